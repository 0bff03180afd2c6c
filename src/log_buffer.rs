//! stderr for the log layer, with INFO and quieter lines written in batches.
//!
//! At the default level every request writes an access line. A `write(2)` per line cost 5 to
//! 10 % of the throughput at 32 connections (benches/README.md, session 13). Here INFO,
//! DEBUG and TRACE lines go into one buffer. The buffer is written out when:
//! - it holds [`FLUSH_BYTES`];
//! - a WARN or ERROR line comes (that line goes right after the held ones, so order holds);
//! - [`FLUSH_AFTER`] has passed since it stopped being empty (a flusher thread does this);
//! - [`flush`] is called, at shutdown and from the panic hook.
//!
//! Warnings and errors are never held. Each line is appended whole, so lines are never
//! interleaved. Like a proxy's buffered access log, a process killed outright (SIGKILL) loses
//! at most the last [`FLUSH_AFTER`] of INFO lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Held bytes past which the buffer is written at once.
pub const FLUSH_BYTES: usize = 32 * 1024;
/// Longest an INFO line waits in the buffer.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);

static HELD: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Wakes the flusher when the buffer stops being empty.
static NOT_EMPTY: Condvar = Condvar::new();
static FLUSHER: Once = Once::new();
/// Set when the flusher thread could not start: then nothing is held.
static NO_FLUSHER: AtomicBool = AtomicBool::new(false);

/// The [`MakeWriter`] for [`crate::json_log::layer`] in production (the pretty format, for a
/// terminal, writes each line at once).
#[derive(Debug, Default, Clone, Copy)]
pub struct BufferedStderr;

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { hold: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        // In tracing's order ERROR < WARN < INFO: warnings and errors go out at once.
        LineWriter {
            hold: *meta.level() > Level::WARN,
        }
    }
}

/// Writes one event's line: held, or with everything held before it.
pub struct LineWriter {
    hold: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        FLUSHER.call_once(start_flusher);
        let mut held = held();
        if !self.hold || NO_FLUSHER.load(Ordering::Relaxed) {
            held.extend_from_slice(line);
            write_out(&mut held);
            return Ok(line.len());
        }
        let was_empty = held.is_empty();
        held.extend_from_slice(line);
        if held.len() >= FLUSH_BYTES {
            write_out(&mut held);
        } else if was_empty {
            drop(held);
            NOT_EMPTY.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes out every held line now.
pub fn flush() {
    write_out(&mut held());
}

fn held() -> MutexGuard<'static, Vec<u8>> {
    // A panic while holding the lock leaves whole lines behind: still fine to write.
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Written under the lock, so two threads' batches cannot cross. A failing stderr loses the
/// lines, as an unbuffered write would; the log is never a reason to fail a request.
fn write_out(held: &mut Vec<u8>) {
    if held.is_empty() {
        return;
    }
    let _ = std::io::stderr().lock().write_all(held);
    held.clear();
    // A burst can leave a large buffer behind; keep a modest one.
    if held.capacity() > 4 * FLUSH_BYTES {
        held.shrink_to(FLUSH_BYTES);
    }
}

fn start_flusher() {
    let spawned = std::thread::Builder::new()
        .name("poe-gateway-log".into())
        .spawn(|| {
            loop {
                let mut h = held();
                while h.is_empty() {
                    h = NOT_EMPTY.wait(h).unwrap_or_else(|e| e.into_inner());
                }
                drop(h);
                // Lines that come meanwhile join this batch.
                std::thread::sleep(FLUSH_AFTER);
                flush();
            }
        });
    if let Err(e) = spawned {
        NO_FLUSHER.store(true, Ordering::Relaxed);
        let _ = writeln!(
            std::io::stderr(),
            "poe-gateway: could not start the log flusher thread ({e}); writing every line at once"
        );
    }
}

/// Runs [`flush`] before the panic message, so the lines before a panic come before it.
pub fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}
