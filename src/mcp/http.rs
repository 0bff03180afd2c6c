//! `/mcp` on the serve port: rmcp's streamable HTTP service behind the gateway's own auth.
//!
//! The HTTP layer authenticates the request exactly as for `/v1/...` and hands us the
//! [`Caller`]; it travels in the request's extensions, which rmcp passes to each tool call as
//! `http::request::Parts`. The body is read here with the server's size and time limits
//! before rmcp sees it. Host and Origin are checked by rmcp: loopback names, the listen
//! address, and `mcp.allowed_hosts`; origins only from `mcp.allowed_origins`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};

use super::{McpCore, PoeTools};
use crate::config::Policy;
use crate::error::GatewayError;
use crate::gateway::Caller;
use crate::http::read_body_of;

/// The body of an `/mcp` response (rmcp's SSE or JSON).
pub type McpBody = BoxBody<Bytes, Infallible>;

type Service = TowerToHyperService<StreamableHttpService<PoeTools, LocalSessionManager>>;

/// The `/mcp` endpoint of one gateway.
#[derive(Clone)]
pub struct McpHttp {
    core: McpCore,
    service: Service,
    /// Holds the service's cancellation token, for [`McpHttp::shutdown`].
    config: StreamableHttpServerConfig,
}

impl McpHttp {
    pub fn new(core: McpCore) -> McpHttp {
        let policy = core.gateway().policy();
        let factory_core = core.clone();
        let config = http_config(policy);
        let service = StreamableHttpService::new(
            move || Ok(factory_core.http_server()),
            Arc::new(LocalSessionManager::default()),
            config.clone(),
        );
        McpHttp {
            core,
            service: TowerToHyperService::new(service),
            config,
        }
    }

    /// Ends every MCP session and refuses new ones, so long-lived SSE streams (a client's
    /// `GET /mcp`) do not hold a graceful shutdown open until its grace period runs out.
    pub fn shutdown(&self) {
        self.config.cancellation_token.cancel();
    }

    pub fn core(&self) -> &McpCore {
        &self.core
    }

    /// Serves one `/mcp` request from an authenticated `caller`.
    pub async fn handle(&self, caller: Caller, req: Request<Incoming>) -> Response<McpBody> {
        let policy = self.core.gateway().policy();
        let (mut parts, body) = req.into_parts();
        let body = match read_body_of(
            body,
            &parts.headers,
            policy.server.max_body_bytes.0,
            policy.server.body_read_timeout,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => return error(&e),
        };
        parts.extensions.insert(caller);
        let req = Request::from_parts(parts, Full::new(body));
        match self.service.call(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

/// rmcp's settings from the policy: hosts, origins, body size.
pub fn http_config(policy: &Policy) -> StreamableHttpServerConfig {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let ip = policy.server.listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        hosts.push(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    hosts.extend(
        policy
            .mcp
            .allowed_hosts
            .iter()
            .map(|h| h.trim().to_string()),
    );
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_max_request_body_bytes(
            usize::try_from(policy.server.max_body_bytes.0).unwrap_or(usize::MAX),
        );
    if policy.mcp.allowed_origins.is_empty() {
        // No browser origin is trusted: a request carrying an Origin is refused.
        config.enforce_origin_validation()
    } else {
        config
            .with_allowed_origins(
                policy
                    .mcp
                    .allowed_origins
                    .iter()
                    .map(|o| o.trim().to_string()),
            )
            .enforce_origin_validation()
    }
}

fn error(e: &GatewayError) -> Response<McpBody> {
    let mut resp = Response::new(Full::new(e.to_json()).boxed());
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
