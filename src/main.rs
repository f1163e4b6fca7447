//! `switchboard`: runs the gateway, the event bus or the agent bridge, or
//! all three (`up`), and the command-line tools `publish`, `tail` and `token`.
//!
//! This file only parses the command line, installs tracing and dispatches:
//! `plan` checks the configuration and turns it into each service's config,
//! `serve` binds sockets and calls each service's `serve`, and `tools` holds
//! the tools. Everything else lives in the service libraries.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod bench;
mod plan;
mod serve;
mod settings;
mod tools;

use std::{collections::HashMap, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use plan::Plan;

/// mimalloc rather than glibc's allocator: the publish path allocates and frees
/// small buffers per event across threads, where glibc spent a fifth of the
/// bus's core (BENCHMARKS.md, durable publish).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Real-time event and agent gateway")]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// `text` or `json`.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gateway and the event bus in one process (dev mode unless --production).
    Up(ServeArgs),
    /// Runs the gateway alone.
    Gateway(ServeArgs),
    /// Runs the event bus alone.
    Eventbus(ServeArgs),
    /// Runs the agent bridge alone.
    AgentBridge(ServeArgs),
    /// Publishes one event through the bus.
    Publish {
        channel: String,
        event: String,
        /// The event's data, as JSON.
        json: String,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Prints an HS256 client token signed with `auth.hs256_secret`.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A role (`roles` claim); repeat for more.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A channel subscribed on connect (`channels` claim); repeat for more.
        #[arg(long = "channel")]
        channels: Vec<String>,
        #[arg(long)]
        audience: Option<String>,
        #[arg(long)]
        issuer: Option<String>,
        /// The HS256 secret.
        #[arg(long, env = "SWITCHBOARD_AUTH__HS256_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Load generators: publish throughput, WebSocket fan-out, agent runs (loopback only), and the thread store.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Prints a channel's events as they arrive, one JSON object per line.
    Tail {
        channel: String,
        /// Replays what came after this position first.
        #[arg(long, value_name = "OFFSET:EPOCH")]
        since: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Default, Clone)]
struct ServeArgs {
    /// Anonymous connections, generated secrets (implied by `up`).
    #[arg(long)]
    dev: bool,
    /// Refuses anonymous connections; secrets must be configured.
    #[arg(long, conflicts_with = "dev")]
    production: bool,
    /// Overrides `gateway.listen`.
    #[arg(long)]
    gateway_listen: Option<String>,
    /// Overrides `eventbus.listen`.
    #[arg(long)]
    eventbus_listen: Option<String>,
    /// Overrides `agent_bridge.listen`.
    #[arg(long)]
    agent_bridge_listen: Option<String>,
    /// Overrides `eventbus.backend`.
    #[arg(long)]
    backend: Option<String>,
    /// Overrides `eventbus.data_dir` and `agent_bridge.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The event bus.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    /// API key of the bus, when it requires one.
    #[arg(long, env = "SWITCHBOARD_AUTH__ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// For an `https://` URL: `tls.ca`, `tls.client_cert`, `tls.client_key`
    /// of the configuration file and the environment.
    #[arg(skip)]
    tls: Option<switchboard_tls::ClientTls>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Up,
    Gateway,
    Eventbus,
    AgentBridge,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    // Every connection is a file descriptor: take the hard limit, not the
    // (often 1024) soft one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files"),
        Err(e) => tracing::warn!(cause = %e, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("SWITCHBOARD_")).collect();
    // The tools read some settings from the environment too: a variable that
    // names no setting is an error for every command (SPEC §8).
    if let Err(message) = settings::load(None, &env) {
        eprintln!("error: invalid configuration: {message}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The tools' TLS settings (`tls.*`), from the file and the environment.
    let client_tls = || {
        settings::load(cli.config.as_deref(), &env).and_then(|s| s.tls.client_config()).map_err(|message| {
            eprintln!("error: invalid configuration: {message}");
            ExitCode::from(EXIT_CONFIG)
        })
    };
    let (role, args) = match cli.command.unwrap_or(Command::Up(ServeArgs::default())) {
        Command::Up(a) => (Role::Up, a),
        Command::Gateway(a) => (Role::Gateway, a),
        Command::Eventbus(a) => (Role::Eventbus, a),
        Command::AgentBridge(a) => (Role::AgentBridge, a),
        Command::Publish { channel, event, json, mut client, idempotency_key } => {
            client.tls = match client_tls() {
                Ok(tls) => tls,
                Err(code) => return code,
            };
            return runtime.block_on(tools::publish(client, channel, event, json, idempotency_key));
        }
        Command::Tail { channel, since, mut client } => {
            client.tls = match client_tls() {
                Ok(tls) => tls,
                Err(code) => return code,
            };
            return runtime.block_on(tools::tail(client, channel, since));
        }
        Command::Token { sub, ttl, roles, channels, audience, issuer, secret } => {
            let claims = tools::token_claims(&sub, ttl, &roles, &channels, audience.as_deref(), issuer.as_deref());
            return tools::token(&secret, &claims);
        }
        Command::Bench(bench) => {
            let tls = match client_tls() {
                Ok(tls) => tls,
                Err(code) => return code,
            };
            return match runtime.block_on(bench::run(bench, tls)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let plan = match settings::load(cli.config.as_deref(), &env).and_then(|s| Plan::new(s, role, &args)) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("error: invalid configuration: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    runtime.block_on(plan.run())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
