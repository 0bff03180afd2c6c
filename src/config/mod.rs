//! Policy configuration: a TOML file with `deny_unknown_fields`, overridden by env vars.
//!
//! Loading is two steps so that every error can name the file, the key and the reason:
//! the file is parsed into a plain TOML table, env overrides are written into that table,
//! and only then is the table deserialised into [`Policy`] through `serde_path_to_error`,
//! which reports the dotted path of the key that failed.

mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use values::ByteSize;

/// The policy file shipped with the project; also the built-in default when no file is found.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");
/// Where `serve` looks for a policy file when `POE_GATEWAY_POLICIES` is not set.
pub const DEFAULT_POLICY_PATH: &str = "policies/default.toml";
const BUILTIN_NAME: &str = "<built-in policies/default.toml>";
const ENV_PREFIX: &str = "POE_GATEWAY_";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub server: ServerPolicy,
    pub upstream: UpstreamPolicy,
    pub auth: AuthPolicy,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub limits: LimitsPolicy,
    pub aliases: BTreeMap<String, AliasTarget>,
    pub mcp: McpPolicy,
    pub cache: CachePolicy,
    pub log: LogPolicy,
    pub redis: RedisPolicy,
    /// Prices for bots Poe's catalogue does not price (or to override it), USD per token.
    pub pricing: BTreeMap<String, crate::gateway::models::PriceOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerPolicy {
    pub listen: SocketAddr,
    pub max_body_bytes: ByteSize,
    /// Request bodies held in memory at once, all requests together: each is read whole
    /// (a retry resends it), so without a total many large ones at once could exhaust memory.
    pub max_bodies_bytes: ByteSize,
    /// After SIGTERM, how long the gateway goes on serving (and accepting) while `/readyz`
    /// fails, so a load balancer that polls it stops sending here before the listener
    /// closes. 0 under Kubernetes, whose preStop hook waits instead.
    #[serde(with = "values::duration")]
    pub shutdown_delay: Duration,
    #[serde(with = "values::duration")]
    pub shutdown_grace: Duration,
    /// Longest time a client may take to send its request body (slow-loris guard).
    #[serde(with = "values::duration")]
    pub body_read_timeout: Duration,
    /// Longest time a client may take to send its request head.
    #[serde(with = "values::duration")]
    pub header_read_timeout: Duration,
    /// A connection with no new request for this long is closed gracefully (what it has in
    /// flight finishes first; an h2 connection gets GOAWAY).
    #[serde(with = "values::duration")]
    pub idle_timeout: Duration,
    /// Open client connections at most; past it, new ones wait in the listen backlog.
    pub max_connections: u32,
    /// Open connections one client address may hold (0: no limit); past it, its new ones
    /// are closed at once. Off by default: behind a proxy or load balancer every client
    /// shares the proxy's address.
    pub max_connections_per_client: u32,
    /// Put `GET /metrics` behind the admin key (`Authorization: Bearer <admin key>`).
    pub metrics_require_admin: bool,
    /// Threads serving connections, each with its own single-threaded runtime and upstream
    /// pool (0: one per CPU). A request then stays on one thread from accept to upstream and
    /// back, with no hand-offs between threads.
    pub threads: u32,
}

impl ServerPolicy {
    /// `threads`, with 0 read as the number of CPUs.
    pub fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }
}

