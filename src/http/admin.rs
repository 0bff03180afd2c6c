//! Usage reports and the admin API: `GET /v1/usage` (the caller's own), and under `/admin`
//! (behind `POE_GATEWAY_ADMIN_KEY`): keys and everyone's usage.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::App;
use super::routes::{HttpResponse, authorization_bearer, json, method_not_allowed, read_body};
use crate::error::GatewayError;
use crate::gateway::Caller;
use crate::gateway::keys::{self, NewKey};
use crate::gateway::models;
use crate::ledger::report::parse_when;
use crate::ledger::{GroupBy, KeyRecord, ReportQuery, now_ms};

/// Default report window when `since` is not given.
const DEFAULT_WINDOW_MS: i64 = 30 * 86_400_000;

/// `GET /v1/usage?since=&until=&group_by=`: the caller's own usage. In `open` mode every
/// caller is the same caller, so that is all usage.
pub(crate) async fn own_usage(
    app: &App,
    req: &Request<Incoming>,
    caller: &Caller,
) -> Result<HttpResponse, GatewayError> {
    let q = report_query(req.uri().query(), &["since", "until", "group_by"])?;
    let report = app.gateway.usage_report(caller, q).await?;
    Ok(json_value(StatusCode::OK, &report))
}

/// Everything under `/admin`.
pub(crate) async fn handle(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, GatewayError> {
    check_admin(app, req.headers(), "the admin API")?;
    let path = req.uri().path().to_string();
    // HEAD is GET without the body, here as on every other route.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    match (method, path.as_str()) {
        (Method::GET, "/admin/keys") => {
            let keys = all_keys(app).await?;
            Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"object": "list", "data": keys}),
            ))
        }
        (Method::POST, "/admin/keys") => {
            let timeout = app.gateway.policy().server.body_read_timeout;
            let (body, _held) =
                read_body(req, NEW_KEY_BODY_LIMIT, timeout, app.gateway.body_budget()).await?;
            // Through serde_path_to_error, so a wrong field is named as the error's `param`.
            let mut de = serde_json::Deserializer::from_slice(&body);
            let new: NewKey = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let message = format!("invalid key request: {}", e.inner());
                let field = e.path().to_string();
                match [
                    "name",
                    "budget_usd",
                    "period",
                    "rpm",
                    "models",
                    "expires_at",
                    "expires_in",
                ]
                .into_iter()
                .find(|f| field == *f || field.starts_with(&format!("{f}[")))
                {
                    Some(f) => GatewayError::bad_param(f, message),
                    None => GatewayError::bad_request(message),
                }
            })?;
            de.end()
                .map_err(|e| GatewayError::bad_request(format!("invalid key request: {e}")))?;
            // Checked before the key is made: a client that gives up while the catalogue is
            // read must not leave a key behind whose secret it never saw.
            let warning = match &new.models {
                Some(names) => model_list_warning(app, names).await,
                None => None,
            };
            let (rec, key) = keys::create_key(app.gateway.ledger().store(), new).await?;
            let mut v = serde_json::to_value(&rec).unwrap_or_default();
            // The only time the key is ever shown.
            v["key"] = serde_json::Value::String(key);
            if let Some(w) = warning {
                tracing::warn!(key_id = %rec.id, "new key: {w}");
                v["warnings"] = serde_json::json!([w]);
            }
            Ok(with_secret(json_value(StatusCode::CREATED, &v)))
        }
        (Method::POST, p) if rotate_path(p).is_some() => {
            let which = rotate_path(p).unwrap_or_default();
            let which = percent_encoding::percent_decode_str(which)
                .decode_utf8_lossy()
                .into_owned();
            let Some((old, rec, key)) =
                keys::rotate_key(app.gateway.ledger().store(), &which).await?
            else {
                return Err(GatewayError::NotFound(format!(
                    "no active key with id or name `{which}`"
                )));
            };
            app.gateway.keys().invalidate(&old.hash).await;
            let mut v = serde_json::to_value(&rec).unwrap_or_default();
            // The only time the new key is ever shown.
            v["key"] = serde_json::Value::String(key);
            Ok(with_secret(json_value(StatusCode::OK, &v)))
        }
        (Method::DELETE, p) if p.starts_with("/admin/keys/") && rotate_path(p).is_none() => {
            let which = percent_encoding::percent_decode_str(&p["/admin/keys/".len()..])
                .decode_utf8_lossy()
                .into_owned();
            let revoked = revoke(app, &which).await?;
            if revoked.is_empty() {
                return Err(GatewayError::NotFound(format!(
                    "no active key with id or name `{which}`"
                )));
            }
            Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"object": "list", "data": revoked}),
            ))
        }
        (Method::DELETE, "/admin/cache") => {
            // All entries, or one key's (`?key_id=`, an id or a name).
            only_params(req.uri().query(), &["key_id"])?;
            let scope = match query_param(req.uri().query(), "key_id") {
                // Shared answers are stored under no key: a key's purge would find none of
                // them, and say it purged.
                Some(_) if app.gateway.policy().cache.shared => {
                    return Err(GatewayError::bad_param(
                        "key_id",
                        "with cache.shared = true every key shares the cached answers, which \
                         belong to no key: purge them all (no key_id)",
                    ));
                }
                Some(which) => Some(key_id(app, &which, true).await?),
                None => None,
            };
            app.gateway.cache().purge(scope.as_deref()).await;
            Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"purged": scope.unwrap_or_else(|| "all".into())}),
            ))
        }
        (Method::GET, "/admin/usage") => {
            let mut q = report_query(req.uri().query(), &["since", "until", "group_by", "key_id"])?;
            q.key_id = match query_param(req.uri().query(), "key_id") {
                Some(which) => Some(key_id(app, &which, false).await?),
                None => None,
            };
            report(app, &q).await
        }
        (m, p) => match allowed_methods(p) {
            Some(allow) => Ok(method_not_allowed(&m, p, allow)),
            None => Err(GatewayError::NotFound(format!(
                "Unknown request URL: {m} {p}"
            ))),
        },
    }
}

