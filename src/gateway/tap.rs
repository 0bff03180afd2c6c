//! The response tap: a `http_body::Body` that forwards upstream frames and reads them on the side.
//!
//! Frames go to the client the moment they arrive. On the side the tap scans SSE events (or
//! remembers a JSON body's frames, which are cheap `Bytes` handles) to learn the usage, whether
//! the stream finished with `[DONE]`, how much text streamed, and when the first byte came.
//!
//! An event stream is forwarded as whole events: a frame that ends mid-event keeps its tail
//! until the event completes. A partial event is of no use to an SSE client, and one cut off by
//! a break would reach it as broken JSON instead of the error event that follows (the SDKs
//! then raise a decoding error, not their API error). A frame of whole events is forwarded as
//! the same `Bytes`, uncopied.
//!
//! One rewrite is made on purpose: when the gateway asked Poe for usage that the client did not
//! ask for ([`ChatRequest::injects_usage`](super::ChatRequest::injects_usage)), the usage-only
//! chunk is dropped and a `usage` field riding on a content chunk is cut out, so the client sees
//! the stream it asked for.
//!
//! The tap also owns the idle timer between frames, and turns an upstream break after the
//! first byte into one final OpenAI-shaped error event, never a faked `[DONE]`. When the body
//! ends, breaks, or is dropped because the client went away, it hands what it saw to the
//! request's [`Completion`], exactly once.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::Endpoint;
use super::cache::Recorder;
use super::completion::Completion;
use super::json::{TopLevel, span_in};
use super::jsonscan::{KeyFinder, MessagesUsage, parse_messages_usage, parse_usage};
use super::sse::SseScanner;
use crate::error::GatewayError;
use crate::upstream::Secret;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Token counts as Poe reports them (read by `jsonscan::parse_usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of `prompt_tokens`, those read from the bot's prompt cache: OpenAI's
    /// `prompt_tokens_details.cached_tokens` (`input_tokens_details` on the Responses API),
    /// Anthropic's `cache_read_input_tokens`.
    pub cache_read_tokens: u64,
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
    /// Bytes received from upstream.
    pub bytes: u64,
    pub events: u64,
    pub saw_done: bool,
    pub usage: Option<Usage>,
    pub first_byte: Option<Instant>,
    pub finish_reasons: Vec<String>,
    /// Bytes of `content` text streamed, for a token estimate when no usage arrives.
    pub text_bytes: u64,
    /// An event of the stream was an error object (`{"error": ...}`): Poe's way to fail a
    /// stream that started well. Such a stream is not a completed answer, even when `[DONE]`
    /// follows, and is never stored.
    pub stream_error: bool,
    /// The error event was not in the client's API's shape, so its SDK does not see it: an
    /// OpenAI-shaped `{"error": ...}` (no `event: error`) in a Messages stream, which the
    /// Anthropic SDKs skip. The gateway then ends the stream with its own error event.
    pub error_unseen: bool,
    /// The finish reasons go only to the request's span: with no span (traces off), the
    /// search for them in every event is skipped.
    pub skip_finish_reasons: bool,
    /// The API the body answers. A Responses API stream ends with a `response.completed`
    /// (or `response.incomplete`) event rather than `[DONE]`, which then counts as its end;
    /// `response.failed` and `error` events fail it; its text comes in `delta`s. A Messages
    /// API stream ends with `message_stop`, fails with an `error` event, and has its usage in
    /// two events (`message_start`, then the counts that changed in `message_delta`).
    pub api: Endpoint,
    /// The Messages API's counts so far (see `api`); `usage` is made from them. Boxed: only
    /// that API has them, and every request's future holds an `Observed`.
    pub(crate) messages_usage: Option<Box<MessagesUsage>>,
    /// A Responses answer's id (`resp_...`): what a later request names as its
    /// `previous_response_id`, which in keys mode only the key that made it may.
    pub response_id: Option<Box<str>>,
}

impl Observed {
    /// The usage's output count is a placeholder: a Messages stream that ended (cut, or
    /// the client gone) before its `message_delta` reported only `message_start`'s count, 1,
    /// however much it streamed. The streamed text is the better figure then.
    pub fn output_unreported(&self) -> bool {
        self.messages_usage
            .as_ref()
            .is_some_and(|m| m.usage_seen() && !m.final_output)
    }
}

// Key searchers, built once: constructing one costs more than a search (it was a quarter
// of an SSE request's instructions when built per call). The pairs are the bytes their SIMD
// loop looks for first (see `KeyFinder`): `n` and `:` of `"content":`, `u` and `g` of
// `"usage"`, `h` and `_` of `"finish_reason":`.
// Forward searches only: memchr's reverse searcher has no SIMD path and cost three times
// as much per chunk as a forward pass over the same bytes.
static USAGE_KEY: LazyLock<KeyFinder> = LazyLock::new(|| KeyFinder::new(b"\"usage\"", (1, 4)));
static FINISH_REASON: LazyLock<KeyFinder> =
    LazyLock::new(|| KeyFinder::new(b"\"finish_reason\":", (6, 7)));
static STOP_REASON: LazyLock<KeyFinder> =
    LazyLock::new(|| KeyFinder::new(b"\"stop_reason\":", (3, 4)));
static CONTENT_KEY: LazyLock<KeyFinder> = LazyLock::new(|| KeyFinder::new(b"\"content\":", (3, 9)));
static DELTA_KEY: LazyLock<KeyFinder> = LazyLock::new(|| KeyFinder::new(b"\"delta\":", (1, 4)));
static TEXT_KEY: LazyLock<KeyFinder> = LazyLock::new(|| KeyFinder::new(b"\"text\":", (1, 4)));
static THINKING_KEY: LazyLock<KeyFinder> =
    LazyLock::new(|| KeyFinder::new(b"\"thinking\":", (2, 5)));
static ERROR_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
static ARGUMENTS_KEY: LazyLock<KeyFinder> =
    LazyLock::new(|| KeyFinder::new(b"\"arguments\":", (3, 7)));
static PARTIAL_JSON_KEY: LazyLock<KeyFinder> =
    LazyLock::new(|| KeyFinder::new(b"\"partial_json\":", (8, 9)));

/// How much of the end of a non-stream body the tap keeps handles to, for reading `usage`
/// (its last member) when the body ends.
const JSON_KEEP_LIMIT: usize = 8 * 1024 * 1024;

/// How much of the start of a body longer than `JSON_KEEP_LIMIT` the tap copies.
const JSON_HEAD_KEEP: usize = 64 * 1024;

enum Mode {
    Sse {
        scanner: SseScanner,
        events: Events,
        /// Set when the client did not ask for usage: the usage is cut out.
        strip_usage: bool,
    },
    /// Frames of a JSON body (refcounted handles, not copies), read once at the end: its
    /// last `JSON_KEEP_LIMIT` bytes, and of a longer one, a copy of its first
    /// `JSON_HEAD_KEEP` (where a usage written before the answer is, and a Responses id).
    Json {
        frames: Vec<Bytes>,
        kept: usize,
        head: BytesMut,
    },
}

/// The cut of a stream into whole events, between frames.
struct Events {
    /// The bytes of an event not yet complete.
    held: BytesMut,
    /// The last frame ended exactly where an event ended, on a `\r`: a `\n` opening the next
    /// frame still belongs to that event, and goes where it went. `Some(true)`: it was kept.
    ended_on_cr: Option<bool>,
    /// The current frame's events, kept between frames so a frame costs no allocation.
    pieces: Vec<Piece>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            held: BytesMut::new(),
            ended_on_cr: None,
            // A frame from Poe usually carries a handful of events; growing from empty cost
            // three reallocations per stream.
            pieces: Vec::with_capacity(16),
        }
    }
}

enum State {
    Streaming,
    Done,
}

pin_project_lite::pin_project! {
    pub struct Tap<B> {
        #[pin]
        inner: B,
        // Boxed so the tap (and a reply body) is `Unpin` and easy to consume in-process.
        idle_timer: Pin<Box<Sleep>>,
        idle: Duration,
        // When the last frame came. The timer is not moved on every frame (each move takes
        // the timer wheel's lock); when it fires early it is re-armed from here.
        last_frame: Instant,
        mode: Mode,
        state: State,
        observed: Observed,
        completion: Option<Completion>,
        // Keeps the upstream frames for the response cache, when the request is cacheable.
        recorder: Option<Recorder>,
        // The key Poe was called with. An error event may quote it (as an error body may):
        // from the first error event on, frames are searched for it and it is cut out.
        redact: Option<Secret>,
    }

    impl<B> PinnedDrop for Tap<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(c) = this.completion.take() {
                // A reader may stop at `[DONE]` without waiting for the body's end (the MCP
                // tools do): the answer was whole, so it counts, and is stored, as completed.
                let outcome = match this.mode {
                    Mode::Sse { .. } if this.observed.saw_done => settled(this.observed),
                    _ => Outcome::Cancelled,
                };
                conclude(c, this.recorder, this.observed, outcome);
            }
        }
    }
}

impl<B> Tap<B> {
    /// `sse`: the body is an event stream. `strip_usage`: remove the usage the gateway injected.
    pub fn new(
        inner: B,
        sse: bool,
        strip_usage: bool,
        idle: Duration,
        completion: Completion,
        recorder: Option<Recorder>,
    ) -> Self {
        Tap {
            inner,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            idle,
            last_frame: Instant::now(),
            mode: if sse {
                Mode::Sse {
                    scanner: SseScanner::default(),
                    events: Events::default(),
                    strip_usage,
                }
            } else {
                Mode::Json {
                    frames: Vec::new(),
                    kept: 0,
                    head: BytesMut::new(),
                }
            },
            state: State::Streaming,
            observed: Observed {
                skip_finish_reasons: !completion.traced(),
                ..Observed::default()
            },
            completion: Some(completion),
            recorder,
            redact: None,
        }
    }

    /// Cuts `key` out of what follows an error event in the stream, or out of a 200 JSON
    /// body that is an error object (see `redact`).
    pub fn redacting(mut self, key: Secret) -> Self {
        self.redact = Some(key);
        self
    }

    /// Reads the body as the answer to a request for `endpoint` (see `Observed::api`).
    pub fn answering(mut self, endpoint: Endpoint) -> Self {
        self.observed.api = endpoint;
        self
    }
}

impl Tap<ReplayBody> {
    /// A tap over recorded stream frames outside any request, accounted as one streamed
    /// request for a bot `m` to `acct`. What the property tests, the fuzz target and the
    /// benchmarks drive.
    pub fn over_frames(
        frames: std::sync::Arc<[Bytes]>,
        strip_usage: bool,
        acct: std::sync::Arc<super::completion::Accounting>,
    ) -> Self {
        let info = super::completion::RequestInfo {
            request_id: "replay".into(),
            key_id: None,
            model: "m".into(),
            alias: None,
            bot: "m".into(),
            stream: true,
            api: crate::ledger::Api::Chat,
            status: 200,
            attempts: 1,
            started: Instant::now(),
            cache_hit: false,
            span: tracing::Span::none(),
            request_body: None,
            request_text_bytes: 0,
            abandoned: 0,
            unlisted: false,
        };
        let mut tap = Tap::new(
            ReplayBody::new(frames, Duration::ZERO),
            true,
            strip_usage,
            Duration::from_secs(60),
            Completion::new(info, acct, None),
            None,
        );
        // No span here, but the tests and the fuzz target read the finish reasons too.
        tap.observed.skip_finish_reasons = false;
        tap
    }
}

impl<B> Tap<B> {
    /// What the tap has read so far (usage, `[DONE]`, byte counts).
    pub fn observed(&self) -> &Observed {
        &self.observed
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
        loop {
            if let State::Done = this.state {
                return Poll::Ready(None);
            }
            let broke = match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(other) => return Poll::Ready(Some(Ok(other))), // trailers
                    };
                    let now = Instant::now();
                    *this.last_frame = now;
                    if this.observed.first_byte.is_none() {
                        this.observed.first_byte = Some(now);
                    }
                    this.observed.bytes += data.len() as u64;
                    if let Some(r) = this.recorder.as_mut() {
                        r.push(&data);
                    }
                    let out = match scan(this.mode, this.observed, data) {
                        // Rare, and never on a good stream's path: only once an error event
                        // came. A key cut by a frame boundary is not found (Poe's events
                        // arrive whole in practice).
                        Ok(out) if this.observed.stream_error => match this.redact.as_ref() {
                            // A 200 JSON error object is held whole (its frames are kept
                            // anyway) and masked at its end, so a key cut by a frame boundary
                            // is found too.
                            Some(_) if matches!(this.mode, Mode::Json { .. }) => Bytes::new(),
                            Some(k) => crate::error::redact_secrets(out, &[k.expose()]),
                            None => out,
                        },
                        Ok(out) => out,
                        Err(reason) => {
                            let last = end_frame(this.mode, this.observed.api, Some(&reason));
                            finish(this.completion, this.observed, Outcome::Incomplete(reason));
                            *this.state = State::Done;
                            return Poll::Ready(last.map(|l| Ok(Frame::data(l))));
                        }
                    };
                    if this.observed.saw_done
                        && this.observed.api == Endpoint::Responses
                        && let Some(c) = this.completion.as_mut()
                    {
                        c.answer_whole(this.observed);
                    }
                    if this.inner.is_end_stream() {
                        // A body of known length is not polled again after its last byte (hyper
                        // stops at the length), so its end is recognised here, not at `None`.
                        let held = held_error_object(this.mode, this.observed, this.redact);
                        let last =
                            self::end(this.mode, this.observed, this.completion, this.recorder);
                        *this.state = State::Done;
                        let out = join(join(out, held).unwrap_or_default(), last);
                        return Poll::Ready(out.map(|o| Ok(Frame::data(o))));
                    }
                    if out.is_empty() {
                        continue; // the whole frame was held back or dropped
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(None) if json_cut_short(this.mode, this.observed) => {
                    "upstream closed the connection before the end of its JSON answer".to_string()
                }
                Poll::Ready(None) => {
                    let held = held_error_object(this.mode, this.observed, this.redact);
                    let last = self::end(this.mode, this.observed, this.completion, this.recorder);
                    *this.state = State::Done;
                    let out = join(held.unwrap_or_default(), last);
                    return Poll::Ready(out.map(|l| Ok(Frame::data(l))));
                }
                Poll::Ready(Some(Err(_))) if crate::upstream::cut_by_shutdown() => {
                    SHUTDOWN_CUT.to_string()
                }
                Poll::Ready(Some(Err(e))) => format!("upstream connection broke mid-response: {e}"),
                Poll::Pending => {
                    // After the last event nothing more is due but the body's end: a Poe
                    // that holds the connection open is not waited on for `timeouts.idle`.
                    let wait = if this.observed.saw_done {
                        AFTER_LAST_EVENT.min(*this.idle)
                    } else {
                        *this.idle
                    };
                    if this.observed.saw_done
                        && this.idle_timer.deadline() > *this.last_frame + wait
                    {
                        this.idle_timer.as_mut().reset(*this.last_frame + wait);
                    }
                    loop {
                        if this.idle_timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        // Armed before the latest frame: wait the rest of the idle time.
                        let due = *this.last_frame + wait;
                        if Instant::now() >= due {
                            break;
                        }
                        this.idle_timer.as_mut().reset(due);
                    }
                    format!(
                        "upstream sent nothing for {}s (timeouts.idle)",
                        this.idle.as_secs_f64()
                    )
                }
            };
            // The answer was whole (`[DONE]`, or the API's last event, came): a connection
            // that breaks or goes quiet after it ends the stream as a close would. Nothing
            // may follow the last event, an error event least of all.
            if this.observed.saw_done || done_at_eof(this.mode, &mut this.observed.clone()) {
                let last = self::end(this.mode, this.observed, this.completion, this.recorder);
                *this.state = State::Done;
                return Poll::Ready(last.map(|l| Ok(Frame::data(l))));
            }
            // After Poe's own error event, the client knows the stream failed, and why.
            let last = end_frame(
                this.mode,
                this.observed.api,
                (!this.observed.stream_error || this.observed.error_unseen)
                    .then_some(broke.as_str()),
            );
            finish(
                this.completion,
                this.observed,
                Outcome::Incomplete(broke.clone()),
            );
            *this.state = State::Done;
            return match last {
                Some(e) => Poll::Ready(Some(Ok(Frame::data(e)))),
                // A JSON body cannot carry an error after its start: fail the body, so the
                // client sees a truncated response rather than a short one that parses.
                // A stream whose own error event came already ends there, cleanly.
                None if matches!(this.mode, Mode::Sse { .. }) => Poll::Ready(None),
                None => Poll::Ready(Some(Err(broke.into()))),
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.mode) {
            // Only a JSON body keeps its exact length: an SSE body may lose usage or gain an
            // error event.
            // But not an empty one: hyper would not read a body of length 0 at all, and the
            // tap, dropped unread, would take the answer for one its client left.
            (State::Streaming, Mode::Json { .. }) if self.inner.size_hint().exact() != Some(0) => {
                self.inner.size_hint()
            }
            _ => SizeHint::default(),
        }
    }
}

/// How long a stream that sent its last event may take to close before the gateway ends it.
const AFTER_LAST_EVENT: Duration = Duration::from_secs(1);

fn finish(completion: &mut Option<Completion>, observed: &Observed, outcome: Outcome) {
    if let Some(c) = completion.take() {
        c.finish(observed, outcome);
    }
}

/// The body ended cleanly from upstream's side: settle the outcome and return what is left
/// to send (held bytes, and an error event if the stream ended without `[DONE]`).
fn end(
    mode: &mut Mode,
    observed: &mut Observed,
    completion: &mut Option<Completion>,
    recorder: &mut Option<Recorder>,
) -> Option<Bytes> {
    const NO_DONE: &str = "upstream ended the stream without [DONE]";
    let completed_done = done_at_eof(mode, observed);
    let (outcome, broke) = match mode {
        // The client has the whole stream, an error event in it included: nothing to add.
        Mode::Sse { .. } if observed.saw_done => (settled(observed), None),
        // Poe's own error event said why it ended: the gateway adds none of its own, unless
        // the client's SDK could not read Poe's.
        Mode::Sse { .. } if observed.stream_error && observed.error_unseen => {
            let why = "upstream sent an error event in the stream";
            (settled(observed), Some(why))
        }
        Mode::Sse { .. } if observed.stream_error => (settled(observed), None),
        Mode::Sse { .. } => {
            let why = match observed.api {
                Endpoint::ChatCompletions => NO_DONE,
                Endpoint::Responses => "upstream ended the stream without response.completed",
                Endpoint::Messages => "upstream ended the stream without message_stop",
            };
            (Outcome::Incomplete(why.into()), Some(why))
        }
        Mode::Json { frames, kept, head } => {
            let whole = *kept as u64 == observed.bytes;
            read_json_usage(frames, observed, whole);
            if !whole {
                read_json_head(head, observed);
            }
            if observed.bytes == 0 {
                // No answer: not stored, not completed.
                (
                    Outcome::Incomplete("upstream answered 200 with an empty body".into()),
                    None,
                )
            } else if observed.stream_error {
                let why = if observed.api == Endpoint::Responses {
                    "upstream answered 200 with an error object or a failed response"
                } else {
                    "upstream answered 200 with an error object"
                };
                (Outcome::Incomplete(why.into()), None)
            } else {
                (Outcome::Completed, None)
            }
        }
    };
    let mut last = end_frame(mode, observed.api, broke);
    if completed_done {
        last = join(last.unwrap_or_default(), Some(Bytes::from_static(b"\n\n")));
    }
    if let Some(c) = completion.take() {
        conclude(c, recorder, observed, outcome);
    }
    last
}

/// A 200 JSON error object held back while a key is to be masked in it (see `poll_frame`):
/// the whole body, masked with its length kept (it went out in the head).
fn held_error_object(mode: &Mode, observed: &Observed, redact: &Option<Secret>) -> Option<Bytes> {
    let (Mode::Json { frames, .. }, true, Some(k)) = (mode, observed.stream_error, redact) else {
        return None;
    };
    Some(crate::error::redact_secrets_keeping_length(
        joined(frames),
        k.expose(),
    ))
}

/// Whether a JSON body that ended without `is_end_stream` (no length in its head, so ended by
/// a chunked body's last chunk or by the connection's close) is cut short: it must parse
/// whole. A close ends a body as cleanly as its last chunk does, so a connection that dropped
/// mid-answer would otherwise pass for a complete answer, be stored and replayed. A body
/// with a length (hyper checks it, and stops there) is never parsed here.
fn json_cut_short(mode: &Mode, observed: &Observed) -> bool {
    let Mode::Json { frames, kept, .. } = mode else {
        return false;
    };
    if observed.bytes == 0 {
        return false;
    }
    let parses = |body: &[u8]| serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    match frames.as_slice() {
        // Only the tail was kept: its last byte at least must close the JSON.
        _ if *kept as u64 != observed.bytes => !frames
            .last()
            .is_some_and(|f| matches!(f.trim_ascii_end().last(), Some(b'}' | b']'))),
        _ => !parses(&joined(frames)),
    }
}

/// Hands a finished request to its completion, storing the recording first when the
/// answer is complete: on any other end the recording is dropped.
fn conclude(
    completion: Completion,
    recorder: &mut Option<Recorder>,
    observed: &Observed,
    outcome: Outcome,
) {
    if let (Outcome::Completed, Some(r)) = (&outcome, recorder.take()) {
        let usage = observed.usage.or_else(|| {
            // A JSON hit reports the entry's usage; a replayed stream is read again.
            (!r.is_stream()).then(|| completion.estimated_usage(observed))
        });
        r.commit(usage);
    }
    completion.finish(observed, outcome);
}

/// How a stream ended that reached `[DONE]` or carried Poe's own error event: completed,
/// unless an event was an error. The reason names no upstream text, which may quote anything
/// (a key included).
fn settled(observed: &Observed) -> Outcome {
    if observed.stream_error {
        Outcome::Incomplete("upstream sent an error event in the stream".into())
    } else {
        Outcome::Completed
    }
}

/// Reads one frame on the side and returns the bytes to forward. An error ends the stream.
fn scan(mode: &mut Mode, observed: &mut Observed, data: Bytes) -> Result<Bytes, String> {
    const TOO_LONG: &str =
        "upstream sent an SSE line or event longer than the gateway accepts (16 MiB)";
    match mode {
        Mode::Sse {
            scanner,
            events:
                Events {
                    held,
                    ended_on_cr,
                    pieces,
                },
            strip_usage,
        } => {
            let lead = std::mem::take(ended_on_cr).filter(|_| data.first() == Some(&b'\n'));
            // First pass: cut the frame into whole events and decide each one, copying nothing.
            pieces.clear();
            if lead == Some(true) {
                pieces.push(Piece::Keep(0..1));
            }
            let mut changed = lead == Some(false);
            let mut from = usize::from(lead.is_some());
            // The held bytes are the start of the first event completed here.
            let mut first = true;
            scanner
                .feed_bounds(&data, &mut |event: Option<&[u8]>, end: usize| {
                    let piece = match event.map(|d| {
                        let has_usage = on_event(observed, d);
                        if has_usage && *strip_usage {
                            usage_edit(d)
                        } else {
                            UsageEdit::Keep
                        }
                    }) {
                        Some(UsageEdit::Drop) => Piece::Drop,
                        Some(UsageEdit::Rewrite(json)) => {
                            let before: &[u8] = if first { held } else { &[] };
                            Piece::Replace(Bytes::from(replace_data(
                                before,
                                &data[from..end],
                                &json,
                            )))
                        }
                        _ => Piece::Keep(from..end),
                    };
                    first = false;
                    changed |= !matches!(piece, Piece::Keep(_));
                    pieces.push(piece);
                    from = end;
                })
                .map_err(|_| TOO_LONG.to_string())?;
            let tail = from..data.len();
            if scanner.pending_lf() && tail.is_empty() {
                *ended_on_cr = pieces.last().map(|p| matches!(p, Piece::Keep(_)));
            }
            if !changed && held.is_empty() && tail.is_empty() {
                return Ok(data); // whole events, nothing to change: the same bytes
            }
            // Second pass: the held bytes belong to the first event completed here.
            let mut out = BytesMut::with_capacity(held.len() + data.len());
            for (i, piece) in pieces.drain(..).enumerate() {
                match piece {
                    Piece::Keep(range) => {
                        if i == 0 {
                            out.extend_from_slice(held);
                        }
                        out.extend_from_slice(&data[range]);
                    }
                    Piece::Replace(event) => out.extend_from_slice(&event),
                    Piece::Drop => {}
                }
                if i == 0 {
                    held.clear();
                }
            }
            held.extend_from_slice(&data[tail]);
            // Keep-alive comments between events (`: ping`, with no blank line after them)
            // are whole lines the client ignores: they go on at once, or a client with a read
            // timeout gives up on a stream Poe is keeping alive. Only those before any line
            // of the next event, so what goes out does not depend on where frames were cut.
            let comments = leading_comment_lines(held);
            if comments > 0 {
                out.extend_from_slice(&held[..comments]);
                let _ = held.split_to(comments);
            }
            // An event's lines of any field (`event:`, `id:`, comments among them) are held
            // until its end, and capped as its data is.
            if held.len() > super::sse::DEFAULT_MAX_LINE {
                return Err(TOO_LONG.to_string());
            }
            Ok(out.freeze())
        }
        Mode::Json { frames, kept, head } => {
            // A 200 whose body is an error object is no answer: not stored, not completed.
            if observed.bytes == data.len() as u64 && is_error_object(observed.api, &data) {
                observed.stream_error = true;
            }
            // The last `JSON_KEEP_LIMIT` bytes: the usage is at the body's end. An error
            // object is kept whole (it may be held back to be masked), up to that limit.
            *kept += data.len();
            frames.push(data.clone());
            if observed.stream_error && *kept > JSON_KEEP_LIMIT {
                return Err(format!(
                    "upstream answered 200 with an error object over {} MiB",
                    JSON_KEEP_LIMIT >> 20
                ));
            }
            while *kept > JSON_KEEP_LIMIT && frames.len() > 1 {
                let gone = frames.remove(0);
                *kept -= gone.len();
                let room = JSON_HEAD_KEEP.saturating_sub(head.len());
                head.extend_from_slice(&gone[..room.min(gone.len())]);
            }
            Ok(data)
        }
    }
}

/// How many bytes at the start of `held` are whole `:` comment lines: each ended by `\n`
/// (or `\r\n`), with no other `\r` in it, which would end a line there.
fn leading_comment_lines(held: &[u8]) -> usize {
    let mut n = 0;
    for line in held.split_inclusive(|b| *b == b'\n') {
        let body = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        match body {
            Some(b) if b.first() == Some(&b':') && !b.contains(&b'\r') => n += line.len(),
            _ => break,
        }
    }
    n
}

/// One whole event of a frame.
enum Piece {
    Keep(Range<usize>),
    Replace(Bytes),
    Drop,
}

enum UsageEdit {
    Keep,
    /// The usage-only chunk (`choices: []`).
    Drop,
    /// A content chunk with `usage` cut out.
    Rewrite(Vec<u8>),
}

/// The whole event `before` + `rest` (blank line included) with its data lines replaced by
/// `data`, one `data:` line per line of it. Its other lines (`event:`, `id:`, `retry:`,
/// comments) stay where they were, and every line ends as the event's lines did.
fn replace_data(before: &[u8], rest: &[u8], data: &[u8]) -> Vec<u8> {
    let joined;
    let raw = if before.is_empty() {
        rest
    } else {
        joined = [before, rest].concat();
        &joined[..]
    };
    // Whole comment lines before the event go as they came, as they do when a frame ends
    // after them (see `leading_comment_lines`): where frames were cut makes no difference.
    let lead = leading_comment_lines(raw);
    let (comments, raw) = raw.split_at(lead);
    // The event's first line ending is the one it is written with. Not the first CR: that
    // may be the blank line's, whose LF can be in the next frame.
    let nl: &[u8] = match memchr::memchr2(b'\n', b'\r', raw) {
        Some(i) if raw[i] == b'\n' => b"\n",
        Some(i) if raw.get(i + 1) == Some(&b'\n') => b"\r\n",
        Some(_) => b"\r",
        None => b"\n",
    };
    let mut out = Vec::with_capacity(lead + raw.len() + data.len());
    out.extend_from_slice(comments);
    let mut data_written = false;
    let mut left = raw;
    while !left.is_empty() {
        let (line, next) = match memchr::memchr2(b'\n', b'\r', left) {
            Some(i) if left[i] == b'\r' && left.get(i + 1) == Some(&b'\n') => (&left[..i], i + 2),
            Some(i) => (&left[..i], i + 1),
            None => (left, left.len()),
        };
        left = &left[next..];
        if line.is_empty() {
            continue; // the blank line that ends the event, written last
        }
        if line == b"data" || line.starts_with(b"data:") {
            if !data_written {
                data_written = true;
                for l in data.split(|b| *b == b'\n') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(l);
                    out.extend_from_slice(nl);
                }
            }
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(nl);
    }
    out.extend_from_slice(nl);
    out
}

/// What to do with one event (that mentions `"usage"`) when the client did not ask for usage.
fn usage_edit(data: &[u8]) -> UsageEdit {
    let Ok(text) = std::str::from_utf8(data) else {
        return UsageEdit::Keep;
    };
    let Ok(fields) = TopLevel::parse(text) else {
        return UsageEdit::Keep;
    };
    let Some(usage) = fields.get("usage") else {
        return UsageEdit::Keep;
    };
    let no_choices = fields.get("choices").is_none_or(|c| {
        let c = c.get().trim();
        c == "null"
            || c.strip_prefix('[')
                .is_some_and(|c| c.trim_start().starts_with(']'))
    });
    // An error event may carry usage too: it is kept (without the usage), so the client
    // learns its stream failed.
    if no_choices && usage.get() != "null" && fields.get("error").is_none() {
        return UsageEdit::Drop;
    }
    // Cut `"usage": value` and one neighbouring comma out of the text.
    let value = span_in(text, usage);
    let bytes = text.as_bytes();
    let Some(key_start) = key_start(bytes, value.start) else {
        return UsageEdit::Keep;
    };
    let before = bytes[..key_start].trim_ascii_end();
    let cut = if before.ends_with(b",") {
        before.len() - 1..value.end
    } else {
        let after = &bytes[value.end..];
        let skip = after.len() - after.trim_ascii_start().len();
        match after.get(skip) {
            Some(b',') => {
                let rest = &after[skip + 1..];
                key_start..value.end + skip + 1 + (rest.len() - rest.trim_ascii_start().len())
            }
            _ => key_start..value.end,
        }
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..cut.start]);
    out.extend_from_slice(&bytes[cut.end..]);
    UsageEdit::Rewrite(out)
}

/// Where the key of the member whose value starts at `value_start` opens: the string before
/// the `:` (found this way, not by searching for `"usage"`, which may also be a string value
/// before it, while the key itself may be written with escapes).
fn key_start(bytes: &[u8], value_start: usize) -> Option<usize> {
    let key = bytes[..value_start]
        .trim_ascii_end()
        .strip_suffix(b":")?
        .trim_ascii_end()
        .strip_suffix(b"\"")?;
    // The opening quote: the last quote not escaped (preceded by an even run of backslashes).
    let mut at = key.len();
    while let Some(i) = memchr::memrchr(b'"', &key[..at]) {
        let slashes = key[..i].iter().rev().take_while(|b| **b == b'\\').count();
        if slashes % 2 == 0 {
            return Some(i);
        }
        at = i;
    }
    None
}

/// Reads one event's data on the side. Returns whether it mentions `"usage"`.
fn on_event(observed: &mut Observed, data: &[u8]) -> bool {
    observed.events += 1;
    if data == b"[DONE]" {
        // A Responses or Messages stream is whole at its last event, whatever follows.
        observed.saw_done |= observed.api == Endpoint::ChatCompletions;
        return false;
    }
    if opens_with_error(data) {
        observed.stream_error = true;
        observed.error_unseen |= observed.api == Endpoint::Messages;
    }
    match observed.api {
        Endpoint::ChatCompletions => {
            // A tool call's arguments are output too. A chunk carries text or a call, so
            // they are looked for only in chunks without text.
            let text = string_len(&CONTENT_KEY, data);
            observed.text_bytes += match text {
                0 => string_len(&ARGUMENTS_KEY, data),
                n => n,
            } as u64;
            // An error member need not come first (`{"id":..,"choices":[..],"error":{..}}`,
            // as OpenRouter fails a stream): the SDKs raise any chunk with one.
            if has_error_member(data) {
                observed.stream_error = true;
            }
        }
        Endpoint::Responses => on_responses_event(observed, data),
        Endpoint::Messages => on_messages_event(observed, data),
    }
    read_usage_and_finish(data, observed)
}

/// A Messages stream's event, by its `type`: `message_stop` ends the stream as `[DONE]`
/// ends a chat stream, and an `error` event fails it. Text comes in `content_block_delta`s.
fn on_messages_event(observed: &mut Observed, data: &[u8]) {
    match event_type(data).as_deref() {
        // A delta carries one of text, thinking or a tool call's input.
        Some(b"content_block_delta") => {
            observed.text_bytes += (string_len(&TEXT_KEY, data)
                + string_len(&THINKING_KEY, data)
                + string_len(&PARTIAL_JSON_KEY, data)) as u64;
        }
        Some(b"message_delta") => {
            observed.messages_usage.get_or_insert_default().final_output = true;
        }
        Some(b"message_stop") => observed.saw_done = true,
        Some(b"error") => observed.stream_error = true,
        _ => {}
    }
}

/// Whether a whole body (or an event) is an error object: `{"error": ...}` as Poe and
/// OpenAI write it, or Anthropic's `{"type": "error", ...}` on the Messages API.
pub(crate) fn is_error_object(api: Endpoint, data: &[u8]) -> bool {
    opens_with_error(data)
        || (api == Endpoint::Messages && event_type(data).as_deref() == Some(b"error"))
}

/// A Responses stream's event, by its `type`: the last one (`response.completed`, or
/// `response.incomplete` when a limit cut the answer short) ends the stream as `[DONE]`
/// ends a chat stream; `response.failed` and `error` fail it.
fn on_responses_event(observed: &mut Observed, data: &[u8]) {
    match event_type(data).as_deref() {
        // Text, a function call's arguments and reasoning are all output.
        Some(
            b"response.output_text.delta"
            | b"response.function_call_arguments.delta"
            | b"response.reasoning_summary_text.delta"
            | b"response.reasoning_text.delta",
        ) => {
            observed.text_bytes += string_len(&DELTA_KEY, data) as u64;
        }
        // The first event names the response.
        Some(b"response.created") if observed.response_id.is_none() => {
            #[derive(serde::Deserialize)]
            struct Created {
                response: Named,
            }
            #[derive(serde::Deserialize)]
            struct Named {
                id: String,
            }
            observed.response_id = serde_json::from_slice::<Created>(data)
                .ok()
                .map(|c| c.response.id.into_boxed_str());
        }
        Some(b"response.completed" | b"response.incomplete") => observed.saw_done = true,
        Some(b"response.failed" | b"error") => observed.stream_error = true,
        _ => {}
    }
}

/// The `type` of an event's object. OpenAI writes it as the first member, which is read in
/// place; any other layout is parsed (skipping the rest of the object).
fn event_type(data: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let first = data
        .trim_ascii_start()
        .strip_prefix(b"{")?
        .trim_ascii_start()
        .strip_prefix(b"\"type\"")
        .and_then(|r| r.trim_ascii_start().strip_prefix(b":"))
        .and_then(|r| r.trim_ascii_start().strip_prefix(b"\""));
    if let Some(rest) = first
        && let Some(end) = memchr::memchr2(b'"', b'\\', rest)
        && rest[end] == b'"'
    {
        return Some(std::borrow::Cow::Borrowed(&rest[..end]));
    }
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let typed: Typed = serde_json::from_slice(data).ok()?;
    typed.kind.map(|k| std::borrow::Cow::Owned(k.into_bytes()))
}

/// Reads the usage and the finish reasons of one JSON document (a chat.completion body, or
/// one chunk's data) without parsing all of it: the document's own `usage` (see
/// [`own_usage`]), parsed from there as one value, and every `"finish_reason":"..."`.
/// Returns whether the document mentions `"usage"` at all (a `null` one included).
///
/// A full parse of each chunk into a struct cost more than the rest of the tap's work on it.
fn read_usage_and_finish(doc: &[u8], observed: &mut Observed) -> bool {
    let seen = USAGE_KEY.find(doc).is_some();
    if seen && let Some(value) = own_usage(doc) {
        take_usage(value, observed);
    }
    if observed.skip_finish_reasons {
        return seen;
    }
    // Anthropic calls it the stop reason.
    let reason_key = if observed.api == Endpoint::Messages {
        &*STOP_REASON
    } else {
        &*FINISH_REASON
    };
    for at in reason_key.find_iter(doc) {
        let Some(rest) = doc[at + reason_key.needle_len()..]
            .trim_ascii_start()
            .strip_prefix(b"\"")
        else {
            continue; // null
        };
        if let Some(end) = memchr::memchr(b'"', rest) {
            observed
                .finish_reasons
                .push(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
    }
    seen
}

/// Reads the usage value `value` starts with, as the API writes it. `null` is not a usage,
/// and leaves one already read in place.
fn take_usage(value: &[u8], observed: &mut Observed) {
    if observed.api == Endpoint::Messages {
        if let Some(u) = parse_messages_usage(value) {
            let counts = observed.messages_usage.get_or_insert_default();
            counts.update(u);
            observed.usage = Some(counts.as_usage());
        }
    } else if let Some(u) = parse_usage(value) {
        observed.usage = Some(u);
    }
}

/// Where the value of a document's own `usage` starts: the last `usage` member of the
/// top-level object, or of its `response` member (a Responses event) or `message` member
/// (Anthropic's `message_start`). A `usage` key deeper down is not the answer's: a Responses
/// object echoes the client's `metadata` after its usage, and tools' schemas before it, so
/// taking the last `"usage":` anywhere let a client replace Poe's counts with its own (and
/// spend past its budget).
///
/// Read backwards from the end, where the usage is: the first one found is the last, and a
/// body kept only from its tail (`JSON_KEEP_LIMIT`) reads the same. Outside strings JSON has
/// no backslashes, so a quote is a string's end when an even number of them precede it.
fn own_usage(doc: &[u8]) -> Option<&[u8]> {
    let escaped = |at: usize| doc[..at].iter().rev().take_while(|b| **b == b'\\').count() % 2 == 1;
    // The key of the member whose value starts at `at` (after `{`), if it is a member.
    let key_before = |at: usize| -> Option<&[u8]> {
        let head = doc[..at]
            .trim_ascii_end()
            .strip_suffix(b":")?
            .trim_ascii_end();
        let inner = head.strip_suffix(b"\"")?;
        let mut from = inner.len();
        loop {
            let q = memchr::memrchr(b'"', &inner[..from])?;
            if !escaped(q) {
                return Some(&inner[q + 1..]);
            }
            from = q;
        }
    };
    // Objects open around the cursor: 1 is the top level's members.
    let mut depth = 0usize;
    // A `usage` one level down, until the key of the object it is in is known.
    let mut nested: Option<usize> = None;
    let mut end = doc.len();
    while let Some(at) = memchr::memrchr3(b'"', b'{', b'}', &doc[..end]) {
        end = at;
        match doc[at] {
            b'}' => depth += 1,
            b'{' => {
                if depth == 2
                    && let Some(value) = nested.take()
                    && matches!(key_before(at), Some(b"response" | b"message"))
                {
                    return Some(&doc[value..]);
                }
                depth = depth.saturating_sub(1);
            }
            _ => {
                // A string's closing quote: find its opening one.
                let mut open = at;
                loop {
                    open = memchr::memrchr(b'"', &doc[..open])?;
                    if !escaped(open) {
                        break;
                    }
                }
                end = open;
                let after = doc[at + 1..].trim_ascii_start();
                if &doc[open + 1..at] == b"usage"
                    && let Some(value) = after.strip_prefix(b":")
                {
                    let value = doc.len() - value.trim_ascii_start().len();
                    match depth {
                        1 => return Some(&doc[value..]),
                        2 if nested.is_none() => nested = Some(value),
                        _ => {}
                    }
                }
            }
        }
    }
    None
}

/// Whether an event's object opens with an `"error"` member, as Poe's and OpenAI's error
/// objects do (`{"error": {...}}`). Only the first member is looked at, so a chunk costs a
/// few comparisons rather than another search.
fn opens_with_error(data: &[u8]) -> bool {
    data.trim_ascii_start()
        .strip_prefix(b"{")
        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""))
}

/// Whether an event's object has a top-level `"error"` member that is not `null`, wherever
/// it sits among the members. Only an event that spells `"error"` out is parsed (its top
/// level, values left raw): the search is all that other events cost.
fn has_error_member(data: &[u8]) -> bool {
    if ERROR_KEY.find(data).is_none() {
        return false;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    super::json::TopLevel::parse(text.trim_ascii()).is_ok_and(|top| {
        top.0
            .iter()
            .any(|(k, v)| k == "error" && v.get().trim_ascii() != "null")
    })
}

/// Bytes of the string values of `key` (`"content":`) in a chunk, escapes counted as written.
fn string_len(key: &KeyFinder, data: &[u8]) -> usize {
    let mut total = 0;
    let mut at = 0;
    while let Some(i) = key.find(&data[at..]) {
        let mut j = at + i + key.needle_len();
        while data.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if data.get(j) != Some(&b'"') {
            at = j;
            continue;
        }
        j += 1;
        let start = j;
        while j < data.len() {
            match data[j] {
                b'\\' => j += 2,
                b'"' => break,
                _ => j += 1,
            }
        }
        total += j.min(data.len()) - start;
        at = j.min(data.len());
    }
    total
}

/// Finds the top-level `usage` of a chat.completion body without parsing the whole body:
/// the last `"usage":` not inside a string, parsed from there as one value.
/// The `usage` of a complete chat.completion body.
pub fn json_usage(body: &Bytes) -> Option<Usage> {
    let mut obs = Observed::default();
    read_json_usage(&mut vec![body.clone()], &mut obs, true);
    obs.usage
}

/// A JSON body's kept frames as one piece (the frame itself when there is one).
fn joined(frames: &[Bytes]) -> Bytes {
    match frames {
        [one] => one.clone(),
        many => {
            let mut all = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            many.iter().for_each(|f| all.extend_from_slice(f));
            all.freeze()
        }
    }
}

/// `whole`: the frames are the whole body (not only its last `JSON_KEEP_LIMIT` bytes).
fn read_json_usage(frames: &mut Vec<Bytes>, observed: &mut Observed, whole: bool) {
    if frames.is_empty() {
        return;
    }
    let body = joined(frames);
    frames.clear();
    read_usage_and_finish(&body, observed);
    // An error object whose `error` member is not its first (OpenRouter's shape, and the
    // chat chunks' rule): no answer, so not stored, not completed. Parsed only when
    // `"error"` is in it.
    if whole && !observed.stream_error && has_error_member(&body) {
        observed.stream_error = true;
    }
    // A whole message's usage is its final count.
    if let Some(m) = observed.messages_usage.as_mut() {
        m.final_output = true;
    }
    // A Responses body names itself, and a `status` of `failed` is Poe's answer in a 200 for
    // a request that failed after it was accepted. Its top level is read, its members
    // skipped over unparsed.
    if whole && observed.api == Endpoint::Responses {
        let fields = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| TopLevel::parse(text).ok());
        if let Some(fields) = fields {
            observed.stream_error |= fields
                .get("status")
                .is_some_and(|status| status.get() == "\"failed\"");
            observed.response_id = fields
                .get("id")
                .and_then(|id| serde_json::from_str::<String>(id.get()).ok())
                .map(String::into_boxed_str);
        }
    }
    // A rough figure for the estimate, needed only when no usage was found (another pass
    // over the whole body otherwise).
    if observed.usage.is_none() {
        // A Responses answer's text is in `output[].content[].text`, a Messages answer's in
        // `content[].text`.
        let key = if observed.api == Endpoint::ChatCompletions {
            &CONTENT_KEY
        } else {
            &TEXT_KEY
        };
        // Tool calls' arguments (chat's `tool_calls[].function`, a Responses
        // `function_call` item) are output too.
        observed.text_bytes = (string_len(key, &body) + string_len(&ARGUMENTS_KEY, &body)) as u64;
    }
}

/// What a body longer than the tail kept (`JSON_KEEP_LIMIT`) says at its start: a usage
/// written before the answer (the tail's was read first), a Responses answer's id. It was
/// charged from its tail alone: a 9 MB answer with its usage first as 15 estimated tokens.
/// With no usage anywhere, the whole body counts as output for the estimate.
fn read_json_head(head: &[u8], observed: &mut Observed) {
    if observed.usage.is_none()
        && let Some(value) = top_level_member(head, b"usage")
    {
        take_usage(value, observed);
        // A whole message's usage is its final count.
        if let Some(m) = observed.messages_usage.as_mut() {
            m.final_output = true;
        }
    }
    if observed.api == Endpoint::Responses
        && observed.response_id.is_none()
        && let Some(value) = top_level_member(head, b"id")
    {
        observed.response_id = serde_json::Deserializer::from_slice(value)
            .into_iter::<String>()
            .next()
            .and_then(Result::ok)
            .map(String::into_boxed_str);
    }
    if observed.usage.is_none() {
        observed.text_bytes = observed.text_bytes.max(observed.bytes);
    }
}

/// Where the value of the top-level member `name` starts in the start of a JSON object,
/// read forwards (strings and nesting followed), if it is there.
fn top_level_member<'a>(doc: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < doc.len() {
        match doc[i] {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < doc.len() && doc[j] != b'"' {
                    j += if doc[j] == b'\\' { 2 } else { 1 };
                }
                if j >= doc.len() {
                    return None;
                }
                if depth == 1 && &doc[start..j] == name {
                    let rest = doc[j + 1..].trim_ascii_start();
                    if let Some(value) = rest.strip_prefix(b":") {
                        return Some(value.trim_ascii_start());
                    }
                }
                i = j + 1;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The last bytes of a body: a held partial event (sent as is when the stream ends normally,
/// dropped before an error), then the error event, if `error` is set. `None` when there is
/// nothing to send, and always for a JSON body.
/// Why an answer broke when the gateway's shutdown cut it (its grace ran out): Poe was
/// still sending.
const SHUTDOWN_CUT: &str =
    "the gateway is shutting down: its shutdown grace ran out before the answer ended";

fn end_frame(mode: &mut Mode, api: Endpoint, error: Option<&str>) -> Option<Bytes> {
    let Mode::Sse { events, .. } = mode else {
        return None;
    };
    let mut out = BytesMut::new();
    if error.is_none() {
        out.extend_from_slice(&events.held);
    }
    events.held.clear();
    if let Some(reason) = error {
        let e = if reason == SHUTDOWN_CUT {
            GatewayError::ShuttingDown(reason.to_string())
        } else {
            GatewayError::UpstreamUnreachable(reason.to_string())
        };
        out.extend_from_slice(&e.to_sse_event_for(api));
    }
    (!out.is_empty()).then(|| out.freeze())
}

/// Whether a stream that ended without a blank line after its last event was ending with
/// its last event (`data: [DONE]`, or the API's own last event, which is then read like any
/// other): the answer was whole, only its last line ending is missing (the SSE spec has such
/// an event dropped, so the client gets the two line ends it lacks). Asked of a copy of the
/// scanner, so a stream that was cut elsewhere is told apart as before.
fn done_at_eof(mode: &Mode, observed: &mut Observed) -> bool {
    let Mode::Sse { scanner, .. } = mode else {
        return false;
    };
    if observed.saw_done || !scanner.in_progress() {
        return false;
    }
    let mut probe = scanner.clone();
    let mut last = None;
    let _ = probe.feed(b"\n\n", &mut |event: &[u8]| last = Some(event.to_vec()));
    // Read on a copy: whether the event ends the stream is `on_event`'s to say, and any
    // other event cut off at the end is not read.
    let Some(event) = last else {
        return false;
    };
    // An event cut off inside its JSON is no last event, whatever its `type` says at its
    // start (read there without parsing the rest): the client could not parse it either.
    if event != b"[DONE]" && serde_json::from_slice::<serde::de::IgnoredAny>(&event).is_err() {
        return false;
    }
    let mut read = observed.clone();
    on_event(&mut read, &event);
    if read.saw_done {
        *observed = read;
    }
    observed.saw_done
}

fn join(a: Bytes, b: Option<Bytes>) -> Option<Bytes> {
    match (a.is_empty(), b) {
        (true, None) => None,
        (false, None) => Some(a),
        (true, Some(b)) => Some(b),
        (false, Some(b)) => {
            let mut out = BytesMut::with_capacity(a.len() + b.len());
            out.extend_from_slice(&a);
            out.extend_from_slice(&b);
            Some(out.freeze())
        }
    }
}

/// A cached answer's frames played back as a body, optionally paced.
pub struct ReplayBody {
    frames: std::sync::Arc<[Bytes]>,
    next: usize,
    delay: Duration,
    pause: Option<Pin<Box<Sleep>>>,
}

impl ReplayBody {
    pub fn new(frames: std::sync::Arc<[Bytes]>, delay: Duration) -> Self {
        ReplayBody {
            frames,
            next: 0,
            delay,
            pause: None,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.next >= self.frames.len() {
            return Poll::Ready(None);
        }
        if self.next > 0 && !self.delay.is_zero() {
            let delay = self.delay;
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let frame = self.frames[self.next].clone();
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_leading_comment_lines_go_on_early() {
        assert_eq!(leading_comment_lines(b": ping\n: ping\r\n"), 15);
        assert_eq!(leading_comment_lines(b": ping\ndata: x\n"), 7);
        assert_eq!(leading_comment_lines(b": ping"), 0, "not yet whole");
        assert_eq!(
            leading_comment_lines(b": a\rdata: x\n"),
            0,
            "a lone CR ends the line"
        );
        assert_eq!(leading_comment_lines(b"data: x\n: ping\n"), 0);
    }

    #[test]
    fn an_error_member_counts_wherever_it_sits() {
        assert!(has_error_member(
            br#"{"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"error"}],"error":{"message":"provider crashed"}}"#
        ));
        assert!(has_error_member(br#"{"choices":[],"error":"down"}"#));
        assert!(!has_error_member(br#"{"choices":[],"error":null}"#));
        assert!(!has_error_member(
            br#"{"choices":[{"delta":{"error":"a field of the delta"}}]}"#
        ));
        assert!(!has_error_member(br#"{"note":""error": quoted","x":1}"#));
    }

    #[test]
    fn json_usage_found_without_full_parse() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": field"}}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        let mut frames = vec![
            Bytes::from_static(&body[..40]),
            Bytes::from_static(&body[40..]),
        ];
        let mut obs = Observed::default();
        read_json_usage(&mut frames, &mut obs, true);
        assert_eq!(
            obs.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                total_tokens: 8,
                cache_read_tokens: 0,
            })
        );
    }

    /// A member is found from the start of a cut document, in strings and nesting neither.
    #[test]
    fn top_level_members_are_found_from_the_start() {
        let doc = br#"{"a":{"usage":1},"s":"\"usage\": 2","usage" : {"x":3},"id":"r"#;
        assert_eq!(
            top_level_member(doc, b"usage"),
            Some(&br#"{"x":3},"id":"r"#[..])
        );
        assert_eq!(top_level_member(doc, b"id"), Some(&br#""r"#[..]));
        assert_eq!(top_level_member(doc, b"x"), None);
    }

    /// The key is found wherever it sits: lookalikes after it (an escaped one in a string, the
    /// word as a string value) are not taken for it.
    #[test]
    fn the_usage_key_is_told_from_lookalikes_after_it() {
        let doc = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5},"note":"usage","x":"the \"usage\": 9"}"#;
        let mut obs = Observed::default();
        assert!(read_usage_and_finish(doc, &mut obs));
        assert_eq!(obs.usage.map(|u| u.total_tokens), Some(5));
    }

    /// Only the answer's own usage counts: a `usage` key in what the client gets echoed
    /// (a Responses object's `metadata`, after the usage; a tool's schema, before it) or in a
    /// string is not it, and a body read only from its tail reads the same.
    #[test]
    fn only_the_answers_own_usage_counts() {
        let usage = |doc: &[u8], api: Endpoint| {
            let mut obs = Observed {
                api,
                ..Observed::default()
            };
            read_usage_and_finish(doc, &mut obs);
            obs.usage.map(|u| (u.prompt_tokens, u.completion_tokens))
        };
        let body = br#"{"id":"resp_1","object":"response","tools":[{"type":"function","name":"f","parameters":{"type":"object","properties":{"usage":{"type":"string"}}}}],"output":[{"type":"message","content":[{"type":"output_text","text":"say "usage": {}"}]}],"usage":{"input_tokens":100000,"output_tokens":20,"total_tokens":100020},"user":null,"metadata":{"usage":{"input_tokens":0,"output_tokens":0}}}"#;
        assert_eq!(usage(body, Endpoint::Responses), Some((100000, 20)));
        assert_eq!(
            usage(&body[40..], Endpoint::Responses),
            Some((100000, 20)),
            "a tail"
        );
        let spoof = br#"{"id":"resp_1","usage":{"input_tokens":100000,"output_tokens":20},"metadata":{"usage":"n/a"}}"#;
        assert_eq!(usage(spoof, Endpoint::Responses), Some((100000, 20)));
        let event = br#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":7,"output_tokens":3},"metadata":{"usage":{"input_tokens":0,"output_tokens":0}}},"sequence_number":9}"#;
        assert_eq!(usage(event, Endpoint::Responses), Some((7, 3)));
        // Only a client's: no usage.
        let none = br#"{"type":"response.completed","response":{"id":"r","metadata":{"usage":{"input_tokens":0,"output_tokens":0}}}}"#;
        assert_eq!(usage(none, Endpoint::Responses), None);
        let start = br#"{"type":"message_start","message":{"id":"m","content":[{"type":"tool_use","input":{"usage":{"input_tokens":1}}}],"usage":{"input_tokens":10,"output_tokens":1}}}"#;
        assert_eq!(usage(start, Endpoint::Messages), Some((10, 1)));
        let chunk = br#"{"id":"c","choices":[{"delta":{"content":""usage":{"prompt_tokens":1}"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        assert_eq!(usage(chunk, Endpoint::ChatCompletions), Some((5, 2)));
        // Escaped backslashes before a closing quote are told from an escaped quote.
        let slashes = br#"{"choices":[{"message":{"content":"ends in a slash \"}}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        assert_eq!(usage(slashes, Endpoint::ChatCompletions), Some((4, 1)));
    }

    /// Without Poe's usage the output is estimated from what was streamed: tool calls'
    /// arguments and reasoning count as well as text (they counted 0).
    #[test]
    fn tool_calls_and_reasoning_count_in_the_estimate() {
        let mut chat = Observed::default();
        on_event(
            &mut chat,
            br#"{"choices":[{"index":0,"delta":{"content":null,"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
        );
        on_event(
            &mut chat,
            br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
        );
        assert_eq!(chat.text_bytes, 10 + 2);
        let mut responses = Observed {
            api: Endpoint::Responses,
            ..Observed::default()
        };
        for event in [
            &br#"{"type":"response.function_call_arguments.delta","item_id":"fc","delta":"{\"a\":1}"}"#[..],
            br#"{"type":"response.reasoning_summary_text.delta","delta":"think"}"#,
            br#"{"type":"response.output_text.delta","delta":"ok"}"#,
        ] {
            on_event(&mut responses, event);
        }
        assert_eq!(responses.text_bytes, 9 + 5 + 2);
    }

    /// A Messages stream's usage comes in two events: the input counts (cache reads and
    /// writes counted in the prompt) at the start, the output count at the end.
    #[test]
    fn messages_usage_is_gathered_over_its_events() {
        let mut obs = Observed {
            api: Endpoint::Messages,
            skip_finish_reasons: false,
            ..Observed::default()
        };
        on_event(
            &mut obs,
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
        );
        on_event(
            &mut obs,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        );
        assert_eq!(obs.text_bytes, 5);
        assert!(!obs.saw_done);
        on_event(
            &mut obs,
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
        );
        on_event(&mut obs, br#"{"type":"message_stop"}"#);
        assert!(obs.saw_done && !obs.stream_error);
        assert_eq!(
            obs.usage,
            Some(Usage {
                prompt_tokens: 115,
                completion_tokens: 7,
                total_tokens: 122,
                cache_read_tokens: 100,
            })
        );
        assert_eq!(obs.finish_reasons, ["end_turn"]);
        // `[DONE]` is no end here; an error event fails the stream.
        let mut obs = Observed {
            api: Endpoint::Messages,
            ..Observed::default()
        };
        on_event(&mut obs, b"[DONE]");
        assert!(!obs.saw_done);
        on_event(
            &mut obs,
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert!(obs.stream_error);
        assert!(is_error_object(
            Endpoint::Messages,
            br#"{"type":"error","error":{}}"#
        ));
        assert!(!is_error_object(
            Endpoint::ChatCompletions,
            br#"{"type":"error","error":{}}"#
        ));
    }

    #[test]
    fn responses_events_are_told_by_their_type() {
        let t = |d: &[u8]| event_type(d).map(|t| String::from_utf8(t.into_owned()).unwrap());
        assert_eq!(
            t(br#"{"type":"response.completed","response":{}}"#).as_deref(),
            Some("response.completed")
        );
        assert_eq!(
            t(br#" { "type" : "error" ,"code":"x"}"#).as_deref(),
            Some("error")
        );
        // Not the first member: found by a parse, not taken from a nested object.
        assert_eq!(
            t(br#"{"response":{"output":[{"type":"message"}]},"type":"response.failed"}"#)
                .as_deref(),
            Some("response.failed")
        );
        assert_eq!(t(br#"{"choices":[]}"#), None);
        assert_eq!(t(b"[DONE]"), None);

        let mut obs = Observed {
            api: Endpoint::Responses,
            ..Observed::default()
        };
        on_event(
            &mut obs,
            br#"{"type":"response.output_text.delta","delta":"Hi \"x\""}"#,
        );
        assert_eq!(obs.text_bytes, 8);
        assert!(!obs.saw_done && !obs.stream_error);
        on_event(
            &mut obs,
            br#"{"type":"response.completed","response":{"usage":{"input_tokens":4,"input_tokens_details":{"cached_tokens":3},"output_tokens":2,"total_tokens":6}}}"#,
        );
        assert!(obs.saw_done && !obs.stream_error);
        assert_eq!(
            obs.usage,
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                total_tokens: 6,
                cache_read_tokens: 3,
            })
        );
        on_event(&mut obs, br#"{"type":"response.failed","response":{}}"#);
        assert!(obs.stream_error);
    }

    #[test]
    fn sse_usage_and_finish_reason() {
        let mut obs = Observed::default();
        on_event(
            &mut obs,
            br#"{"choices":[{"delta":{"content":"hello"},"finish_reason":"stop"}]}"#,
        );
        on_event(
            &mut obs,
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        );
        on_event(&mut obs, b"[DONE]");
        assert!(obs.saw_done);
        assert_eq!(obs.finish_reasons, vec!["stop"]);
        assert_eq!(obs.usage.unwrap().total_tokens, 3);
        assert_eq!(obs.text_bytes, 5);
    }

    /// A rewritten event keeps its other fields and comments in place, and its line endings;
    /// all its data lines make way for the new data's lines.
    #[test]
    fn rewritten_events_keep_their_other_lines() {
        let out = replace_data(
            b"event: chunk\r\n: note\r\nda",
            b"ta: {\"a\":\r\ndata: 1}\r\nid: 7\r\nretry: 10\r\n\r\n",
            b"{\"b\":\n2}",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: chunk\r\n: note\r\ndata: {\"b\":\r\ndata: 2}\r\nid: 7\r\nretry: 10\r\n\r\n"
        );
        let out = replace_data(b"", b"id: 1\rdata:{}\r\r", b"{\"c\":3}");
        assert_eq!(out, b"id: 1\rdata: {\"c\":3}\r\r");
    }

    /// Found by the `sse_tap` fuzz target: LF lines, then a CRLF blank line cut between its CR
    /// and LF. The event was written with CR or CRLF depending on the cut.
    #[test]
    fn rewritten_events_take_their_first_line_ending() {
        let data = br#"{"id":"a"}"#;
        let whole = replace_data(b"", b"data: {\"usage\":null,\"id\":\"a\"}\n\r\n", data);
        let cut = replace_data(b"", b"data: {\"usage\":null,\"id\":\"a\"}\n\r", data);
        assert_eq!(whole, b"data: {\"id\":\"a\"}\n\n");
        assert_eq!(cut, whole);
    }

    #[test]
    fn usage_edits() {
        assert!(matches!(
            usage_edit(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#),
            UsageEdit::Drop
        ));
        let cases: [(&[u8], &str); 3] = [
            (
                br#"{"id":"a","choices":[{"delta":{}}],"usage":{"total_tokens":3}}"#,
                r#"{"id":"a","choices":[{"delta":{}}]}"#,
            ),
            (
                br#"{"usage": null , "id":"a","choices":[{"delta":{}}]}"#,
                r#"{"id":"a","choices":[{"delta":{}}]}"#,
            ),
            (
                br#"{"id":"a","usage":null,"choices":[]}"#,
                r#"{"id":"a","choices":[]}"#,
            ),
        ];
        for (input, want) in cases {
            match usage_edit(input) {
                UsageEdit::Rewrite(out) => assert_eq!(String::from_utf8(out).unwrap(), want),
                _ => panic!("not rewritten: {}", String::from_utf8_lossy(input)),
            }
        }
        assert!(matches!(
            usage_edit(br#"{"choices":[{"delta":{"content":"\"usage\""}}]}"#),
            UsageEdit::Keep
        ));
    }

    // Regressions found by the `sse_tap` fuzz target (fuzz/).
    #[test]
    fn usage_edit_cuts_the_usage_key_not_a_lookalike() {
        // The string value "usage" before the key, and the key written with an escape.
        match usage_edit(br#"{"b":"usage","us\u0061ge":1,"choices":[1]}"#) {
            UsageEdit::Rewrite(out) => assert_eq!(out, br#"{"b":"usage","choices":[1]}"#),
            _ => panic!("not rewritten"),
        }
        // `[[]]` holds a choice: the chunk is rewritten, not dropped.
        assert!(matches!(
            usage_edit(br#"{"choices":[[]],"usage":{"total_tokens":1}}"#),
            UsageEdit::Rewrite(_)
        ));
    }

    #[test]
    fn a_multi_line_event_is_rewritten_line_by_line() {
        let mut mode = Mode::Sse {
            scanner: SseScanner::default(),
            events: Events::default(),
            strip_usage: true,
        };
        let frame = b"data: {\"id\":\"a\",\ndata: \"choices\":[],\"usage\":null}\n\n";
        let out = scan(
            &mut mode,
            &mut Observed::default(),
            Bytes::from_static(frame),
        )
        .unwrap();
        assert_eq!(&out[..], b"data: {\"id\":\"a\",\ndata: \"choices\":[]}\n\n");
    }
}
