//! The `poe-gateway` command line.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use poe_gateway::config::{self, AuthMode};
use poe_gateway::gateway::alias::Aliases;
use poe_gateway::gateway::keys::{self, NewKey};
use poe_gateway::gateway::models::{self, Models};
use poe_gateway::ledger::report::{self, parse_when};
use poe_gateway::ledger::{self, GroupBy, Period, ReportQuery, Store, now_ms};
use poe_gateway::upstream::{Secret, Upstream};
use poe_gateway::{Gateway, GatewayError, Policy, http, telemetry};

// jemalloc rather than glibc's malloc. Under load glibc spent 8-13 % of the gateway's CPU
// samples in malloc, free and their consolidation: a request's few larger allocations (its
// future, a stored answer's copy) take glibc's slow path. jemalloc served stored misses
// 8 % (JSON) and 33 % (SSE) faster with the same memory per held stream; mimalloc was as
// fast but held 60 % more per stream. benches/README.md, session 6.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "poe-gateway",
    version,
    about = "An OpenAI-compatible gateway in front of Poe's API"
)]
struct Cli {
    /// Policy file (TOML). Default: policies/default.toml if present, else the built-in default.
    #[arg(long, global = true, env = "POE_GATEWAY_POLICIES")]
    policies: Option<PathBuf>,
    /// The usage ledger and key store: sqlite://PATH or postgres://... Default:
    /// sqlite://./data/poe-gateway.db; for `mcp`, the user's data directory
    /// ($XDG_DATA_HOME or ~/.local/share, then poe-gateway/poe-gateway.db).
    #[arg(long, global = true, env = "POE_GATEWAY_DATABASE_URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP gateway (OpenAI-compatible API under /v1, MCP at /mcp).
    Serve,
    /// Validate the configuration (policy file and env overrides) and exit.
    Check,
    /// Serve the MCP tools over stdio (what Claude Desktop, Claude Code and Cursor launch).
    /// Calls are paid with POE_API_KEY; logs go to stderr.
    Mcp,
    /// Gateway keys for `auth.mode = "keys"`.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage and cost from the ledger.
    Usage(UsageArgs),
    /// Exit 0 if the gateway on the configured listen address answers /healthz (for
    /// container health checks, where the image has no shell or curl).
    Healthcheck,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key. The key is printed once, alone on the last line of stdout.
    Create {
        #[arg(long)]
        name: String,
        /// Budget in USD per period; requests are refused once it is spent.
        #[arg(long)]
        budget_usd: Option<f64>,
        #[arg(long, value_enum, default_value = "month")]
        period: Period,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Models (aliases or bots) the key may use, comma-separated. Default: all.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// When the key stops working: unix seconds, YYYY-MM-DD (UTC) or RFC 3339.
        #[arg(long, conflicts_with = "expires_in")]
        expires_at: Option<String>,
        /// Or how long it works from now: 90d, 12h. Default: it never expires.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Revoke a key by id or name.
    Revoke { key: String },
    /// Give a key (by id or name) a new secret, printed once on the last line of stdout. The
    /// key keeps its id, budget, limits, spend and reports; the old secret stops working.
    Rotate { key: String },
}

#[derive(clap::Args)]
struct UsageArgs {
    #[command(subcommand)]
    command: Option<UsageCommand>,
    /// Start: an age (7d, 24h), YYYY-MM-DD, RFC 3339 or unix seconds.
    #[arg(long, default_value = "30d")]
    since: String,
    /// End (exclusive), same forms. Default: now.
    #[arg(long)]
    until: Option<String>,
    /// Group by model, key, day or api (`--group-by` is the same, named as the HTTP API's
    /// `group_by`).
    #[arg(long, value_enum, visible_alias = "group-by")]
    by: Option<GroupBy>,
    /// Only this key id.
    #[arg(long)]
    key: Option<String>,
    /// table, json or csv.
    #[arg(long, default_value = "table")]
    format: String,
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Poe's compute-point balance for POE_API_KEY.
    Balance,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Keys(_) | Command::Usage(_)) {
        // A report piped into `head` ends when `head` does, as other tools' do: Rust ignores
        // SIGPIPE, and the next line printed panicked (exit 101, a panic message).
        // SAFETY: set before any thread is started; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let env = match config::env_text() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("poe-gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let loaded = match config::load(cli.policies.as_deref(), env) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("poe-gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let secret = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .map(Secret::new)
    };
    let server_key = secret("POE_API_KEY");
    let admin_key = secret("POE_GATEWAY_ADMIN_KEY");

