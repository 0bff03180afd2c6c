//! The one error type for errors the gateway makes itself, mapped to OpenAI-shaped JSON.
//!
//! Errors that come from Poe are never turned into these: they pass through as Poe sent them.
//! Messages here must never contain a key; the constructors take only what is safe to show.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;

use crate::gateway::Endpoint;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// A request body in a form the gateway does not read (a `Content-Encoding`).
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The client was too slow sending its request.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Forbidden(String),
    /// Open mode and a web page the policy does not trust (see `http::browser`).
    #[error("{0}")]
    ForeignOrigin(String),
    /// An admin-only route (the admin API, or `/metrics` with `server.metrics_require_admin`)
    /// while no admin key is configured: nothing the client sends can unlock it.
    #[error("{0}")]
    AdminDisabled(String),
    /// A gateway key's budget is spent: 429 `insufficient_quota`, which the OpenAI SDKs raise
    /// as `RateLimitError`, the same as OpenAI's own quota errors.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Overloaded(String),
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    ShuttingDown(String),
    /// Shared state (Redis) is down and the policy is `fail_closed`.
    #[error("{0}")]
    StateUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct AnthropicEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Forbidden(_)
            | GatewayError::ForeignOrigin(_)
            | GatewayError::AdminDisabled(_) => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. } | GatewayError::QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::Overloaded(_)
            | GatewayError::ShuttingDown(_)
            | GatewayError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field: the SDKs pick their exception class from the status,
    /// and callers that branch on `type` see the usual names.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType(_)
            | GatewayError::RequestTimeout(_)
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed(_) => "invalid_request_error",
            GatewayError::Unauthorized(_) => "authentication_error",
            GatewayError::Forbidden(_)
            | GatewayError::ForeignOrigin(_)
            | GatewayError::AdminDisabled(_) => "permission_error",
            GatewayError::QuotaExceeded(_) => "insufficient_quota",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::Overloaded(_)
            | GatewayError::ShuttingDown(_)
            | GatewayError::StateUnavailable(_) => "overloaded_error",
            GatewayError::UpstreamUnreachable(_) => "upstream_error",
            GatewayError::UpstreamTimeout(_) => "timeout_error",
            GatewayError::Internal(_) => "server_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::UnsupportedMediaType(_) => "unsupported_content_encoding",
            GatewayError::Unauthorized(_) => "invalid_api_key",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::Forbidden(_) => "model_not_allowed",
            GatewayError::ForeignOrigin(_) => "origin_not_allowed",
            GatewayError::AdminDisabled(_) => "admin_disabled",
            GatewayError::QuotaExceeded(_) => "insufficient_quota",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::Overloaded(_) => "overloaded",
            GatewayError::ShuttingDown(_) => "shutting_down",
            GatewayError::StateUnavailable(_) => "shared_state_unavailable",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    /// A failure inside the gateway (a database or Redis error). Its detail may name hosts,
    /// files or SQL, so it goes to the log, inside the request's span; the client gets what
    /// failed and the request id to quote (sent as `x-request-id`).
    pub fn internal(what: &str, detail: &dyn std::fmt::Display) -> GatewayError {
        tracing::error!(error = %detail, "{what} failed");
        GatewayError::Internal(format!(
            "{what} failed inside the gateway; its log has the details under this request's x-request-id"
        ))
    }

    /// How long the client should wait before trying again, when the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => *retry_after,
            GatewayError::Overloaded(_) | GatewayError::ShuttingDown(_) => {
                Some(Duration::from_secs(1))
            }
            // Shared state or the key store is down; they are retried every few seconds.
            GatewayError::StateUnavailable(_) => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// `{"error":{"message","type","param","code"}}`
    pub fn to_json(&self) -> Bytes {
        let env = Envelope {
            error: self.body(self.kind()),
        };
        Bytes::from(serde_json::to_vec(&env).expect("error envelope serialises"))
    }

    /// The inner error object, with `kind` as its type.
    fn body(&self, kind: &'static str) -> Body<'static> {
        let param = match self {
            GatewayError::BadRequest { param, .. } => *param,
            _ => None,
        };
        Body {
            message: self.to_string(),
            kind,
            param,
            code: Some(self.code()),
        }
    }

    /// The same error as one SSE event, for a stream that already started: the OpenAI SDKs
    /// raise on a `data:` event carrying `error`, so the client can tell it from a clean end.
    pub fn to_sse_event(&self) -> Bytes {
        self.to_sse_event_for(Endpoint::ChatCompletions)
    }

    /// The error body for a client of `api`. A Messages API client (Anthropic's SDKs, Claude
    /// Code) reads Anthropic's shape, `{"type":"error","error":{"type","message"}}`, with
    /// Anthropic's names for the type. The OpenAI members (`param`, `code`) stay in the inner
    /// object, so a client reading either shape finds what it looks for.
    pub fn to_json_for(&self, api: Endpoint) -> Bytes {
        if api != Endpoint::Messages {
            return self.to_json();
        }
        let env = AnthropicEnvelope {
            kind: "error",
            error: self.body(self.anthropic_kind()),
        };
        Bytes::from(serde_json::to_vec(&env).expect("error envelope serialises"))
    }

    /// [`to_sse_event`](Self::to_sse_event) for a client of `api`. Anthropic's SDKs raise on
    /// an event named `error`, so that stream's event has the `event:` line too.
    pub fn to_sse_event_for(&self, api: Endpoint) -> Bytes {
        let json = self.to_json_for(api);
        let mut out = Vec::with_capacity(json.len() + 24);
        if api == Endpoint::Messages {
            out.extend_from_slice(b"event: error\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// Anthropic's error type for this error's status (its SDKs pick the exception class from
    /// the status, as OpenAI's do).
    fn anthropic_kind(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }
}

/// What a secret is replaced with in anything relayed from upstream.
pub const REDACTED: &str = "[redacted]";

/// A `Retry-After` value for a wait: whole seconds, rounded up, at least 1, as the header
/// requires.
pub fn retry_after_value(wait: Duration) -> http::HeaderValue {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    http::HeaderValue::from(secs.max(1))
}

/// Secrets shorter than this are not searched for: they would match ordinary text.
const MIN_SECRET_LEN: usize = 8;

/// As [`redact_secrets`], for a body whose length has gone out in its head already: each
/// occurrence becomes [`REDACTED`] padded with spaces to the secret's length (or `*`s, for a
/// secret shorter than that), so the length stays.
pub fn redact_secrets_keeping_length(body: Bytes, secret: &str) -> Bytes {
    let s = secret.as_bytes();
    if s.len() < MIN_SECRET_LEN || memchr::memmem::find(&body, s).is_none() {
        return body;
    }
    let mask: Vec<u8> = if s.len() >= REDACTED.len() {
        let mut m = REDACTED.as_bytes().to_vec();
        m.resize(s.len(), b' ');
        m
    } else {
        vec![b'*'; s.len()]
    };
    let mut out = body.to_vec();
    let mut at = 0;
    while let Some(i) = memchr::memmem::find(&out[at..], s) {
        out[at + i..at + i + s.len()].copy_from_slice(&mask);
        at += i + s.len();
    }
    Bytes::from(out)
}

/// `body` with every occurrence of each secret replaced by [`REDACTED`]. An upstream that
/// echoes the key it was called with (Poe's own error messages can quote the `Authorization`
/// value) must not have it handed on to the client, the logs or the cache. The same `Bytes`
/// comes back, uncopied, when no secret occurs.
pub fn redact_secrets(body: Bytes, secrets: &[&str]) -> Bytes {
    let secrets: Vec<&[u8]> = secrets
        .iter()
        .map(|s| s.as_bytes())
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .collect();
    if !secrets
        .iter()
        .any(|s| memchr::memmem::find(&body, s).is_some())
    {
        return body;
    }
    let mut out = body.to_vec();
    for s in secrets {
        let mut at = 0;
        let mut next = Vec::with_capacity(out.len());
        for i in memchr::memmem::find_iter(&out, s) {
            next.extend_from_slice(&out[at..i]);
            next.extend_from_slice(REDACTED.as_bytes());
            at = i + s.len();
        }
        next.extend_from_slice(&out[at..]);
        out = next;
    }
    Bytes::from(out)
}

/// [`redact_secrets`] over header values (an upstream may echo the key in a header too),
/// for one secret with its searcher built already. Every answer is
/// searched for the upstream key, and building a searcher costs more than searching a
/// response's few headers with it, so the key's is built once, beside the key.
pub fn redact_headers_with(
    headers: &mut http::HeaderMap,
    secret: &str,
    finder: &memchr::memmem::Finder<'_>,
) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    // Look before copying anything.
    for value in headers.values_mut() {
        if finder.find(value.as_bytes()).is_none() {
            continue;
        }
        let redacted = redact_secrets(Bytes::copy_from_slice(value.as_bytes()), &[secret]);
        if let Ok(v) = http::HeaderValue::from_maybe_shared(redacted) {
            *value = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = GatewayError::bad_param("model", "`model` is required");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "`model` is required");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn secrets_are_redacted_everywhere_they_occur() {
        let key = "poe-key-0123456789";
        let body = Bytes::from(format!(
            r#"{{"error":{{"message":"Invalid key {key}, Bearer {key}","type":"auth"}}}}"#
        ));
        let out = redact_secrets(body, &[key, "short"]);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains(key), "{text}");
        assert_eq!(text.matches(REDACTED).count(), 2, "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());

        let clean = Bytes::from_static(b"{\"error\":{\"message\":\"no key here\"}}");
        let same = redact_secrets(clean.clone(), &[key]);
        assert_eq!(same.as_ptr(), clean.as_ptr(), "nothing to redact: no copy");
        // Short secrets are never searched for.
        assert_eq!(redact_secrets(Bytes::from_static(b"abc"), &["abc"]), "abc");

        let mut h = http::HeaderMap::new();
        h.insert("x-debug", format!("auth=Bearer {key}").parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        redact_headers_with(&mut h, key, &memchr::memmem::Finder::new(key));
        assert_eq!(h["x-debug"], "auth=Bearer [redacted]");
        assert_eq!(h["x-other"], "fine");
    }
}
