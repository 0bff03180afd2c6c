//! One chat call through the core, and reading its reply for a tool result.
//!
//! The request is built as JSON bytes and parsed by [`ChatRequest::parse`], exactly as the HTTP
//! API does, then handed to [`Gateway::chat`]. A streamed reply is read frame by frame with an
//! [`SseScanner`], collecting `choices[0].delta.content` and sending progress notifications as
//! text arrives; a non-stream reply is read whole. A non-2xx reply is Poe's (or the gateway's)
//! error, turned into a message for a tool error.
//!
//! Dropping the future drops the reply body, which closes the upstream response: that is how a
//! cancelled tool call stops the upstream call.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::schemars::{self, JsonSchema};
use rmcp::{Peer, RoleServer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::gateway::sse::SseScanner;
use crate::gateway::{Caller, ChatRequest, Gateway, ReplyBody};

/// Largest answer read (text of a stream, or a whole JSON body).
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;
/// Progress notifications are batched to at most one per this interval.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// What the bot answered.
#[derive(Debug, Default)]
pub struct Answer {
    pub text: String,
    /// The bot that answered, after aliases and fallbacks.
    pub bot: String,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// `choices[0].message.tool_calls` of a non-stream answer.
    pub tool_calls: Vec<Value>,
}

/// Where progress notifications go, when the client asked for them.
pub struct Progress {
    peer: Peer<RoleServer>,
    token: ProgressToken,
    last: Option<Instant>,
    pending: String,
    chars: u64,
}

impl Progress {
    pub fn new(peer: Peer<RoleServer>, token: ProgressToken) -> Progress {
        Progress {
            peer,
            token,
            last: None,
            pending: String::new(),
            chars: 0,
        }
    }

    async fn text(&mut self, piece: &str) {
        if piece.is_empty() {
            return;
        }
        self.chars += piece.chars().count() as u64;
        self.pending.push_str(piece);
        if self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            self.flush().await;
        }
    }

    /// Progress counts characters received; the message is the text since the last one.
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let message = std::mem::take(&mut self.pending);
        let param = ProgressNotificationParam::new(self.token.clone(), self.chars as f64)
            .with_message(message);
        if let Err(e) = self.peer.notify_progress(param).await {
            tracing::debug!(error = %e, "progress notification not sent");
        }
        self.last = Some(Instant::now());
    }

    /// "Still waiting": progress is the seconds waited so far.
    async fn waiting(&mut self, waited: Duration) {
        let secs = waited.as_secs();
        let param = ProgressNotificationParam::new(self.token.clone(), secs as f64)
            .with_message(format!("waiting for the bot's answer ({secs}s)"));
        if let Err(e) = self.peer.notify_progress(param).await {
            tracing::debug!(error = %e, "progress notification not sent");
        }
    }
}

/// How a call reports progress, when the client gave a progress token.
pub struct ProgressPlan {
    pub progress: Progress,
    /// For a non-stream call: how often to say it is still waiting.
    pub interval: Duration,
}

/// Sends `body` (a chat completion request as JSON) through the core and reads the answer.
/// `Err` is a message for a tool error.
///
/// With a progress plan, a stream reports its text as it arrives, and a non-stream call says
/// every `interval` that it is still waiting.
pub async fn ask(
    gateway: &Gateway,
    caller: &Caller,
    body: &Value,
    plan: Option<ProgressPlan>,
) -> Result<Answer, String> {
    let bytes = serde_json::to_vec(body).map_err(|e| format!("cannot build the request: {e}"))?;
    let req =
        ChatRequest::parse(Bytes::from(bytes)).map_err(|e| format!("invalid request: {e}"))?;
    if req.stream() {
        return call(gateway, caller, req, plan.map(|p| p.progress)).await;
    }
    let Some(ProgressPlan {
        mut progress,
        interval,
    }) = plan
    else {
        return call(gateway, caller, req, None).await;
    };
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(started + interval, interval);
    let work = call(gateway, caller, req, None);
    tokio::pin!(work);
    loop {
        tokio::select! {
            answer = &mut work => return answer,
            _ = ticks.tick() => progress.waiting(started.elapsed()).await,
        }
    }
}

async fn call(
    gateway: &Gateway,
    caller: &Caller,
    req: ChatRequest,
    progress: Option<Progress>,
) -> Result<Answer, String> {
    let stream = req.stream();
    let reply = gateway
        .chat(caller, req)
        .await
        .map_err(|e| format!("the gateway refused the call: {e}"))?;
    let bot = reply.bot;
    if !reply.status.is_success() {
        let body = read_all(reply.body).await.unwrap_or_default();
        return Err(error_message(reply.status, &body, &bot));
    }
    let mut answer = if stream {
        read_stream(reply.body, progress).await?
    } else {
        let body = read_all(reply.body).await?;
        parse_completion(&body)?
    };
    answer.bot = bot;
    Ok(answer)
}

