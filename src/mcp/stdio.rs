//! MCP over stdin/stdout: one JSON-RPC message per line.
//!
//! rmcp's own line transport drops a line over its limit with a log line and no answer, so a
//! client that sent a request too large (a big base64 attachment) waited for its own timeout,
//! minutes in some clients. This one answers it: the request's id is read from the start of
//! the line (clients write `jsonrpc`, `id` and `method` before `params`), and the error names
//! the limit. Everything else is as rmcp's: lines are read without ever holding more than the
//! limit, and a read cancelled halfway resumes where it stopped.

use std::sync::Arc;

use rmcp::RoleServer;
use rmcp::model::{ErrorCode, ErrorData, RequestId};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// How much of an oversized line is kept to find its id in.
const ID_WINDOW: usize = 4096;

pub struct LineTransport<R, W> {
    read: BufReader<R>,
    line: Vec<u8>,
    max_line: usize,
    /// The current line went over `max_line`: its start (up to `ID_WINDOW` bytes) and its
    /// length so far, until its end is read.
    oversized: Option<(Vec<u8>, usize)>,
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
    /// A line over the limit ended: its start, and its length.
    Oversized(Vec<u8>, usize),
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
                // Over the limit: from here on only its start is kept, to find its id in.
                let len = self.line.len();
                let mut start = std::mem::take(&mut self.line);
                start.truncate(ID_WINDOW);
                self.oversized = Some((start, len));
            }
            match &mut self.oversized {
                Some((start, len)) => {
                    let room = ID_WINDOW.saturating_sub(start.len());
                    start.extend_from_slice(&chunk[..room.min(chunk.len())]);
                    *len += chunk.len();
                }
                None => self.line.extend_from_slice(chunk),
            }
            self.read.consume(take);
            if newline.is_some() {
                return Ok(match self.oversized.take() {
                    Some((start, len)) => Read::Oversized(start, len),
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
                Ok(Read::Oversized(start, len)) => {
                    tracing::warn!(
                        bytes = len,
                        limit = self.max_line,
                        "MCP message over server.max_body_bytes refused"
                    );
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
                    self.answer(error, request_id(&start));
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

/// The `id` of a JSON-RPC request from the start of its text, when it is there: the first
/// `"id"` member with a number or a plain string value.
fn request_id(start: &[u8]) -> Option<RequestId> {
    let mut at = 0;
    while let Some(i) = memchr::memmem::find(&start[at..], b"\"id\"") {
        let key = at + i;
        at = key + 4;
        if key > 0 && start[key - 1] == b'\\' {
            continue;
        }
        let Some(rest) = start[at..].trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        if let Some(s) = rest.strip_prefix(b"\"") {
            let end = memchr::memchr2(b'"', b'\\', s)?;
            if s[end] != b'"' {
                return None;
            }
            let id = std::str::from_utf8(&s[..end]).ok()?;
            return Some(RequestId::String(id.into()));
        }
        let digits = rest
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'-')
            .count();
        return std::str::from_utf8(&rest[..digits])
            .ok()?
            .parse::<i64>()
            .ok()
            .map(RequestId::Number);
    }
    None
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
}
