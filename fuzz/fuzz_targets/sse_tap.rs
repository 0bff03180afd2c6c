//! The SSE tap (src/gateway/tap.rs) on an arbitrary byte stream cut into arbitrary frames.
//!
//! Input: `n`, then `n` frame-length bytes, then the stream. The stream is cut into frames of
//! those lengths in turn (0: the rest of the stream in one frame); `n = 0` sends it whole.
//!
//! Checked, as tests/tap_props.rs does for modelled streams:
//! - pass-through: the client gets the stream byte for byte, as whole events. A stream
//!   without `[DONE]` loses its unfinished last event and ends with one error event, unless
//!   one of its own events was an error object; one whose unfinished last event is
//!   `data: [DONE]` gets the blank line that completes it;
//! - usage stripping: the cut makes no difference (the same bytes and the same usage as the
//!   stream sent in one frame), and the output is a well-formed rewrite: its events are the
//!   stream's events in order, a usage chunk dropped or a chunk's `usage` member cut out,
//!   every other member of that chunk unchanged;
//! - both modes read the same usage, `[DONE]`, event count and finish reasons.

#![no_main]

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Body;
use libfuzzer_sys::fuzz_target;
use poe_gateway::GatewayError;
use poe_gateway::gateway::completion::Accounting;
use poe_gateway::gateway::json::TopLevel;
use poe_gateway::gateway::sse::SseScanner;
use poe_gateway::gateway::tap::{Observed, Tap};
use poe_gateway::ledger::{Ledger, Store};
use poe_gateway::metrics::Metrics;

struct Env {
    rt: tokio::runtime::Runtime,
    acct: Arc<Accounting>,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    // The ledger's writer is spawned on a runtime dropped at once: every row is then refused
    // (and counted as dropped) rather than piling up over millions of runs.
    let acct = {
        let tmp = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = tmp.enter();
        Arc::new(Accounting {
            metrics: Arc::new(Metrics::new()),
            ledger: Ledger::start(Store::memory().expect("sqlite"), None),
            charger: None,
        })
    };
    Env { rt, acct }
});

/// Runs `frames` through a tap; returns the client's bytes and what the tap observed.
fn run(frames: Vec<Bytes>, strip: bool) -> (Vec<u8>, Observed) {
    let env = &*ENV;
    let _guard = env.rt.enter();
    let mut tap = Tap::over_frames(frames.into(), strip, env.acct.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match Pin::new(&mut tap).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let data = frame
                    .into_data()
                    .expect("an SSE tap sends data frames only");
                assert!(!data.is_empty(), "the tap never sends an empty frame");
                out.extend_from_slice(&data);
            }
            Poll::Ready(Some(Err(e))) => panic!("an SSE tap ends with an event, not an error: {e}"),
            Poll::Ready(None) => break,
            Poll::Pending => panic!("a replayed body with no delay never waits"),
        }
    }
    assert!(tap.is_end_stream());
    (out, tap.observed().clone())
}

fn cut(stream: &[u8], lens: &[u8]) -> Vec<Bytes> {
    if lens.is_empty() {
        return if stream.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::copy_from_slice(stream)]
        };
    }
    let mut frames = Vec::new();
    let mut at = 0;
    for &len in lens.iter().cycle() {
        if at == stream.len() {
            break;
        }
        let end = match len {
            0 => stream.len(),
            n => (at + n as usize).min(stream.len()),
        };
        frames.push(Bytes::copy_from_slice(&stream[at..end]));
        at = end;
    }
    frames
}

/// Where the stream's last event (or blank line) ends: what follows is an unfinished event.
fn last_bound(stream: &[u8]) -> usize {
    let mut scanner = SseScanner::default();
    let mut last = 0;
    scanner
        .feed_bounds(stream, &mut |_: Option<&[u8]>, end: usize| last = end)
        .expect("fuzz inputs are far below the line limit");
    last
}

/// The bytes of whole `:` comment lines at the start of `rest`: lines the tap passes on as
/// they come, before any line of an event. A line ends at `\n`, `\r\n` or a lone `\r`; one
/// ended by a lone `\r`, or by the stream's end, is not known to be whole and stops the run.
fn comment_lines(rest: &[u8]) -> usize {
    let mut at = 0;
    while rest.get(at) == Some(&b':') {
        let Some(end) = rest[at..].iter().position(|b| *b == b'\n' || *b == b'\r') else {
            break;
        };
        let end = at + end;
        match (rest[end], rest.get(end + 1)) {
            (b'\n', _) => at = end + 1,
            (b'\r', Some(b'\n')) => at = end + 2,
            _ => break,
        }
    }
    at
}

/// The events of a stream, as data payloads, and whether a line or event was left open.
fn events(stream: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut scanner = SseScanner::default();
    let mut out = Vec::new();
    scanner
        .feed(stream, &mut |d: &[u8]| out.push(d.to_vec()))
        .expect("fuzz inputs are far below the line limit");
    (out, scanner.in_progress())
}

fn same_reading(a: &Observed, b: &Observed) {
    assert_eq!(a.usage, b.usage, "usage");
    assert_eq!(a.saw_done, b.saw_done, "[DONE]");
    assert_eq!(a.events, b.events, "event count");
    assert_eq!(a.finish_reasons, b.finish_reasons, "finish reasons");
    assert_eq!(a.text_bytes, b.text_bytes, "text bytes");
    assert_eq!(a.bytes, b.bytes, "bytes");
}