async fn read_all(body: ReplyBody) -> Result<Bytes, String> {
    Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("reading the answer failed: {e}"))
}

async fn read_stream(body: ReplyBody, mut progress: Option<Progress>) -> Result<Answer, String> {
    let mut body = std::pin::pin!(body);
    let mut scanner = SseScanner::default();
    let mut answer = Answer::default();
    let mut done = false;
    let mut failed: Option<String> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the answer stream broke: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let before = answer.text.len();
        scanner
            .feed(&data, &mut |event: &[u8]| {
                if failed.is_some() || done {
                    return;
                }
                match on_event(event, &mut answer) {
                    Ok(true) => done = true,
                    Ok(false) => {}
                    Err(e) => failed = Some(e),
                }
            })
            .map_err(|_| {
                "the answer stream sent a line longer than the gateway accepts".to_string()
            })?;
        if let Some(e) = failed {
            return Err(partial(e, &answer.text));
        }
        if answer.text.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is longer than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        if let Some(p) = progress.as_mut() {
            p.text(&answer.text[before..]).await;
        }
        if done {
            break;
        }
    }
    if let Some(p) = progress.as_mut() {
        p.flush().await;
    }
    if !done {
        return Err(partial(
            "the answer stream ended without [DONE]".into(),
            &answer.text,
        ));
    }
    Ok(answer)
}

fn partial(e: String, text: &str) -> String {
    if text.is_empty() {
        e
    } else {
        format!(
            "{e} (after {} characters of the answer)",
            text.chars().count()
        )
    }
}

/// Reads one SSE event; `Ok(true)` at `[DONE]`.
fn on_event(data: &[u8], answer: &mut Answer) -> Result<bool, String> {
    if data == b"[DONE]" {
        return Ok(true);
    }
    let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
        tracing::debug!("skipping an SSE event that is not JSON");
        return Ok(false);
    };
    if let Some(err) = chunk.get("error").filter(|e| !e.is_null()) {
        return Err(format!("the answer stream failed: {}", describe_error(err)));
    }
    if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
        answer.usage = serde_json::from_value(u.clone()).ok();
    }
    if let Some(choice) = chunk.pointer("/choices/0") {
        if let Some(piece) = choice.pointer("/delta/content").and_then(Value::as_str) {
            answer.text.push_str(piece);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            answer.finish_reason = Some(reason.to_string());
        }
    }
    Ok(false)
}

fn parse_completion(body: &[u8]) -> Result<Answer, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not valid JSON: {e}"))?;
    if let Some(err) = doc.get("error").filter(|e| !e.is_null()) {
        return Err(describe_error(err));
    }
    let message = doc
        .pointer("/choices/0/message")
        .ok_or("the answer has no choices[0].message")?;
    let text = match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        // Some providers answer with content parts.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    Ok(Answer {
        text,
        bot: String::new(),
        usage: doc
            .get("usage")
            .and_then(|u| serde_json::from_value(u.clone()).ok()),
        finish_reason: doc
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
            .map(String::from),
        tool_calls: message
            .get("tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    })
}

/// `type: message` from an OpenAI- or Poe-shaped error object.
fn describe_error(err: &Value) -> String {
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message");
    match err.get("type").and_then(Value::as_str) {
        Some(kind) => format!("{kind}: {message}"),
        None => message.to_string(),
    }
}

/// The tool error for a non-2xx reply: Poe's own message (or the gateway's, for an error it
/// made itself, e.g. upstream unreachable), with the status.
fn error_message(status: http::StatusCode, body: &[u8], bot: &str) -> String {
    let detail = match serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
    {
        Some(err) => describe_error(&err),
        None => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(500).collect();
            if text.is_empty() {
                "no details".into()
            } else {
                text
            }
        }
    };
    format!(
        "the call to `{bot}` failed with HTTP {}: {detail}",
        status.as_u16()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_carry_poe_text() {
        let body =
            br#"{"error":{"code":404,"type":"not_found_error","message":"Model nope not found"}}"#;
        let m = error_message(http::StatusCode::NOT_FOUND, body, "nope");
        assert_eq!(
            m,
            "the call to `nope` failed with HTTP 404: not_found_error: Model nope not found"
        );
        let m = error_message(http::StatusCode::BAD_GATEWAY, b"<html>bad</html>", "x");
        assert!(m.ends_with("<html>bad</html>"), "{m}");
    }

    #[test]
    fn completion_with_tool_calls() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let a = parse_completion(body).unwrap();
        assert_eq!(a.text, "");
        assert_eq!(a.tool_calls.len(), 1);
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(a.usage.unwrap().total_tokens, 3);
    }
}
