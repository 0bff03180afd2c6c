//! The parts of Anthropic's API that Poe does not serve but its clients ask for: token
//! counting (`POST /v1/messages/count_tokens`, which Claude Code calls) and the model list in
//! Anthropic's shape (what `client.models.list()` of the Anthropic SDKs reads). Both are
//! answered here from what the gateway already has; neither calls Poe or costs anything.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::App;
use super::routes::{HttpResponse, authenticate, json as json_response, read_body};
use crate::error::GatewayError;
use crate::gateway::alias::Route;
use crate::gateway::completion::estimated_tokens;
use crate::gateway::models::Catalogue;
use crate::gateway::request::prompt_text;
use crate::gateway::{ChatRequest, Endpoint};

/// Says that a count is the gateway's estimate, not a tokenizer's.
pub(crate) const TOKENS_HEADER: &str = "x-poe-gateway-tokens";

/// Tokens counted for an image or document, whatever its size: Anthropic's images cost about
/// width × height / 750 tokens and are scaled down past about 1.15 megapixels, so a large
/// image is about this many. The bytes of its base64 say nothing of its dimensions.
const ATTACHMENT_TOKENS: u64 = 1_600;

/// `POST /v1/messages/count_tokens`: the input tokens of a Messages request, estimated the
/// way the ledger estimates a prompt Poe reported no usage for (a token per 4 bytes of the
/// request's strings) plus [`ATTACHMENT_TOKENS`] per attachment. Poe has no counting route,
/// and Anthropic documents its own count as an estimate too. The body is checked as a
/// Messages request (a `model` and non-empty `messages`), and a gateway key may count only
/// for the models it may use; nothing is charged or recorded.
pub(crate) async fn count_tokens(
    app: &App,
    req: Request<Incoming>,
    request_id: &Arc<str>,
) -> Result<HttpResponse, GatewayError> {
    let caller = authenticate(app, req.headers(), request_id).await?;
    let policy = app.gateway.policy();
    let (body, _held) = read_body(
        req,
        policy.server.max_body_bytes.0,
        policy.server.body_read_timeout,
        app.gateway.body_budget(),
    )
    .await?;
    let parsed = ChatRequest::parse_for(Endpoint::Messages, body)?;
    if let Some(rec) = &caller.key {
        let model = parsed.model();
        let direct;
        let bots: &[String] = match app.gateway.aliases().resolve(model) {
            Route::Alias { bots, .. } => bots,
            Route::Direct(m) => {
                direct = [m.to_string()];
                &direct
            }
        };
        app.gateway.keys().check_model(rec, model, bots)?;
    }
    let text = prompt_text(parsed.body())?;
    let tokens =
        estimated_tokens(text.bytes) as u64 + u64::from(text.attachments) * ATTACHMENT_TOKENS;
    let mut resp = json_response(
        StatusCode::OK,
        Bytes::from(format!("{{\"input_tokens\":{tokens}}}")),
    );
    resp.headers_mut()
        .insert(TOKENS_HEADER, HeaderValue::from_static("estimated"));
    Ok(resp)
}

