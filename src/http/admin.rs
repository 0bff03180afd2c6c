//! Usage reports and the admin API: `GET /v1/usage` (the caller's own), and under `/admin`
//! (behind `POE_GATEWAY_ADMIN_KEY`): keys and everyone's usage.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::App;
use super::routes::{HttpResponse, json};
use crate::error::GatewayError;
use crate::gateway::Caller;
use crate::gateway::keys::{self, NewKey};
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
    let q = report_query(req.uri().query())?;
    let report = app.gateway.usage_report(caller, q).await?;
    Ok(json_value(StatusCode::OK, &report))
}

/// Everything under `/admin`.
pub(crate) async fn handle(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, GatewayError> {
    check_admin(app, req.headers())?;
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/admin/keys") => {
            let keys = app
                .gateway
                .ledger()
                .store()
                .list_keys()
                .await
                .map_err(|e| GatewayError::Internal(format!("listing keys failed: {e}")))?;
            Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"object": "list", "data": keys}),
            ))
        }
        (Method::POST, "/admin/keys") => {
            let body = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                Limited::new(req.into_body(), 64 * 1024).collect(),
            )
            .await
            .map_err(|_| GatewayError::bad_request("request body not received in time"))?
            .map_err(|e| GatewayError::bad_request(format!("could not read the body: {e}")))?
            .to_bytes();
            let new: NewKey = serde_json::from_slice(&body)
                .map_err(|e| GatewayError::bad_request(format!("invalid key request: {e}")))?;
            let (rec, key) = keys::create_key(app.gateway.ledger().store(), new).await?;
            let mut v = serde_json::to_value(&rec).unwrap_or_default();
            // The only time the key is ever shown.
            v["key"] = serde_json::Value::String(key);
            Ok(json_value(StatusCode::CREATED, &v))
        }
        (Method::DELETE, p) if p.starts_with("/admin/keys/") => {
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
            // All entries, or one key's (`?key_id=`).
            let scope = query_param(req.uri().query(), "key_id");
            app.gateway.cache().purge(scope.as_deref());
            Ok(json_value(
                StatusCode::OK,
                &serde_json::json!({"purged": scope.unwrap_or_else(|| "all".into())}),
            ))
        }
        (Method::GET, "/admin/usage") => {
            let mut q = report_query(req.uri().query())?;
            q.key_id = query_param(req.uri().query(), "key_id");
            report(app, &q).await
        }
        (m, p) => Err(GatewayError::NotFound(format!(
            "Unknown request URL: {m} {p}"
        ))),
    }
}

async fn revoke(app: &App, which: &str) -> Result<Vec<KeyRecord>, GatewayError> {
    let revoked = app
        .gateway
        .ledger()
        .store()
        .revoke_key(which, now_ms())
        .await
        .map_err(|e| GatewayError::Internal(format!("revoking failed: {e}")))?;
    for k in &revoked {
        app.gateway.keys().invalidate(&k.hash).await;
    }
    Ok(revoked)
}

/// The admin key, compared in constant time. Gateway keys and Poe keys are refused here.
fn check_admin(app: &App, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(admin) = app.gateway.admin_key() else {
        return Err(GatewayError::Forbidden(
            "the admin API is disabled: set POE_GATEWAY_ADMIN_KEY to enable it".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.trim()
                .strip_prefix("Bearer ")
                .or_else(|| v.trim().strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(admin.expose().as_bytes())) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized(
            "the admin API needs the admin key".into(),
        ))
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
        .map_err(|e| GatewayError::Internal(format!("usage report failed: {e}")))?;
    Ok(json_value(StatusCode::OK, &report))
}

fn report_query(query: Option<&str>) -> Result<ReportQuery, GatewayError> {
    let now = now_ms();
    let when = |name: &'static str, default: i64| -> Result<i64, GatewayError> {
        match query_param(query, name) {
            Some(v) => parse_when(&v, now).map_err(|e| GatewayError::bad_param(name, e)),
            None => Ok(default),
        }
    };
    let since_ms = when("since", now - DEFAULT_WINDOW_MS)?;
    let until_ms = when("until", now + 1)?;
    let group_by = match query_param(query, "group_by") {
        None => None,
        Some(g) => Some(GroupBy::parse(&g).ok_or_else(|| {
            GatewayError::bad_param("group_by", "`group_by` must be model, day or key")
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

fn json_value(status: StatusCode, v: &impl serde::Serialize) -> HttpResponse {
    json(
        status,
        Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    )
}
