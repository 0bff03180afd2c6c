//! The chat request as the gateway sees it: the client's bytes, plus the few fields it reads.
//!
//! Only the top level is parsed, into raw slices of the body. The upstream body is then the
//! client's bytes with the `model` value spliced out and the bot's name spliced in, so every
//! field the gateway does not know (bot parameters, attachments, tools) goes to Poe byte for
//! byte, and a 50 MiB attachment is copied once rather than parsed into a tree and printed again.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::json::TopLevel;

use crate::error::GatewayError;

/// The API a request speaks. Each goes to Poe's route of the same name, through the same
/// aliases, limits, retries and accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    #[default]
    ChatCompletions,
    /// `POST /v1/responses`, the Responses API (what the OpenAI Agents SDK and Codex speak).
    /// Never answered from the cache: Poe stores each response for later ones to build on.
    Responses,
    /// `POST /v1/messages`, Anthropic's Messages API (what the Anthropic SDKs and Claude Code
    /// speak; Poe serves Claude bots on it). Its usage comes in two events, its errors in
    /// Anthropic's shape. Not cached: prompt caching and tool loops make repeats rare, and a
    /// replay would need the API's own event names.
    Messages,
}

impl Endpoint {
    /// The path, as the client and Poe both know it.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
        }
    }

    /// The name its requests' ledger rows are kept under.
    pub fn api(self) -> crate::ledger::Api {
        match self {
            Endpoint::ChatCompletions => crate::ledger::Api::Chat,
            Endpoint::Responses => crate::ledger::Api::Responses,
            Endpoint::Messages => crate::ledger::Api::Messages,
        }
    }

    /// The endpoint of a request path, if it is one.
    pub fn of_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/responses" => Some(Endpoint::Responses),
            "/v1/messages" => Some(Endpoint::Messages),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    body: Bytes,
    endpoint: Endpoint,
    /// Where the `model` value (quotes included) sits in `body`.
    model_span: Range<usize>,
    model: String,
    stream: bool,
    /// Where `stream_options` sits, when the client sent it.
    stream_options_span: Option<Range<usize>>,
    include_usage: bool,
    temperature: Option<f64>,
    has_seed: bool,
    cache: super::cache::CacheDirectives,
    max_tokens: Option<u64>,
    /// Bytes inside the body's strings, encoded media left out: the text a prompt estimate
    /// starts from when Poe's usage is missing.
    text_bytes: u64,
    /// Client headers that go to Poe as they came: the Messages API's version and beta
    /// flags. Boxed and rare, so a chat request carries one pointer.
    forward: Option<Box<http::HeaderMap>>,
}

/// The Messages API's request headers, passed to Poe: the API version the client was
/// written against, and the beta features it turns on (Claude Code sends several).
pub const FORWARDED_HEADERS: [&str; 2] = ["anthropic-version", "anthropic-beta"];

/// Sent when the client named no version, which Poe's Messages API requires (the SDKs send
/// one; a hand-written request may not): the one Anthropic's API has answered since 2023.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// The headers of `from` that a request to `endpoint` passes on to Poe, if any.
pub fn forwarded_headers(
    endpoint: Endpoint,
    from: &http::HeaderMap,
) -> Option<Box<http::HeaderMap>> {
    if endpoint != Endpoint::Messages {
        return None;
    }
    let mut kept = http::HeaderMap::new();
    for name in FORWARDED_HEADERS {
        for v in from.get_all(name) {
            kept.append(name, v.clone());
        }
    }
    if !kept.contains_key(FORWARDED_HEADERS[0]) {
        kept.insert(
            FORWARDED_HEADERS[0],
            http::HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
        );
    }
    Some(Box::new(kept))
}

/// Longest `model` accepted. Poe's bot names are a few dozen characters.
pub(crate) const MAX_MODEL_LEN: usize = 256;

/// Whether `name` may be a model or bot name: short and printable. The name goes into the
/// ledger, logs and metrics: a NUL is refused by Postgres (the whole batch of rows with it),
/// and a control character would forge log lines. Requests and the policy's aliases both
/// follow it.
pub(crate) fn is_bot_name(name: &str) -> bool {
    name.len() <= MAX_MODEL_LEN && !name.chars().any(char::is_control)
}

impl ChatRequest {
    /// Parses and checks a chat completion body. Errors are 400s that name the field.
    pub fn parse(body: Bytes) -> Result<ChatRequest, GatewayError> {
        ChatRequest::parse_for(Endpoint::ChatCompletions, body)
    }