impl Default for ServerPolicy {
    fn default() -> Self {
        ServerPolicy {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: ByteSize(50 * 1024 * 1024),
            max_bodies_bytes: ByteSize(512 * 1024 * 1024),
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(120),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_connections: 16_384,
            max_connections_per_client: 0,
            metrics_require_admin: false,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamPolicy {
    pub base_url: String,
    #[serde(with = "values::duration")]
    pub models_ttl: Duration,
    /// Certificate authorities (a PEM file) trusted for the upstream besides the public
    /// roots: a TLS-inspecting corporate proxy, or a private Poe-compatible endpoint.
    pub ca_file: Option<PathBuf>,
    /// Requests one HTTP/2 connection to the upstream carries at once; past it, another
    /// connection opens. At most the upstream's own stream limit (RFC 9113 recommends it be
    /// at least 100): hyper queues requests past that limit inside the connection.
    pub http2_max_streams: u32,
    /// A connection to the upstream that falls silent is checked after this long: an HTTP/2
    /// PING while a request is open on it, TCP keep-alive probes while it is idle.
    #[serde(with = "values::duration")]
    pub keepalive_interval: Duration,
    /// A check left unanswered this long closes the connection (so does data sent and not
    /// acknowledged for the interval and this together). A request caught on a dead
    /// connection then fails and is retried on a new one, instead of waiting out
    /// `timeouts.first_byte` (a dropped NAT mapping, a load balancer gone without a FIN).
    #[serde(with = "values::duration")]
    pub keepalive_timeout: Duration,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        UpstreamPolicy {
            base_url: "https://api.poe.com".into(),
            models_ttl: Duration::from_secs(600),
            ca_file: None,
            http2_max_streams: 100,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Any client; upstream calls use the server's `POE_API_KEY`.
    Open,
    /// The client's own Poe key is forwarded upstream.
    Passthrough,
    /// Gateway-issued keys (`poe-gateway keys create`); upstream uses `POE_API_KEY`.
    Keys,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::Open => "open",
            AuthMode::Passthrough => "passthrough",
            AuthMode::Keys => "keys",
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthPolicy {
    /// Unset means `open` on a loopback address; elsewhere it must be chosen.
    pub mode: Option<AuthMode>,
    pub allow_open_on_network: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "values::duration")]
    pub connect: Duration,
    #[serde(with = "values::duration")]
    pub first_byte: Duration,
    #[serde(with = "values::duration")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    #[serde(with = "values::duration")]
    pub base_backoff: Duration,
    #[serde(with = "values::duration")]
    pub max_backoff: Duration,
    #[serde(with = "values::duration")]
    pub max_retry_after: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
            budget_ratio: 0.2,
            budget_min_per_second: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsPolicy {
    pub upstream_rpm: u32,
    #[serde(with = "values::duration")]
    pub queue_timeout: Duration,
    pub max_concurrent_upstream: u32,
}

impl Default for LimitsPolicy {
    fn default() -> Self {
        LimitsPolicy {
            upstream_rpm: 500,
            queue_timeout: Duration::from_secs(10),
            max_concurrent_upstream: 1024,
        }
    }
}

/// The MCP tool server (`poe-gateway mcp` over stdio, `/mcp` on the serve port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpPolicy {
    /// `Host` names `/mcp` accepts besides the loopback ones (`localhost`, `127.0.0.1`, `::1`):
    /// the gateway's public name, optionally with a port (`gw.example.com`, `gw.example.com:443`).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call `/mcp` (`https://app.example.com:443`, `http://localhost:*`).
    /// A request carrying any other `Origin` is refused; a request without one passes.
    /// Pages at these origins get CORS on every route (`http::browser::Cors`).
    pub allowed_origins: Vec<String>,
    /// Directories `attachment_path` may read from when the tool is called over HTTP.
    /// Empty (the default) refuses local paths over HTTP; stdio may read any file the user can.
    pub attachment_roots: Vec<PathBuf>,
    /// Largest attachment (a file or base64 data, decoded size) the tools accept.
    /// `attachment_url` is passed to Poe unread, so no limit applies to it.
    pub max_attachment_bytes: ByteSize,
    /// A session is forgotten after this long without use.
    #[serde(with = "values::duration")]
    pub session_ttl: Duration,
    /// Sessions kept at once (all callers together); past it the caller holding the most
    /// loses its least recently used one.
    pub max_sessions: u64,
    /// Bytes of session history kept at once (all callers together): past it the sessions
    /// unused longest end. Without it, `max_sessions` full sessions could hold
    /// `max_sessions * max_session_bytes`.
    pub max_sessions_bytes: ByteSize,
    /// Sessions kept at once for one caller (gateway key, Poe key, or the server's own): past
    /// it the caller's least recently used session ends, so one caller cannot push everyone
    /// else's sessions out of `max_sessions`.
    pub max_sessions_per_key: usize,
    /// MCP clients connected over HTTP at once (each an `Mcp-Session-Id`, open until the
    /// client ends it or it is idle for 5 minutes): each holds a task and its buffers, so an
    /// unbounded number would let clients (any bearer, in passthrough mode) exhaust memory.
    pub max_clients: usize,
    /// Of those, for one caller.
    pub max_clients_per_key: usize,
    /// Messages kept per session besides the system message; the oldest turns are trimmed.
    pub max_session_messages: usize,
    /// Bytes of history kept per session (attachments included); the oldest turns are trimmed.
    pub max_session_bytes: ByteSize,
    /// While a non-streamed call (images, video, tool calls) waits for its answer, a progress
    /// notification goes out this often, so clients that reset their timeout on progress keep
    /// waiting for a long generation.
    #[serde(with = "values::duration")]
    pub progress_interval: Duration,
}

impl Default for McpPolicy {
    fn default() -> Self {
        McpPolicy {
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            attachment_roots: Vec::new(),
            max_attachment_bytes: ByteSize(20 * 1024 * 1024),
            session_ttl: Duration::from_secs(60 * 60),
            max_sessions: 1000,
            max_sessions_per_key: 100,
            max_sessions_bytes: ByteSize(256 * 1024 * 1024),
            max_clients: 1000,
            max_clients_per_key: 20,
            max_session_messages: 100,
            max_session_bytes: ByteSize(8 * 1024 * 1024),
            progress_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogPolicy {
    /// Put request bodies (prompts) in the access log. Off: no prompt or completion is logged.
    pub bodies: bool,
}

/// Which requests the response cache serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Off,
    /// Requests with `temperature` 0 or a `seed`: the ones whose answer is meant to repeat.
    Deterministic,
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachePolicy {
    pub mode: CacheMode,
    /// Total size of cached responses.
    pub max_bytes: ByteSize,
    /// Largest single response kept; bigger ones are served but not stored.
    pub max_entry_bytes: ByteSize,
    #[serde(with = "values::duration")]
    pub ttl: Duration,
    /// Share entries across callers (keys). Off: each key sees only its own entries.
    pub shared: bool,
    /// Gap between replayed stream frames; 0 replays at once.
    #[serde(with = "values::duration")]
    pub replay_frame_delay: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            mode: CacheMode::Deterministic,
            max_bytes: ByteSize(256 * 1024 * 1024),
            max_entry_bytes: ByteSize(8 * 1024 * 1024),
            ttl: Duration::from_secs(3600),
            shared: false,
            replay_frame_delay: Duration::ZERO,
        }
    }
}

/// What a limit or a budget does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Go on with this replica's in-process state (limits), or with no check (budgets).
    FailOpen,
    /// Refuse with a 503 until Redis answers again.
    FailClosed,
}

/// Shared state for several replicas. Without a URL everything stays in-process.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisPolicy {
    /// `redis://[:password@]host:port[/db]`; `POE_GATEWAY_REDIS_URL` sets it. Never logged.
    pub url: Option<String>,
    /// Prefix of every key the gateway writes, so several gateways can share one Redis.
    pub key_prefix: String,
    /// Longest a Redis call may take before it counts as a failure.
    #[serde(with = "values::duration")]
    pub timeout: Duration,
    /// Per-key RPM and the upstream limiter while Redis is down.
    pub limits_on_error: FailurePolicy,
    /// Budgets while Redis is down.
    pub budgets_on_error: FailurePolicy,
    /// Keep cached answers in Redis too, behind the in-process cache, so a hit on one replica
    /// serves all of them.
    pub cache: bool,
}

// By hand, so a password in the URL never reaches a log through `{:?}`.
impl fmt::Debug for RedisPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPolicy")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("limits_on_error", &self.limits_on_error)
            .field("budgets_on_error", &self.budgets_on_error)
            .field("cache", &self.cache)
            .finish()
    }
}

impl Default for RedisPolicy {
    fn default() -> Self {
        RedisPolicy {
            url: None,
            key_prefix: "pgw:".into(),
            timeout: Duration::from_millis(250),
            limits_on_error: FailurePolicy::FailOpen,
            budgets_on_error: FailurePolicy::FailClosed,
            cache: true,
        }
    }
}

/// An alias points at one bot, or at a fallback chain tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasTarget {
    One(String),
    Chain(Vec<String>),
}

