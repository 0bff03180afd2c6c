//! The stream tap behaves the same however the upstream stream is cut into frames.
//!
//! Streams are generated from a model: content chunks with multi-byte text, comments,
//! multi-line `data:` events, a finish chunk, usage on its own chunk or riding on a content
//! chunk, `[DONE]` or not, LF or CRLF. For every stream and every cut:
//! - the client's bytes equal the model's expected rewrite (the injected usage removed),
//! - the usage the tap reads is the same,
//! - a passthrough tap returns the stream byte for byte.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use poe_gateway::gateway::completion::Accounting;
use poe_gateway::gateway::tap::{Tap, Usage};
use poe_gateway::ledger::{Ledger, Store};
use poe_gateway::metrics::Metrics;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Event {
    Content(String),
    Comment,
    MultiLine(u8),
    Finish,
    UsageOnly(u64, u64),
    /// Usage riding on a content chunk, with an `id:` line or none.
    UsageWithContent(String, u64, u64, Option<u8>),
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// (bytes upstream sends, bytes the client should get when usage is stripped)
fn render(events: &[Event], done: bool, crlf: bool) -> (Vec<u8>, Vec<u8>, Option<Usage>) {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut up = String::new();
    let mut client = String::new();
    let mut usage = None;
    for e in events {
        let (wire, seen) = match e {
            Event::Content(t) => {
                let w = format!(
                    "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}{nl}{nl}",
                    json_str(t)
                );
                (w.clone(), w)
            }
            Event::Comment => {
                let w = format!(": keep-alive{nl}{nl}");
                (w.clone(), w)
            }
            Event::MultiLine(n) => {
                let w = format!("event: note{nl}data: line one {n}{nl}data: line two{nl}{nl}");
                (w.clone(), w)
            }
            Event::Finish => {
                let w = format!(
                    "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}{nl}{nl}"
                );
                (w.clone(), w)
            }
            Event::UsageOnly(p, c) => {
                usage = Some(Usage {
                    prompt_tokens: *p,
                    completion_tokens: *c,
                    total_tokens: p + c,
                    cache_read_tokens: 0,
                });
                (
                    format!(
                        "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}{nl}{nl}",
                        p + c
                    ),
                    String::new(),
                )
            }
            Event::UsageWithContent(t, p, c, id) => {
                usage = Some(Usage {
                    prompt_tokens: *p,
                    completion_tokens: *c,
                    total_tokens: p + c,
                    cache_read_tokens: 0,
                });
                let choices = format!(
                    "[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]",
                    json_str(t)
                );
                let id = id.map(|n| format!("id: {n}{nl}")).unwrap_or_default();
                (
                    format!(
                        "{id}data: {{\"id\":\"c\",\"choices\":{choices},\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}{nl}{nl}",
                        p + c
                    ),
                    // The gateway rewrites the event with the field cut out; its `id:` line
                    // and its line endings stay.
                    format!("{id}data: {{\"id\":\"c\",\"choices\":{choices}}}{nl}{nl}"),
                )
            }
        };
        up.push_str(&wire);
        client.push_str(&seen);
    }
    if done {
        let w = format!("data: [DONE]{nl}{nl}");
        up.push_str(&w);
        client.push_str(&w);
    }
    (up.into_bytes(), client.into_bytes(), usage)
}

fn event() -> impl Strategy<Value = Event> {
    let text = "[a-z \u{e9}\u{2615}\u{1f600}\"\\\\]{0,12}";
    prop_oneof![
        4 => text.prop_map(Event::Content),
        1 => Just(Event::Comment),
        1 => any::<u8>().prop_map(Event::MultiLine),
        1 => Just(Event::Finish),
        1 => (0u64..5000, 0u64..5000).prop_map(|(p, c)| Event::UsageOnly(p, c)),
        1 => (text, 0u64..5000, 0u64..5000, proptest::option::of(any::<u8>()))
            .prop_map(|(t, p, c, id)| Event::UsageWithContent(t, p, c, id)),
    ]
}

/// Runs `frames` through a tap; returns the client's bytes and the usage read.
fn run(frames: Vec<Bytes>, strip: bool) -> (Vec<u8>, Option<Usage>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let acct = Arc::new(Accounting {
            metrics: Arc::new(Metrics::new()),
            ledger: Ledger::start(Store::memory().unwrap(), None),
            charger: None,
        });
        let mut tap = Tap::over_frames(frames.into(), strip, acct);
        let mut out = Vec::new();
        while let Some(frame) = tap.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                assert!(!d.is_empty(), "the tap never sends an empty frame");
                out.extend_from_slice(&d);
            }
        }
        (out, tap.observed().usage)
    })
}

fn cut(bytes: &[u8], points: &[usize]) -> Vec<Bytes> {
    let mut pts: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    pts.sort_unstable();
    pts.dedup();
    let mut frames = Vec::new();
    let mut at = 0;
    for p in pts.into_iter().chain([bytes.len()]) {
        if p > at {
            frames.push(Bytes::copy_from_slice(&bytes[at..p]));
            at = p;
        }
    }
    frames
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_cut_gives_the_same_client_bytes_and_usage(
        events in prop::collection::vec(event(), 0..12),
        done in any::<bool>(),
        crlf in any::<bool>(),
        points in prop::collection::vec(any::<usize>(), 0..30),
    ) {
        let (upstream, expected, usage) = render(&events, done, crlf);
        let frames = cut(&upstream, &points);

        let (stripped, read) = run(frames.clone(), true);
        if done {
            prop_assert_eq!(&stripped, &expected);
        } else {
            // Without [DONE] the stream ends with one error event after the expected bytes.
            prop_assert!(stripped.starts_with(&expected));
            let tail = String::from_utf8_lossy(&stripped[expected.len()..]).into_owned();
            prop_assert!(tail.starts_with("data: {\"error\""), "tail: {:?}", tail);
        }
        prop_assert_eq!(read, usage);

        let (passed, read) = run(frames, false);
        prop_assert!(passed.starts_with(&upstream));
        prop_assert_eq!(read, usage);
    }
}
