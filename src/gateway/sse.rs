//! An incremental server-sent-events scanner.
//!
//! It is fed frames exactly as they arrive from upstream, cut anywhere (mid-line, mid-UTF-8,
//! between `\r` and `\n`), and calls back once per complete event with its `data` payload.
//! It never changes or holds back the bytes the client gets: it only reads them on the side.

use memchr::{memchr, memchr2};

/// Longest line accepted, and longest event (its `data` lines together); a stream with a
/// longer one is treated as broken rather than letting one upstream grow the gateway's
/// memory without bound (an event of many 1 MiB lines went past a cap on lines alone).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct SseScanner {
    /// A line cut by a frame boundary, carried to the next frame.
    line: Vec<u8>,
    /// The `data` of the event being assembled (lines joined with `\n`).
    data: Vec<u8>,
    /// The event's data while it is a single `data` line of the frame being fed: where it is
    /// in that frame. Most events are one line in one frame, and are read where they lie;
    /// `data` gets a copy only when a second line comes or the frame ends first.
    data_in_frame: Option<std::ops::Range<usize>>,
    has_data: bool,
    /// The last frame ended in `\r`: a `\n` starting the next one belongs to it.
    skip_lf: bool,
    /// While at the stream's start: how many bytes of a UTF-8 byte-order mark have been seen.
    /// The spec has a leading BOM skipped; read as text, it would hide the first line's field
    /// name and lose the first event.
    bom_seen: Option<u8>,
    max_line: usize,
}

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

impl Default for SseScanner {
    fn default() -> Self {
        SseScanner::new(DEFAULT_MAX_LINE)
    }
}

impl SseScanner {
    pub fn new(max_line: usize) -> Self {
        SseScanner {
            line: Vec::new(),
            data: Vec::new(),
            data_in_frame: None,
            has_data: false,
            skip_lf: false,
            bom_seen: Some(0),
            max_line,
        }
    }

    /// The last frame ended in `\r`, so a `\n` opening the next one still belongs to the
    /// line (and event) that `\r` ended.
    pub fn pending_lf(&self) -> bool {
        self.skip_lf
    }

    /// True while a line or an event is partly received: a break now leaves the client
    /// holding half an event.
    pub fn in_progress(&self) -> bool {
        !self.line.is_empty() || self.has_data || self.bom_seen.is_some_and(|n| n > 0)
    }

