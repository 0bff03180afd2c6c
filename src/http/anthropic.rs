//! The parts of Anthropic's API that Poe does not serve but its clients ask for: token
//! counting (`POST /v1/messages/count_tokens`, which Claude Code calls) and the model list in
//! Anthropic's shape (what `client.models.list()` of the Anthropic SDKs reads). Both are
//! answered here from what the gateway already has; neither calls Poe or costs anything.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::App;
use super::routes::{HttpResponse, authenticate, json as json_response, read_body};
use crate::error::GatewayError;
use crate::gateway::models::{Catalogue, poe_id_of_anthropic_model, same_bot};
use crate::gateway::{ChatRequest, Endpoint};

/// Says that a count is the gateway's estimate, not a tokenizer's.
pub(crate) const TOKENS_HEADER: &str = "x-poe-gateway-tokens";

/// `POST /v1/messages/count_tokens`: the input tokens of a Messages request, estimated (see
/// [`super::token_count`]). Poe has no counting route, and Anthropic documents its own count as an
/// estimate too. The body is checked as a Messages request (a `model` and non-empty
/// `messages`), and a gateway key may count only for the models it may use; nothing is
/// charged or recorded.
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
        // A name that is no alias is checked as itself: it has no bots of its own.
        let model = parsed.model();
        let route = app.gateway.aliases().resolve(model);
        app.gateway.keys().check_model(rec, model, route.bots())?;
    }
    // Read in one pass, nothing kept but what a block's kind depends on.
    let tokens = super::token_count::estimate(parsed.body())
        .map_err(|e| GatewayError::bad_request(format!("request body is not valid JSON: {e}")))?;
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
    let models = messages_models(cat);
    let position = |id: &str, param: &'static str| {
        find(&models, id)
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

/// `GET /v1/models/{id}` for an Anthropic client. An Anthropic model id finds the Poe bot it
/// stands for, as it does on the Messages API.
pub(crate) fn model(cat: &Catalogue, id: &str) -> Result<Bytes, GatewayError> {
    let models = messages_models(cat);
    match find(&models, id) {
        Some(i) => Ok(Bytes::from(model_info(models[i]).to_string())),
        None => Err(GatewayError::NotFound(format!(
            "The model `{id}` does not exist or is not served on /v1/messages"
        ))),
    }
}

/// Where `id` is in `models`: its own name (any case), or else the name of the bot it stands
/// for (an Anthropic model id), as on the Messages API.
fn find(models: &[&Value], id: &str) -> Option<usize> {
    models
        .iter()
        .position(|e| entry_id(e).eq_ignore_ascii_case(id))
        .or_else(|| models.iter().position(|e| same_bot(entry_id(e), id)))
}

/// The catalogue's entries that Poe's Messages API serves, in its order, each name once
/// (case-insensitively): an alias named like a bot stands in the bot's place, as a request of
/// that name reaches the alias. With each name once, and [`find`] trying names before the
/// bots they stand for, paging by id never goes back.
fn messages_models(cat: &Catalogue) -> Vec<&Value> {
    let mut out: Vec<&Value> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for e in cat.entries() {
        match at.entry(entry_id(e).to_ascii_lowercase()) {
            Entry::Occupied(i) => out[*i.get()] = e,
            Entry::Vacant(v) => {
                v.insert(out.len());
                out.push(e);
            }
        }
    }
    out.retain(|e| serves_messages(cat, e));
    out
}

fn entry_id(e: &Value) -> &str {
    e.get("id").and_then(Value::as_str).unwrap_or("")
}

/// One entry as Anthropic's `ModelInfo`.
fn model_info(e: &Value) -> Value {
    let id = entry_id(e);
    // An alias is shown by its own name, not its bot's.
    let display_name = match e.get("alias_of") {
        Some(_) => id,
        None => e
            .pointer("/metadata/display_name")
            .and_then(Value::as_str)
            .unwrap_or(id),
    };
    // Poe's `created` is in milliseconds (read as seconds when too small to be); Anthropic's
    // `created_at` is an RFC 3339 time.
    let created_at = e
        .get("created")
        .and_then(Value::as_i64)
        .map(|t| {
            if (0..100_000_000_000).contains(&t) {
                i128::from(t) * 1000
            } else {
                i128::from(t)
            }
        })
        .and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    let mut info = json!({
        "type": "model",
        "id": id,
        "display_name": display_name,
        "created_at": created_at,
    });
    for (theirs, ours) in [
        ("max_input_tokens", "/context_window/context_length"),
        ("max_tokens", "/context_window/max_output_tokens"),
    ] {
        if let Some(n) = e.pointer(ours).and_then(Value::as_u64) {
            info[theirs] = n.into();
        }
    }
    info
}

/// Whether Poe's Messages API answers for this entry: one whose `supported_endpoints` name
/// it, or a Claude bot (Poe serves Claude there; its catalogue may not say so), or an alias
/// whose every bot is one.
fn serves_messages(cat: &Catalogue, e: &Value) -> bool {
    if let Some(bots) = e.get("alias_of").and_then(Value::as_array) {
        return !bots.is_empty()
            && bots
                .iter()
                .all(|b| b.as_str().is_some_and(|b| bot_serves_messages(cat, b)));
    }
    fields_serve_messages(e)
}

/// Whether an entry's own fields say it serves the Messages API.
fn fields_serve_messages(e: &Value) -> bool {
    let listed = e
        .get("supported_endpoints")
        .and_then(Value::as_array)
        .is_some_and(|eps| {
            eps.iter()
                .filter_map(Value::as_str)
                .any(|p| p.trim_end_matches('/').ends_with("messages"))
        });
    let anthropic = e
        .get("owned_by")
        .and_then(Value::as_str)
        .is_some_and(|o| o.eq_ignore_ascii_case("anthropic"));
    listed || anthropic || is_claude(entry_id(e))
}

/// An alias's bot: a catalogue bot that [`serves_messages`] (by its Poe name or its Anthropic
/// model id), or else one named like Claude (Poe takes Anthropic's ids it does not list).
fn bot_serves_messages(cat: &Catalogue, bot: &str) -> bool {
    let poe = poe_id_of_anthropic_model(bot);
    match cat.entry(poe.as_deref().unwrap_or(bot)) {
        // An alias named like the bot stands in the bot's entry, with the bot's fields
        // (its chain is not followed again: it names the bot itself).
        Some(e) => fields_serve_messages(e),
        None => is_claude(bot),
    }
}

fn is_claude(name: &str) -> bool {
    name.get(..6)
        .is_some_and(|p| p.eq_ignore_ascii_case("claude"))
}