/// Read by hand for errors that say what an alias is (serde's own, for an untagged enum,
/// said "data did not match any variant of untagged enum AliasTarget"), and what the likely
/// slip is when a table comes: a bot name with a dot written unquoted.
impl<'de> Deserialize<'de> for AliasTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, SeqAccess, Visitor};
        struct Target;
        const WHAT: &str = "a bot name (\"gpt-5\") or a list of bot names tried in order \
                            ([\"gpt-5\", \"claude-sonnet-4.5\"])";
        impl<'de> Visitor<'de> for Target {
            type Value = AliasTarget;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(WHAT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AliasTarget, E> {
                Ok(AliasTarget::One(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AliasTarget, A::Error> {
                let mut bots = Vec::new();
                loop {
                    match seq.next_element::<toml::Value>()? {
                        None => return Ok(AliasTarget::Chain(bots)),
                        Some(toml::Value::String(b)) => bots.push(b),
                        Some(other) => {
                            return Err(de::Error::custom(format!(
                                "each bot of a fallback chain is a name in quotes, not {} {other}",
                                other.type_str()
                            )));
                        }
                    }
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<AliasTarget, A::Error> {
                Err(de::Error::custom(format!(
                    "an alias is {WHAT}, not a table; a name with a dot in it must be quoted \
                     (\"claude-sonnet-4.5\" = ...), or TOML reads the dot as a table"
                )))
            }
        }
        d.deserialize_any(Target)
    }
}

impl AliasTarget {
    pub fn bots(&self) -> &[String] {
        match self {
            AliasTarget::One(bot) => std::slice::from_ref(bot),
            AliasTarget::Chain(bots) => bots,
        }
    }
}

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
    /// The env var the bad value came from, when it came from one.
    pub env: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.reason)?;
        if let Some(env) = &self.env {
            write!(f, " (value set by env {env})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where the policy text came from, for error messages.
#[derive(Debug, Clone)]
pub enum PolicySource {
    File(PathBuf),
    Builtin,
}

impl PolicySource {
    pub fn name(&self) -> String {
        match self {
            PolicySource::File(p) => p.display().to_string(),
            PolicySource::Builtin => BUILTIN_NAME.to_string(),
        }
    }
}

/// A loaded, validated policy and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub policy: Policy,
    pub source: PolicySource,
}

/// Finds the policy file: an explicit path (flag or `POE_GATEWAY_POLICIES`) must exist;
/// otherwise `policies/default.toml` if present, else the built-in copy of it.
pub fn locate(explicit: Option<&Path>) -> Result<(PolicySource, String), ConfigError> {
    if let Some(path) = explicit {
        return std::fs::read_to_string(path)
            .map(|text| (PolicySource::File(path.to_path_buf()), text))
            .map_err(|e| ConfigError {
                file: path.display().to_string(),
                key: String::new(),
                reason: format!("cannot read policy file: {e}"),
                env: None,
            });
    }
    let default = Path::new(DEFAULT_POLICY_PATH);
    match std::fs::read_to_string(default) {
        Ok(text) => Ok((PolicySource::File(default.to_path_buf()), text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((PolicySource::Builtin, DEFAULT_POLICY.to_string()))
        }
        // There but unreadable (no permission, not UTF-8): it was skipped for the built-in
        // policy, and a file saying `mode = "keys"` served in open mode on the server's key.
        Err(e) => Err(ConfigError {
            file: default.display().to_string(),
            key: String::new(),
            reason: format!("cannot read policy file: {e}"),
            env: None,
        }),
    }
}

/// Loads the policy from `explicit` (or the default locations) with overrides from `env`.
pub fn load<I>(explicit: Option<&Path>, env: I) -> Result<Loaded, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let (source, text) = locate(explicit)?;
    let policy = parse(&source.name(), &text, env)?;
    Ok(Loaded { policy, source })
}

/// Parses policy text, applies env overrides, deserialises and validates.
pub fn parse<I>(file: &str, text: &str, env: I) -> Result<Policy, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let err = |key: &str, reason: String, env: Option<String>| ConfigError {
        file: file.to_string(),
        key: key.to_string(),
        reason,
        env,
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!("line {}: ", line_of(text, s.start)))
            .unwrap_or_default();
        err("", format!("{at}invalid TOML: {}", e.message()), None)
    })?;

    // Settings left out take the shipped policy's values; the code's defaults are the same
    // for every section but the aliases, a table of the shipped file alone. A file with no
    // `[aliases]` gets those; an empty `[aliases]` means none.
    if !table.contains_key("aliases")
        && let Ok(mut shipped) = toml::from_str::<toml::Table>(DEFAULT_POLICY)
        && let Some(aliases) = shipped.remove("aliases")
    {
        table.insert("aliases".into(), aliases);
    }

    // Remember which keys came from env (the variable, and its text when it was read as a
    // TOML value), so an error can point at the variable.
    let mut from_env: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    // Two variables name some keys (`POE_GATEWAY_LISTEN` and `POE_GATEWAY_SERVER__LISTEN`):
    // both set, to different values, is refused, rather than the environment's order
    // deciding.
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, value) in env {
        let Some((section, key)) = env_key(&name) else {
            if let Some((key, meant)) = one_underscore_setting(&name, &value) {
                let reason = format!(
                    "{name} is not read: a setting's variable has two underscores after its section ({meant})"
                );
                return Err(err(&key, reason, Some(name)));
            }
            continue;
        };
        let dotted = format!("{section}.{key}");
        if let Some((other, other_value)) = seen.get(&dotted)
            && *other != name
            && *other_value != value
        {
            return Err(err(
                &dotted,
                format!("is set by both {other} and {name}, to different values; set one"),
                Some(name),
            ));
        }
        seen.insert(dotted, (name.clone(), value.clone()));
        let section_table = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = section_table.as_table_mut() else {
            return Err(err(
                &section,
                "is not a table, so it cannot take an env override".into(),
                Some(name),
            ));
        };
        let parsed = env_value(&value);
        let raw = (!parsed.is_str()).then_some(value);
        section_table.insert(key.clone(), parsed);
        from_env.insert(format!("{section}.{key}"), (name, raw));
    }

    // What a key read as TOML failed with, before it was tried as text.
    let mut as_toml: BTreeMap<String, String> = BTreeMap::new();
    let policy: Policy = loop {
        match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(p) => break p,
            Err(e) => {
                let key = e.path().to_string();
                // A string setting whose env text also reads as TOML (`KEY_PREFIX=2024`):
                // take the text as it was written, and try again.
                // Not one written as a list or table (`[1, 2]`): that was meant as TOML.
                if let Some((_, raw @ Some(_))) = from_env.get_mut(&key)
                    && !raw
                        .as_deref()
                        .is_some_and(|t| t.trim_start().starts_with(['[', '{']))
                    && let Some((section, field)) = key.split_once('.')
                    && let Some(t) = table.get_mut(section).and_then(|t| t.as_table_mut())
                {
                    let text = raw.take().expect("matched Some");
                    t.insert(field.to_string(), toml::Value::String(text));
                    as_toml.insert(key, e.into_inner().message().to_string());
                    continue;
                }
                let env = env_for(&from_env, &key).map(|(_, (name, _))| name.clone());
                // Not a string setting either: the first reading's reason is the one that
                // fits (`-1` for a count is a negative number, not "a string").
                let reason = match as_toml.remove(&key) {
                    Some(first) => first,
                    None => e.into_inner().message().to_string(),
                };
                return Err(err(&key, reason, env));
            }
        }
    };
    validate(&policy).map_err(|(key, reason)| {
        let env = env_for(&from_env, &key).map(|(_, (name, _))| name.clone());
        err(&key, reason, env)
    })?;
    Ok(policy)
}

