//! MCP tool arguments (src/mcp/tools.rs) decoded from arbitrary JSON bytes, as rmcp's
//! `Parameters<T>` does (serde_json), then put through the checks the tools make before
//! anything leaves the process:
//! - names (`check_name`), `params` merging (`merge_params`), tool definitions
//!   (`normalize_tools`), `get_usage`'s `since` (`parse_when`) and `group_by`;
//! - attachments (src/mcp/attachments.rs): URL and base64 attachments (size limits, `data:`
//!   URLs, MIME checks and sniffing), under the default limit and a tiny one. Paths are left
//!   out: they read the disk.
//!
//! Checked: never a panic; a loaded base64 attachment's content part carries exactly the
//! decoded bytes, within the limit; normalised tools all have a `type` and a named `function`;
//! a request the tools would build from accepted arguments is one the gateway parses without
//! panicking.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use poe_gateway::config::{ByteSize, McpPolicy};
use poe_gateway::gateway::ChatRequest;
use poe_gateway::ledger::GroupBy;
use poe_gateway::ledger::report::parse_when;
use poe_gateway::mcp::Access;
use poe_gateway::mcp::attachments::{self, AttachmentPolicy, Spec};
use poe_gateway::mcp::tools::{
    AskPoeArgs, AskWithAttachmentArgs, AskWithToolsArgs, ClearSessionArgs, GenerateImageArgs,
    GenerateVideoArgs, GetUsageArgs, ListModelsArgs, check_name, merge_params, normalize_tools,
};
use serde_json::{Map, Value, json};

/// A fixed "now" (2026-11-22T16:50:00Z), so runs repeat.
const NOW_MS: i64 = 1_795_366_200_000;
const TINY: u64 = 16;

fn body_parses(bot: &str, prompt: Value, mut fields: Map<String, Value>, stream: bool) {
    fields.insert("model".into(), Value::String(bot.into()));
    fields.insert(
        "messages".into(),
        json!([{"role": "user", "content": prompt}]),
    );
    fields.insert("stream".into(), Value::Bool(stream));
    let bytes = serde_json::to_vec(&Value::Object(fields)).expect("a Value serialises");
    // `params` may carry a field of the wrong type (a 400 for the caller), never a panic.
    if let Ok(req) = ChatRequest::parse(Bytes::from(bytes)) {
        assert_eq!(req.model(), bot);
        let _ = req.upstream_body(bot);
    }
}

/// Runs `attachments::load` for a URL or base64 spec; those never wait (no disk, no network).
fn load(spec: Spec<'_>, max: u64) -> Option<Result<attachments::Attachment, String>> {
    if spec.path.is_some() {
        return None;
    }
    let mcp = McpPolicy {
        max_attachment_bytes: ByteSize(max),
        ..McpPolicy::default()
    };
    let policy = AttachmentPolicy::new(&mcp);
    let fut = pin!(attachments::load(spec, &policy, Access::Remote));
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => panic!("a URL or base64 attachment waited"),
    }
}

fn check_attachment(args: &AskWithAttachmentArgs) {
    let spec = args.spec();
    for max in [McpPolicy::default().max_attachment_bytes.0, TINY] {
        let Some(result) = load(spec, max) else {
            return;
        };
        let Ok(att) = result else { continue };
        assert!(!att.name.is_empty());
        let part = att.content_part();
        let url = part
            .pointer("/image_url/url")
            .or_else(|| part.pointer("/file/file_data"))
            .and_then(Value::as_str)
            .expect("a content part carries a URL");
        if let Some(given) = spec.url {
            assert_eq!(att.size, None);
            assert_eq!(url, given.trim());
            continue;
        }
        let size = att.size.expect("inline data has a size");
        assert!(size <= max, "{size} bytes passed a limit of {max}");
        let (head, b64) = url.split_once(',').expect("a data: URL");
        assert!(head.starts_with("data:") && head.ends_with(";base64"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("the content part's base64 decodes");
        assert_eq!(bytes.len() as u64, size);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(args) = serde_json::from_slice::<AskPoeArgs>(data) {
        let mut fields = Map::new();
        if let Some(t) = args.temperature {
            fields.insert("temperature".into(), json!(t));
        }
        if let Some(n) = args.max_tokens {
            fields.insert("max_tokens".into(), json!(n));
        }
        if let (Ok(bot), Ok(())) = (
            check_name("bot", &args.bot),
            merge_params(&mut fields, args.params),
        ) {
            body_parses(&bot, Value::String(args.prompt), fields, true);
        }
    }
    if let Ok(args) = serde_json::from_slice::<AskWithAttachmentArgs>(data) {
        check_attachment(&args);
        let mut fields = Map::new();
        if let (Ok(bot), Ok(())) = (
            check_name("bot", &args.bot),
            merge_params(&mut fields, args.params),
        ) {
            body_parses(&bot, Value::String(args.prompt), fields, true);
        }
    }
    if let Ok(args) = serde_json::from_slice::<AskWithToolsArgs>(data) {
        let _ = check_name("bot", &args.bot);
        if let Ok(tools) = normalize_tools(args.tools) {
            assert!(!tools.is_empty());
            for t in &tools {
                assert!(t.get("type").is_some(), "{t}");
                let name = t.pointer("/function/name").and_then(Value::as_str);
                assert!(name.is_some_and(|n| !n.is_empty()), "{t}");
            }
        }
    }
    if let Ok(args) = serde_json::from_slice::<GenerateImageArgs>(data) {
        let model = args.model.unwrap_or_else(|| "image".into());
        let mut fields = Map::new();
        if let (Ok(bot), Ok(())) = (
            check_name("model", &model),
            merge_params(&mut fields, args.params),
        ) {
            body_parses(&bot, Value::String(args.prompt), fields, false);
        }
    }
    if let Ok(args) = serde_json::from_slice::<GenerateVideoArgs>(data) {
        let model = args.model.unwrap_or_else(|| "video".into());
        let mut fields = Map::new();
        if let Some(d) = args.duration {
            fields.insert("duration".into(), d);
        }
        if let (Ok(bot), Ok(())) = (
            check_name("model", &model),
            merge_params(&mut fields, args.params),
        ) {
            body_parses(&bot, Value::String(args.prompt), fields, false);
        }
    }
    if let Ok(args) = serde_json::from_slice::<ListModelsArgs>(data) {
        let _ = args.filter.map(|f| f.trim().to_lowercase());
    }
    if let Ok(args) = serde_json::from_slice::<GetUsageArgs>(data) {
        if let Some(since) = &args.since {
            let _ = parse_when(since, NOW_MS);
        }
        if let Some(g) = &args.group_by {
            let _ = GroupBy::parse(g);
        }
    }
    let _ = serde_json::from_slice::<ClearSessionArgs>(data);
});