    /// Parses and checks a body for `endpoint`. A Responses body needs only `model` (its
    /// input may be `input`, a stored prompt or a previous response); its `stream_options`
    /// are its own, so no usage is asked for (its last event carries it anyway).
    pub fn parse_for(endpoint: Endpoint, body: Bytes) -> Result<ChatRequest, GatewayError> {
        let text = std::str::from_utf8(&body).map_err(|e| {
            GatewayError::bad_request(format!("request body is not valid UTF-8: {e}"))
        })?;
        let text_bytes = check_depth(&body)?;
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = TopLevel::deserialize(&mut de).map_err(|e| json_error(&e))?;
        de.end().map_err(|e| json_error(&e))?;
        let fields = fields.0;

        let span_of = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            start..start + raw.get().len()
        };
        let find = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);

        let model_raw = find("model").ok_or_else(|| {
            GatewayError::bad_param("model", "you must provide a `model` parameter")
        })?;
        let model: String = serde_json::from_str(model_raw.get())
            .map_err(|_| GatewayError::bad_param("model", "`model` must be a string"))?;
        if model.trim().is_empty() {
            return Err(GatewayError::bad_param(
                "model",
                "`model` must not be empty",
            ));
        }
        if !is_bot_name(&model) {
            return Err(GatewayError::bad_param(
                "model",
                format!(
                    "`model` must be a bot name of at most {MAX_MODEL_LEN} bytes, without control characters"
                ),
            ));
        }
        let chat = endpoint == Endpoint::ChatCompletions;
        if chat || endpoint == Endpoint::Messages {
            let messages = find("messages").ok_or_else(|| {
                GatewayError::bad_param("messages", "you must provide a `messages` parameter")
            })?;
            if !messages.get().starts_with('[') {
                return Err(GatewayError::bad_param(
                    "messages",
                    "`messages` must be an array",
                ));
            }
            if messages.get()[1..].trim_start().starts_with(']') {
                return Err(GatewayError::bad_param(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
        }
        let stream = match find("stream") {
            None => false,
            Some(raw) if raw.get() == "null" => false,
            Some(raw) => serde_json::from_str::<bool>(raw.get())
                .map_err(|_| GatewayError::bad_param("stream", "`stream` must be a boolean"))?,
        };
        let (stream_options_span, include_usage) = match find("stream_options") {
            _ if !chat => (None, false),
            None => (None, false),
            Some(raw) if raw.get() == "null" => (Some(span_of(raw)), false),
            Some(raw) => {
                let opts: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(raw.get()).map_err(|_| {
                        GatewayError::bad_param(
                            "stream_options",
                            "`stream_options` must be an object",
                        )
                    })?;
                let include = match opts.get("include_usage") {
                    None | Some(serde_json::Value::Null) => false,
                    Some(serde_json::Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(GatewayError::bad_param(
                            "stream_options",
                            "`stream_options.include_usage` must be a boolean",
                        ));
                    }
                };
                (Some(span_of(raw)), include)
            }
        };
        let number = |name: &'static str| -> Result<Option<f64>, GatewayError> {
            match find(name) {
                None => Ok(None),
                Some(raw) if raw.get() == "null" => Ok(None),
                Some(raw) => serde_json::from_str::<f64>(raw.get())
                    .map(Some)
                    .map_err(|_| {
                        GatewayError::bad_param(name, format!("`{name}` must be a number"))
                    }),
            }
        };
        let temperature = number("temperature")?;
        let has_seed = find("seed").is_some_and(|raw| raw.get() != "null");
        // Both are checked, whichever is used: a mistyped one must not slip through to Poe.
        let max_tokens = match endpoint {
            Endpoint::ChatCompletions => {
                let max_completion_tokens = number("max_completion_tokens")?;
                max_completion_tokens.or(number("max_tokens")?)
            }
            Endpoint::Responses => number("max_output_tokens")?,
            Endpoint::Messages => number("max_tokens")?,
        }
        .map(|n| n as u64);

        let model_span = span_of(model_raw);
        Ok(ChatRequest {
            endpoint,
            model_span,
            model,
            stream,
            stream_options_span,
            include_usage,
            temperature,
            has_seed,
            cache: Default::default(),
            max_tokens,
            text_bytes,
            body,
            forward: None,
        })
    }

    /// A Responses request's `previous_response_id`, when it names one. Read again from the
    /// body (which parsed before) rather than kept: only keys mode asks, and every request's
    /// future would carry it.
    pub fn previous_response_id(&self) -> Result<Option<String>, GatewayError> {
        if self.endpoint != Endpoint::Responses {
            return Ok(None);
        }
        let text = std::str::from_utf8(&self.body).unwrap_or_default();
        let Ok(fields) = TopLevel::parse(text) else {
            return Ok(None);
        };
        match fields.get("previous_response_id") {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map(Some)
                .map_err(|_| {
                    GatewayError::bad_param(
                        "previous_response_id",
                        "`previous_response_id` must be a string",
                    )
                }),
        }
    }

    /// Bytes of text in the request (its strings, encoded media left out).
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The model name as the client asked for it.
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    /// Whether the client itself asked for a usage chunk at the end of the stream.
    pub fn include_usage(&self) -> bool {
        self.include_usage
    }

    /// The client sent a `seed`: it wants a repeatable answer.
    pub fn has_seed(&self) -> bool {
        self.has_seed
    }

    /// Client headers to send to Poe with the request (see [`FORWARDED_HEADERS`]).
    pub fn forwarded_headers(&self) -> Option<&http::HeaderMap> {
        self.forward.as_deref()
    }

    /// Sets the client headers that go to Poe (see [`forwarded_headers`]).
    pub fn set_forwarded_headers(&mut self, headers: Option<Box<http::HeaderMap>>) {
        self.forward = headers;
    }

    /// The client's cache wishes; the HTTP layer reads them from headers.
    pub fn cache_directives(&self) -> super::cache::CacheDirectives {
        self.cache
    }

    pub fn set_cache_directives(&mut self, d: super::cache::CacheDirectives) {
        self.cache = d;
    }

    pub fn temperature(&self) -> Option<f64> {
        self.temperature
    }

    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn has_stream_options(&self) -> bool {
        self.stream_options_span.is_some()
    }

    /// True when the client streams without asking for usage: the gateway then asks Poe for
    /// it (to account the request) and the tap removes it again before the client sees it.
    pub fn injects_usage(&self) -> bool {
        self.stream && !self.include_usage && self.endpoint == Endpoint::ChatCompletions
    }

    /// The body to send upstream: the client's bytes with `model` set to `bot`, and
    /// `stream_options.include_usage = true` when [`injects_usage`](Self::injects_usage).
    /// When nothing changes the client's `Bytes` are reused without a copy.
    pub fn upstream_body(&self, bot: &str) -> Bytes {
        let inject = self.injects_usage();
        if bot == self.model && !inject {
            return self.body.clone();
        }
        let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
        if bot != self.model {
            let quoted = serde_json::to_vec(bot).expect("a string serialises");
            edits.push((self.model_span.clone(), quoted));
        }
        if inject {
            match &self.stream_options_span {
                None => {
                    // Right after the opening brace; `model` and `messages` follow, so a
                    // trailing comma is always valid.
                    let at = self.body.iter().position(|b| *b == b'{').unwrap_or(0) + 1;
                    edits.push((
                        at..at,
                        b"\"stream_options\":{\"include_usage\":true},".to_vec(),
                    ));
                }
                Some(span) => {
                    let mut opts: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_slice(&self.body[span.clone()]).unwrap_or_default();
                    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
                    let text = serde_json::to_vec(&opts).expect("a map serialises");
                    edits.push((span.clone(), text));
                }
            }
        }
        edits.sort_by_key(|(r, _)| r.start);
        let extra: usize = edits.iter().map(|(_, t)| t.len()).sum();
        let mut out = BytesMut::with_capacity(self.body.len() + extra);
        let mut at = 0;
        for (range, text) in edits {
            out.put_slice(&self.body[at..range.start]);
            out.put_slice(&text);
            at = range.end;
        }
        out.put_slice(&self.body[at..]);
        out.freeze()
    }
}