/// The env override behind an error at `path`: the one set at it, or the one whose key the
/// path lies inside (`pricing.bot.prompt` under `pricing.bot`), or the one under it (an
/// unknown section `servr`, from `POE_GATEWAY_SERVR__LISTEN`).
fn env_for<'a, V>(from_env: &'a BTreeMap<String, V>, path: &str) -> Option<(&'a String, &'a V)> {
    let inside = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    from_env.get_key_value(path).or_else(|| {
        from_env
            .iter()
            .find(|(k, _)| inside(k, path) || (!path.is_empty() && inside(path, k)))
    })
}

/// The process environment as text. `std::env::vars` panics on any variable that is not
/// UTF-8, even one that is none of ours; those are left out, except the gateway's own
/// (`POE_*`, `OTEL_*`), which are an error naming the variable.
pub fn env_text() -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let (Some(name), value) = (name.to_str(), value.into_string()) else {
            continue;
        };
        match value {
            Ok(v) => out.push((name.to_string(), v)),
            Err(_) if name.starts_with("POE_") || name.starts_with("OTEL_") => {
                return Err(format!("env {name}: the value is not valid UTF-8"));
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Maps `POE_GATEWAY_<SECTION>__<KEY>` and the documented short names onto policy keys.
fn env_key(name: &str) -> Option<(String, String)> {
    match name {
        "POE_GATEWAY_LISTEN" => return Some(("server".into(), "listen".into())),
        "POE_BASE_URL" => return Some(("upstream".into(), "base_url".into())),
        "POE_GATEWAY_REDIS_URL" => return Some(("redis".into(), "url".into())),
        _ => {}
    }
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let (section, key) = rest.split_once("__")?;
    if section.is_empty() || key.is_empty() {
        return None;
    }
    Some((section.to_ascii_lowercase(), key.to_ascii_lowercase()))
}

/// A variable that is a setting with one underscore where two belong
/// (`POE_GATEWAY_AUTH_MODE` for `POE_GATEWAY_AUTH__MODE`): the policy key it meant and the
/// variable that sets it. Left unread, such a typo ran a team's gateway in open mode without
/// a word. Only a real setting of a section counts: the gateway's own one-underscore names
/// (`POE_GATEWAY_LOG_FORMAT`, ...) and other programs' pass, Kubernetes' service variables
/// among them (`POE_GATEWAY_REDIS_SERVICE_HOST`, for a Service named `poe-gateway-redis`).
/// The maps (`aliases`, `pricing`) take any key, so nothing there is taken for a typo.
fn one_underscore_setting(name: &str, value: &str) -> Option<(String, String)> {
    const OWN: &[&str] = &["LOG_FORMAT", "DATABASE_URL", "ADMIN_KEY", "POLICIES"];
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains("__") || OWN.contains(&rest) {
        return None;
    }
    let (section, key) = rest.split_once('_')?;
    let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
    if key.is_empty() || ["aliases", "pricing"].contains(&section.as_str()) {
        return None;
    }
    // A setting is a key of a section the policy knows: read alone, it is not an unknown
    // field, of the section or of the policy (its value may still be wrong, which the
    // variable meant would say).
    let mut inner = toml::Table::new();
    inner.insert(key.clone(), env_value(value));
    let mut outer = toml::Table::new();
    outer.insert(section.clone(), toml::Value::Table(inner));
    if let Err(e) = Policy::deserialize(toml::Value::Table(outer))
        && e.message().contains("unknown field")
    {
        return None;
    }
    let meant = format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    );
    Some((format!("{section}.{key}"), meant))
}

/// An env value is read as a TOML value when it is one (`true`, `3`, `["a","b"]`), else as a string.
fn env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Checks that deserialisation cannot express. Returns (key, reason).
fn validate(p: &Policy) -> Result<(), (String, String)> {
    let bad = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
    let base = p.upstream.base_url.as_str();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return bad("upstream.base_url", "must start with http:// or https://");
    }
    if base
        .parse::<http::Uri>()
        .map(|u| u.host().is_none())
        .unwrap_or(true)
    {
        return bad("upstream.base_url", "is not a valid URL with a host");
    }
    // `http::Uri` takes any digits for a port: 99999 passed, and every call failed.
    let authority = base.split_once("://").map_or("", |(_, r)| r);
    let authority = authority.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, r)| r);
    if let Some((_, port)) = after_host.rsplit_once(':')
        && !port.is_empty()
        && port.parse::<u16>().is_err()
    {
        return bad("upstream.base_url", "has a port outside 0..65535");
    }
    if p.upstream.http2_max_streams == 0 {
        return bad("upstream.http2_max_streams", "must be at least 1");
    }
    if let Some(path) = &p.upstream.ca_file {
        if path.as_os_str().is_empty() {
            return bad(
                "upstream.ca_file",
                "must be a path to a PEM file, not empty",
            );
        }
        if let Err(e) = crate::upstream::read_ca_file(path) {
            return bad("upstream.ca_file", &e);
        }
    }
    if p.retry.max_attempts == 0 {
        return bad("retry.max_attempts", "must be at least 1");
    }
    if !(0.0..=1.0).contains(&p.retry.budget_ratio) {
        return bad("retry.budget_ratio", "must be between 0.0 and 1.0");
    }
    if p.retry.base_backoff > p.retry.max_backoff {
        return bad("retry.base_backoff", "must not exceed retry.max_backoff");
    }
    if p.limits.upstream_rpm == 0 {
        return bad("limits.upstream_rpm", "must be at least 1");
    }
    if p.limits.max_concurrent_upstream == 0 {
        return bad("limits.max_concurrent_upstream", "must be at least 1");
    }
    for (name, d) in [
        ("server.idle_timeout", p.server.idle_timeout),
        ("server.header_read_timeout", p.server.header_read_timeout),
        ("server.body_read_timeout", p.server.body_read_timeout),
        ("timeouts.connect", p.timeouts.connect),
        ("timeouts.first_byte", p.timeouts.first_byte),
        ("timeouts.idle", p.timeouts.idle),
        ("upstream.keepalive_interval", p.upstream.keepalive_interval),
        ("upstream.keepalive_timeout", p.upstream.keepalive_timeout),
    ] {
        if d.is_zero() {
            return bad(name, "must be greater than zero");
        }
    }
    if p.cache.ttl.is_zero() {
        return bad(
            "cache.ttl",
            "must be greater than zero (use cache.mode = \"off\" to disable)",
        );
    }
    if p.cache.max_entry_bytes.0 > p.cache.max_bytes.0 {
        return bad("cache.max_entry_bytes", "must not exceed cache.max_bytes");
    }
    if p.server.threads > 1024 {
        return bad(
            "server.threads",
            "must be at most 1024 (0 means one per CPU)",
        );
    }
    if p.server.max_connections == 0 {
        return bad("server.max_connections", "must be at least 1");
    }
    if p.server.max_body_bytes.0 == 0 {
        return bad("server.max_body_bytes", "must be greater than zero");
    }
    if p.server.max_bodies_bytes.0 < p.server.max_body_bytes.0 {
        return bad(
            "server.max_bodies_bytes",
            "must be at least server.max_body_bytes (one whole body)",
        );
    }
    validate_mcp(&p.mcp)?;
    if let Some(url) = &p.redis.url
        && !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
    {
        return bad(
            "redis.url",
            "must start with redis://, rediss:// or unix://",
        );
    }
    // What `serve` parses it with, so `check` passes only what starts. The crate's reasons
    // are fixed texts: the URL (and its password) is never quoted.
    if let Some(url) = &p.redis.url
        && let Err(e) = redis::Client::open(url.as_str())
    {
        return bad("redis.url", &format!("is not a usable Redis URL: {e}"));
    }
    if p.redis.timeout.is_zero() {
        return bad("redis.timeout", "must be greater than zero");
    }
    for (bot, price) in &p.pricing {
        for (field, v) in [
            ("prompt", price.prompt),
            ("completion", price.completion),
            ("request", price.request),
            ("cache_read", price.cache_read),
            ("cache_write", price.cache_write),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err((
                    format!("pricing.{bot}.{field}"),
                    "must be a non-negative number (USD per token, or per request)".into(),
                ));
            }
        }
    }
    for (alias, target) in &p.aliases {
        let key = format!("aliases.{alias}");
        if target.bots().is_empty() {
            return Err((key, "a fallback chain needs at least one bot".into()));
        }
        if target.bots().iter().any(|b| b.trim().is_empty()) {
            return Err((key, "bot names must not be empty".into()));
        }
        if let Some(b) = target.bots().iter().find(|b| b.trim() != b.as_str()) {
            return Err((
                key,
                format!("bot name {b:?} starts or ends with spaces, which no bot's name does"),
            ));
        }
        // TOML hands an unquoted date over as its text.
        if let Some(b) = target
            .bots()
            .iter()
            .find(|b| b.parse::<toml::value::Datetime>().is_ok())
        {
            return Err((
                key,
                format!(
                    "{b} reads as a date, not a bot name; an alias is a bot name in quotes \
                     (\"gpt-5\") or a list of them"
                ),
            ));
        }
        // Names are matched without regard to case: one of the two would never be reached.
        if let Some(other) = p
            .aliases
            .keys()
            .find(|o| *o != alias && o.eq_ignore_ascii_case(alias))
        {
            return Err((
                key,
                format!("alias {other:?} has the same name but for case; requests reach only one"),
            ));
        }
        // A chain lists bots: a name that is another alias goes to Poe as a bot name (and
        // fails there), unless that alias also calls a bot of its own name.
        for bot in target.bots() {
            let nested = p.aliases.iter().find(|(name, t)| {
                *name != alias
                    && name.eq_ignore_ascii_case(bot)
                    && !t.bots().iter().any(|b| b.eq_ignore_ascii_case(bot))
            });
            if let Some((_, t)) = nested {
                return Err((
                    key,
                    format!(
                        "{bot:?} is an alias, and a chain lists bots: write its bots out ({})",
                        t.bots().join(", ")
                    ),
                ));
            }
        }
        // The names a request may use, by the same rule as a client's `model`.
        let max = crate::gateway::request::MAX_MODEL_LEN;
        if !std::iter::once(alias)
            .chain(target.bots())
            .all(|n| crate::gateway::request::is_bot_name(n))
        {
            return Err((
                key,
                format!(
                    "alias and bot names must be at most {max} bytes, without control characters"
                ),
            ));
        }
    }
    match (p.auth.mode, p.server.listen.ip().is_loopback()) {
        (None | Some(AuthMode::Open), false) if !p.auth.allow_open_on_network => Err((
            "auth.mode".into(),
            format!(
                "open auth on the non-loopback address {} would let anyone spend the Poe key; \
                 set auth.mode = \"passthrough\", or auth.allow_open_on_network = true",
                p.server.listen
            ),
        )),
        _ => Ok(()),
    }
}