/// A new key's model list checked against Poe's catalogue (see [`models::model_list_warning`]),
/// waiting for it at most [`CATALOGUE_CHECK_WAIT`].
async fn model_list_warning(app: &App, names: &[String]) -> Option<String> {
    let catalogue = tokio::time::timeout(CATALOGUE_CHECK_WAIT, app.gateway.models())
        .await
        .unwrap_or_else(|_| {
            Err(GatewayError::UpstreamTimeout(format!(
                "no answer within {}s",
                CATALOGUE_CHECK_WAIT.as_secs()
            )))
        });
    models::model_list_warning(catalogue.as_deref(), app.gateway.aliases(), names)
}

/// The longest a new key waits for Poe's catalogue to check its model list.
const CATALOGUE_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest `POST /admin/keys` body.
const NEW_KEY_BODY_LIMIT: u64 = 64 * 1024;

/// The methods a known admin path answers, for 405 and `Allow`.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/admin/keys" => Some("GET, POST"),
        "/admin/usage" => Some("GET"),
        "/admin/cache" => Some("DELETE"),
        p if rotate_path(p).is_some() => Some("POST"),
        p if p.starts_with("/admin/keys/") => Some("DELETE"),
        _ => None,
    }
}

/// The key (id or name, percent-encoded) of `/admin/keys/{key}/rotate`. A name with a `/` in
/// it comes encoded (`%2F`), so the path's last segment tells the route.
fn rotate_path(path: &str) -> Option<&str> {
    path.strip_prefix("/admin/keys/")?
        .strip_suffix("/rotate")
        .filter(|which| !which.is_empty() && !which.contains('/'))
}

/// The id of the key `which` names, by id or by name (as `keys revoke` takes them): a filter
/// that matches no key is a 400, not an empty report or a purge of nothing. A name that
/// several keys have had (revoked ones keep theirs) must be given as an id.
/// `open_scope`: the open mode's cache scope, `open`, is a scope here too.
async fn key_id(app: &App, which: &str, open_scope: bool) -> Result<String, GatewayError> {
    let keys = all_keys(app).await?;
    keys::key_id_of(&keys, which, open_scope).map_err(|e| GatewayError::bad_param("key_id", e))
}

