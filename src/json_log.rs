//! The JSON log line: what tracing-subscriber's `json().flatten_event(true)` writes, byte for
//! byte (the same keys in the same order, serde_json's escaping and number formats), built
//! for a fraction of its cost.
//!
//! Why: at the default `RUST_LOG=info` every request writes an access line, and
//! tracing-subscriber's JSON formatter spent about 30k instructions on each (callgrind), a
//! quarter of a whole stored-miss request. It serialises through an adaptor that checks UTF-8
//! on every small write and escapes `Display` values piece by piece, and it formats the
//! timestamp through `fmt` each time. Here a line is built in a reused byte buffer with
//! serde_json's own writers, the date part of the timestamp is formatted once a second, and
//! the line goes to the writer in one piece. (json-subscriber, tried as a drop-in, cost more:
//! 41k.) `tests` checks the output against tracing-subscriber's own, spans included.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// The event format (use with `fmt_fields(JsonFields::new())`, whose span fields it reads).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

/// The gateway's JSON log layer, writing lines to `make_writer` (stderr in
/// [`crate::telemetry::init`]; tests capture them).
pub fn layer<S, W>(make_writer: W) -> tracing_subscriber::fmt::Layer<S, JsonFields, JsonLines, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLines)
        .with_writer(make_writer)
}

/// A thread's reused buffers: the line, a `Debug` value being formatted, and the date part
/// of the timestamp for the second it was made for.
#[derive(Default)]
struct Buffers {
    line: Vec<u8>,
    text: String,
    second: Option<(u64, [u8; 19])>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        BUFFERS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut b) => write_line(&mut b, ctx, &mut writer, event),
            // An event logged while formatting one (from inside a `Debug` impl).
            Err(_) => write_line(&mut Buffers::default(), ctx, &mut writer, event),
        })
    }
}

fn write_line<S, N>(
    b: &mut Buffers,
    ctx: &FmtContext<'_, S, N>,
    writer: &mut Writer<'_>,
    event: &Event<'_>,
) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    let Buffers { line, text, second } = b;
    line.clear();
    line.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(line, second, SystemTime::now());
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(event.metadata().level().as_str().as_bytes());
    line.push(b'"');
    event.record(&mut Fields { line, text });
    key(line, "target");
    string(line, event.metadata().target());
    let current = event
        .parent()
        .and_then(|id| ctx.span(id))
        .or_else(|| ctx.lookup_current());
    if let Some(span) = &current {
        key(line, "span");
        write_span::<S, N>(line, span);
        key(line, "spans");
        line.push(b'[');
        if let Some(leaf) = ctx.lookup_current() {
            for (i, s) in leaf.scope().from_root().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                write_span::<S, N>(line, &s);
            }
        }
        line.push(b']');
    }
    line.extend_from_slice(b"}\n");
    // Everything written is UTF-8 (strings, serde_json's output, ASCII); checked once here.
    writer.write_str(std::str::from_utf8(line).map_err(|_| fmt::Error)?)
}

/// `{<the span's fields>,"name":"<name>"}`, as tracing-subscriber writes a span: its fields
/// are stored as JSON text by `JsonFields`, and re-read (into serde_json's map, so in that
/// map's key order) to be merged with the name.
fn write_span<S, N>(line: &mut Vec<u8>, span: &SpanRef<'_, S>)
where
    S: for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    line.push(b'{');
    let ext = span.extensions();
    let fields = ext
        .get::<FormattedFields<N>>()
        .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok());
    if let Some(serde_json::Value::Object(map)) = fields {
        for (k, v) in map {
            string(line, &k);
            line.push(b':');
            let _ = serde_json::to_writer(&mut *line, &v);
            line.push(b',');
        }
    }
    line.extend_from_slice(b"\"name\":");
    string(line, span.metadata().name());
    line.push(b'}');
}

/// A JSON string, escaped as serde_json escapes it.
fn string(line: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(line, s);
}