fn validate_mcp(m: &McpPolicy) -> Result<(), (String, String)> {
    let bad = |k: &str, r: String| Err((format!("mcp.{k}"), r));
    if m.max_attachment_bytes.0 == 0 {
        return bad("max_attachment_bytes", "must be greater than zero".into());
    }
    if m.session_ttl.is_zero() {
        return bad("session_ttl", "must be greater than zero".into());
    }
    if m.max_sessions == 0 {
        return bad("max_sessions", "must be at least 1".into());
    }
    if m.max_sessions_per_key == 0 {
        return bad("max_sessions_per_key", "must be at least 1".into());
    }
    if m.max_clients == 0 {
        return bad("max_clients", "must be at least 1".into());
    }
    if m.max_clients_per_key == 0 {
        return bad("max_clients_per_key", "must be at least 1".into());
    }
    if m.max_sessions_bytes.0 < m.max_session_bytes.0 {
        return bad(
            "max_sessions_bytes",
            "must be at least mcp.max_session_bytes (one full session)".into(),
        );
    }
    if m.max_session_messages < 2 {
        return bad(
            "max_session_messages",
            "must be at least 2 (one user and one assistant message)".into(),
        );
    }
    if m.max_session_bytes.0 == 0 {
        return bad("max_session_bytes", "must be greater than zero".into());
    }
    if m.progress_interval.is_zero() {
        return bad("progress_interval", "must be greater than zero".into());
    }
    for host in &m.allowed_hosts {
        let h = host.trim();
        if h.is_empty()
            || h.contains("://")
            || h.contains('/')
            || h.parse::<http::uri::Authority>().is_err()
        {
            return bad(
                "allowed_hosts",
                format!(
                    "{host:?} is not a host name (optionally with :port); write `gw.example.com`, not a URL"
                ),
            );
        }
    }
    for origin in &m.allowed_origins {
        let o = origin.trim();
        let ok = o == "null"
            || o.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
            });
        if !ok {
            return bad(
                "allowed_origins",
                format!(
                    "{origin:?} is not an origin; write `scheme://host[:port]`, e.g. `https://app.example.com:443`"
                ),
            );
        }
    }
    for root in &m.attachment_roots {
        if !root.is_absolute() {
            return bad(
                "attachment_roots",
                format!("{} is not an absolute path", root.display()),
            );
        }
    }
    Ok(())
}

