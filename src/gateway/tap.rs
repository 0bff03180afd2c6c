//! The response tap: a `http_body::Body` that forwards upstream frames unchanged and reads
//! them on the side.
//!
//! Frames go to the client the moment they arrive; nothing is buffered. On the side the tap
//! scans SSE events (or remembers a JSON body's frames, which are cheap `Bytes` handles) to
//! learn the usage, whether the stream finished with `[DONE]`, and when the first byte came.
//! It also owns the idle timer between frames, and turns an upstream break after the first
//! byte into one final OpenAI-shaped error event, never a faked `[DONE]`.
//!
//! When the body ends, breaks, or is dropped because the client went away, the tap hands what
//! it saw to the request's [`Completion`], exactly once.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use super::completion::Completion;
use super::sse::SseScanner;
use crate::error::GatewayError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Token counts as Poe reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// How a response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The whole body arrived (for a stream: up to `[DONE]`).
    Completed,
    /// Upstream broke, went idle, or ended a stream without `[DONE]`.
    Incomplete(String),
    /// The client went away first.
    Cancelled,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Incomplete(_) => "incomplete",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// What the tap learnt from a response body.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub bytes: u64,
    pub events: u64,
    pub saw_done: bool,
    pub usage: Option<Usage>,
    pub first_byte: Option<Instant>,
    pub finish_reasons: Vec<String>,
}

/// Largest non-stream body the tap keeps handles to for reading `usage` at the end.
const JSON_KEEP_LIMIT: usize = 8 * 1024 * 1024;

enum Mode {
    Sse(SseScanner),
    /// Frames of a JSON body (refcounted handles, not copies), read once at the end.
    Json {
        frames: Vec<Bytes>,
        kept: usize,
    },
}

enum State {
    Streaming,
    /// An error event to send, then the end.
    Closing(Bytes),
    Done,
}

pin_project_lite::pin_project! {
    pub struct Tap<B> {
        #[pin]
        inner: B,
        #[pin]
        idle_timer: Sleep,
        idle: Duration,
        mode: Mode,
        state: State,
        observed: Observed,
        completion: Option<Completion>,
    }

    impl<B> PinnedDrop for Tap<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(c) = this.completion.take() {
                c.finish(this.observed, Outcome::Cancelled);
            }
        }
    }
}