    let database_url = match (cli.database_url, &cli.command) {
        (Some(url), _) => url,
        (None, Command::Mcp) => mcp_database_url(),
        (None, _) => ledger::DEFAULT_DATABASE_URL.to_string(),
    };
    match cli.command {
        Command::Check => {
            let p = &loaded.policy;
            if p.auth_mode() != AuthMode::Passthrough && server_key.is_none() {
                eprintln!(
                    "poe-gateway: {}: auth.mode is {} but POE_API_KEY is not set; `serve` would refuse to start",
                    loaded.source.name(),
                    p.auth_mode()
                );
                return ExitCode::from(2);
            }
            if let Err(e) = poe_gateway::ledger::Store::check_url(&database_url)
                .and_then(|()| poe_gateway::ledger::Store::check_writable(&database_url))
            {
                eprintln!("poe-gateway: ledger: {e}");
                return ExitCode::from(2);
            }
            if let Err(e) = telemetry::check_env() {
                eprintln!("poe-gateway: {e}");
                return ExitCode::from(2);
            }
            println!(
                "ok: {} (listen {}, auth {}, upstream {}, {} aliases)",
                loaded.source.name(),
                p.server.listen,
                p.auth_mode(),
                // A password in the URL stays out of the unit's journal.
                poe_gateway::ledger::redact_url(&p.upstream.base_url),
                p.aliases.len()
            );
            ExitCode::SUCCESS
        }
        Command::Serve => run(async move {
            let telemetry = telemetry::init();
            let code = serve(loaded, server_key, admin_key, database_url).await;
            // Flushing blocks on the exporter task: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            code
        }),
        Command::Mcp => run(async move {
            let telemetry = telemetry::init();
            let code = mcp_stdio(loaded, server_key, database_url).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            code
        }),
        Command::Keys(cmd) => run(keys_command(cmd, database_url, loaded.policy)),
        Command::Usage(args) => run(usage_command(args, loaded, server_key, database_url)),
        Command::Healthcheck => run(healthcheck(loaded.policy.server.listen)),
    }
}

/// Writes to stdout and flushes, for a secret shown once: whether it got out is known.
fn show(text: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)?;
    out.flush()
}