/// Whether a request comes from an Anthropic client: their SDKs send `anthropic-version` on
/// every call, which OpenAI's never do.
pub(crate) fn wants_anthropic_shape(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

/// Most models one page lists, as Anthropic's API allows.
const MAX_PAGE: usize = 1000;
/// Models on a page when the client names no `limit` (Anthropic's default).
const DEFAULT_PAGE: usize = 20;

/// `GET /v1/models` for an Anthropic client: the models the Messages API reaches, in
/// Anthropic's shape and pages (`limit`, `after_id`, `before_id`; `has_more`, `first_id`,
/// `last_id`). Aliases are listed when every bot they try is such a model.
pub(crate) fn model_list(cat: &Catalogue, query: Option<&str>) -> Result<Bytes, GatewayError> {
    let mut limit = DEFAULT_PAGE;
    let (mut after, mut before) = (None, None);
    for (name, value) in query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
    {
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        GatewayError::bad_param(
                            "limit",
                            format!("`limit` must be a whole number from 1 to {MAX_PAGE}"),
                        )
                    })?;
            }
            "after_id" => after = Some(value),
            "before_id" => before = Some(value),
            _ => {}
        }
    }
    let models: Vec<&Value> = cat
        .entries()
        .iter()
        .filter(|e| serves_messages(cat, e))
        .collect();
    let position = |id: &str, param: &'static str| {
        models
            .iter()
            .position(|e| entry_id(e).eq_ignore_ascii_case(id))
            .ok_or_else(|| GatewayError::bad_param(param, format!("no model `{id}` to page from")))
    };
    // A page after `after_id`, or else the one ending before `before_id`, or the first.
    let (start, end) = match (&after, &before) {
        (Some(id), _) => {
            let from = position(id, "after_id")? + 1;
            (from, (from + limit).min(models.len()))
        }
        (None, Some(id)) => {
            let to = position(id, "before_id")?;
            (to.saturating_sub(limit), to)
        }
        (None, None) => (0, limit.min(models.len())),
    };
    let page = &models[start..end];
    let has_more = if before.is_some() && after.is_none() {
        start > 0
    } else {
        end < models.len()
    };
    let data: Vec<Value> = page.iter().map(|e| model_info(e)).collect();
    let first = page.first().map(|e| entry_id(e));
    let last = page.last().map(|e| entry_id(e));
    let body = json!({
        "data": data,
        "has_more": has_more,
        "first_id": first,
        "last_id": last,
    });
    Ok(Bytes::from(body.to_string()))
}

/// `GET /v1/models/{id}` for an Anthropic client.
pub(crate) fn model(cat: &Catalogue, id: &str) -> Result<Bytes, GatewayError> {
    match cat.entry(id).filter(|e| serves_messages(cat, e)) {
        Some(e) => Ok(Bytes::from(model_info(e).to_string())),
        None => Err(GatewayError::NotFound(format!(
            "The model `{id}` does not exist or is not served on /v1/messages"
        ))),
    }
}

fn entry_id(e: &Value) -> &str {
    e.get("id").and_then(Value::as_str).unwrap_or("")
}

/// One entry as Anthropic's `ModelInfo`.
fn model_info(e: &Value) -> Value {
    let id = entry_id(e);
    let display_name = e
        .pointer("/metadata/display_name")
        .and_then(Value::as_str)
        .unwrap_or(id);
    // Poe's `created` is in milliseconds; Anthropic's `created_at` is an RFC 3339 time.
    let created_at = e
        .get("created")
        .and_then(Value::as_i64)
        .and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    json!({
        "type": "model",
        "id": id,
        "display_name": display_name,
        "created_at": created_at,
    })
}

/// Whether Poe's Messages API answers for this entry: one whose `supported_endpoints` name
/// it, or a Claude bot (Poe serves Claude there; its catalogue may not say so), or an alias
/// whose every bot is one.
fn serves_messages(cat: &Catalogue, e: &Value) -> bool {
    if let Some(bots) = e.get("alias_of").and_then(Value::as_array) {
        return !bots.is_empty()
            && bots.iter().all(|b| {
                b.as_str()
                    .and_then(|b| cat.entry(b))
                    .is_some_and(|t| t.get("alias_of").is_none() && serves_messages(cat, t))
            });
    }
    let listed = e
        .get("supported_endpoints")
        .and_then(Value::as_array)
        .is_some_and(|eps| {
            eps.iter()
                .filter_map(Value::as_str)
                .any(|p| p.trim_end_matches('/').ends_with("messages"))
        });
    let claude = e
        .get("owned_by")
        .and_then(Value::as_str)
        .is_some_and(|o| o.eq_ignore_ascii_case("anthropic"))
        || entry_id(e)
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("claude"));
    listed || claude
}