/// `,"name":`
fn key(line: &mut Vec<u8>, name: &str) {
    line.push(b',');
    string(line, name);
    line.push(b':');
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's `SystemTime` timer writes it.
fn timestamp(line: &mut Vec<u8>, cache: &mut Option<(u64, [u8; 19])>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let date = match cache {
        Some((s, date)) if *s == secs => *date,
        _ => {
            let date = date_time(secs);
            *cache = Some((secs, date));
            date
        }
    };
    line.extend_from_slice(&date);
    line.push(b'.');
    let mut micros = [0u8; 6];
    digits(&mut micros, since.subsec_micros());
    line.extend_from_slice(&micros);
    line.push(b'Z');
}

/// `n` in decimal, zero-padded to fill `out`.
fn digits(out: &mut [u8], mut n: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for a Unix time in seconds.
fn date_time(secs: u64) -> [u8; 19] {
    let t = time::OffsetDateTime::from_unix_timestamp(secs.min(i64::MAX as u64) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = [0u8; 19];
    digits(&mut out[0..4], t.year().clamp(0, 9999) as u32);
    digits(&mut out[5..7], u8::from(t.month()) as u32);
    digits(&mut out[8..10], t.day() as u32);
    digits(&mut out[11..13], t.hour() as u32);
    digits(&mut out[14..16], t.minute() as u32);
    digits(&mut out[17..19], t.second() as u32);
    for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        out[at] = sep;
    }
    out
}

/// Writes an event's fields as `,"name":value` pairs, as tracing-serde's map visitor does.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    text: &'a mut String,
}

impl Fields<'_> {
    fn scalar<T: serde::Serialize>(&mut self, field: &Field, value: T) {
        key(self.line, field.name());
        let _ = serde_json::to_writer(&mut *self.line, &value);
    }
}

impl Visit for Fields<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.scalar(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.scalar(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.scalar(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.scalar(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        key(self.line, field.name());
        string(self.line, value);
    }

    /// `%value`, `?value`, the message, and whatever else has no method of its own.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text.clear();
        let _ = write!(self.text, "{value:?}");
        key(self.line, field.name());
        string(self.line, self.text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    /// What `log` writes through a subscriber with our format or tracing-subscriber's.
    fn lines(ours: bool, log: impl Fn()) -> String {
        let sink = Sink::default();
        let layer: Box<dyn tracing_subscriber::Layer<_> + Send + Sync> = if ours {
            super::layer(sink.clone()).boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(sink.clone())
                .json()
                .flatten_event(true)
                .boxed()
        };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), log);
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    fn access_line() {
        let n: Option<f64> = None;
        tracing::info!(
            target: "poe_gateway::access",
            request_id = %"a \"quoted\"\nid\u{1}",
            key_id = "",
            model = %"gpt-5",
            stream = true,
            status = 502u16,
            attempts = 3u32,
            latency_ms = 245.412_371_999_999_98,
            ttfb_ms = n,
            prompt_tokens = Some(-7i64),
            big = u128::MAX,
            unicode = "h\u{e9}llo \u{2713}\u{7f}",
            nan = f64::NAN,
            "request finished"
        );
    }

    fn in_spans() {
        let outer = tracing::info_span!("request", method = "POST", n = 1u64, z = "b");
        let _o = outer.enter();
        let inner = tracing::warn_span!("upstream", "gen_ai.system" = "poe");
        let _i = inner.enter();
        tracing::warn!(error = ?io::Error::other("boom"), "in two spans {}", 2);
        let orphan = tracing::info_span!("other", empty = tracing::field::Empty);
        tracing::error!(parent: &orphan, "with an explicit parent");
    }

    /// Every line the same text once its timestamp is cut out, and timestamps of the same
    /// shape (their values are `timestamps`' business: the two runs are a moment apart).
    #[test]
    fn lines_are_tracing_subscribers_own() {
        for log in [access_line as fn(), in_spans] {
            let (ours, theirs) = (lines(true, log), lines(false, log));
            assert_eq!(ours.lines().count(), theirs.lines().count());
            assert!(!ours.is_empty());
            for (a, b) in ours.lines().zip(theirs.lines()) {
                let split = |l: &str| {
                    let at = l.find("\",\"level\"").unwrap();
                    (l[..at].to_string(), l[at..].to_string())
                };
                let ((ta, ra), (tb, rb)) = (split(a), split(b));
                assert_eq!(ra, rb);
                let shape = |t: &str| t.bytes().map(|c| c.is_ascii_digit()).collect::<Vec<_>>();
                assert_eq!(shape(&ta), shape(&tb), "{ta} / {tb}");
                assert_eq!(
                    ta.replace(char::is_numeric, ""),
                    tb.replace(char::is_numeric, "")
                );
            }
        }
        let spans = lines(true, in_spans);
        assert!(spans.contains(r#""spans":[{"method":"POST","#), "{spans}");
        assert!(spans.contains(r#""span":{"name":"other"}"#), "{spans}");
    }

    #[test]
    fn timestamps() {
        let mut cache = None;
        let mut at = |secs: u64, micros: u32| {
            let mut line = Vec::new();
            let t = UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000);
            timestamp(&mut line, &mut cache, t);
            String::from_utf8(line).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(951_782_400, 999_999), "2000-02-29T00:00:00.999999Z");
        assert_eq!(at(1_796_169_599, 120_000), "2026-12-01T23:59:59.120000Z");
        assert_eq!(at(1_796_169_600, 1), "2026-12-02T00:00:00.000001Z");
    }
}