async fn all_keys(app: &App) -> Result<Vec<KeyRecord>, GatewayError> {
    app.gateway
        .ledger()
        .store()
        .list_keys()
        .await
        .map_err(|e| GatewayError::internal("listing keys", &e))
}

async fn revoke(app: &App, which: &str) -> Result<Vec<KeyRecord>, GatewayError> {
    let revoked = app
        .gateway
        .ledger()
        .store()
        .revoke_key(which, now_ms())
        .await
        .map_err(|e| GatewayError::internal("revoking the key", &e))?;
    for k in &revoked {
        app.gateway.keys().invalidate(&k.hash).await;
    }
    Ok(revoked)
}

/// The admin key, compared in constant time. Gateway keys and Poe keys are refused here.
/// `what` names the route in the error message.
pub(crate) fn check_admin(app: &App, headers: &HeaderMap, what: &str) -> Result<(), GatewayError> {
    let Some(admin) = app.gateway.admin_key() else {
        return Err(GatewayError::AdminDisabled(format!(
            "{what} needs the admin key, and none is configured: set POE_GATEWAY_ADMIN_KEY to enable it"
        )));
    };
    // `Authorization` only: the admin key does not belong in an Anthropic client's
    // `x-api-key`, and proxies in front may guard the admin routes by that header.
    let presented = authorization_bearer(headers).map_or(&b""[..], str::as_bytes);
    if bool::from(presented.ct_eq(admin.expose().as_bytes())) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized(format!(
            "{what} needs the admin key: send `Authorization: Bearer <POE_GATEWAY_ADMIN_KEY>`"
        )))
    }
}

async fn report(app: &App, q: &ReportQuery) -> Result<HttpResponse, GatewayError> {
    // Rows finished a moment ago are still on the ledger queue; a report should include them.
    app.gateway.flush().await;
    let report = app
        .gateway
        .ledger()
        .store()
        .report(q)
        .await
        .map_err(|e| GatewayError::internal("the usage report", &e))?;
    Ok(json_value(StatusCode::OK, &report))
}

/// A parameter the route does not know is a 400: a typo (`groupby`, `key`) would otherwise
/// give everyone's totals, ungrouped, as if it were the answer.
fn only_params(query: Option<&str>, known: &[&str]) -> Result<(), GatewayError> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !known.contains(&name) {
            return Err(GatewayError::bad_request(format!(
                "unknown query parameter `{}`; this route takes {}",
                super::browser::shown(name),
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}

fn report_query(query: Option<&str>, known: &[&str]) -> Result<ReportQuery, GatewayError> {
    only_params(query, known)?;
    let now = now_ms();
    let when = |name: &'static str, default: i64| -> Result<i64, GatewayError> {
        match query_param(query, name) {
            Some(v) => parse_when(&v, now).map_err(|e| GatewayError::bad_param(name, e)),
            None => Ok(default),
        }
    };
    let since_ms = when("since", now - DEFAULT_WINDOW_MS)?;
    let until_ms = when("until", now + 1)?;
    // The error names the bound the caller gave (a `since` in the future, with `until` left
    // to its default, is the `since`'s fault).
    let given = if query_param(query, "until").is_some() {
        "until"
    } else {
        "since"
    };
    crate::ledger::report::check_window(since_ms, until_ms)
        .map_err(|e| GatewayError::bad_param(given, e))?;
    let group_by = match query_param(query, "group_by") {
        None => None,
        Some(g) => Some(GroupBy::parse(&g).ok_or_else(|| {
            GatewayError::bad_param("group_by", "`group_by` must be model, day, key or api")
        })?),
    };
    Ok(ReportQuery {
        since_ms,
        until_ms,
        key_id: None,
        group_by,
    })
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// A response that carries a new key: no cache on the way (a proxy's, the client's) may keep
/// it.
fn with_secret(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn json_value(status: StatusCode, v: &impl serde::Serialize) -> HttpResponse {
    json(
        status,
        Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    )
}