fn run(fut: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("poe-gateway: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `poe-gateway mcp`: stdout carries the protocol, so everything else goes to stderr.
async fn mcp_stdio(
    loaded: config::Loaded,
    server_key: Option<Secret>,
    database_url: String,
) -> ExitCode {
    if server_key.is_none() {
        eprintln!(
            "poe-gateway mcp: POE_API_KEY is not set: the MCP tools call Poe with it \
             (get one at https://poe.com/api_key)"
        );
        return ExitCode::from(2);
    }
    let gateway = match Gateway::open(loaded.policy, server_key, None, &database_url).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("poe-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let result = poe_gateway::mcp::serve_stdio(gateway.clone()).await;
    gateway.flush().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poe-gateway mcp: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    loaded: config::Loaded,
    server_key: Option<Secret>,
    admin_key: Option<Secret>,
    database_url: String,
) -> ExitCode {
    let listen = loaded.policy.server.listen;
    let gateway = match Gateway::open(loaded.policy, server_key, admin_key, &database_url).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("poe-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("poe-gateway: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    // The first stdout line is the address, for scripts that start us on port 0.
    println!("poe-gateway listening on http://{addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, policies = %loaded.source.name(), ledger = gateway.ledger().store().backend(), "poe-gateway started");
    let threads = gateway.policy().server.thread_count();
    let served = match listener.into_std() {
        Ok(listener) => {
            let signals = stop_signals();
            let mut first = signals.clone();
            let mut second = signals;
            http::serve_threads(
                listener,
                gateway,
                threads,
                async move {
                    let _ = first.wait_for(|n| *n >= 1).await;
                },
                async move {
                    let _ = second.wait_for(|n| *n >= 2).await;
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poe-gateway: cannot start the serving threads: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The ledger of `poe-gateway mcp` when none is named: in the user's data directory, not the
/// working directory, which an MCP client chooses (Claude Desktop starts servers in `/`,
/// read-only on macOS, and Claude Code in the user's project, which a `data/` folder would
/// litter). The working directory's `./data` only when there is no home to go by.
fn mcp_database_url() -> String {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".local/share"))
        });
    match base {
        Some(base) => format!(
            "sqlite://{}",
            base.join("poe-gateway/poe-gateway.db").display()
        ),
        None => ledger::DEFAULT_DATABASE_URL.to_string(),
    }
}

async fn open_store(database_url: &str) -> Result<Store, ExitCode> {
    Store::open(database_url).await.map_err(|e| {
        eprintln!("poe-gateway: ledger: {e}");
        ExitCode::FAILURE
    })
}

/// The file a `sqlite://` URL names, when there is none there yet. The default path is
/// relative, so a CLI run from another directory than the gateway's (or a mistyped path)
/// would otherwise work on a new, empty ledger the gateway never reads.
fn missing_sqlite_file(database_url: &str) -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(database_url.strip_prefix("sqlite://")?);
    (!path.exists()).then(|| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

async fn keys_command(cmd: KeysCommand, database_url: String, policy: Policy) -> ExitCode {
    // A ledger in this process's memory ends with it: a key made there is stored nowhere
    // (`keys create` printed one that no gateway would ever take).
    if database_url.starts_with("sqlite::memory:") {
        eprintln!(
            "poe-gateway: ledger: `keys` needs the gateway's ledger, and sqlite::memory: is a \
             new one that ends with this command; point POE_GATEWAY_DATABASE_URL (or \
             --database-url) at the gateway's ledger"
        );
        return ExitCode::FAILURE;
    }
    let missing = missing_sqlite_file(&database_url);
    if let Some(path) = &missing
        && !matches!(cmd, KeysCommand::Create { .. })
    {
        eprintln!(
            "poe-gateway: ledger: no ledger file at {}; point POE_GATEWAY_DATABASE_URL (or \
             --database-url) at the gateway's ledger",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    // Listing or revoking needs a ledger there already, and so does a key made in an
    // existing SQLite file: opened to write, any other database (another program's, or an
    // empty file) became a ledger, and answered as an empty one. `list` reads it as it is.
    let creating = matches!(cmd, KeysCommand::Create { .. });
    let existing = !creating || (missing.is_none() && database_url.starts_with("sqlite://"));
    let read_only = if existing {
        match Store::open_existing(&database_url).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("poe-gateway: ledger: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let store = match read_only {
        Some(s) if matches!(cmd, KeysCommand::List { .. }) => s,
        _ => match open_store(&database_url).await {
            Ok(s) => s,
            Err(code) => return code,
        },
    };
    if let Some(path) = &missing {
        // A first key before the gateway ever ran is fine; a new ledger by mistake is not,
        // so say where it went.
        eprintln!(
            "poe-gateway: no ledger was at {}: created a new one there (a gateway reading \
             another ledger will not know this key)",
            path.display()
        );
    }
    match cmd {
        KeysCommand::Create {
            name,
            budget_usd,
            period,
            rpm,
            models,
            expires_at,
            expires_in,
        } => {
            let new = NewKey {
                name,
                budget_usd,
                period: Some(period),
                rpm,
                models,
                expires_at: expires_at.map(keys::When::Text),
                expires_in,
            };
            match keys::create_key(&store, new).await {
                Ok((rec, key)) => {
                    let budget = rec
                        .budget_usd
                        .map(|b| format!("${} per {}", keys::usd(b), rec.period.as_str()))
                        .unwrap_or_else(|| "no budget".into());
                    let rpm = rec
                        .rpm
                        .map(|r| format!("{r} rpm"))
                        .unwrap_or_else(|| "no rpm limit".into());
                    let models = rec
                        .models
                        .as_ref()
                        .map(|m| m.join(","))
                        .unwrap_or_else(|| "all models".into());
                    let expires = rec
                        .expires_ms
                        .map(|at| format!("expires {}", keys::rfc3339_ms(at)))
                        .unwrap_or_else(|| "never expires".into());
                    let shown = show(format_args!(
                        "created {} ({}): {budget}, {rpm}, {models}, {expires}\n{key}\n",
                        rec.id, rec.name
                    ));
                    if let Err(e) = shown {
                        // Shown once or never: an active key nobody has is taken back.
                        let undone = store
                            .revoke_key(&rec.id, poe_gateway::ledger::now_ms())
                            .await;
                        eprintln!(
                            "poe-gateway: the new key could not be shown ({e}); {}",
                            match undone {
                                Ok(_) => format!("{} was revoked again", rec.id),
                                Err(_) => format!("revoke {} and create another", rec.id),
                            }
                        );
                        return ExitCode::FAILURE;
                    }
                    if let Some(names) = &rec.models
                        && let Some(w) = model_list_warning(&policy, names).await
                    {
                        eprintln!("poe-gateway: warning: {w}");
                    }
                    ExitCode::SUCCESS
                }
                // An argument the key cannot have: a usage error, as clap's own are.
                Err(e @ GatewayError::BadRequest { .. }) => {
                    eprintln!("poe-gateway: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("poe-gateway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        KeysCommand::List { format } => match store.list_keys().await {
            Ok(keys) if format == "json" => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(keys) => {
                let now = poe_gateway::ledger::now_ms();
                println!(
                    "{:<22} {:<20} {:<8} {:>12} {:<6} {:>6}  {:<20}  models",
                    "id", "name", "status", "budget_usd", "period", "rpm", "expires"
                );
                for k in keys {
                    println!(
                        "{:<22} {:<20} {:<8} {:>12} {:<6} {:>6}  {:<20}  {}",
                        k.id,
                        k.name,
                        if k.revoked_ms.is_some() {
                            "revoked"
                        } else if k.expires_ms.is_some_and(|at| now >= at) {
                            "expired"
                        } else {
                            "active"
                        },
                        k.budget_usd.map(keys::usd).unwrap_or_else(|| "-".into()),
                        k.period.as_str(),
                        k.rpm.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                        k.expires_ms
                            .map(keys::rfc3339_ms)
                            .unwrap_or_else(|| "-".into()),
                        k.models
                            .map(|m| m.join(","))
                            .unwrap_or_else(|| "all".into()),
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("poe-gateway: {e}");
                ExitCode::FAILURE
            }
        },
        KeysCommand::Rotate { key } => match keys::rotate_key(&store, &key).await {
            Ok(None) => {
                eprintln!("poe-gateway: no active key with id or name `{key}`");
                ExitCode::FAILURE
            }
            Ok(Some((_, rec, secret))) => {
                let shown = show(format_args!(
                    "rotated {} ({}): the old key is refused from now on (within 5 s by running gateways)\n{secret}\n",
                    rec.id, rec.name
                ));
                if let Err(e) = shown {
                    eprintln!(
                        "poe-gateway: the new key of {} could not be shown ({e}), and the old one \
                         is revoked: rotate it again",
                        rec.id
                    );
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("poe-gateway: {e}");
                ExitCode::FAILURE
            }
        },
        KeysCommand::Revoke { key } => match store.revoke_key(&key, now_ms()).await {
            Ok(revoked) if revoked.is_empty() => {
                eprintln!("poe-gateway: no active key with id or name `{key}`");
                ExitCode::FAILURE
            }
            Ok(revoked) => {
                for k in revoked {
                    println!("revoked {} ({})", k.id, k.name);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("poe-gateway: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `keys create --models`: the names checked against Poe's catalogue, read from the
/// configured upstream (no key needed) and waited for at most 3 s, so a script reading the
/// key is not held up long by an unreachable upstream. The key is made either way (see
/// [`models::model_list_warning`]).
async fn model_list_warning(policy: &Policy, names: &[String]) -> Option<String> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    let aliases = Aliases::new(&policy.aliases);
    let read = async {
        let upstream = Upstream::new(
            &policy.upstream,
            policy.timeouts.connect,
            policy.timeouts.connect,
            1,
        )
        .map_err(GatewayError::UpstreamUnreachable)?;
        Models::new(policy.upstream.models_ttl)
            .get(&upstream, &aliases)
            .await
    };
    let catalogue = tokio::time::timeout(WAIT, read).await.unwrap_or_else(|_| {
        Err(GatewayError::UpstreamTimeout(format!(
            "no answer within {}s",
            WAIT.as_secs()
        )))
    });
    models::model_list_warning(catalogue.as_deref(), &aliases, names)
}

async fn usage_command(
    args: UsageArgs,
    loaded: config::Loaded,
    server_key: Option<Secret>,
    database_url: String,
) -> ExitCode {
    if let Some(UsageCommand::Balance) = args.command {
        let Some(key) = server_key else {
            eprintln!("poe-gateway: POE_API_KEY is not set");
            return ExitCode::from(2);
        };
        let p = &loaded.policy;
        let upstream = match Upstream::new(&p.upstream, p.timeouts.connect, p.timeouts.connect, 1) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("poe-gateway: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match upstream.balance(&key).await {
            Ok(points) => {
                println!("{points} points");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("poe-gateway: reading the point balance failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !matches!(args.format.as_str(), "table" | "json" | "csv") {
        eprintln!("poe-gateway: --format must be table, json or csv");
        return ExitCode::from(2);
    }
    let now = now_ms();
    let since_ms = match parse_when(&args.since, now) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("poe-gateway: --since: {e}");
            return ExitCode::from(2);
        }
    };
    let until_ms = match args
        .until
        .as_deref()
        .map(|u| parse_when(u, now))
        .transpose()
    {
        Ok(t) => t.unwrap_or(now + 1),
        Err(e) => {
            eprintln!("poe-gateway: --until: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = report::check_window(since_ms, until_ms) {
        // The bound that was given (a `--since` in the future is the `--since`'s fault).
        let given = if args.until.is_some() {
            "--until"
        } else {
            "--since"
        };
        eprintln!("poe-gateway: {given}: {e}");
        return ExitCode::from(2);
    }
    // Read-only: a report never creates a ledger or changes its schema.
    let store = match Store::open_existing(&database_url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("poe-gateway: ledger: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `--key` by id or by name; a key that does not exist is an error, not an empty report.
    let key_id = match args.key {
        None => None,
        Some(which) => {
            let known = match store.list_keys().await {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("poe-gateway: ledger: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match keys::key_id_of(&known, &which, false) {
                Ok(id) => Some(id),
                Err(e) => {
                    eprintln!("poe-gateway: --key: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let q = ReportQuery {
        since_ms,
        until_ms,
        key_id,
        group_by: args.by,
    };
    match store.report(&q).await {
        Ok(r) => {
            print!("{}", report::render(&r, &args.format));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("poe-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck(listen: std::net::SocketAddr) -> ExitCode {
    use http_body_util::Empty;
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let uri = format!("http://{addr}/healthz");
    match tokio::time::timeout(
        std::time::Duration::from_secs(3),
        client.get(uri.parse().expect("a valid URI")),
    )
    .await
    {
        Ok(Ok(resp)) if resp.status().is_success() => ExitCode::SUCCESS,
        Ok(Ok(resp)) => {
            eprintln!("poe-gateway: {uri} answered {}", resp.status());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("poe-gateway: {uri}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("poe-gateway: {uri}: no answer within 3s");
            ExitCode::FAILURE
        }
    }
}

/// How many stop signals have come: SIGTERM, SIGINT (Ctrl-C) and SIGHUP. The first starts a
/// graceful shutdown; a second one ends its drain at once. SIGHUP stops the gateway the same
/// way (it reloads nothing): left to its default, it would kill the process with no drain
/// and no last ledger write.
fn stop_signals() -> tokio::sync::watch::Receiver<u32> {
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{Signal, SignalKind, signal};
            async fn next(s: &mut Option<Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            let mut term = signal(SignalKind::terminate()).ok();
            let mut int = signal(SignalKind::interrupt()).ok();
            let mut hup = signal(SignalKind::hangup()).ok();
            loop {
                let name = tokio::select! {
                    _ = next(&mut term) => "SIGTERM",
                    _ = next(&mut int) => "SIGINT",
                    _ = next(&mut hup) => "SIGHUP",
                };
                tracing::info!(signal = name, "stop signal received");
                tx.send_modify(|n| *n += 1);
            }
        }
        #[cfg(not(unix))]
        loop {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}
