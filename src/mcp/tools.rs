//! The MCP tools. Names and arguments are what users of the old Python server know.
//!
//! Failures a caller can act on (bad arguments, an unknown session, a missing file, Poe's own
//! errors) are tool results with `isError: true` and a message saying what went wrong, so the
//! agent sees them; protocol errors are left to rmcp (unknown tool, malformed request).

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, Resource, ServerCapabilities, ServerConfig,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::attachments::{self, Spec};
use super::reply::{self, Answer, Progress, ProgressPlan, Usage};
use super::sessions::Scope;
use super::{Access, McpCore, media};
use crate::gateway::Caller;

/// The alias `generate_image` uses when no model is given.
pub const IMAGE_ALIAS: &str = "image";
/// The alias `generate_video` uses when no model is given.
pub const VIDEO_ALIAS: &str = "video";
/// Top-level request fields the tools set themselves; `params` may not override them.
const RESERVED: &[&str] = &["model", "messages", "stream", "stream_options", "n"];

const INSTRUCTIONS: &str = "Ask Poe's bots (Claude, GPT, Gemini, Grok, image and video models and many more) \
through the poe-gateway. `ask_poe` answers a prompt and returns a `session_id`: pass it back to continue the \
conversation. `ask_with_attachment` sends a file, an image or a URL along. `ask_poe_with_tools` lets the bot \
request function calls, which you run yourself. `generate_image` and `generate_video` return media URLs. \
`list_models` shows the bots and the gateway's short aliases. `get_usage` reports your usage and cost.";

/// How a server instance learns who is calling.
#[derive(Clone)]
pub(crate) enum Mode {
    /// One local client; this caller pays for every call.
    Local(Caller),
    /// `/mcp`: each call's caller is in its HTTP request (set by the HTTP layer after auth).
    Http,
}

/// The MCP server: one per connection (stdio) or per MCP session (HTTP), all sharing one
/// [`McpCore`].
#[derive(Clone)]
pub struct PoeTools {
    core: McpCore,
    mode: Mode,
}

// ----- arguments -----

/// Reads an optional text argument, taking a blank one as not given: agents fill optional
/// fields with `""` about as often as they leave them out.
fn blank_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty()))
}