/// Deepest nesting of arrays and objects accepted (serde_json's own recursion limit). Only the
/// top level is parsed here, so without this a hostile body could nest without bound and be
/// passed on; one pass over the bytes, skipping strings.
const MAX_DEPTH: usize = 128;

/// It also returns the bytes inside strings (keys and values, escapes as written) except
/// encoded media ([`is_encoded_media`]): the prompt estimate's input, had for free on this
/// pass.
fn check_depth(body: &[u8]) -> Result<u64, GatewayError> {
    let mut depth = 0usize;
    let mut text = 0u64;
    // The string just closed was a `"data":` key whose value is a string.
    let mut data_value = false;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: to the next quote not escaped. A prompt is mostly string
                // bytes, so they are skipped with memchr rather than looked at one by one.
                i += 1;
                let start = i;
                while let Some(j) = memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or(&[])) {
                    if body[i + j] == b'"' {
                        i += j;
                        break;
                    }
                    i += j + 2;
                }
                if i >= body.len() || body[i] != b'"' {
                    break; // unterminated: the parser names the error
                }
                let string = &body[start..i];
                if !is_encoded_media(string, std::mem::take(&mut data_value)) {
                    text += string.len() as u64;
                    // A key (or value) spelled `data`: its value may be base64.
                    data_value = string == b"data" && is_string_member(&body[i + 1..]);
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(GatewayError::bad_request(format!(
                        "request body is nested too deeply (more than {MAX_DEPTH} levels)"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(text)
}

/// Whether a string is media encoded as text, which a tokenizer does not read as words: a
/// `data:` URL (OpenAI's images and files), or base64 as the value of a `data` member
/// (Anthropic's images and documents, OpenAI's `input_audio`). Told by their first bytes, so
/// a pasted `data: ...` log line or a tool's `data` argument in words stays text.
fn is_encoded_media(string: &[u8], data_member: bool) -> bool {
    const LOOK: usize = 64;
    if data_member {
        return string.len() >= LOOK && looks_like_base64(&string[..LOOK]);
    }
    // `data:<type>/<subtype>[;...],`: no space before the comma, within the first 256 bytes.
    let Some(head) = string[..string.len().min(256)].strip_prefix(b"data:") else {
        return false;
    };
    head.first().is_some_and(u8::is_ascii_alphabetic)
        && memchr::memchr(b',', head)
            .is_some_and(|comma| !head[..comma].iter().any(u8::is_ascii_whitespace))
}

/// Whether the start of a JSON string is base64, as written: its alphabet, with `/` or `+`
/// perhaps escaped (`\/` by PHP's encoder, `\u002B` by .NET's).
fn looks_like_base64(mut s: &[u8]) -> bool {
    while let Some((&b, rest)) = s.split_first() {
        s = match b {
            b'\\' => match rest {
                [b'/', rest @ ..] => rest,
                [b'u', b'0', b'0', b'2', b'b' | b'B' | b'f' | b'F', rest @ ..] => rest,
                // Cut off at the end of what is looked at.
                [] | [b'u', ..] if rest.len() < 5 => &[],
                _ => return false,
            },
            b if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') => rest,
            _ => return false,
        };
    }
    true
}

/// Whether `rest`, the bytes after a string, goes on with `:` and a string value.
fn is_string_member(rest: &[u8]) -> bool {
    let mut rest = rest.trim_ascii_start().iter();
    rest.next() == Some(&b':') && rest.as_slice().trim_ascii_start().first() == Some(&b'"')
}

fn json_error(e: &serde_json::Error) -> GatewayError {
    let what = if e.to_string().contains("recursion limit") {
        "request body is nested too deeply"
    } else {
        "request body is not valid JSON"
    };
    GatewayError::bad_request(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChatRequest, GatewayError> {
        ChatRequest::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn splices_model_and_keeps_everything_else() {
        let body = r#"{ "model" : "Claude", "messages":[{"role":"user","content":"hi"}], "thinking_budget": 1024 , "x":{"y":[1,2]}}"#;
        let r = parse(body).unwrap();
        assert_eq!(r.model(), "Claude");
        let up = r.upstream_body("claude-sonnet-4.5");
        assert_eq!(
            std::str::from_utf8(&up).unwrap(),
            body.replace("\"Claude\"", "\"claude-sonnet-4.5\"")
        );
    }

    #[test]
    fn encoded_media_is_not_prompt_text() {
        let text = |s: &str| check_depth(s.as_bytes()).unwrap();
        let b64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
        // Keys and values count; a `data:` URL and base64 in a `data` member do not.
        assert_eq!(text(r#"{"ab":"cd"}"#), 4);
        assert_eq!(
            text(&format!(
                r#"{{"url":"data:image/png;base64,{b64}","x":"y"}}"#
            )),
            5
        );
        assert_eq!(
            text(&format!(
                r#"{{"source":{{"type":"base64","data" : "{b64}"}}, "input_audio":{{"data":"{b64}","format":"wav"}}}}"#
            )),
            44
        );
        // Words stay text: a `data` member in words, a short one, a log line, `data` as a
        // value or holding an object.
        let words = "some words that a tool was given as its data argument, long enough";
        assert_eq!(
            text(&format!(r#"{{"data":"{words}"}}"#)),
            4 + words.len() as u64
        );
        assert_eq!(text(r#"{"data":"QUJD"}"#), 8);
        // Base64 with `/` or `+` escaped, as some encoders write it.
        let escaped = format!("\\/9j\\/4AAQ{}\\u002B", &b64[..60]);
        assert_eq!(text(&format!(r#"{{"data":"{escaped}"}}"#)), 4);
        // An escape other than those: text.
        assert_eq!(text(&format!(r#"{{"data":"a\\n{}"}}"#, &b64[..70])), 4 + 74);
        assert_eq!(text(r#"{"text":"data: {\"a\":1}, more"}"#), 4 + 21);
        assert_eq!(text(r#"["data","x"]"#), 5);
        assert_eq!(text(r#"{"data":{"k":"v"}}"#), 6);
    }

    #[test]
    fn rejects_bad_shapes() {
        for (body, want) in [
            ("{", "not valid JSON"),
            ("[]", "not valid JSON"),
            (r#"{"messages":[{}]}"#, "`model`"),
            (r#"{"model":3,"messages":[{}]}"#, "must be a string"),
            (r#"{"model":"a"}"#, "`messages`"),
            (r#"{"model":"a","messages":{}}"#, "must be an array"),
            (
                r#"{"model":"a","model":"b","messages":[{}]}"#,
                "duplicate key",
            ),
            (r#"{"model":"a","messages":[{}],"stream":"yes"}"#, "boolean"),
            (
                r#"{"model":"a","messages":[{}],"stream_options":{"include_usage":{}}}"#,
                "`stream_options.include_usage` must be a boolean",
            ),
            (
                r#"{"model":"a","messages":[{}],"max_completion_tokens":5,"max_tokens":{}}"#,
                "`max_tokens` must be a number",
            ),
            (
                r#"{"model":"a","messages":[{}]} trailing"#,
                "not valid JSON",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.to_string().contains(want), "{body}: {e}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn injects_include_usage_only_for_streams_without_it() {
        let r = parse(r#" {"model":"a","messages":[{}],"stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body("b")).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "b");
        let r = parse(r#"{"stream_options":{"x":1},"model":"a","messages":[{}],"stream":true}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body("a")).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        let body = r#"{"model":"a","messages":[{}],"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(parse(body).unwrap().upstream_body("a"), body.as_bytes());
        let body = r#"{"model":"a","messages":[{}]}"#;
        assert_eq!(parse(body).unwrap().upstream_body("a"), body.as_bytes());
    }

    #[test]
    fn reads_stream_flags() {
        let r = parse(r#"{"model":"a","messages":[{}],"stream":true,"stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert!(r.stream() && r.include_usage() && r.has_stream_options());
        let r = parse(r#"{"model":"a","messages":[{}],"stream":false}"#).unwrap();
        assert!(!r.stream() && !r.include_usage());
    }

    #[test]
    fn escaped_keys_still_match() {
        let r = parse(r#"{"mod\u0065l":"a","messages":[{}]}"#).unwrap();
        assert_eq!(r.model(), "a");
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let depth = 100_000;
        let body = format!(
            r#"{{"model":"a","messages":[{}{}]}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let e = ChatRequest::parse(Bytes::from(body)).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("nested too deeply"), "{e}");
    }

    #[test]
    fn nesting_inside_strings_does_not_count() {
        let deep_text = "[{".repeat(1000);
        let body = format!(
            r#"{{"model":"a","messages":[{{"role":"user","content":"{deep_text} \" [ "}}]}}"#
        );
        assert!(ChatRequest::parse(Bytes::from(body)).is_ok());
    }

    #[test]
    fn many_distinct_keys_then_a_duplicate() {
        let mut body = String::from(r#"{"model":"a","messages":[{}]"#);
        for i in 0..1000 {
            body.push_str(&format!(",\"k{i}\":{i}"));
        }
        let ok = format!("{body}}}");
        assert!(ChatRequest::parse(Bytes::from(ok)).is_ok());
        for dup in ["k0", "k999", "model"] {
            let bad = format!("{body},\"{dup}\":1}}");
            let e = ChatRequest::parse(Bytes::from(bad)).unwrap_err();
            assert!(
                e.to_string().contains(&format!("duplicate key `{dup}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_a_400() {
        let e = ChatRequest::parse(Bytes::from_static(
            b"{\"model\":\"\xff\",\"messages\":[{}]}",
        ))
        .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }
}