impl Policy {
    /// The auth mode in force: unset means `open` (validation has ruled out the unsafe cases).
    pub fn auth_mode(&self) -> AuthMode {
        self.auth.mode.unwrap_or(AuthMode::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_default_parses() {
        let p = parse("default.toml", DEFAULT_POLICY, env(&[])).unwrap();
        assert_eq!(p.timeouts.first_byte, Duration::from_secs(600));
        for alias in ["claude", "gpt", "gemini", "grok", "image", "video"] {
            assert!(p.aliases.contains_key(alias), "{alias}");
        }
    }

    /// A policy file with no `[aliases]` keeps the shipped ones, as every other setting
    /// left out keeps the shipped value; an empty `[aliases]` (or one of its own) is exactly
    /// that. An env override adds to whichever applies.
    #[test]
    fn aliases_left_out_are_the_shipped_ones() {
        let shipped = parse("default.toml", DEFAULT_POLICY, env(&[]))
            .unwrap()
            .aliases;
        let p = parse("p.toml", "[cache]\nmode = \"off\"\n", env(&[])).unwrap();
        assert_eq!(p.aliases.len(), shipped.len());
        assert!(p.aliases.contains_key("claude"));
        let p = parse("p.toml", "[aliases]\n", env(&[])).unwrap();
        assert!(p.aliases.is_empty());
        let p = parse("p.toml", "[aliases]\nmine = \"gpt-5\"\n", env(&[])).unwrap();
        assert_eq!(p.aliases.keys().collect::<Vec<_>>(), ["mine"]);
        let p = parse("p.toml", "", env(&[("POE_GATEWAY_ALIASES__MINE", "gpt-5")])).unwrap();
        assert_eq!(p.aliases.len(), shipped.len() + 1);
    }

    #[test]
    fn env_overrides_name_the_variable_on_error() {
        let p = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_TIMEOUTS__FIRST_BYTE", "2s")]),
        )
        .unwrap();
        assert_eq!(p.timeouts.first_byte, Duration::from_secs(2));
        let e = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_TIMEOUTS__FIRST_BYTE", "soon")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "timeouts.first_byte");
        assert_eq!(e.env.as_deref(), Some("POE_GATEWAY_TIMEOUTS__FIRST_BYTE"));
        assert!(
            e.to_string()
                .starts_with("f.toml: key `timeouts.first_byte`: ")
        );
    }

    #[test]
    fn env_errors_under_or_around_the_key_still_name_the_variable() {
        for (var, value, key) in [
            ("POE_GATEWAY_SERVR__LISTEN", "127.0.0.1:1", "servr"),
            (
                "POE_GATEWAY_MCP__ALLOWED_HOSTS",
                "[1]",
                "mcp.allowed_hosts[0]",
            ),
        ] {
            let e = parse("f.toml", "", env(&[(var, value)])).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert_eq!(e.env.as_deref(), Some(var), "{e}");
        }
        // An error in the file is still the file's.
        let e = parse(
            "f.toml",
            "[retry]\nmax_atempts = 2\n",
            env(&[("POE_GATEWAY_RETRY__MAX_ATTEMPTS", "2")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "retry.max_atempts");
        assert_eq!(e.env, None, "{e}");
    }

    #[test]
    fn a_string_setting_from_env_may_look_like_a_number() {
        let p = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_REDIS__KEY_PREFIX", "2024")]),
        )
        .unwrap();
        assert_eq!(p.redis.key_prefix, "2024");
        // A number where a number belongs is still read as one.
        let p = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_RETRY__MAX_ATTEMPTS", "2")]),
        )
        .unwrap();
        assert_eq!(p.retry.max_attempts, 2);
        let e = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_RETRY__MAX_ATTEMPTS", "two")]),
        )
        .unwrap_err();
        assert_eq!(
            e.env.as_deref(),
            Some("POE_GATEWAY_RETRY__MAX_ATTEMPTS"),
            "{e}"
        );
        // A number out of range is said to be one, not "a string".
        let e = parse(
            "f.toml",
            "",
            env(&[("POE_GATEWAY_RETRY__MAX_ATTEMPTS", "-1")]),
        )
        .unwrap_err();
        assert!(e.reason.contains("-1"), "{e}");
        assert!(!e.reason.contains("string"), "{e}");
    }