impl<B> Tap<B> {
    pub fn new(inner: B, sse: bool, idle: Duration, completion: Completion) -> Self {
        Tap {
            inner,
            idle_timer: tokio::time::sleep(idle),
            idle,
            mode: if sse {
                Mode::Sse(SseScanner::default())
            } else {
                Mode::Json {
                    frames: Vec::new(),
                    kept: 0,
                }
            },
            state: State::Streaming,
            observed: Observed::default(),
            completion: Some(completion),
        }
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match std::mem::replace(this.state, State::Done) {
            State::Done => return Poll::Ready(None),
            State::Closing(event) => return Poll::Ready(Some(Ok(Frame::data(event)))),
            State::Streaming => *this.state = State::Streaming,
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        let broke = match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.observed.first_byte.is_none() {
                        this.observed.first_byte = Some(Instant::now());
                    }
                    this.observed.bytes += data.len() as u64;
                    if let Err(reason) = scan(this.mode, this.observed, data) {
                        // The frame still goes out; the stream ends after it.
                        let event = break_event(this.mode, &reason);
                        finish(this.completion, this.observed, Outcome::Incomplete(reason));
                        *this.state = event.map(State::Closing).unwrap_or(State::Done);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if this.inner.is_end_stream() {
                    // A body of known length is not polled again after its last byte (hyper
                    // stops at the length), so its end is recognised here, not at `None`.
                    let outcome = end_outcome(this.mode, this.observed);
                    let event = match &outcome {
                        Outcome::Incomplete(reason) => break_event(this.mode, reason),
                        _ => None,
                    };
                    finish(this.completion, this.observed, outcome);
                    *this.state = event.map(State::Closing).unwrap_or(State::Done);
                    return Poll::Ready(Some(Ok(frame)));
                }
                let deadline = Instant::now() + *this.idle;
                this.idle_timer.as_mut().reset(deadline);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                let outcome = end_outcome(this.mode, this.observed);
                if let Outcome::Incomplete(reason) = &outcome {
                    let event = break_event(this.mode, reason);
                    finish(this.completion, this.observed, outcome);
                    *this.state = State::Done;
                    return Poll::Ready(event.map(|e| Ok(Frame::data(e))));
                }
                finish(this.completion, this.observed, outcome);
                *this.state = State::Done;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => format!("upstream connection broke mid-response: {e}"),
            Poll::Pending => {
                ready!(this.idle_timer.as_mut().poll(cx));
                format!(
                    "upstream sent nothing for {}s (timeouts.idle)",
                    this.idle.as_secs_f64()
                )
            }
        };
        let event = break_event(this.mode, &broke);
        finish(
            this.completion,
            this.observed,
            Outcome::Incomplete(broke.clone()),
        );
        *this.state = State::Done;
        match event {
            Some(e) => Poll::Ready(Some(Ok(Frame::data(e)))),
            // A JSON body cannot carry an error after its start: fail the body, so the
            // client sees a truncated response rather than a short one that parses.
            None => Poll::Ready(Some(Err(broke.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming => {
                // Only a JSON body keeps its exact length: an SSE body may gain an error event.
                match self.mode {
                    Mode::Json { .. } => self.inner.size_hint(),
                    Mode::Sse(_) => SizeHint::default(),
                }
            }
            _ => SizeHint::default(),
        }
    }
}

fn finish(completion: &mut Option<Completion>, observed: &Observed, outcome: Outcome) {
    if let Some(c) = completion.take() {
        c.finish(observed, outcome);
    }
}

/// Reads one frame on the side. An error ends the stream (a line over the cap).
fn scan(mode: &mut Mode, observed: &mut Observed, data: &Bytes) -> Result<(), String> {
    match mode {
        Mode::Sse(scanner) => scanner
            .feed(data, &mut |event: &[u8]| on_event(observed, event))
            .map_err(|_| "upstream sent an SSE line longer than the gateway accepts".to_string()),
        Mode::Json { frames, kept } => {
            if *kept + data.len() <= JSON_KEEP_LIMIT {
                *kept += data.len();
                frames.push(data.clone());
            }
            Ok(())
        }
    }
}

fn on_event(observed: &mut Observed, data: &[u8]) {
    observed.events += 1;
    if data == b"[DONE]" {
        observed.saw_done = true;
        return;
    }
    // Only chunks that mention usage or a finish reason are parsed; content chunks are not.
    let has_usage = memmem::find(data, b"\"usage\"").is_some();
    let has_finish = memmem::find(data, b"\"finish_reason\":\"").is_some()
        || memmem::find(data, b"\"finish_reason\": \"").is_some();
    if !(has_usage || has_finish) {
        return;
    }
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        finish_reason: Option<String>,
    }
    if let Ok(chunk) = serde_json::from_slice::<Chunk>(data) {
        if chunk.usage.is_some() {
            observed.usage = chunk.usage;
        }
        for reason in chunk.choices.into_iter().filter_map(|c| c.finish_reason) {
            observed.finish_reasons.push(reason);
        }
    }
}

fn end_outcome(mode: &mut Mode, observed: &mut Observed) -> Outcome {
    match mode {
        Mode::Sse(_) if observed.saw_done => Outcome::Completed,
        Mode::Sse(_) => Outcome::Incomplete("upstream ended the stream without [DONE]".into()),
        Mode::Json { frames, .. } => {
            read_json_usage(frames, observed);
            Outcome::Completed
        }
    }
}

/// Finds the top-level `usage` of a chat.completion body without parsing the whole body:
/// the last `"usage":` not inside a string, parsed from there as one value.
fn read_json_usage(frames: &mut Vec<Bytes>, observed: &mut Observed) {
    let body: Bytes = match frames.len() {
        0 => return,
        1 => frames.pop().expect("one frame"),
        _ => {
            let mut all = BytesMut::with_capacity(frames.iter().map(|f| f.len()).sum());
            frames.drain(..).for_each(|f| all.extend_from_slice(&f));
            all.freeze()
        }
    };
    let finder = memmem::FinderRev::new(b"\"usage\"");
    let mut end = body.len();
    while let Some(at) = finder.rfind(&body[..end]) {
        if at > 0 && body[at - 1] == b'\\' {
            end = at;
            continue;
        }
        let rest = &body[at + 7..];
        let rest = rest.trim_ascii_start();
        if let Some(value) = rest.strip_prefix(b":") {
            let mut it = serde_json::Deserializer::from_slice(value).into_iter::<Usage>();
            if let Some(Ok(u)) = it.next() {
                observed.usage = Some(u);
            }
        }
        break;
    }
}

/// The final event for a broken SSE stream; `None` for a JSON body.
fn break_event(mode: &Mode, reason: &str) -> Option<Bytes> {
    let Mode::Sse(scanner) = mode else {
        return None;
    };
    let event = GatewayError::UpstreamUnreachable(reason.to_string()).to_sse_event();
    if !scanner.in_progress() {
        return Some(event);
    }
    // Close the half-received line and event first, so the error is an event of its own.
    let mut out = BytesMut::with_capacity(event.len() + 2);
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(&event);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_found_without_full_parse() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": field"}}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        let mut frames = vec![
            Bytes::from_static(&body[..40]),
            Bytes::from_static(&body[40..]),
        ];
        let mut obs = Observed::default();
        read_json_usage(&mut frames, &mut obs);
        assert_eq!(
            obs.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                total_tokens: 8
            })
        );
    }

    #[test]
    fn sse_usage_and_finish_reason() {
        let mut obs = Observed::default();
        on_event(
            &mut obs,
            br#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        );
        on_event(
            &mut obs,
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        );
        on_event(&mut obs, b"[DONE]");
        assert!(obs.saw_done);
        assert_eq!(obs.finish_reasons, vec!["stop"]);
        assert_eq!(obs.usage.unwrap().total_tokens, 3);
    }
}
