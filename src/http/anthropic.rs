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
use crate::gateway::alias::Route;
use crate::gateway::completion::estimated_tokens;
use crate::gateway::models::{Catalogue, poe_id_of_anthropic_model, same_bot};
use crate::gateway::{ChatRequest, Endpoint};

/// Says that a count is the gateway's estimate, not a tokenizer's.
pub(crate) const TOKENS_HEADER: &str = "x-poe-gateway-tokens";

/// `POST /v1/messages/count_tokens`: the input tokens of a Messages request, estimated (see
/// [`estimate`]). Poe has no counting route, and Anthropic documents its own count as an
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
    // Parsed whole, unlike a request on its way to Poe: a count reads every block's type.
    let doc: Value = serde_json::from_slice(parsed.body())
        .map_err(|e| GatewayError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let mut resp = json_response(
        StatusCode::OK,
        Bytes::from(format!("{{\"input_tokens\":{}}}", estimate(&doc))),
    );
    resp.headers_mut()
        .insert(TOKENS_HEADER, HeaderValue::from_static("estimated"));
    Ok(resp)
}

/// Tokens for media whose size the gateway cannot see (an image by URL or file id, an image
/// it cannot read): about what a large image costs, as Anthropic scales images down to about
/// 1.15 megapixels.
const MEDIA_TOKENS: u64 = 1_600;
/// Tokens per PDF page: Anthropic reads each page as an image and as text, "typically 1,500
/// to 3,000 tokens per page".
const PDF_PAGE_TOKENS: u64 = 2_000;
/// Bytes per PDF page, when the pages cannot be counted (their objects compressed).
const PDF_PAGE_BYTES: u64 = 60_000;

/// The input tokens of a Messages request body: a token per 4 bytes of its strings (keys
/// included, as the ledger estimates a prompt Poe reported no usage for), except that
/// - a base64 image counts by its size, as Anthropic prices images (width × height / 750,
///   scaled to at most 1,568 pixels a side and about 1,600 tokens);
/// - a base64 PDF counts [`PDF_PAGE_TOKENS`] a page;
/// - an image or document by URL or file id counts [`MEDIA_TOKENS`];
/// - a thinking block's `signature` and a `redacted_thinking` block count nothing (they are
///   not read as text).
pub(crate) fn estimate(doc: &Value) -> u64 {
    let mut count = Count::default();
    count.walk(doc);
    estimated_tokens(count.text_bytes) as u64 + count.media_tokens
}

#[derive(Default)]
struct Count {
    text_bytes: u64,
    media_tokens: u64,
}

impl Count {
    fn walk(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.text_bytes += s.len() as u64,
            Value::Array(items) => items.iter().for_each(|i| self.walk(i)),
            Value::Object(o) => {
                match o.get("type").and_then(Value::as_str) {
                    Some("redacted_thinking") => return,
                    Some("image" | "document") => {
                        if let Some(source) = o.get("source").filter(|s| s.is_object()) {
                            self.source(source);
                            return;
                        }
                    }
                    _ => {}
                }
                for (k, v) in o {
                    if k == "signature" && o.get("type").and_then(Value::as_str) == Some("thinking")
                    {
                        continue;
                    }
                    self.text_bytes += k.len() as u64;
                    self.walk(v);
                }
            }
            _ => {}
        }
    }

    /// An image's or document's `source`.
    fn source(&mut self, source: &Value) {
        let field = |name: &str| source.get(name).and_then(Value::as_str);
        match field("type") {
            Some("base64") => {
                let data = field("data").unwrap_or("");
                self.media_tokens += match field("media_type") {
                    Some("application/pdf") => pdf_tokens(data),
                    _ => image_tokens(data).unwrap_or(MEDIA_TOKENS),
                };
            }
            // A plain-text document, or one of content blocks: text like any other.
            Some("text") => self.walk(source.get("data").unwrap_or(&Value::Null)),
            Some("content") => self.walk(source.get("content").unwrap_or(&Value::Null)),
            _ => self.media_tokens += MEDIA_TOKENS,
        }
    }
}

fn decode(data: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(data).ok()
}

/// An image's tokens by Anthropic's formula, from the dimensions in its header (PNG, JPEG,
/// GIF, WebP); `None` when they cannot be read.
fn image_tokens(data: &str) -> Option<u64> {
    let bytes = decode(data)?;
    let (w, h) = image_size(&bytes)?;
    if w == 0 || h == 0 {
        return None;
    }
    let (mut w, mut h) = (w as f64, h as f64);
    let long = w.max(h);
    if long > 1568.0 {
        (w, h) = (w * 1568.0 / long, h * 1568.0 / long);
    }
    Some(((w * h / 750.0).ceil() as u64).clamp(1, MEDIA_TOKENS))
}

/// Width and height from an image's header.
fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let be16 = |i: usize| {
        Some(u32::from(u16::from_be_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let le16 = |i: usize| {
        Some(u32::from(u16::from_le_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let le24 = |i: usize| {
        let s = b.get(i..i + 3)?;
        Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some((be32(16)?, be32(20)?));
    }
    if b.starts_with(b"GIF8") {
        return Some((le16(6)?, le16(8)?));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        return match b.get(12..16)? {
            b"VP8X" => Some((le24(24)? + 1, le24(27)? + 1)),
            b"VP8 " => Some((le16(26)? & 0x3fff, le16(28)? & 0x3fff)),
            b"VP8L" => {
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            _ => None,
        };
    }
    if b.starts_with(&[0xff, 0xd8]) {
        // JPEG: the segments up to a start-of-frame marker, which holds the size.
        let mut i = 2;
        while i + 9 < b.len() {
            if b[i] != 0xff {
                return None;
            }
            let marker = b[i + 1];
            let len = be16(i + 2)? as usize;
            if matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc) {
                return Some((be16(i + 7)?, be16(i + 5)?));
            }
            i += 2 + len;
        }
    }
    None
}

/// A PDF's tokens: [`PDF_PAGE_TOKENS`] for each page object, or for each
/// [`PDF_PAGE_BYTES`] when its pages are inside compressed object streams.
fn pdf_tokens(data: &str) -> u64 {
    let Some(bytes) = decode(data) else {
        return MEDIA_TOKENS;
    };
    let mut pages = 0u64;
    for needle in [&b"/Type /Page"[..], b"/Type/Page"] {
        pages += memchr::memmem::find_iter(&bytes, needle)
            .filter(|&at| bytes.get(at + needle.len()) != Some(&b's'))
            .count() as u64;
    }
    if pages == 0 {
        pages = (bytes.len() as u64).div_ceil(PDF_PAGE_BYTES).max(1);
    }
    pages * PDF_PAGE_TOKENS
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
        models
            .iter()
            .position(|e| same_bot(entry_id(e), id))
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
    match messages_models(cat)
        .into_iter()
        .find(|e| same_bot(entry_id(e), id))
    {
        Some(e) => Ok(Bytes::from(model_info(e).to_string())),
        None => Err(GatewayError::NotFound(format!(
            "The model `{id}` does not exist or is not served on /v1/messages"
        ))),
    }
}

/// The catalogue's entries that Poe's Messages API serves, in its order, each name once
/// (case-insensitively). An alias named like a bot stands in the bot's place: a request of
/// that name reaches the alias.
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
        .map(|t| if t < 100_000_000_000 { t * 1000 } else { t })
        .and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
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
        Some(e) => e.get("alias_of").is_none() && serves_messages(cat, e),
        None => is_claude(bot),
    }
}

fn is_claude(name: &str) -> bool {
    name.get(..6)
        .is_some_and(|p| p.eq_ignore_ascii_case("claude"))
}