/// A top-level object's members as (key, raw value text).
fn members(data: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(data).ok()?;
    let top = TopLevel::parse(text).ok()?;
    Some(
        top.0
            .iter()
            .map(|(k, v)| (k.to_string(), v.get().to_string()))
            .collect(),
    )
}

/// What strip mode does with one upstream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Keep,
    /// A usage-only chunk: a usage value, no choices and no error.
    Drop,
    /// The same top-level members in the same order, the `usage` member left out.
    Rewrite,
}

fn expect(input: &[u8]) -> Expect {
    let Some(m) = members(input) else {
        return Expect::Keep;
    };
    let get = |name: &str| m.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    // The tap reads only chunks that spell `"usage"` out; a key written with escapes is
    // not recognised (Poe writes plain keys).
    let Some(usage) = get("usage") else {
        return Expect::Keep;
    };
    if !input.windows(7).any(|w| w == b"\"usage\"") {
        return Expect::Keep;
    }
    let no_choices = get("choices").is_none_or(|c| {
        c == "null"
            || serde_json::from_str::<Vec<serde::de::IgnoredAny>>(c).is_ok_and(|v| v.is_empty())
    });
    // An error event is kept, its usage cut out, so the client learns its stream failed.
    if no_choices && usage != "null" && get("error").is_none() {
        Expect::Drop
    } else {
        Expect::Rewrite
    }
}

fn is_rewrite(input: &[u8], output: &[u8]) -> bool {
    let (Some(before), Some(after)) = (members(input), members(output)) else {
        return false;
    };
    after.iter().eq(before.iter().filter(|(k, _)| k != "usage"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize).min(rest.len());
    let (lens, stream) = rest.split_at(n);
    let frames = cut(stream, lens);

    let (mut in_events, open) = events(stream);
    let mut saw_done = in_events.iter().any(|e| e == b"[DONE]");
    // An unfinished last event that a blank line would make `[DONE]`.
    let (completed, _) = events(&[stream, b"\n\n"].concat());
    let eof_done = !saw_done
        && open
        && completed.len() > in_events.len()
        && completed.last().is_some_and(|e| e == b"[DONE]");
    if eof_done {
        in_events = completed;
        saw_done = true;
    }
    // Poe's own error event (an object opening with `"error"`, or a chunk with a top-level
    // `error` member that is not null, spelled out) says why a stream ended: the tap adds
    // none of its own after it.
    let own_error = in_events.iter().any(|e| {
        e.trim_ascii_start()
            .strip_prefix(b"{")
            .is_some_and(|r| r.trim_ascii_start().starts_with(b"\"error\""))
            || (e.windows(7).any(|w| w == b"\"error\"")
                && members(e.trim_ascii()).is_some_and(|m| {
                    m.iter().any(|(k, v)| k == "error" && v.trim() != "null")
                }))
    });
    let ended = saw_done || own_error;
    let error_event =
        GatewayError::UpstreamUnreachable("upstream ended the stream without [DONE]".into())
            .to_sse_event();

    // Pass-through: the same bytes, and the error event when `[DONE]` never came.
    let (passed, seen) = run(frames.clone(), false);
    let mut want = stream.to_vec();
    if eof_done {
        want.extend_from_slice(b"\n\n");
    } else if !ended {
        // Whole comment lines after the last event, before any line of an unfinished one,
        // went on as they came.
        let bound = last_bound(stream);
        want.truncate(bound + comment_lines(&stream[bound..]));
        want.extend_from_slice(&error_event);
    }
    assert_eq!(passed, want, "pass-through changed the stream");
    assert_eq!(seen.saw_done, saw_done);
    assert_eq!(seen.bytes, stream.len() as u64);

    // Strip: the cut makes no difference.
    let (stripped, read) = run(frames, true);
    let (whole, whole_read) = run(cut(stream, &[]), true);
    assert_eq!(
        stripped,
        whole,
        "the cut changed the stripped stream: {:?} vs {:?}",
        String::from_utf8_lossy(&stripped),
        String::from_utf8_lossy(&whole)
    );
    same_reading(&read, &whole_read);
    same_reading(&read, &seen);

    // Strip: a well-formed rewrite of the stream's events.
    let body = if ended {
        &stripped[..]
    } else {
        stripped
            .strip_suffix(&error_event[..])
            .expect("a stream without [DONE] ends with the error event")
    };
    let (out_events, _) = events(body);
    let mut out = out_events.iter();
    for input in &in_events {
        let want = expect(input);
        if want == Expect::Drop {
            continue;
        }
        let got = out.next();
        let ok = match want {
            Expect::Keep => got == Some(input),
            _ => got.is_some_and(|o| is_rewrite(input, o)),
        };
        assert!(
            ok,
            "upstream event {:?} should be {want:?}, the client got {:?}",
            String::from_utf8_lossy(input),
            got.map(|o| String::from_utf8_lossy(o))
        );
    }
    assert!(
        out.next().is_none(),
        "the stripped stream has events the upstream did not send: {:?}",
        String::from_utf8_lossy(&stripped)
    );
});
