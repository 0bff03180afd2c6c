//! The one error type for errors the gateway makes itself, mapped to OpenAI-shaped JSON.
//!
//! Errors that come from Poe are never turned into these: they pass through as Poe sent them.
//! Messages here must never contain a key; the constructors take only what is safe to show.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
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
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Envelope<'a> {
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
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. } | GatewayError::QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::Overloaded(_) | GatewayError::ShuttingDown(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            | GatewayError::RequestTimeout(_)
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed(_) => "invalid_request_error",
            GatewayError::Unauthorized(_) => "authentication_error",
            GatewayError::Forbidden(_) => "permission_error",
            GatewayError::QuotaExceeded(_) => "insufficient_quota",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::Overloaded(_) | GatewayError::ShuttingDown(_) => "overloaded_error",
            GatewayError::UpstreamUnreachable(_) => "upstream_error",
            GatewayError::UpstreamTimeout(_) => "timeout_error",
            GatewayError::Internal(_) => "server_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::Unauthorized(_) => "invalid_api_key",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::Forbidden(_) => "model_not_allowed",
            GatewayError::QuotaExceeded(_) => "insufficient_quota",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::Overloaded(_) => "overloaded",
            GatewayError::ShuttingDown(_) => "shutting_down",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => *retry_after,
            GatewayError::Overloaded(_) | GatewayError::ShuttingDown(_) => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// `{"error":{"message","type","param","code"}}`
    pub fn to_json(&self) -> Bytes {
        let param = match self {
            GatewayError::BadRequest { param, .. } => *param,
            _ => None,
        };
        let env = Envelope {
            error: Body {
                message: self.to_string(),
                kind: self.kind(),
                param,
                code: Some(self.code()),
            },
        };
        Bytes::from(serde_json::to_vec(&env).expect("error envelope serialises"))
    }

    /// The same error as one SSE event, for a stream that already started: the OpenAI SDKs
    /// raise on a `data:` event carrying `error`, so the client can tell it from a clean end.
    pub fn to_sse_event(&self) -> Bytes {
        let json = self.to_json();
        let mut out = Vec::with_capacity(json.len() + 10);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
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
}
