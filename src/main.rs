//! The `poe-gateway` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use poe_gateway::config::{self, AuthMode};
use poe_gateway::upstream::Secret;
use poe_gateway::{Gateway, http, telemetry};

#[derive(Parser)]
#[command(name = "poe-gateway", version, about = "An OpenAI-compatible gateway in front of Poe's API")]
struct Cli {
    /// Policy file (TOML). Default: policies/default.toml if present, else the built-in default.
    #[arg(long, global = true, env = "POE_GATEWAY_POLICIES")]
    policies: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP gateway (OpenAI-compatible API under /v1).
    Serve,
    /// Validate the configuration (policy file and env overrides) and exit.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match config::load(cli.policies.as_deref(), std::env::vars()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("poe-gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let server_key = std::env::var("POE_API_KEY")
        .ok()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .map(Secret::new);

    match cli.command {
        Command::Check => {
            let p = &loaded.policy;
            if p.auth_mode() == AuthMode::Open && server_key.is_none() {
                eprintln!(
                    "poe-gateway: {}: auth.mode is open but POE_API_KEY is not set; `serve` would refuse to start",
                    loaded.source.name()
                );
                return ExitCode::from(2);
            }
            println!(
                "ok: {} (listen {}, auth {}, upstream {}, {} aliases)",
                loaded.source.name(),
                p.server.listen,
                p.auth_mode(),
                p.upstream.base_url,
                p.aliases.len()
            );
            ExitCode::SUCCESS
        }
        Command::Serve => {
            telemetry::init_logging();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("poe-gateway: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(loaded, server_key))
        }
    }
}

async fn serve(loaded: config::Loaded, server_key: Option<Secret>) -> ExitCode {
    let listen = loaded.policy.server.listen;
    let gateway = match Gateway::new(loaded.policy, server_key) {
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
    tracing::info!(%addr, policies = %loaded.source.name(), "poe-gateway started");
    http::serve(listener, gateway, shutdown_signal()).await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
