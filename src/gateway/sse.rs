//! An incremental server-sent-events scanner.
//!
//! It is fed frames exactly as they arrive from upstream, cut anywhere (mid-line, mid-UTF-8,
//! between `\r` and `\n`), and calls back once per complete event with its `data` payload.
//! It never changes or holds back the bytes the client gets: it only reads them on the side.

use memchr::{memchr, memchr2};

/// Longest line accepted; a stream with a longer line is treated as broken rather than
/// letting one upstream grow the gateway's memory without bound.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct SseScanner {
    /// A line cut by a frame boundary, carried to the next frame.
    line: Vec<u8>,
    /// The `data` of the event being assembled (lines joined with `\n`).
    data: Vec<u8>,
    has_data: bool,
    /// The last frame ended in `\r`: a `\n` starting the next one belongs to it.
    skip_lf: bool,
    max_line: usize,
}

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
            has_data: false,
            skip_lf: false,
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
        !self.line.is_empty() || self.has_data
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
    /// event's data if it had any and the offset in `chunk` just past the boundary. This is
    /// what lets the tap cut a frame into whole events when it must drop one.
    pub fn feed_bounds(
        &mut self,
        chunk: &[u8],
        on_bound: &mut impl FnMut(Option<&[u8]>, usize),
    ) -> Result<(), LineTooLong> {
        let total = chunk.len();
        let mut chunk = chunk;
        while !chunk.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    continue;
                }
            }
            let Some(i) = memchr2(b'\n', b'\r', chunk) else {
                if self.line.len() + chunk.len() > self.max_line {
                    return Err(LineTooLong);
                }
                self.line.extend_from_slice(chunk);
                return Ok(());
            };
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
                self.line_done(&chunk[..i], end, on_bound);
            } else {
                if self.line.len() + i > self.max_line {
                    return Err(LineTooLong);
                }
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..i]);
                self.line_done(&line, end, on_bound);
                line.clear();
                self.line = line;
            }
            chunk = next;
        }
        Ok(())
    }

    fn line_done(
        &mut self,
        line: &[u8],
        end: usize,
        on_bound: &mut impl FnMut(Option<&[u8]>, usize),
    ) {
        if line.is_empty() {
            on_bound(self.has_data.then_some(&self.data[..]), end);
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (field, value) = match memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn any_cut_gives_the_same_events() {
        let stream = b": keep-alive\r\ndata: {\"a\":\"\xc3\xa9\"}\r\n\r\ndata: one\ndata: two\n\nevent: x\ndata:[DONE]\r\r";
        let whole = events(&[stream]);
        assert_eq!(whole, vec!["{\"a\":\"\u{e9}\"}", "one\ntwo", "[DONE]"]);
        for cut in 0..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), whole);
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
    fn long_lines_are_refused() {
        let mut s = SseScanner::new(8);
        assert!(s.feed(b"data: 12345", &mut |_: &[u8]| {}).is_err());
    }
}
