//! The MCP adapter: Poe as Model Context Protocol tools, over stdio and streamable HTTP.
//!
//! Every tool call goes to the [`Gateway`] core in-process (a [`ChatRequest`] built from JSON
//! bytes, then [`Gateway::chat`]), never over HTTP to ourselves, so aliasing, limits, retries and
//! fallbacks hold for MCP exactly as for the HTTP API.
//!
//! - [`tools`]: the tools (`ask_poe`, `ask_with_attachment`, `ask_poe_with_tools`,
//!   `generate_image`, `generate_video`, `list_models`, `clear_session`).
//! - [`sessions`]: conversation history in moka, scoped to the caller.
//! - [`attachments`]: files, base64 data and URLs turned into content parts.
//! - [`reply`]: reading the core's reply (streamed or not), with progress and cancellation.
//! - [`http`]: `/mcp` on the serve port; `stdio`: `poe-gateway mcp`.
//!
//! Nothing here runs model output, writes files or fetches URLs: the tools only read
//! attachments the caller names, within the limits of the policy's `[mcp]` section.
//!
//! [`ChatRequest`]: crate::gateway::ChatRequest

pub mod attachments;
pub mod http;
mod media;
mod reply;
pub mod sessions;
mod stdio;
pub mod tools;

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::handler::server::router::tool::ToolRouter;

use crate::gateway::{Caller, Gateway};
use attachments::AttachmentPolicy;
use sessions::Sessions;
pub use tools::PoeTools;

/// Where a tool call comes from, which decides what it may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The user's own machine (stdio, in-process): `attachment_path` may name any file the
    /// process can read.
    Local,
    /// A network client (`/mcp`): `attachment_path` only inside `mcp.attachment_roots`.
    Remote,
}

/// State shared by every MCP connection of one gateway: the core, the sessions, the tools.
#[derive(Clone)]
pub struct McpCore {
    inner: Arc<CoreInner>,
}

struct CoreInner {
    gateway: Gateway,
    sessions: Sessions,
    attachments: AttachmentPolicy,
    router: ToolRouter<PoeTools>,
}

impl McpCore {
    pub fn new(gateway: Gateway) -> McpCore {
        let mcp = &gateway.policy().mcp;
        McpCore {
            inner: Arc::new(CoreInner {
                sessions: Sessions::new(mcp),
                attachments: AttachmentPolicy::new(mcp),
                router: PoeTools::router(),
                gateway,
            }),
        }
    }

    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }

    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// A tool server for one local client (stdio, or in-process tests): every call is paid
    /// for by `caller`, and attachment paths may name any readable file.
    pub fn local_server(&self, caller: Caller) -> PoeTools {
        PoeTools::new(self.clone(), tools::Mode::Local(caller))
    }

    /// A tool server for `/mcp`: each call's caller comes from its own HTTP request.
    pub fn http_server(&self) -> PoeTools {
        PoeTools::new(self.clone(), tools::Mode::Http)
    }
}

/// The caller for `poe-gateway mcp`: the server's own `POE_API_KEY` pays.
pub fn stdio_caller() -> Caller {
    Caller::server(Arc::from("mcp-stdio"))
}

/// Serves MCP over stdin/stdout until the client closes stdin. Logs must go to stderr.
pub async fn serve_stdio(gateway: Gateway) -> Result<(), String> {
    // One JSON-RPC message per line: allow one as large as an HTTP request body, so a
    // base64 attachment that works over HTTP works here too.
    let max_line = usize::try_from(gateway.policy().server.max_body_bytes.0).unwrap_or(usize::MAX);
    let server = McpCore::new(gateway).local_server(stdio_caller());
    let transport = stdio::LineTransport::new(tokio::io::stdin(), tokio::io::stdout(), max_line);
    let running = server
        .serve(transport)
        .await
        .map_err(|e| format!("MCP initialisation over stdio failed: {e}"))?;
    tracing::info!("MCP server ready on stdio");
    running
        .waiting()
        .await
        .map(|reason| tracing::info!(?reason, "MCP client on stdio went away"))
        .map_err(|e| format!("MCP stdio service failed: {e}"))
}
