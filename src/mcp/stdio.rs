//! MCP over stdin/stdout: one JSON-RPC message per line.
//!
//! rmcp's own line transport drops a line over its limit with a log line and no answer, so a
//! client that sent a request too large (a big base64 attachment) waited for its own timeout,
//! minutes in some clients. This one answers it: the request's top-level `id` is found as the
//! line streams past, wherever it sits (Python's SDK writes it first, the TypeScript SDK's
//! clients, Claude's among them, last, after `params`), and the error names the limit.
//! Everything else is as rmcp's: lines are read without ever holding more than the limit, and
//! a read cancelled halfway resumes where it stopped.

use std::sync::Arc;

use rmcp::RoleServer;
use rmcp::model::{ErrorCode, ErrorData, RequestId};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

pub struct LineTransport<R, W> {
    read: BufReader<R>,
    line: Vec<u8>,
    max_line: usize,
    /// The current line went over `max_line`: the search for its id, and its length so far,
    /// until its end is read.
    oversized: Option<(IdScan, usize)>,
    write: Arc<Mutex<W>>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> LineTransport<R, W> {
    pub fn new(read: R, write: W, max_line: usize) -> Self {
        LineTransport {
            read: BufReader::new(read),
            line: Vec::new(),
            max_line,
            oversized: None,
            write: Arc::new(Mutex::new(write)),
        }
    }
}

enum Read {
    Line,
    /// A line over the limit ended: whether it had an `id` member and its value when that
    /// is readable (`None`: a notification), and its length.
    Oversized(Option<Option<RequestId>>, usize),
    Eof,
}

impl<R: AsyncRead + Unpin, W> LineTransport<R, W> {
    /// One `\n`-ended line into `self.line`. Cancel-safe: `fill_buf` takes nothing until
    /// `consume`, and the copy and the `consume` happen with no await between them.
    async fn read_line(&mut self) -> std::io::Result<Read> {
        loop {
            let available = self.read.fill_buf().await?;
            if available.is_empty() {
                return Ok(Read::Eof);
            }
            let newline = memchr::memchr(b'\n', available);
            let take = newline.map_or(available.len(), |i| i + 1);
            let chunk = &available[..take];
            if self.oversized.is_none() && self.line.len() + chunk.len() > self.max_line {
                // Over the limit: from here on nothing is kept; its id is looked for as it
                // goes by.
                let mut scan = IdScan::default();
                scan.feed(&self.line);
                self.oversized = Some((scan, self.line.len()));
                self.line = Vec::new();
            }
            match &mut self.oversized {
                Some((scan, len)) => {
                    scan.feed(chunk);
                    *len += chunk.len();
                }
                None => self.line.extend_from_slice(chunk),
            }
            self.read.consume(take);
            if newline.is_some() {
                return Ok(match self.oversized.take() {
                    Some((scan, len)) => Read::Oversized(scan.member(), len),
                    None => Read::Line,
                });
            }
        }
    }
}

impl<R, W> Transport<RoleServer> for LineTransport<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        write_message(self.write.clone(), item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            match self.read_line().await {
                Ok(Read::Line) => {}
                Ok(Read::Oversized(id, len)) => {
                    tracing::warn!(
                        bytes = len,
                        limit = self.max_line,
                        "MCP message over server.max_body_bytes refused"
                    );
                    // A notification (no `id`) is never answered: no client waits for it,
                    // and an error under `id: null` is one it cannot match to anything.
                    let Some(id) = id else {
                        continue;
                    };
                    let error = ErrorData::new(
                        ErrorCode::INVALID_REQUEST,
                        format!(
                            "this message is over the gateway's limit of {} bytes \
                             (server.max_body_bytes); for a large attachment, pass \
                             attachment_path instead of attachment_base64",
                            self.max_line
                        ),
                        None,
                    );
                    self.answer(error, id);
                    continue;
                }
                Ok(Read::Eof) => return None,
                Err(e) => {
                    tracing::error!(error = %e, "reading stdin failed");
                    return None;
                }
            }
            let text = self.line.trim_ascii();
            if text.is_empty() {
                self.line.clear();
                continue;
            }
            let message = match serde_json::from_slice::<RxJsonRpcMessage<RoleServer>>(text) {
                Ok(message) => Some(message),
                Err(e) => {
                    // JSON-RPC tells text that is no JSON (a parse error) from JSON that is
                    // no request.
                    let (code, what) = match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                        Err(_) => (ErrorCode::PARSE_ERROR, "not JSON"),
                        Ok(_) => (ErrorCode::INVALID_REQUEST, "not a JSON-RPC message"),
                    };
                    let error = ErrorData::new(code, format!("{what}: {e}"), None);
                    self.answer(error, request_id(text));
                    None
                }
            };
            self.line.clear();
            if message.is_some() {
                return message;
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.write.lock().await.flush().await
    }
}

impl<R, W: AsyncWrite + Unpin + Send + 'static> LineTransport<R, W> {
    /// Sends an error response on a task of its own, so `receive` stays cancel-safe.
    /// An error response needs an `id`, `null` when the request's could not be read (JSON-RPC
    /// 2.0, section 5); rmcp's message type leaves the member out then, so it is written here.
    fn answer(&self, error: ErrorData, id: Option<RequestId>) {
        let message = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error});
        let write = self.write.clone();
        tokio::spawn(async move {
            let Ok(mut line) = serde_json::to_vec(&message) else {
                return;
            };
            line.push(b'\n');
            let mut w = write.lock().await;
            if w.write_all(&line).await.is_ok() {
                let _ = w.flush().await;
            }
        });
    }
}