/// The same for an argument that may be text or something else (`tool_choice`, `duration`):
/// a blank string is not given, and neither is `null`.
fn blank_value_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?
        .filter(|v| !v.is_null() && v.as_str().is_none_or(|s| !s.trim().is_empty())))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AskPoeArgs {
    /// The Poe bot or gateway alias to ask, e.g. `claude`, `gpt`, `Claude-Sonnet-4.5`, `GPT-5`,
    /// `Gemini-2.5-Pro` (case-insensitive). `list_models` shows them all.
    pub bot: String,
    /// The message to send.
    pub prompt: String,
    /// Continue this conversation: the `session_id` from an earlier answer. Omit it to start a
    /// new session (its id comes back with the answer).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub session_id: Option<String>,
    /// A system prompt. It sets (or replaces) the session's system message.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub system: Option<String>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Longest answer, in tokens.
    pub max_tokens: Option<u32>,
    /// Thinking budget in tokens, for bots that think before answering (Claude: 0 to 31999).
    pub thinking_budget: Option<u32>,
    /// Reasoning effort, for bots that support it: `minimal`, `low`, `medium` or `high`.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub reasoning_effort: Option<String>,
    /// Other bot parameters, sent as top-level request fields, e.g. `{"web_search": true}`.
    /// `list_models` shows a bot's parameters where Poe publishes them.
    pub params: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AskWithAttachmentArgs {
    /// The Poe bot or gateway alias to ask (it must accept the attachment's kind of input).
    pub bot: String,
    /// The message to send with the attachment.
    pub prompt: String,
    /// A local file to attach: an absolute path (or `~/...`). Over stdio any file you can
    /// read; over HTTP only files inside the gateway's configured attachment directories
    /// (a relative path is looked up in them).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub attachment_path: Option<String>,
    /// An http(s) URL Poe fetches itself (the gateway never downloads it). Its type comes
    /// from its file name; give `mime_type` when the name has no extension (Poe's own image
    /// URLs, from `generate_image`, are known as images).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub attachment_url: Option<String>,
    /// The file's content as base64 (or a `data:` URL). Give `mime_type` or `filename` when
    /// the content is not a common image, PDF, audio or video format.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub attachment_base64: Option<String>,
    /// The attachment's MIME type, e.g. `image/png`, `application/pdf`. Detected from the
    /// content when possible.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub mime_type: Option<String>,
    /// The file name shown to the bot. Defaults to the path's or URL's file name.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub filename: Option<String>,
    /// Continue this conversation (the `session_id` from an earlier answer); omit to start a new one.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub session_id: Option<String>,
    /// A system prompt. It sets (or replaces) the session's system message.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub system: Option<String>,
    /// Other bot parameters, sent as top-level request fields.
    pub params: Option<Map<String, Value>>,
}

impl AskWithAttachmentArgs {
    /// The attachment these arguments describe, for [`attachments::load`].
    pub fn spec(&self) -> Spec<'_> {
        Spec {
            path: self.attachment_path.as_deref(),
            url: self.attachment_url.as_deref(),
            base64: self.attachment_base64.as_deref(),
            mime_type: self.mime_type.as_deref(),
            filename: self.filename.as_deref(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AskWithToolsArgs {
    /// The Poe bot or gateway alias to ask; it must support tool calling (`list_models` with
    /// capability `tools`).
    pub bot: String,
    /// The message to send.
    pub prompt: String,
    /// OpenAI function definitions: `{"type": "function", "function": {"name", "description",
    /// "parameters": <JSON schema>}}`, or just `{"name", "description", "parameters"}`.
    pub tools: Vec<Value>,
    /// `"auto"`, `"none"`, `"required"`, or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default, deserialize_with = "blank_value_is_none")]
    pub tool_choice: Option<Value>,
    /// Whether the bot may request several calls at once.
    pub parallel_tool_calls: Option<bool>,
    /// Continue this conversation (the `session_id` from an earlier answer); omit to start a new one.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub session_id: Option<String>,
    /// A system prompt. It sets (or replaces) the session's system message.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub system: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateImageArgs {
    /// What to draw.
    pub prompt: String,
    /// The image bot or alias. Default: the gateway's `image` alias.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub model: Option<String>,
    /// Aspect ratio, for bots that take one (GPT-Image-1: `1:1`, `3:2`, `2:3`).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub aspect: Option<String>,
    /// Quality, for bots that take one (e.g. `low`, `medium`, `high`).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub quality: Option<String>,
    /// Other bot parameters, sent as top-level request fields (e.g. `negative_prompt`).
    pub params: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateVideoArgs {
    /// What the video shows.
    pub prompt: String,
    /// The video bot or alias. Default: the gateway's `video` alias.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub model: Option<String>,
    /// Aspect ratio, for bots that take one (e.g. `16:9`, `9:16`).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub aspect_ratio: Option<String>,
    /// Length, as the bot expects it: seconds (e.g. `8`) or a string (e.g. `"8s"`).
    #[serde(default, deserialize_with = "blank_value_is_none")]
    pub duration: Option<Value>,
    /// Other bot parameters, sent as top-level request fields (e.g. `resolution`, `negative_prompt`).
    pub params: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Answers with text.
    Text,
    /// Makes images.
    Image,
    /// Makes video.
    Video,
    /// Makes audio.
    Audio,
    /// Reads images.
    Vision,
    /// Calls functions (`ask_poe_with_tools`).
    Tools,
    /// Searches the web.
    WebSearch,
    /// Thinks before answering.
    Reasoning,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListModelsArgs {
    /// Keep models whose id, name or description contains this (case-insensitive).
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub filter: Option<String>,
    /// Keep models with this capability.
    #[serde(default, deserialize_with = "blank_capability_is_none")]
    pub capability: Option<Capability>,
}

/// `capability` as [`blank_is_none`] reads text: a blank one is not given.
fn blank_capability_is_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Capability>, D::Error> {
    match blank_value_is_none(d)? {
        None => Ok(None),
        Some(v) => Capability::deserialize(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetUsageArgs {
    /// Start of the period: an age such as `7d` or `24h`, a date `YYYY-MM-DD`, an RFC 3339
    /// time, or unix seconds. Default: 30 days ago.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub since: Option<String>,
    /// Split the totals by `model`, `day`, `key` or `api` (`chat`, `responses`, `messages`).
    /// Default: totals only.
    #[serde(default, deserialize_with = "blank_is_none")]
    #[schemars(with = "Option<String>")]
    pub group_by: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct UsageResult {
    /// Requests, tokens (with the prompt tokens read from and written to the bots' prompt
    /// caches), cost in USD, cache hits and savings, errors, and rows without a known price,
    /// for the period (and per group when asked).
    pub report: Value,
    /// Poe's compute-point balance of the key paying for your calls, when the gateway knows it.
    pub point_balance: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearSessionArgs {
    /// The session to forget.
    pub session_id: String,
}

// ----- results -----

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AskResult {
    /// The bot's answer.
    pub text: String,
    /// Pass this back as `session_id` to continue the conversation.
    pub session_id: String,
    /// The bot that answered (after aliases and fallbacks).
    pub bot: String,
    /// Token counts, when Poe reported them.
    pub usage: Option<Usage>,
    /// Why the answer ended (`stop`, `length`, `tool_calls`...).
    pub finish_reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ToolsResult {
    /// Any text the bot answered alongside (or instead of) tool calls.
    pub text: String,
    /// The calls the bot requests, in OpenAI's shape: `{"id", "type": "function", "function":
    /// {"name", "arguments": "<JSON string>"}}`. Run them yourself; the gateway never does.
    pub tool_calls: Vec<Value>,
    pub finish_reason: Option<String>,
    /// Pass this back as `session_id` to continue the conversation.
    pub session_id: String,
    pub bot: String,
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct MediaResult {
    /// The media URLs found in the bot's answer, in order.
    pub urls: Vec<String>,
    /// The bot's whole answer (markdown).
    pub text: String,
    pub bot: String,
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ModelInfo {
    pub id: String,
    /// Poe's display name.
    pub name: Option<String>,
    pub description: Option<String>,
    pub owned_by: Option<String>,
    /// For a gateway alias: the bots it tries, in order.
    pub alias_of: Option<Vec<String>>,
    pub input_modalities: Vec<String>,
    pub output_modalities: Vec<String>,
    /// Poe's `supported_features` (e.g. `tools`, `web_search`).
    pub features: Vec<String>,
    /// USD per token (strings, as Poe publishes them), when known.
    pub pricing: Option<Value>,
    pub context_length: Option<u64>,
    /// Bot-specific parameters (pass them in `params`), when Poe publishes them.
    pub parameters: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ModelsResult {
    pub models: Vec<ModelInfo>,
    /// The gateway's aliases: short name to the bots it tries.
    pub aliases: BTreeMap<String, Vec<String>>,
    pub count: usize,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ClearResult {
    pub session_id: String,
    pub cleared: bool,
}

// ----- tools -----

#[tool_router]
impl PoeTools {
    #[tool(
        description = "Ask a Poe bot a question and get its answer. Starts a new conversation, or continues \
                       one when you pass the `session_id` an earlier call returned. Long answers stream, with \
                       progress notifications when you send a progress token.",
        output_schema = schema_for_output::<AskResult>(),
        annotations(title = "Ask a Poe bot", read_only_hint = true, open_world_hint = true)
    )]
    async fn ask_poe(
        &self,
        Parameters(args): Parameters<AskPoeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.ask_poe_impl(args, &ctx)).await)
    }

    #[tool(
        description = "Ask a Poe bot about a file: an image, PDF, audio or video (or another document). Give \
                       exactly one of attachment_path (a local file), attachment_url (Poe fetches it) or \
                       attachment_base64 (+ mime_type). Images go to the bot as images, the rest as files.",
        output_schema = schema_for_output::<AskResult>(),
        annotations(title = "Ask a Poe bot about a file", read_only_hint = true, open_world_hint = true)
    )]
    async fn ask_with_attachment(
        &self,
        Parameters(args): Parameters<AskWithAttachmentArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.ask_with_attachment_impl(args, &ctx)).await)
    }

    #[tool(
        description = "Ask a Poe bot that can call functions: pass OpenAI function definitions in `tools`, and \
                       get back the `tool_calls` the bot wants made. The gateway never runs anything: you run \
                       the calls and send the results in a follow-up prompt with the same session_id.",
        output_schema = schema_for_output::<ToolsResult>(),
        annotations(title = "Ask a Poe bot with function calling", read_only_hint = true, open_world_hint = true)
    )]
    async fn ask_poe_with_tools(
        &self,
        Parameters(args): Parameters<AskWithToolsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.ask_with_tools_impl(args, &ctx)).await)
    }

    #[tool(
        description = "Generate an image with a Poe image bot (default: the gateway's `image` alias, e.g. \
                       GPT-Image-1). Returns the image URLs, as text and as resource links.",
        output_schema = schema_for_output::<MediaResult>(),
        annotations(title = "Generate an image", read_only_hint = true, open_world_hint = true)
    )]
    async fn generate_image(
        &self,
        Parameters(args): Parameters<GenerateImageArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        let mut extra = Map::new();
        put(&mut extra, "aspect", args.aspect.map(Value::from));
        put(&mut extra, "quality", args.quality.map(Value::from));
        let model = args.model.unwrap_or_else(|| IMAGE_ALIAS.into());
        Ok(finish(
            ct,
            self.media_impl(model, args.prompt, extra, args.params, &ctx),
        )
        .await)
    }

    #[tool(
        description = "Generate a video with a Poe video bot (default: the gateway's `video` alias, e.g. Veo-3). \
                       Returns the video URLs, as text and as resource links. Video bots can take minutes.",
        output_schema = schema_for_output::<MediaResult>(),
        annotations(title = "Generate a video", read_only_hint = true, open_world_hint = true)
    )]
    async fn generate_video(
        &self,
        Parameters(args): Parameters<GenerateVideoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        let mut extra = Map::new();
        put(
            &mut extra,
            "aspect_ratio",
            args.aspect_ratio.map(Value::from),
        );
        put(&mut extra, "duration", args.duration);
        let model = args.model.unwrap_or_else(|| VIDEO_ALIAS.into());
        Ok(finish(
            ct,
            self.media_impl(model, args.prompt, extra, args.params, &ctx),
        )
        .await)
    }

    #[tool(
        description = "List the Poe bots and the gateway's aliases, with their modalities, features and prices \
                       where known. Narrow it with `filter` (text) and `capability`.",
        output_schema = schema_for_output::<ModelsResult>(),
        annotations(title = "List Poe models", read_only_hint = true, open_world_hint = true)
    )]
    async fn list_models(
        &self,
        Parameters(args): Parameters<ListModelsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.list_models_impl(args)).await)
    }

    #[tool(
        description = "The same as list_models (the name the older Poe MCP server used).",
        output_schema = schema_for_output::<ModelsResult>(),
        annotations(title = "List Poe models", read_only_hint = true, open_world_hint = true)
    )]
    async fn list_available_models(
        &self,
        Parameters(args): Parameters<ListModelsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.list_models_impl(args)).await)
    }

    #[tool(
        description = "Your usage and cost through this gateway: requests, tokens, USD (null-priced \
                       bots are counted apart), cache hits and what they saved, and errors, for a period, \
                       optionally per model, day, key or api (the API the requests used). Also Poe's point balance when it is known.",
        output_schema = schema_for_output::<UsageResult>(),
        annotations(title = "Usage and cost", read_only_hint = true, open_world_hint = false)
    )]
    async fn get_usage(
        &self,
        Parameters(args): Parameters<GetUsageArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.get_usage_impl(args, &ctx)).await)
    }

    #[tool(
        description = "Forget a conversation session and its history.",
        output_schema = schema_for_output::<ClearResult>(),
        annotations(title = "Clear a session", read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn clear_session(
        &self,
        Parameters(args): Parameters<ClearSessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, rmcp::ErrorData> {
        let ct = ctx.ct.clone().cancelled_owned();
        Ok(finish(ct, self.clear_session_impl(args, &ctx)).await)
    }
}

#[tool_handler(router = self.core.inner.router)]
impl ServerHandler for PoeTools {
    /// Every tool call runs in an `execute_tool` span, which parents the chat span of the
    /// gateway call it makes. Over HTTP, a caller's `traceparent` parents the tool span.
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        use tracing::Instrument;
        let span = if crate::telemetry::traces_enabled() {
            let span = tracing::info_span!(
                "execute_tool",
                otel.name = %format!("execute_tool {}", request.name),
                gen_ai.operation.name = "execute_tool",
                gen_ai.tool.name = %request.name,
                gen_ai.provider.name = "poe",
                error.type = tracing::field::Empty,
            );
            if let Some(cx) = context
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| crate::telemetry::extract_context(&p.headers))
            {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                let _ = span.set_parent(cx);
            }
            span
        } else {
            tracing::Span::none()
        };
        let call = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        let result = self
            .core
            .inner
            .router
            .call(call)
            .instrument(span.clone())
            .await;
        if result.is_err() {
            span.record("error.type", "invalid_request");
        }
        result
    }

    /// A request rmcp could not read as the method it names comes here as a custom request,
    /// where rmcp's default answer is -32601 with the bare method as its message: an agent
    /// whose `tools/call` had bad params was told the method did not exist. The protocol's
    /// own methods get -32602 with what is wrong; other methods are not found, by name.
    async fn on_custom_request(
        &self,
        request: rmcp::model::CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CustomResult, rmcp::ErrorData> {
        const SPEC_METHODS: &[&str] = &[
            "initialize",
            "ping",
            "tools/list",
            "tools/call",
            "resources/list",
            "resources/read",
            "resources/templates/list",
            "resources/subscribe",
            "resources/unsubscribe",
            "prompts/list",
            "prompts/get",
            "completion/complete",
            "logging/setLevel",
        ];
        let method = request.method;
        if !SPEC_METHODS.contains(&method.as_str()) {
            return Err(rmcp::ErrorData::new(
                rmcp::model::ErrorCode::METHOD_NOT_FOUND,
                format!("method not found: {method}"),
                None,
            ));
        }
        let why = match (method.as_str(), request.params) {
            (_, None) => "params are missing".to_string(),
            ("tools/call", Some(p)) => {
                match serde_json::from_value::<rmcp::model::CallToolRequestParams>(p) {
                    Err(e) => e.to_string(),
                    Ok(_) => "expected {\"name\": <tool>, \"arguments\": {...}}".into(),
                }
            }
            (_, Some(_)) => "they do not have the shape the method takes".into(),
        };
        Err(rmcp::ErrorData::invalid_params(
            format!("invalid params for {method}: {why}"),
            None,
        ))
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "poe-gateway",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Runs a tool's work until it ends or the client cancels the call (`cancelled` resolves).
/// Cancelling drops the work, and with it any upstream reply body, which stops the upstream call.
async fn finish(
    cancelled: impl Future<Output = ()>,
    work: impl Future<Output = Result<CallToolResult, String>>,
) -> CallToolResult {
    tokio::select! {
        biased;
        _ = cancelled => tool_error("cancelled by the client".into()),
        r = work => r.unwrap_or_else(tool_error),
    }
}

fn tool_error(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

/// A success with `value` as structured content (and as JSON text), plus `extra` blocks.
fn structured<T: Serialize>(value: &T, extra: Vec<ContentBlock>) -> Result<CallToolResult, String> {
    let value =
        serde_json::to_value(value).map_err(|e| format!("cannot encode the result: {e}"))?;
    let mut result = CallToolResult::structured(value);
    result.content.extend(extra);
    Ok(result)
}

fn put(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        map.insert(key.to_string(), v);
    }
}

#[doc(hidden)] // pub for the fuzz targets (fuzz/)
pub fn check_name(what: &str, name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{what}` must not be empty"));
    }
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(format!("`{what}` is not a bot name"));
    }
    Ok(name.to_string())
}

/// Merges `params` into `body` (tool-set fields win), refusing the fields the tool owns.
#[doc(hidden)] // pub for the fuzz targets (fuzz/)
pub fn merge_params(
    body: &mut Map<String, Value>,
    params: Option<Map<String, Value>>,
) -> Result<(), String> {
    for (k, v) in params.unwrap_or_default() {
        if RESERVED.contains(&k.as_str()) {
            return Err(format!("`params` may not set `{k}`: the tool sets it"));
        }
        body.entry(k).or_insert(v);
    }
    Ok(())
}

/// One conversational call: history, request, answer, history again.
struct Turn {
    bot: String,
    system: Option<String>,
    session_id: Option<String>,
    /// The new user message.
    user: Value,
    /// Top-level request fields besides model, messages and stream.
    fields: Map<String, Value>,
    stream: bool,
}

impl PoeTools {
    pub(crate) fn new(core: McpCore, mode: Mode) -> PoeTools {
        PoeTools { core, mode }
    }

    /// The tool router, built once per [`McpCore`].
    pub(crate) fn router() -> ToolRouter<PoeTools> {
        Self::tool_router()
    }

    /// Progress reporting for this call, when the client asked for it with a progress token.
    fn progress_plan(&self, ctx: &RequestContext<RoleServer>) -> Option<ProgressPlan> {
        let token = ctx.meta.get_progress_token()?;
        Some(ProgressPlan {
            progress: Progress::new(ctx.peer.clone(), token),
            interval: self.core.gateway().policy().mcp.progress_interval,
        })
    }

    fn access(&self) -> Access {
        match self.mode {
            Mode::Local(_) => Access::Local,
            Mode::Http => Access::Remote,
        }
    }

    /// Who pays for this call. Over HTTP it is whoever the HTTP layer authenticated for this
    /// request; there is no fallback to the server's key.
    fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, String> {
        match &self.mode {
            Mode::Local(base) => Ok(Caller {
                request_id: Arc::from(uuid::Uuid::new_v4().to_string()),
                ..base.clone()
            }),
            Mode::Http => ctx
                .extensions
                .get::<http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<Caller>())
                .cloned()
                .ok_or_else(|| "this MCP request carries no authenticated caller".to_string()),
        }
    }

    async fn converse(
        &self,
        turn: Turn,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<(Answer, String), String> {
        let caller = self.caller(ctx)?;
        let sessions = self.core.sessions();
        let session = sessions
            .open(Scope::of(&caller), turn.session_id.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = turn.fields;
        body.insert("model".into(), Value::String(turn.bot));
        body.insert(
            "messages".into(),
            Value::Array(
                session
                    .history()
                    .messages(turn.system.as_deref(), turn.user.clone()),
            ),
        );
        body.insert("stream".into(), Value::Bool(turn.stream));
        if turn.stream {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        let plan = self.progress_plan(ctx);
        let answer = reply::ask(self.core.gateway(), &caller, &Value::Object(body), plan).await?;
        let session_id = session.id.to_string();
        let assistant = json!({"role": "assistant", "content": remembered_text(&answer)});
        sessions
            .commit(session, turn.system, turn.user, assistant)
            .await;
        Ok((answer, session_id))
    }

    async fn ask_poe_impl(
        &self,
        args: AskPoeArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let bot = check_name("bot", &args.bot)?;
        if args.prompt.trim().is_empty() {
            return Err("`prompt` must not be empty".into());
        }
        let mut fields = Map::new();
        if let Some(t) = args.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err("`temperature` must be between 0 and 2".into());
            }
            fields.insert("temperature".into(), json!(t));
        }
        put(&mut fields, "max_tokens", args.max_tokens.map(Value::from));
        put(
            &mut fields,
            "thinking_budget",
            args.thinking_budget.map(Value::from),
        );
        put(
            &mut fields,
            "reasoning_effort",
            args.reasoning_effort.map(Value::from),
        );
        merge_params(&mut fields, args.params)?;
        let turn = Turn {
            bot,
            system: args.system,
            session_id: args.session_id,
            user: json!({"role": "user", "content": args.prompt}),
            fields,
            stream: true,
        };
        let (answer, session_id) = self.converse(turn, ctx).await?;
        structured(&ask_result(answer, session_id), vec![])
    }

    async fn ask_with_attachment_impl(
        &self,
        args: AskWithAttachmentArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let bot = check_name("bot", &args.bot)?;
        let attachment =
            attachments::load(args.spec(), &self.core.inner.attachments, self.access()).await?;
        let mut parts = Vec::with_capacity(2);
        if !args.prompt.trim().is_empty() {
            parts.push(json!({"type": "text", "text": args.prompt}));
        }
        parts.push(attachment.content_part());
        let mut fields = Map::new();
        merge_params(&mut fields, args.params)?;
        let turn = Turn {
            bot,
            system: args.system,
            session_id: args.session_id,
            user: json!({"role": "user", "content": parts}),
            fields,
            stream: true,
        };
        let (answer, session_id) = self.converse(turn, ctx).await?;
        structured(&ask_result(answer, session_id), vec![])
    }

    async fn ask_with_tools_impl(
        &self,
        args: AskWithToolsArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let bot = check_name("bot", &args.bot)?;
        if args.prompt.trim().is_empty() {
            return Err("`prompt` must not be empty".into());
        }
        let tools = normalize_tools(args.tools)?;
        let mut fields = Map::new();
        fields.insert("tools".into(), Value::Array(tools));
        put(&mut fields, "tool_choice", args.tool_choice);
        put(
            &mut fields,
            "parallel_tool_calls",
            args.parallel_tool_calls.map(Value::from),
        );
        let turn = Turn {
            bot,
            system: args.system,
            session_id: args.session_id,
            user: json!({"role": "user", "content": args.prompt}),
            fields,
            // Non-stream: tool calls arrive whole, not as deltas to assemble.
            stream: false,
        };
        let (answer, session_id) = self.converse(turn, ctx).await?;
        let result = ToolsResult {
            text: answer.text,
            tool_calls: answer.tool_calls,
            finish_reason: answer.finish_reason,
            session_id,
            bot: answer.bot,
            usage: answer.usage,
        };
        structured(&result, vec![])
    }

    async fn media_impl(
        &self,
        model: String,
        prompt: String,
        mut fields: Map<String, Value>,
        params: Option<Map<String, Value>>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let model = check_name("model", &model)?;
        if prompt.trim().is_empty() {
            return Err("`prompt` must not be empty".into());
        }
        merge_params(&mut fields, params)?;
        let caller = self.caller(ctx)?;
        fields.insert("model".into(), Value::String(model));
        fields.insert(
            "messages".into(),
            json!([{"role": "user", "content": prompt}]),
        );
        fields.insert("stream".into(), Value::Bool(false));
        let plan = self.progress_plan(ctx);
        let answer = reply::ask(self.core.gateway(), &caller, &Value::Object(fields), plan).await?;
        let found = media::extract(&answer.text);
        if found.is_empty() {
            let text: String = answer.text.chars().take(1000).collect();
            return Err(format!(
                "`{}` answered without a media URL: {text}",
                answer.bot
            ));
        }
        let links = found
            .iter()
            .map(|m| {
                let mut r = Resource::new(m.url.clone(), m.name.clone());
                if let Some(mime) = &m.mime_type {
                    r = r.with_mime_type(mime.clone());
                }
                ContentBlock::resource_link(r)
            })
            .collect();
        let result = MediaResult {
            urls: found.into_iter().map(|m| m.url).collect(),
            text: answer.text,
            bot: answer.bot,
            usage: answer.usage,
        };
        structured(&result, links)
    }

    async fn list_models_impl(&self, args: ListModelsArgs) -> Result<CallToolResult, String> {
        let gateway = self.core.gateway();
        let catalogue = gateway
            .models()
            .await
            .map_err(|e| format!("cannot read Poe's model list: {e}"))?;
        let filter = args
            .filter
            .map(|f| f.trim().to_lowercase())
            .filter(|f| !f.is_empty());
        let models: Vec<ModelInfo> = catalogue
            .entries()
            .iter()
            .filter_map(model_info)
            .filter(|m| filter.as_deref().is_none_or(|f| matches_text(m, f)))
            .filter(|m| args.capability.is_none_or(|c| has_capability(m, c)))
            .collect();
        let aliases = gateway
            .aliases()
            .iter()
            .map(|(name, bots)| (name.to_string(), bots.to_vec()))
            .collect();
        let result = ModelsResult {
            count: models.len(),
            models,
            aliases,
        };
        structured(&result, vec![])
    }

    async fn get_usage_impl(
        &self,
        args: GetUsageArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        use crate::ledger::{GroupBy, ReportQuery, now_ms, report::parse_when};
        let caller = self.caller(ctx)?;
        let now = now_ms();
        let since_ms = match args.since.as_deref() {
            Some(s) => parse_when(s, now).map_err(|e| format!("`since`: {e}"))?,
            None => now - 30 * 86_400_000,
        };
        let group_by = match args.group_by.as_deref() {
            None => None,
            Some(g) => Some(
                GroupBy::parse(g)
                    .ok_or_else(|| "`group_by` must be model, day, key or api".to_string())?,
            ),
        };
        let gateway = self.core.gateway();
        let report = gateway
            .usage_report(
                &caller,
                ReportQuery {
                    since_ms,
                    until_ms: now + 1,
                    key_id: None,
                    group_by,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        // The server key's balance is only the caller's business when the server key pays.
        let point_balance = match caller.credential {
            crate::gateway::Credential::Server => gateway.point_balance(),
            crate::gateway::Credential::Poe(_) => None,
        };
        let result = UsageResult {
            report: serde_json::to_value(&report).map_err(|e| e.to_string())?,
            point_balance,
        };
        structured(&result, vec![])
    }

    async fn clear_session_impl(
        &self,
        args: ClearSessionArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let caller = self.caller(ctx)?;
        let cleared = self
            .core
            .sessions()
            .clear(Scope::of(&caller), &args.session_id)
            .await
            .map_err(|e| e.to_string())?;
        if !cleared {
            return Err(
                super::sessions::SessionError::Unknown(args.session_id.trim().to_string())
                    .to_string(),
            );
        }
        structured(
            &ClearResult {
                session_id: args.session_id.trim().to_string(),
                cleared,
            },
            vec![],
        )
    }
}

fn ask_result(answer: Answer, session_id: String) -> AskResult {
    AskResult {
        text: answer.text,
        session_id,
        bot: answer.bot,
        usage: answer.usage,
        finish_reason: answer.finish_reason,
    }
}

/// The assistant message kept in the session. Tool calls are kept as a note in the text: an
/// assistant message with `tool_calls` would need the matching `tool` results next, which the
/// agent sends as a plain prompt instead.
fn remembered_text(answer: &Answer) -> String {
    if answer.tool_calls.is_empty() {
        return answer.text.clone();
    }
    let calls: Vec<String> = answer
        .tool_calls
        .iter()
        .map(|c| {
            let name = c
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let args = c
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            let id = c.get("id").and_then(Value::as_str).unwrap_or("");
            format!("{name}({args}) [id {id}]")
        })
        .collect();
    let note = format!("[requested tool calls: {}]", calls.join("; "));
    if answer.text.is_empty() {
        note
    } else {
        format!("{}\n\n{note}", answer.text)
    }
}

/// Accepts OpenAI tool definitions, or bare function definitions (wrapped).
#[doc(hidden)] // pub for the fuzz targets (fuzz/)
pub fn normalize_tools(tools: Vec<Value>) -> Result<Vec<Value>, String> {
    if tools.is_empty() {
        return Err("`tools` must hold at least one function definition".into());
    }
    tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let Value::Object(obj) = t else {
                return Err(format!("tools[{i}] must be an object"));
            };
            let name_ok = |f: &Map<String, Value>| f.get("name").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
            if let Some(Value::Object(f)) = obj.get("function") {
                if !name_ok(f) {
                    return Err(format!("tools[{i}].function needs a `name`"));
                }
                let mut obj = obj;
                obj.entry("type").or_insert(json!("function"));
                return Ok(Value::Object(obj));
            }
            if name_ok(&obj) {
                return Ok(json!({"type": "function", "function": obj}));
            }
            Err(format!(
                "tools[{i}] is not a function definition: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            ))
        })
        .collect()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn model_info(e: &Value) -> Option<ModelInfo> {
    let id = e.get("id")?.as_str()?.to_string();
    let text = |p: &str| e.pointer(p).and_then(Value::as_str).map(String::from);
    let description = text("/description").map(|d| {
        if d.chars().count() > 300 {
            format!("{}…", d.chars().take(300).collect::<String>())
        } else {
            d
        }
    });
    let pricing = e
        .get("pricing")
        .filter(|p| {
            p.as_object()
                .is_some_and(|o| o.values().any(|v| !v.is_null()))
        })
        .cloned();
    let parameters = e.get("parameters").and_then(Value::as_array).map(|ps| {
        ps.iter()
            .filter_map(|p| p.get("name").and_then(Value::as_str).map(String::from))
            .collect()
    });
    let alias_of = e.get("alias_of").map(|a| strings(Some(a)));
    let mut features = strings(e.get("supported_features"));
    if e.get("reasoning").is_some_and(|r| !r.is_null())
        && !features.iter().any(|f| f == "reasoning")
    {
        features.push("reasoning".into());
    }
    Some(ModelInfo {
        id,
        name: text("/metadata/display_name"),
        description,
        owned_by: text("/owned_by"),
        alias_of,
        input_modalities: strings(e.pointer("/architecture/input_modalities")),
        output_modalities: strings(e.pointer("/architecture/output_modalities")),
        features,
        pricing,
        context_length: e
            .pointer("/context_window/context_length")
            .and_then(Value::as_u64),
        parameters,
    })
}

fn matches_text(m: &ModelInfo, f: &str) -> bool {
    [Some(&m.id), m.name.as_ref(), m.description.as_ref()]
        .into_iter()
        .flatten()
        .any(|s| s.to_lowercase().contains(f))
        || m.alias_of
            .iter()
            .flatten()
            .any(|b| b.to_lowercase().contains(f))
}

fn has_capability(m: &ModelInfo, c: Capability) -> bool {
    let out = |x: &str| {
        m.output_modalities
            .iter()
            .any(|o| o.eq_ignore_ascii_case(x))
    };
    let feature = |x: &str| m.features.iter().any(|o| o.eq_ignore_ascii_case(x));
    match c {
        Capability::Text => out("text"),
        Capability::Image => out("image"),
        Capability::Video => out("video"),
        Capability::Audio => out("audio"),
        Capability::Vision => m
            .input_modalities
            .iter()
            .any(|i| i.eq_ignore_ascii_case("image")),
        Capability::Tools => feature("tools"),
        Capability::WebSearch => feature("web_search"),
        Capability::Reasoning => feature("reasoning"),
    }
}
