//! `switchboard`: runs the gateway, the event bus, or both (`up`), and the
//! command-line tools `publish` and `tail`.
//!
//! This file only parses the command line and configuration, installs
//! tracing, binds sockets and calls each service's `serve`; everything else
//! lives in the service libraries.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod bench;
mod settings;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use switchboard_proto::eventbus::v1 as pb;

use settings::{AccessSetting, Settings, addr};

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
    /// Load generators: publish throughput and WebSocket fan-out (loopback only).
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
    let (role, args) = match cli.command.unwrap_or(Command::Up(ServeArgs::default())) {
        Command::Up(a) => (Role::Up, a),
        Command::Gateway(a) => (Role::Gateway, a),
        Command::Eventbus(a) => (Role::Eventbus, a),
        Command::AgentBridge(a) => (Role::AgentBridge, a),
        Command::Publish { channel, event, json, client, idempotency_key } => {
            return runtime.block_on(publish(client, channel, event, json, idempotency_key));
        }
        Command::Tail { channel, since, client } => return runtime.block_on(tail(client, channel, since)),
        Command::Token { sub, ttl, roles, channels, audience, issuer, secret } => {
            let claims = token_claims(&sub, ttl, &roles, &channels, audience.as_deref(), issuer.as_deref());
            return match switchboard_gateway::auth::mint_hs256(secret.as_bytes(), &claims) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Bench(bench) => {
            return match runtime.block_on(bench::run(bench)) {
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

/// What to run, checked and ready to bind.
struct Plan {
    role: Role,
    dev: bool,
    gateway_listen: SocketAddr,
    eventbus_listen: SocketAddr,
    bridge_listen: SocketAddr,
    bus_metrics_listen: Option<SocketAddr>,
    bridge_metrics_listen: Option<SocketAddr>,
    gateway: switchboard_gateway::Config,
    /// Whether `gateway.agent_bridge_url` was left to default to the local bridge.
    local_bridge: bool,
    /// Whether `agent_bridge.eventbus_url` was left to default to the local bus.
    local_bridge_bus: bool,
    bridge: switchboard_agent_bridge::Config,
    /// Whether `gateway.eventbus_url` was left to default to the local bus.
    local_bus: bool,
    eventbus: switchboard_eventbus::Config,
    admin_key_generated: bool,
    /// A client token printed in dev mode, signed with the generated secret.
    dev_token: Option<String>,
}

fn token_claims(
    sub: &str,
    ttl: Duration,
    roles: &[String],
    channels: &[String],
    audience: Option<&str>,
    issuer: Option<&str>,
) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut claims = serde_json::json!({ "sub": sub, "iat": now, "exp": now + ttl.as_secs() });
    if !roles.is_empty() {
        claims["roles"] = serde_json::json!(roles);
    }
    if !channels.is_empty() {
        claims["channels"] = serde_json::json!(channels);
    }
    if let Some(aud) = audience {
        claims["aud"] = serde_json::json!(aud);
    }
    if let Some(iss) = issuer {
        claims["iss"] = serde_json::json!(iss);
    }
    claims
}

/// Lowers `max_connections` to what the open-file limit allows, keeping
/// some descriptors for everything else (stores, links, listeners): past it,
/// `accept` fails and the node stops answering even `/health`.
fn within_open_files(max_connections: usize) -> usize {
    let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return max_connections;
    };
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    let allowed = soft.saturating_sub((soft / 8).max(64)).max(1);
    if allowed < max_connections {
        tracing::warn!(
            max_connections = allowed,
            open_files = soft,
            "limits.max_connections lowered to fit the open-file limit"
        );
        return allowed;
    }
    max_connections
}

fn random_key() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn access(
    key: &str,
    setting: Option<&AccessSetting>,
    default: switchboard_gateway::Access,
) -> Result<switchboard_gateway::Access, String> {
    use switchboard_gateway::Access;
    Ok(match setting {
        None => default,
        Some(AccessSetting::Word(w)) => match w.as_str() {
            "none" => Access::None,
            "anonymous" => Access::Anonymous,
            "authenticated" => Access::Authenticated,
            other => {
                return Err(format!(
                    "{key}: {other:?} is not one of none, anonymous, authenticated, or a list of roles"
                ));
            }
        },
        Some(AccessSetting::Roles(roles)) => Access::Roles(roles.clone()),
    })
}

impl Plan {
    fn new(mut s: Settings, role: Role, args: &ServeArgs) -> Result<Plan, String> {
        if let Some(v) = &args.gateway_listen {
            s.gateway.listen = v.clone();
        }
        if let Some(v) = &args.eventbus_listen {
            s.eventbus.listen = v.clone();
        }
        if let Some(v) = &args.agent_bridge_listen {
            s.agent_bridge.listen = v.clone();
        }
        if let Some(v) = &args.backend {
            s.eventbus.backend = v.clone();
        }
        if let Some(v) = &args.data_dir {
            s.eventbus.data_dir = v.clone();
            s.agent_bridge.data_dir = v.clone();
        }
        let dev = args.dev || (role == Role::Up && !args.production);
        let gateway_listen = addr("gateway.listen", &s.gateway.listen)?;
        let eventbus_listen = addr("eventbus.listen", &s.eventbus.listen)?;
        let bridge_listen = addr("agent_bridge.listen", &s.agent_bridge.listen)?;
        let bus_metrics_listen =
            s.eventbus.metrics_listen.as_deref().map(|a| addr("eventbus.metrics_listen", a)).transpose()?;
        let bridge_metrics_listen =
            s.agent_bridge.metrics_listen.as_deref().map(|a| addr("agent_bridge.metrics_listen", a)).transpose()?;
        let backend = match s.eventbus.backend.as_str() {
            "embedded" => switchboard_eventbus::Backend::Embedded,
            "memory" => switchboard_eventbus::Backend::Memory,
            "redis" => match &s.eventbus.redis_url {
                Some(url) => switchboard_eventbus::Backend::Redis { url: url.clone() },
                None => return Err("eventbus.redis_url: required by the redis backend (redis://HOST:PORT)".into()),
            },
            "nats" => {
                return Err(format!(
                    "eventbus.backend: the {} backend is not available in this build yet",
                    s.eventbus.backend
                ));
            }
            other => {
                return Err(format!("eventbus.backend: {other:?} is not one of embedded, memory, redis, nats"));
            }
        };
        let fsync = match s.eventbus.fsync.as_str() {
            "always" => switchboard_eventbus::Fsync::Always,
            "batch" => switchboard_eventbus::Fsync::Batch,
            "never" => switchboard_eventbus::Fsync::Never,
            other => {
                return Err(format!("eventbus.fsync: {other:?} is not one of always, batch, never"));
            }
        };
        let l = &s.limits;
        for (key, value) in [
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_subscriptions", l.max_subscriptions),
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_user", l.max_connections_per_user),
            ("limits.rate_per_second", l.rate_per_second as usize),
            ("limits.rate_burst", l.rate_burst as usize),
            ("limits.protocol_errors_per_minute", l.protocol_errors_per_minute),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.max_event_bytes", l.max_event_bytes),
            ("limits.history_size", l.history_size as usize),
        ] {
            if value == 0 {
                return Err(format!("{key}: must be greater than 0"));
            }
        }
        if s.gateway.heartbeat_interval.0.is_zero() {
            return Err("gateway.heartbeat_interval: must be greater than 0".into());
        }
        let mut admin_key_generated = false;
        let admin_key = match s.auth.admin_key.clone() {
            Some(k) if k.len() < 16 => return Err("auth.admin_key: must be at least 16 characters".into()),
            Some(k) => Some(k),
            None if dev => {
                admin_key_generated = true;
                Some(random_key())
            }
            None => {
                return Err(
                    "auth.admin_key: required outside --dev (or set it with SWITCHBOARD_AUTH__ADMIN_KEY)".into()
                );
            }
        };
        let anonymous = s.auth.anonymous.unwrap_or(dev);
        let mut auth = switchboard_gateway::auth::AuthConfig {
            audience: s.auth.audience.clone(),
            issuer: s.auth.issuer.clone(),
            expiry_grace: s.auth.expiry_grace.0,
            authorize_timeout: s.auth.authorize_timeout.0,
            ..Default::default()
        };
        let mut dev_token = None;
        let secret = match s.auth.hs256_secret.clone() {
            Some(secret) if secret.len() < 32 => {
                return Err("auth.hs256_secret: must be at least 32 characters".into());
            }
            Some(secret) => Some(secret),
            None if dev => {
                let secret = random_key();
                // The printed dev token is the developer's own: it has the
                // `admin` role, so `get_status` shows everything to it.
                let claims = token_claims(
                    "dev",
                    Duration::from_secs(24 * 3600),
                    &["admin".to_owned()],
                    &[],
                    s.auth.audience.as_deref(),
                    s.auth.issuer.as_deref(),
                );
                dev_token = switchboard_gateway::auth::mint_hs256(secret.as_bytes(), &claims).ok();
                Some(secret)
            }
            None => None,
        };
        if let Some(secret) = &secret {
            auth = auth.with_hs256(secret.as_bytes());
        }
        for file in &s.auth.public_key_files {
            let pem = std::fs::read(file).map_err(|e| format!("auth.public_key_files: {}: {e}", file.display()))?;
            auth = auth.with_public_pem(&pem).map_err(|e| format!("auth.public_key_files: {}: {e}", file.display()))?;
        }
        if let Some(url) = &s.auth.jwks_url {
            auth.jwks = Some(switchboard_gateway::jwks::Jwks::new(url, s.auth.jwks_refresh.0, s.auth.jwks_timeout.0)?);
        }
        if !auth.has_keys() && !anonymous && matches!(role, Role::Up | Role::Gateway) {
            return Err("auth.hs256_secret: a token key (auth.hs256_secret, auth.public_key_files or auth.jwks_url) is required outside --dev unless auth.anonymous = true".into());
        }

        let history = switchboard_eventbus::HistoryPolicy { size: l.history_size, ttl: l.history_ttl.0 };
        let mut bus_namespaces = HashMap::new();
        let mut gw_namespaces = HashMap::new();
        for (name, ns) in &s.namespaces {
            bus_namespaces.insert(
                name.clone(),
                switchboard_eventbus::HistoryPolicy {
                    size: ns.history_size.unwrap_or(history.size),
                    ttl: ns.history_ttl.map(|d| d.0).unwrap_or(history.ttl),
                },
            );
            gw_namespaces.insert(
                name.clone(),
                switchboard_gateway::Namespace {
                    subscribe: access(
                        &format!("namespaces.{name}.subscribe"),
                        ns.subscribe.as_ref(),
                        switchboard_gateway::Access::Anonymous,
                    )?,
                    publish: access(
                        &format!("namespaces.{name}.publish"),
                        ns.publish.as_ref(),
                        switchboard_gateway::Access::None,
                    )?,
                },
            );
        }
        for channel in &s.gateway.default_channels {
            switchboard_proto::channel::validate(channel)
                .map_err(|e| format!("gateway.default_channels: {channel:?}: {e}"))?;
        }
        let mut rpc = HashMap::new();
        for (method, setting) in &s.rpc {
            // `none` is accepted too: a method nobody may call from a browser.
            let access = access(&format!("rpc.{method}"), Some(setting), switchboard_gateway::Access::None)?;
            rpc.insert(method.clone(), access);
        }
        let eventbus = switchboard_eventbus::Config {
            backend,
            data_dir: s.eventbus.data_dir.clone(),
            fsync,
            fsync_interval: s.eventbus.fsync_interval.0,
            cache_bytes: usize::try_from(s.eventbus.cache_bytes.0).unwrap_or(usize::MAX),
            max_event_bytes: l.max_event_bytes,
            recovery_max: l.recovery_max,
            max_stream_channels: l.max_stream_channels,
            history,
            namespaces: bus_namespaces,
            // A generated (dev) key guards only the HTTP admin API, so that
            // `switchboard publish` and producers work out of the box in dev.
            api_key: s.auth.admin_key.clone(),
            node: "eventbus".into(),
        };
        let local_bus = s.gateway.eventbus_url.is_none();
        let local_bridge = s.gateway.agent_bridge_url.is_none();
        let local_bridge_bus = s.agent_bridge.eventbus_url.is_none();
        let openai = match &s.agents.openai {
            Some(o) => {
                let api_key = match &o.api_key_env {
                    Some(var) => {
                        Some(std::env::var(var).map_err(|_| format!("agents.openai.api_key_env: {var} is not set"))?)
                    }
                    None => None,
                };
                Some(switchboard_agent_bridge::openai::OpenAiConfig {
                    base_url: o.base_url.clone(),
                    model: o.model.clone(),
                    api_key,
                    timeout: o.timeout.0,
                })
            }
            None => None,
        };
        if !(s.agents.default == "echo" || (s.agents.default == "openai" && openai.is_some())) {
            return Err(format!("agents.default: {:?} is not an available built-in agent", s.agents.default));
        }
        let bridge = switchboard_agent_bridge::Config {
            data_dir: s.agent_bridge.data_dir.clone(),
            eventbus_url: Some(
                s.agent_bridge.eventbus_url.clone().unwrap_or_else(|| format!("http://{eventbus_listen}")),
            ),
            api_key: s.auth.admin_key.clone(),
            default_agent: s.agents.default.clone(),
            echo_delay: Duration::from_millis(s.agents.echo.delay_ms),
            run_deadline: s.agents.run_deadline.0,
            max_enqueued: s.agents.max_enqueued,
            shutdown_grace: s.gateway.shutdown_grace.0,
            openai,
        };
        let gateway = switchboard_gateway::Config {
            node: s.gateway.node.clone().unwrap_or_else(|| "gateway".into()),
            eventbus_urls: match &s.gateway.eventbus_url {
                Some(urls) => urls.0.clone(),
                None => vec![format!("http://{eventbus_listen}")],
            },
            agent_bridge_url: Some(
                s.gateway.agent_bridge_url.clone().unwrap_or_else(|| format!("http://{bridge_listen}")),
            ),
            admin_key,
            anonymous,
            heartbeat_interval: s.gateway.heartbeat_interval.0,
            heartbeat_timeout: s.gateway.heartbeat_timeout.0,
            shutdown_grace: s.gateway.shutdown_grace.0,
            limits: switchboard_gateway::Limits {
                max_message_bytes: l.max_message_bytes,
                max_subscriptions: l.max_subscriptions,
                max_connections: within_open_files(l.max_connections),
                max_connections_per_user: l.max_connections_per_user,
                rate_per_second: l.rate_per_second,
                rate_burst: l.rate_burst,
                protocol_errors_per_minute: l.protocol_errors_per_minute,
                outbound_queue_bytes: l.outbound_queue_bytes,
                recovery_max: l.recovery_max,
                header_timeout: l.header_timeout.0,
                write_timeout: l.write_timeout.0,
                link_wait: l.link_wait.0,
            },
            namespaces: gw_namespaces,
            rpc,
            default_channels: s.gateway.default_channels.clone(),
            allowed_origins: s.gateway.allowed_origins.clone(),
            auth,
        };
        Ok(Plan {
            role,
            dev,
            gateway_listen,
            eventbus_listen,
            bridge_listen,
            bus_metrics_listen,
            bridge_metrics_listen,
            gateway,
            local_bridge,
            local_bridge_bus,
            bridge,
            local_bus,
            eventbus,
            admin_key_generated,
            dev_token,
        })
    }

    async fn run(mut self) -> ExitCode {
        let stop = CancellationToken::new();
        let bus_stop = CancellationToken::new();
        tokio::spawn(signal(stop.clone()));
        let runs_bus = matches!(self.role, Role::Up | Role::Eventbus);
        let runs_gateway = matches!(self.role, Role::Up | Role::Gateway);
        let runs_bridge = matches!(self.role, Role::Up | Role::AgentBridge);
        let mut bus_listener = None;
        let mut gateway_listener = None;
        let mut bridge_listener = None;
        if runs_bus {
            match bind(self.eventbus_listen, "eventbus.listen").await {
                Ok(l) => bus_listener = Some(l),
                Err(code) => return code,
            }
        }
        if runs_gateway {
            match bind(self.gateway_listen, "gateway.listen").await {
                Ok(l) => gateway_listener = Some(l),
                Err(code) => return code,
            }
        }
        if runs_bridge {
            match bind(self.bridge_listen, "agent_bridge.listen").await {
                Ok(l) => bridge_listener = Some(l),
                Err(code) => return code,
            }
        }
        let mut bus_task = None;
        if let Some(listener) = bus_listener {
            let bus_addr = listener.local_addr().ok();
            if let (true, Some(a)) = (self.local_bus, bus_addr) {
                self.gateway.eventbus_urls = vec![format!("http://{a}")];
            }
            if let (true, Some(a)) = (self.local_bridge_bus, bus_addr) {
                self.bridge.eventbus_url = Some(format!("http://{a}"));
            }
            let (bus, handle) = match switchboard_eventbus::open(self.eventbus.clone()).await {
                Ok(opened) => opened,
                Err(e) => {
                    eprintln!("error: cannot open the event bus store: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "eventbus  grpc://{}  (backend {}, epoch {})",
                bus_addr.map(|a| a.to_string()).unwrap_or_default(),
                bus.backend(),
                bus.epoch().unwrap_or("per channel")
            );
            if let Some(addr) = self.bus_metrics_listen {
                match bind(addr, "eventbus.metrics_listen").await {
                    Ok(l) => {
                        println!(
                            "metrics   http://{}/metrics  (eventbus)",
                            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                        );
                        tokio::spawn(switchboard_eventbus::serve_metrics(
                            bus.clone(),
                            l,
                            stop.clone().cancelled_owned(),
                        ));
                    }
                    Err(code) => return code,
                }
            }
            // The bus stops last: runs publish their last events to it.
            let token = bus_stop.clone();
            bus_task = Some(tokio::spawn(async move {
                let r = switchboard_eventbus::serve_bus(bus, listener, token.cancelled_owned()).await;
                handle.stop().await;
                r.map_err(|e| e.to_string())
            }));
        }
        let mut bridge_task = None;
        if let Some(listener) = bridge_listener {
            let bridge_addr = listener.local_addr().ok();
            if let (true, Some(a)) = (self.local_bridge, bridge_addr) {
                self.gateway.agent_bridge_url = Some(format!("http://{a}"));
            }
            let bridge = match switchboard_agent_bridge::open(self.bridge.clone()) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot open the agent bridge: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let agents: Vec<String> = bridge.agents().into_iter().map(|a| a.0).collect();
            println!(
                "bridge    grpc://{}  (agents: {})",
                bridge_addr.map(|a| a.to_string()).unwrap_or_default(),
                agents.join(", ")
            );
            if let Some(addr) = self.bridge_metrics_listen {
                match bind(addr, "agent_bridge.metrics_listen").await {
                    Ok(l) => {
                        println!(
                            "metrics   http://{}/metrics  (agent bridge)",
                            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                        );
                        tokio::spawn(switchboard_agent_bridge::serve_metrics(
                            bridge.clone(),
                            l,
                            stop.clone().cancelled_owned(),
                        ));
                    }
                    Err(code) => return code,
                }
            }
            let token = stop.clone();
            let key = self.bridge.api_key.clone();
            bridge_task = Some(tokio::spawn(async move {
                switchboard_agent_bridge::serve_bridge(bridge, key, listener, token.cancelled_owned())
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        let mut gateway_task = None;
        if let Some(listener) = gateway_listener {
            if let Ok(a) = listener.local_addr() {
                println!("gateway   ws://{a}/ws/connect");
                println!("          http://{a}/api/ws/info");
            }
            let token = stop.clone();
            let config = self.gateway.clone();
            gateway_task = Some(tokio::spawn(async move {
                switchboard_gateway::serve(config, listener, token.cancelled_owned()).await.map_err(|e| e.to_string())
            }));
        }
        if let (true, Some(key)) = (self.admin_key_generated, &self.gateway.admin_key) {
            println!("admin key {key}  (generated; set auth.admin_key to keep one)");
        }
        if let (true, Some(token)) = (runs_gateway, &self.dev_token) {
            println!("token     {token}  (user \"dev\", 24 h; signed with a generated auth.hs256_secret)");
        }
        println!("mode      {}", if self.dev { "dev: anonymous connections allowed" } else { "production" });
        // Shutdown, in order (SPEC §11): the gateway and the bridge stop runs
        // and deliver their ends, the gateway's sessions say goodbye, and the
        // bus, which they publish to, stops last. Each service bounds its own
        // shutdown by the grace period; past it (and a second for the bus)
        // what still runs is dropped, so the process always exits in time.
        let grace = self.gateway.shutdown_grace;
        let overdue = CancellationToken::new();
        let bus_overdue = CancellationToken::new();
        let (stopped, late, bus_late) = (stop.clone(), overdue.clone(), bus_overdue.clone());
        tokio::spawn(async move {
            stopped.cancelled().await;
            tokio::time::sleep(grace + Duration::from_millis(500)).await;
            late.cancel();
            tokio::time::sleep(Duration::from_millis(400)).await;
            bus_late.cancel();
        });
        let mut ok = true;
        for task in [gateway_task, bridge_task].into_iter().flatten() {
            ok &= finish(task, &stop, &overdue).await;
        }
        // The others are done (they end only once stopped, or by failing,
        // which stops everything), or there were none: the bus stops with
        // the signal.
        let stopping = stop.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            bus_stop.cancel();
        });
        if let Some(task) = bus_task {
            ok &= finish(task, &stop, &bus_overdue).await;
        }
        if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }
}

/// Waits for a service to end; one that fails stops the others, and one
/// still running once `overdue` is cancelled is dropped. Returns false on failure.
async fn finish(
    task: tokio::task::JoinHandle<Result<(), String>>,
    stop: &CancellationToken,
    overdue: &CancellationToken,
) -> bool {
    let abort = task.abort_handle();
    let result = tokio::select! {
        r = task => r,
        _ = overdue.cancelled() => {
            abort.abort();
            eprintln!("warning: a service did not stop within the grace period");
            return true;
        }
    };
    match result {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            stop.cancel();
            false
        }
        Err(e) => {
            eprintln!("error: service task failed: {e}");
            stop.cancel();
            false
        }
    }
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("error: cannot listen on {addr} ({key}): {e}");
        ExitCode::FAILURE
    })
}

async fn signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    stop.cancel();
}

type Client = pb::event_bus_client::EventBusClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, switchboard_gateway::link::ApiKey>,
>;

fn client(args: &ClientArgs) -> Result<Client, String> {
    switchboard_gateway::link::client(&args.url, args.key.as_deref())
}

async fn publish(args: ClientArgs, channel: String, event: String, json: String, key: Option<String>) -> ExitCode {
    let mut client = match client(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let request = pb::PublishRequest {
        channel,
        event,
        data: json.into_bytes().into(),
        idempotency_key: key.unwrap_or_default(),
        meta: Default::default(),
    };
    match client.publish(request).await {
        Ok(resp) => {
            let r = resp.into_inner();
            println!(
                "{}",
                serde_json::json!({ "event_id": r.event_id, "offset": r.offset, "epoch": r.epoch, "duplicate": r.duplicate })
            );
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("error: {}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}

async fn tail(args: ClientArgs, channel: String, since: Option<String>) -> ExitCode {
    let since = match since.as_deref().map(switchboard_gateway::protocol::parse_since) {
        None => None,
        Some(Some(s)) => Some(pb::StreamPosition { offset: s.offset, epoch: s.epoch }),
        Some(None) => {
            eprintln!("error: --since must be OFFSET:EPOCH");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut client = match client(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let join =
        pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Join(pb::Join { channel, since })) };
    // The request stream stays open (and the subscription with it) until exit.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(join).await;
    let mut stream = match client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            eprintln!("error: {}: {}", status.code(), status.message());
            return ExitCode::FAILURE;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            m = stream.message() => m,
        };
        use pb::subscribe_response::Response as R;
        match msg {
            Ok(Some(pb::SubscribeResponse { response: Some(R::Joined(j)) })) => {
                if let Some(err) = j.error {
                    eprintln!("error: {}", err.message);
                    return ExitCode::FAILURE;
                }
                let p = j.position.unwrap_or_default();
                eprintln!(
                    "# joined {} at {}:{} (recovered: {}, missed: {})",
                    j.channel, p.offset, p.epoch, j.recovered, j.missed
                );
            }
            Ok(Some(pb::SubscribeResponse { response: Some(R::Events(batch)) })) => {
                for e in &batch.events {
                    println!("{}", switchboard_gateway::link::frame(e).text.as_str());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return ExitCode::SUCCESS,
            Err(status) => {
                eprintln!("error: {}: {}", status.code(), status.message());
                tokio::time::sleep(Duration::from_millis(10)).await;
                return ExitCode::FAILURE;
            }
        }
    }
}