async fn write_message<W: AsyncWrite + Unpin>(
    write: Arc<Mutex<W>>,
    item: TxJsonRpcMessage<RoleServer>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&item)?;
    line.push(b'\n');
    let mut w = write.lock().await;
    w.write_all(&line).await?;
    w.flush().await
}

/// The top-level `id` of a JSON-RPC request in its text.
fn request_id(text: &[u8]) -> Option<RequestId> {
    let mut scan = IdScan::default();
    scan.feed(text);
    scan.id()
}

/// Finds the top-level `"id"` member of a JSON object whose text comes in pieces, without
/// keeping the text: nesting and strings are followed, so an `"id"` inside `params` (a bot
/// parameter, a tool's schema) or inside a string is not taken for it. Its value counts when
/// it is a number or a string without escapes.
#[derive(Debug, Default)]
struct IdScan {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1, a member's name comes next (after `{` or `,`).
    expect_name: bool,
    /// The member whose value comes next (after its `:`) is `id`.
    id_value_next: bool,
    /// The string being read at depth 1: a member's name, or `id`'s value.
    text: Option<Vec<u8>>,
    /// The string being read is `id`'s value.
    text_is_id: bool,
    /// `id`'s number, as its characters so far.
    number: Option<Vec<u8>>,
    /// What `id` turned out to be (`Some(None)`: not a number or plain string).
    found: Option<Option<RequestId>>,
}

/// The longest name or id text kept while scanning.
const ID_TEXT_MAX: usize = 256;

impl IdScan {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.found.is_some() {
                return;
            }
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                self.end_string();
                return;
            }
            // Kept as written, escapes included: decoded at the string's end.
            if let Some(t) = &mut self.text {
                if t.len() < ID_TEXT_MAX {
                    t.push(b);
                } else {
                    self.text = None;
                }
            }
            return;
        }
        if let Some(n) = &mut self.number {
            if b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E') {
                n.push(b);
                return;
            }
            let id = std::str::from_utf8(n)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
                .map(RequestId::Number);
            self.found = Some(id);
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.text_is_id = self.depth == 1 && self.id_value_next;
                self.text =
                    (self.depth == 1 && (self.expect_name || self.text_is_id)).then(Vec::new);
            }
            b'{' | b'[' => {
                if self.depth == 1 && self.id_value_next {
                    self.found = Some(None);
                }
                self.depth += 1;
                self.expect_name = self.depth == 1 && b == b'{';
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 => self.expect_name = false,
            b',' if self.depth == 1 => {
                self.expect_name = true;
                self.id_value_next = false;
            }
            b'-' | b'0'..=b'9' if self.depth == 1 && self.id_value_next => {
                self.number = Some(vec![b]);
            }
            // `null`, `true`...: an id that is none.
            b'a'..=b'z' if self.depth == 1 && self.id_value_next => self.found = Some(None),
            _ => {}
        }
    }

    fn end_string(&mut self) {
        // The string as JSON reads it (`"a\"b"`, `"\u0069d"`).
        let decoded = self.text.take().and_then(|raw| {
            let quoted = [&b"\""[..], &raw, b"\""].concat();
            serde_json::from_slice::<String>(&quoted).ok()
        });
        if self.text_is_id {
            self.found = Some(decoded.map(|t| RequestId::String(t.into())));
        } else if self.expect_name {
            self.id_value_next = decoded.as_deref() == Some("id");
        }
    }

    /// The id found, if the text had one (a number still being read when the text ends
    /// counts).
    fn id(self) -> Option<RequestId> {
        self.member().flatten()
    }

    /// Whether the text had a top-level `id` member, and its value when readable.
    fn member(mut self) -> Option<Option<RequestId>> {
        if self.found.is_none() && self.number.is_some() {
            self.byte(b' ');
        }
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_from_a_line_start() {
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"#),
            Some(RequestId::Number(7))
        );
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0", "id" : "a-1","method""#),
            Some(RequestId::String("a-1".into()))
        );
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","method":"x","params":{"#),
            None
        );
        assert_eq!(
            request_id(br#"{"x":"\"id\": 3","id":4}"#),
            Some(RequestId::Number(4))
        );
    }

    /// The TypeScript SDK writes `id` last, after `params`; an `id` inside `params` is not
    /// the request's, nor is a name that only looks like it.
    #[test]
    fn the_top_level_id_is_found_wherever_it_sits() {
        assert_eq!(
            request_id(
                br#"{"method":"tools/call","params":{"arguments":{"params":{"id":0},"x":[{"id":"no"}]}},"jsonrpc":"2.0","id":12}"#
            ),
            Some(RequestId::Number(12))
        );
        assert_eq!(
            request_id(br#"{"params":{"id":1},"ids":2, "id" : "req-9"}"#),
            Some(RequestId::String("req-9".into()))
        );
        // Escapes read as JSON reads them, in the name and in the id.
        assert_eq!(
            request_id(br#"{"params":{"id":1},"\u0069d":"a\"b\u00e9"}"#),
            Some(RequestId::String("a\"b\u{e9}".into()))
        );
        assert_eq!(request_id(br#"{"params":{"id":1},"id":null}"#), None);
        assert_eq!(request_id(br#"{"params":{"id":1}}"#), None);
        // Fed in pieces, split anywhere.
        let text = br#"{"params":{"prompt":"a \"id\": 5 b","id":6},"id":-77}"#;
        for cut in 0..text.len() {
            let mut scan = IdScan::default();
            scan.feed(&text[..cut]);
            scan.feed(&text[cut..]);
            assert_eq!(scan.id(), Some(RequestId::Number(-77)), "cut at {cut}");
        }
    }
}