    /// An alias of the wrong type says what an alias is (it said "data did not match any
    /// variant of untagged enum AliasTarget"), and a bot name with a dot written unquoted
    /// (a TOML table) is told to be quoted.
    #[test]
    fn a_wrong_alias_says_what_an_alias_is() {
        for (text, key, says) in [
            ("[aliases]\nfast = 5\n", "aliases.fast", "a bot name"),
            ("[aliases]\nfast = true\n", "aliases.fast", "a bot name"),
            (
                "[aliases]\nfast = [\"gpt-5\", 5]\n",
                "aliases.fast",
                "a name in quotes",
            ),
            (
                "[aliases]\nclaude-sonnet-4.5 = [\"claude-sonnet-4.5\"]\n",
                "aliases.claude-sonnet-4",
                "must be quoted",
            ),
        ] {
            let e = parse("p.toml", text, env(&[])).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.reason.contains(says), "{text}: {e}");
            assert!(!e.reason.contains("untagged"), "{text}: {e}");
        }
        // A TOML date is no bot name (it was taken as one, as its text).
        let e = parse("p.toml", "[aliases]\nfast = 2024-01-01\n", env(&[])).unwrap_err();
        assert_eq!(e.key, "aliases.fast", "{e}");
        assert!(e.reason.contains("a bot name"), "{e}");
        // An env override written as a list is read as one, and not retried as a bot named
        // by its text.
        let e = parse(
            "p.toml",
            "",
            env(&[("POE_GATEWAY_ALIASES__FAST", "[\"gpt-5\", 2]")]),
        )
        .unwrap_err();
        assert_eq!(e.env.as_deref(), Some("POE_GATEWAY_ALIASES__FAST"), "{e}");
        assert!(e.reason.contains("a name in quotes"), "{e}");
        let p = parse(
            "p.toml",
            "",
            env(&[("POE_GATEWAY_ALIASES__FAST", "[\"gpt-5\", \"o3\"]")]),
        )
        .unwrap();
        assert_eq!(
            p.aliases["fast"],
            AliasTarget::Chain(vec!["gpt-5".into(), "o3".into()])
        );
        // A duration of a fraction of seconds is one.
        let p = parse("p.toml", "[timeouts]\nfirst_byte = 1.5\n", env(&[])).unwrap();
        assert_eq!(
            p.timeouts.first_byte,
            std::time::Duration::from_millis(1500)
        );
        let e = parse("p.toml", "[timeouts]\nfirst_byte = -1.5\n", env(&[])).unwrap_err();
        assert_eq!(e.key, "timeouts.first_byte", "{e}");
    }

    #[test]
    fn alias_and_bot_names_are_printable() {
        for text in [
            "[aliases]\n\"a\\nb\" = \"gpt-5\"\n",
            "[aliases]\nok = \"gpt\\u0000\"\n",
            "[aliases]\nok = [\"gpt-5\", \"x\\ty\"]\n",
        ] {
            let e = parse("p.toml", text, env(&[])).unwrap_err();
            assert!(e.key.starts_with("aliases."), "{text}: {e}");
            assert!(e.reason.contains("control characters"), "{text}: {e}");
        }
    }

    #[test]
    fn a_key_set_by_two_variables_to_different_values_is_refused() {
        let both = |a: &str, b: &str| {
            parse(
                "f.toml",
                "",
                env(&[("POE_GATEWAY_LISTEN", a), ("POE_GATEWAY_SERVER__LISTEN", b)]),
            )
        };
        let e = both("127.0.0.1:1", "127.0.0.1:2").unwrap_err();
        assert_eq!(e.key, "server.listen", "{e}");
        assert!(e.reason.contains("POE_GATEWAY_LISTEN"), "{e}");
        assert!(e.reason.contains("POE_GATEWAY_SERVER__LISTEN"), "{e}");
        let p = both("127.0.0.1:3", "127.0.0.1:3").unwrap();
        assert_eq!(p.server.listen.port(), 3);
    }

    /// Alias tables a request could not reach as written are refused, naming the alias:
    /// two names that differ by case (one was never reached), a chain entry that is another
    /// alias (it went to Poe as a bot name), a bot name with spaces around it. An alias
    /// named like a bot it calls, and a chain naming an alias that is also such a bot, pass.
    #[test]
    fn alias_tables_that_cannot_work_are_refused() {
        for (text, key, why) in [
            (
                "[aliases]
Dup = \"a\"\ndup = \"b\"\n",
                "aliases.Dup",
                "but for case",
            ),
            (
                "[aliases]
ok = \"bot-ok\"\nnest = [\"ok\", \"b\"]\n",
                "aliases.nest",
                "is an alias",
            ),
            (
                "[aliases]
x = \" bot-ok \"\n",
                "aliases.x",
                "spaces",
            ),
        ] {
            let e = parse("p.toml", text, env(&[])).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
        let fine = "[aliases]\ngpt-5 = [\"gpt-5\", \"gpt-4o\"]\nsafe = [\"GPT-5\", \"claude\"]\n";
        parse("p.toml", fine, env(&[])).unwrap();
        parse("p.toml", DEFAULT_POLICY, env(&[])).unwrap();
    }

    /// Durations past what the timers take are a config error naming the key, not a panic
    /// at start (a moka lifetime over 1,000 years) or on a request (an instant overflow).
    #[test]
    fn durations_over_ten_years_are_refused() {
        for (text, key) in [
            (
                "[upstream]\nmodels_ttl = \"1001y\"\n",
                "upstream.models_ttl",
            ),
            (
                "[limits]\nqueue_timeout = 9223372036854775807\n",
                "limits.queue_timeout",
            ),
        ] {
            let e = parse("p.toml", text, env(&[])).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains("at most 10 years"), "{e}");
        }
        // One underscore where two belong is refused, naming the variable meant; the
        // gateway's own short names and other programs' variables pass.
        // A wrong value too: the variable meant is named, not the value's fault.
        let e = parse(
            "p.toml",
            "",
            env(&[("POE_GATEWAY_RETRY_MAX_ATTEMPTS", "x")]),
        )
        .unwrap_err();
        assert!(e.reason.contains("POE_GATEWAY_RETRY__MAX_ATTEMPTS"), "{e}");
        let e = parse("p.toml", "", env(&[("POE_GATEWAY_AUTH_MODE", "keys")])).unwrap_err();
        assert_eq!(e.key, "auth.mode");
        assert_eq!(e.env.as_deref(), Some("POE_GATEWAY_AUTH_MODE"));
        assert!(e.reason.contains("POE_GATEWAY_AUTH__MODE"), "{e}");
        for fine in [
            "POE_GATEWAY_LOG_FORMAT",
            "POE_GATEWAY_SERVICE_HOST",
            "POE_GATEWAY_PORT_8080_TCP",
            "POE_GATEWAY_BIN",
            "POE_GATEWAY_DATABASE_URL",
            // Kubernetes' service links for Services named poe-gateway-redis, -mcp, -cache.
            "POE_GATEWAY_REDIS_SERVICE_HOST",
            "POE_GATEWAY_REDIS_PORT",
            "POE_GATEWAY_MCP_SERVICE_PORT",
            "POE_GATEWAY_CACHE_PORT_6379_TCP_ADDR",
            "POE_GATEWAY_ALIASES_FAST",
        ] {
            parse("p.toml", "", env(&[(fine, "x")])).unwrap();
        }
        // What `serve` cannot use, `check` refuses: a port out of range, a Redis URL its
        // client does not parse (the password unquoted).
        let e = parse(
            "p.toml",
            "",
            env(&[("POE_BASE_URL", "http://127.0.0.1:99999")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "upstream.base_url");
        parse(
            "p.toml",
            "",
            env(&[("POE_BASE_URL", "http://[::1]:8080/v1")]),
        )
        .unwrap();
        parse(
            "p.toml",
            "",
            env(&[("POE_BASE_URL", "http://u:p@127.0.0.1/v1")]),
        )
        .unwrap();
        for url in [
            "redis://:hunter2pw@127.0.0.1:notaport/0",
            "redis://:hunter2pw@h/abc",
        ] {
            let e = parse("p.toml", "", env(&[("POE_GATEWAY_REDIS_URL", url)])).unwrap_err();
            assert_eq!(e.key, "redis.url");
            assert!(!e.to_string().contains("hunter2pw"), "{e}");
        }
        parse(
            "p.toml",
            "",
            env(&[("POE_GATEWAY_REDIS_URL", "redis://:pw@h:6379/2")]),
        )
        .unwrap();
        let e = parse("p.toml", "", env(&[("POE_GATEWAY_CACHE__TTL", "11y")])).unwrap_err();
        assert_eq!(e.key, "cache.ttl", "{e}");
        assert!(parse("p.toml", "[cache]\nttl = \"3650days\"\n", env(&[])).is_ok());
    }

    #[test]
    fn zero_read_timeouts_are_refused() {
        for key in ["header_read_timeout", "body_read_timeout"] {
            let e = parse("p.toml", &format!("[server]\n{key} = \"0s\"\n"), env(&[])).unwrap_err();
            assert_eq!(e.key, format!("server.{key}"), "{e}");
            assert!(e.reason.contains("greater than zero"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("p.toml", "[retry]\nmax_atempts = 2\n", env(&[])).unwrap_err();
        assert_eq!(e.key, "retry.max_atempts");
        assert!(e.reason.contains("max_atempts"), "{e}");
    }

    #[test]
    fn open_on_network_is_refused() {
        let e = parse("p.toml", "[server]\nlisten = \"0.0.0.0:8080\"\n", env(&[])).unwrap_err();
        assert_eq!(e.key, "auth.mode");
        let ok = parse(
            "p.toml",
            "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"passthrough\"\n",
            env(&[]),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn mcp_section_defaults_and_checks() {
        let p = parse("p.toml", "", env(&[])).unwrap();
        assert!(p.mcp.attachment_roots.is_empty());
        assert_eq!(p.mcp.session_ttl, Duration::from_secs(3600));
        let p = parse(
            "p.toml",
            "[mcp]\nattachment_roots = [\"/srv/files\"]\nmax_attachment_bytes = \"1MiB\"\nallowed_hosts = [\"gw.example.com\"]\n",
            env(&[]),
        )
        .unwrap();
        assert_eq!(p.mcp.max_attachment_bytes.0, 1024 * 1024);
        assert_eq!(p.mcp.attachment_roots, vec![PathBuf::from("/srv/files")]);
        for (text, key) in [
            (
                "[mcp]\nattachment_roots = [\"files\"]\n",
                "mcp.attachment_roots",
            ),
            (
                "[mcp]\nallowed_hosts = [\"https://gw.example.com\"]\n",
                "mcp.allowed_hosts",
            ),
            (
                "[mcp]\nallowed_origins = [\"gw.example.com\"]\n",
                "mcp.allowed_origins",
            ),
            (
                "[mcp]\nmax_session_messages = 1\n",
                "mcp.max_session_messages",
            ),
            ("[mcp]\nsession_tll = \"1m\"\n", "mcp.session_tll"),
            (
                "[mcp]\nmax_sessions_per_key = 0\n",
                "mcp.max_sessions_per_key",
            ),
            (
                "[mcp]\nmax_sessions_bytes = \"1MiB\"\n",
                "mcp.max_sessions_bytes",
            ),
        ] {
            let e = parse("p.toml", text, env(&[])).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        let p = parse(
            "p.toml",
            "",
            env(&[("POE_GATEWAY_MCP__ATTACHMENT_ROOTS", "[\"/data\"]")]),
        )
        .unwrap();
        assert_eq!(p.mcp.attachment_roots, vec![PathBuf::from("/data")]);
    }

    #[test]
    fn syntax_errors_give_a_line() {
        let e = parse("p.toml", "[server]\nlisten = \n", env(&[])).unwrap_err();
        assert!(e.reason.starts_with("line 2:"), "{e}");
    }
}