    /// Passes over a byte-order mark at the stream's start, even one cut by a frame boundary.
    /// `None` if the whole frame is (so far) the start of one: nothing to read yet.
    fn skip_bom<'c>(&mut self, chunk: &'c [u8]) -> Option<&'c [u8]> {
        let Some(before) = self.bom_seen else {
            return Some(chunk);
        };
        let before = usize::from(before);
        let matched = chunk
            .iter()
            .zip(&BOM[before..])
            .take_while(|(a, b)| a == b)
            .count();
        if before + matched == BOM.len() {
            self.bom_seen = None;
            return Some(&chunk[matched..]);
        }
        if matched == chunk.len() {
            self.bom_seen = Some((before + matched) as u8);
            return None;
        }
        // Not a BOM after all: the bytes taken for one in earlier frames start the first line.
        self.bom_seen = None;
        self.line.extend_from_slice(&BOM[..before]);
        Some(chunk)
    }

    /// Feeds one frame; `on_event` gets the data of each event completed by it.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        on_event: &mut impl FnMut(&[u8]),
    ) -> Result<(), LineTooLong> {
        self.feed_bounds(chunk, &mut |data: Option<&[u8]>, _end: usize| {
            if let Some(d) = data {
                on_event(d)
            }
        })
    }

    /// Like [`feed`](Self::feed), but reports every event boundary (blank line), with the
    /// event's data if it had any and the offset in `chunk` just past the boundary. The end
    /// of a leading byte-order mark is reported as a boundary without data. This is
    /// what lets the tap cut a frame into whole events when it must drop one.
    pub fn feed_bounds(
        &mut self,
        chunk: &[u8],
        on_bound: &mut impl FnMut(Option<&[u8]>, usize),
    ) -> Result<(), LineTooLong> {
        let frame = chunk;
        let total = chunk.len();
        let Some(mut chunk) = self.skip_bom(chunk) else {
            return Ok(());
        };
        if chunk.len() < total {
            // The mark is reported as a piece of its own, so that an edit of the first
            // event (strip mode) neither loses it nor reads it as part of a line.
            on_bound(None, total - chunk.len());
        }
        let result = loop {
            if chunk.is_empty() {
                break Ok(());
            }
            if self.skip_lf {
                self.skip_lf = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    continue;
                }
            }
            let Some(i) = memchr2(b'\n', b'\r', chunk) else {
                if self.line.len() + chunk.len() > self.max_line {
                    break Err(LineTooLong);
                }
                self.line.extend_from_slice(chunk);
                break Ok(());
            };
            // The usual event, `data: ...` and a blank line, LF-ended and whole in this frame:
            // reported straight from where it lies, without the line-by-line pass.
            if chunk[i] == b'\n'
                && chunk.get(i + 1) == Some(&b'\n')
                && self.line.is_empty()
                && !self.has_data
                && chunk.starts_with(b"data:")
            {
                let start = total - chunk.len();
                let value = if chunk.get(5) == Some(&b' ') && i > 5 {
                    6
                } else {
                    5
                };
                let end = start + i + 2;
                on_bound(Some(&frame[start + value..start + i]), end);
                chunk = &frame[end..];
                continue;
            }
            let rest = &chunk[i + 1..];
            let next = if chunk[i] == b'\r' {
                match rest.first() {
                    Some(b'\n') => &rest[1..],
                    Some(_) => rest,
                    None => {
                        self.skip_lf = true;
                        rest
                    }
                }
            } else {
                rest
            };
            let end = total - next.len();
            if self.line.is_empty() {
                let start = total - chunk.len();
                self.line_done(frame, start..start + i, true, end, on_bound);
            } else {
                if self.line.len() + i > self.max_line {
                    break Err(LineTooLong);
                }
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..i]);
                self.line_done(&line, 0..line.len(), false, end, on_bound);
                line.clear();
                self.line = line;
            }
            if self.data.len() > self.max_line {
                break Err(LineTooLong);
            }
            chunk = next;
        };
        // The frame is the caller's: an event still open keeps its own copy of its data.
        self.data_from_frame(frame);
        result
    }

    /// Moves the event's data out of the frame (into `data`), before more is added to it
    /// or the frame goes away.
    fn data_from_frame(&mut self, frame: &[u8]) {
        if let Some(r) = self.data_in_frame.take() {
            self.data.extend_from_slice(&frame[r]);
        }
    }

    /// One line, `src[line]`, ending at `end` in the frame. `src` is the frame itself
    /// (`in_frame`) or a line carried over from earlier frames.
    fn line_done(
        &mut self,
        src: &[u8],
        line: std::ops::Range<usize>,
        in_frame: bool,
        end: usize,
        on_bound: &mut impl FnMut(Option<&[u8]>, usize),
    ) {
        // Only a frame's first line can be a carried one, before any data lies in the frame.
        debug_assert!(in_frame || self.data_in_frame.is_none());
        if line.is_empty() {
            let data = match self.data_in_frame.take() {
                Some(r) => &src[r],
                None => &self.data[..],
            };
            on_bound(self.has_data.then_some(data), end);
            self.data.clear();
            self.has_data = false;
            return;
        }
        let text = &src[line.clone()];
        if text[0] == b':' {
            return; // comment
        }
        let (field, value) = match memchr(b':', text) {
            Some(i) => {
                let v = line.start + i + 1;
                let v = if src.get(v) == Some(&b' ') && v < line.end {
                    v + 1
                } else {
                    v
                };
                (&text[..i], v..line.end)
            }
            None => (text, line.end..line.end),
        };
        if field == b"data" {
            if in_frame && !self.has_data {
                self.data_in_frame = Some(value);
            } else {
                if in_frame {
                    self.data_from_frame(src);
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(&src[value]);
            }
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event is capped as a line is: many short `data` lines add up.
    #[test]
    fn an_event_of_many_lines_is_capped_too() {
        let mut s = SseScanner::new(64);
        let line = b"data: 0123456789012345678901234567890123456789\n";
        assert!(s.feed(line, &mut |_| {}).is_ok());
        assert_eq!(s.feed(line, &mut |_| {}), Err(LineTooLong));
        let mut s = SseScanner::new(64);
        for _ in 0..10 {
            let mut one = line.to_vec();
            one.push(b'\n');
            assert!(
                s.feed(&one, &mut |_| {}).is_ok(),
                "whole events do not add up"
            );
        }
    }

    fn events(frames: &[&[u8]]) -> Vec<String> {
        let mut s = SseScanner::default();
        let mut out = Vec::new();
        for f in frames {
            s.feed(f, &mut |d: &[u8]| {
                out.push(String::from_utf8_lossy(d).into_owned())
            })
            .unwrap();
        }
        out
    }

    /// Every cut of `stream` in two, and one byte per frame, give the events `want`.
    fn assert_any_cut<S: AsRef<str> + std::fmt::Debug>(stream: &[u8], want: &[S]) {
        let want: Vec<&str> = want.iter().map(AsRef::as_ref).collect();
        for cut in 0..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                want,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), want);
    }

    #[test]
    fn any_cut_gives_the_same_events() {
        let stream = b": keep-alive\r\ndata: {\"a\":\"\xc3\xa9\"}\r\n\r\ndata: one\ndata: two\n\nevent: x\ndata:[DONE]\r\r";
        let whole = events(&[stream]);
        assert_eq!(whole, vec!["{\"a\":\"\u{e9}\"}", "one\ntwo", "[DONE]"]);
        assert_any_cut(stream, &whole);
    }

    #[test]
    fn lf_only_data_events_are_read_whole_or_cut() {
        // The one-line `data:` event LF-ended, in the shapes the fast path must tell apart.
        let stream = b"data: a\n\ndata:b\n\ndata:\n\ndata: \n\ndata: c\ndata: d\n\ndata: e\n\r\n: x\n\ndata: f\n\n";
        let want = vec!["a", "b", "", "", "c\nd", "e", "f"];
        assert_eq!(events(&[stream]), want);
        assert_any_cut(stream, &want);
    }

    #[test]
    fn bounds_cut_a_frame_into_whole_events() {
        let frame = b": c\n\ndata: a\r\n\r\ndata: b\n\ndata: par";
        let mut s = SseScanner::default();
        let mut cuts = Vec::new();
        s.feed_bounds(frame, &mut |d: Option<&[u8]>, end| {
            cuts.push((d.map(|d| d.to_vec()), end))
        })
        .unwrap();
        assert_eq!(
            cuts,
            vec![
                (None, 5),
                (Some(b"a".to_vec()), 16),
                (Some(b"b".to_vec()), 25)
            ]
        );
        assert!(s.in_progress());
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped_wherever_the_frames_cut_it() {
        let stream = b"\xEF\xBB\xBFdata: a\n\ndata: b\n\n";
        let want = vec!["a", "b"];
        assert_any_cut(stream, &want);
        // Only at the start, and only a whole one: a stray prefix is still part of the line.
        assert_eq!(events(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]), vec!["a"]);
        assert_eq!(events(&[b"\xEF", b"\xBBdata: a\n\n"]), Vec::<String>::new());
        assert_eq!(events(&[b"\xEF", b"\xBB", b"\n\ndata: c\n\n"]), vec!["c"]);
        // The bounds stay the frame's own offsets, the mark included.
        let mut s = SseScanner::default();
        let mut cuts = Vec::new();
        s.feed_bounds(b"\xEF\xBB\xBFdata: a\n\n", &mut |d: Option<&[u8]>, end| {
            cuts.push((d.map(|d| d.to_vec()), end))
        })
        .unwrap();
        assert_eq!(cuts, vec![(None, 3), (Some(b"a".to_vec()), 12)]);
    }

    #[test]
    fn long_lines_are_refused() {
        let mut s = SseScanner::new(8);
        assert!(s.feed(b"data: 12345", &mut |_: &[u8]| {}).is_err());
    }
}
