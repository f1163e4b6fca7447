//! Turns the settings and the flags into the three services' configs: a
//! `Plan`, checked before anything is bound, whose errors name the setting
//! at fault. The checks run in a fixed order, so that a configuration with
//! several faults always reports the same one.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    Role, ServeArgs,
    settings::{AccessSetting, Settings, addr},
    tools::token_claims,
};

/// What to run, checked and ready to bind.
pub(crate) struct Plan {
    pub(crate) role: Role,
    pub(crate) dev: bool,
    pub(crate) gateway_listen: SocketAddr,
    pub(crate) eventbus_listen: SocketAddr,
    pub(crate) bridge_listen: SocketAddr,
    pub(crate) bus_metrics_listen: Option<SocketAddr>,
    pub(crate) bridge_metrics_listen: Option<SocketAddr>,
    pub(crate) gateway: switchboard_gateway::Config,
    /// Whether `gateway.agent_bridge_url` was left to default to the local bridge.
    pub(crate) local_bridge: bool,
    /// Whether `agent_bridge.eventbus_url` was left to default to the local bus.
    pub(crate) local_bridge_bus: bool,
    pub(crate) bridge: switchboard_agent_bridge::Config,
    /// Whether `gateway.eventbus_url` was left to default to the local bus.
    pub(crate) local_bus: bool,
    pub(crate) eventbus: switchboard_eventbus::Config,
    pub(crate) admin_key_generated: bool,
    /// A client token printed in dev mode, signed with the generated secret.
    pub(crate) dev_token: Option<String>,
}

impl Plan {
    /// Checks the settings, with the flags applied over them, for `role`.
    ///
    /// # Errors
    /// A message naming the setting at fault.
    pub(crate) fn new(mut s: Settings, role: Role, args: &ServeArgs) -> Result<Plan, String> {
        apply_flags(&mut s, args);
        let dev = args.dev || (role == Role::Up && !args.production);
        let gateway_listen = addr("gateway.listen", &s.gateway.listen)?;
        let eventbus_listen = addr("eventbus.listen", &s.eventbus.listen)?;
        let bridge_listen = addr("agent_bridge.listen", &s.agent_bridge.listen)?;
        let bus_metrics_listen =
            s.eventbus.metrics_listen.as_deref().map(|a| addr("eventbus.metrics_listen", a)).transpose()?;
        let bridge_metrics_listen =
            s.agent_bridge.metrics_listen.as_deref().map(|a| addr("agent_bridge.metrics_listen", a)).transpose()?;
        let mut eventbus = eventbus_config(&s)?;
        check_positive(&s)?;
        let (keys, generated) = gateway_keys(&s, role, dev)?;
        let rules = access_rules(&s)?;
        let tls = tls_config(&s, role)?;
        let mut bridge = bridge_config(&s, eventbus_listen)?;
        let mut gateway = gateway_config(&s, keys, rules, eventbus_listen, bridge_listen);
        eventbus.tls = tls.eventbus;
        (bridge.tls, bridge.client_tls) = (tls.bridge, tls.client.clone());
        (gateway.tls, gateway.client_tls) = (tls.gateway, tls.client);
        Ok(Plan {
            role,
            dev,
            gateway_listen,
            eventbus_listen,
            bridge_listen,
            bus_metrics_listen,
            bridge_metrics_listen,
            gateway,
            local_bridge: s.gateway.agent_bridge_url.is_none(),
            local_bridge_bus: s.agent_bridge.eventbus_url.is_none(),
            bridge,
            local_bus: s.gateway.eventbus_url.is_none(),
            eventbus,
            admin_key_generated: generated.admin_key,
            dev_token: generated.token,
        })
    }
}

/// The gateway's keys and who may connect without a token.
struct GatewayKeys {
    admin_key: Option<String>,
    anonymous: bool,
    auth: switchboard_gateway::auth::AuthConfig,
}

/// What dev mode generated, for the startup lines to print.
struct Generated {
    admin_key: bool,
    /// A client token signed with the generated secret.
    token: Option<String>,
}

/// Who may subscribe and publish in each namespace, and call each method.
struct AccessRules {
    namespaces: HashMap<String, switchboard_gateway::Namespace>,
    rpc: HashMap<String, switchboard_gateway::Access>,
}

/// The TLS of each listener that runs (its files are read now, so that a
/// bad one exits 64 before anything is bound), and of the gRPC clients.
struct TlsConfigs {
    gateway: Option<switchboard_tls::ServerTls>,
    eventbus: Option<switchboard_tls::ServerTls>,
    bridge: Option<switchboard_tls::ServerTls>,
    client: Option<switchboard_tls::ClientTls>,
}

fn tls_config(s: &Settings, role: Role) -> Result<TlsConfigs, String> {
    let grpc = || vec![b"h2".to_vec()];
    let gateway = match role {
        Role::Up | Role::Gateway => {
            let g = &s.gateway;
            server_tls("gateway", &g.tls_cert, &g.tls_key, &None, vec![b"h2".to_vec(), b"http/1.1".to_vec()])?
        }
        _ => None,
    };
    let eventbus = match role {
        Role::Up | Role::Eventbus => {
            let e = &s.eventbus;
            server_tls("eventbus", &e.tls_cert, &e.tls_key, &e.tls_client_ca, grpc())?
        }
        _ => None,
    };
    let bridge = match role {
        Role::Up | Role::AgentBridge => {
            let b = &s.agent_bridge;
            server_tls("agent_bridge", &b.tls_cert, &b.tls_key, &b.tls_client_ca, grpc())?
        }
        _ => None,
    };
    Ok(TlsConfigs { gateway, eventbus, bridge, client: s.tls.client_config()? })
}

/// A listener's TLS from its `<section>.tls_*` settings: none, or both a
/// certificate and a key.
fn server_tls(
    section: &'static str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    client_ca: &Option<PathBuf>,
    alpn: Vec<Vec<u8>>,
) -> Result<Option<switchboard_tls::ServerTls>, String> {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (None, None) if client_ca.is_some() => {
            return Err(format!("{section}.tls_client_ca: needs {section}.tls_cert and {section}.tls_key"));
        }
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(format!("{section}.tls_key: required with {section}.tls_cert")),
        (None, Some(_)) => return Err(format!("{section}.tls_cert: required with {section}.tls_key")),
    };
    let files = switchboard_tls::ServerFiles { section, cert, key, client_ca: client_ca.clone(), alpn };
    switchboard_tls::ServerTls::load(files).map(Some).map_err(|e| e.to_string())
}

/// `https` for a local service that serves TLS, else `http`.
fn scheme(tls_cert: &Option<PathBuf>) -> &'static str {
    if tls_cert.is_some() { "https" } else { "http" }
}

/// Flags override the file and the environment.
fn apply_flags(s: &mut Settings, args: &ServeArgs) {
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
}

fn eventbus_config(s: &Settings) -> Result<switchboard_eventbus::Config, String> {
    let backend = match s.eventbus.backend.as_str() {
        "embedded" => switchboard_eventbus::Backend::Embedded,
        "memory" => switchboard_eventbus::Backend::Memory,
        "redis" => match &s.eventbus.redis_url {
            Some(url) => switchboard_eventbus::Backend::Redis { url: url.clone() },
            None => return Err("eventbus.redis_url: required by the redis backend (redis://HOST:PORT)".into()),
        },
        "nats" => match &s.eventbus.nats_url {
            Some(url) => switchboard_eventbus::Backend::Nats { url: url.clone() },
            None => return Err("eventbus.nats_url: required by the nats backend (nats://HOST:PORT)".into()),
        },
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
    let history = switchboard_eventbus::HistoryPolicy { size: l.history_size, ttl: l.history_ttl.0 };
    let mut namespaces: HashMap<String, switchboard_eventbus::HistoryPolicy> = s
        .namespaces
        .iter()
        .map(|(name, ns)| {
            let policy = switchboard_eventbus::HistoryPolicy {
                size: ns.history_size.unwrap_or(history.size),
                ttl: ns.history_ttl.map(|d| d.0).unwrap_or(history.ttl),
            };
            (name.clone(), policy)
        })
        .collect();
    // Threads on the bus (`agent_bridge.threads = "bus"`) are durable: their
    // channels keep the newest `agents.thread_max_messages` and do not age
    // out, unless configured otherwise.
    use switchboard_agent_bridge::threads::bus::{LOG_NAMESPACE, OWNER_NAMESPACE};
    let kept = |size: u64| switchboard_eventbus::HistoryPolicy { size, ttl: THREAD_TTL };
    namespaces.entry(LOG_NAMESPACE.into()).or_insert(kept(s.agents.thread_max_messages as u64));
    // Claims only: more than one only when users race to start a thread.
    namespaces.entry(OWNER_NAMESPACE.into()).or_insert(kept(16));
    Ok(switchboard_eventbus::Config {
        backend,
        data_dir: s.eventbus.data_dir.clone(),
        fsync,
        fsync_interval: s.eventbus.fsync_interval.0,
        cache_bytes: usize::try_from(s.eventbus.cache_bytes.0).unwrap_or(usize::MAX),
        max_event_bytes: l.max_event_bytes,
        recovery_max: l.recovery_max,
        max_stream_channels: l.max_stream_channels,
        history,
        namespaces,
        // A generated (dev) key guards only the HTTP admin API, so that
        // `switchboard publish` and producers work out of the box in dev.
        api_key: s.auth.admin_key.clone(),
        node: "eventbus".into(),
        ..switchboard_eventbus::Config::default()
    })
}

/// How long threads on the bus are kept: for good (ten years, which every
/// backend's expiry can represent).
const THREAD_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Refuses the limits and intervals that would stop everything at 0.
fn check_positive(s: &Settings) -> Result<(), String> {
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
    Ok(())
}

/// The admin key and the token keys; in dev mode the missing ones are
/// generated, with a client token for the developer.
fn gateway_keys(s: &Settings, role: Role, dev: bool) -> Result<(GatewayKeys, Generated), String> {
    let mut generated = Generated { admin_key: false, token: None };
    let admin_key = match s.auth.admin_key.clone() {
        Some(k) if k.len() < 16 => return Err("auth.admin_key: must be at least 16 characters".into()),
        Some(k) => Some(k),
        None if dev => {
            generated.admin_key = true;
            Some(random_key())
        }
        None => {
            return Err("auth.admin_key: required outside --dev (or set it with SWITCHBOARD_AUTH__ADMIN_KEY)".into());
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
            generated.token = switchboard_gateway::auth::mint_hs256(secret.as_bytes(), &claims).ok();
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
    Ok((GatewayKeys { admin_key, anonymous, auth }, generated))
}

fn access_rules(s: &Settings) -> Result<AccessRules, String> {
    let mut namespaces = HashMap::new();
    for (name, ns) in &s.namespaces {
        namespaces.insert(
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
                presence: ns.presence,
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
    Ok(AccessRules { namespaces, rpc })
}

fn bridge_config(s: &Settings, eventbus_listen: SocketAddr) -> Result<switchboard_agent_bridge::Config, String> {
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
    if s.agents.thread_max_messages == 0 {
        return Err("agents.thread_max_messages: must be greater than 0".into());
    }
    Ok(switchboard_agent_bridge::Config {
        data_dir: s.agent_bridge.data_dir.clone(),
        local_bus: None,
        threads: match s.agent_bridge.threads.as_str() {
            "local" => switchboard_agent_bridge::ThreadsAt::Local,
            "bus" => switchboard_agent_bridge::ThreadsAt::Bus,
            other => return Err(format!("agent_bridge.threads: {other:?} is not one of local, bus")),
        },
        eventbus_url: Some(
            s.agent_bridge
                .eventbus_url
                .clone()
                .unwrap_or_else(|| format!("{}://{eventbus_listen}", scheme(&s.eventbus.tls_cert))),
        ),
        api_key: s.auth.admin_key.clone(),
        default_agent: s.agents.default.clone(),
        echo_delay: Duration::from_millis(s.agents.echo.delay_ms),
        run_deadline: s.agents.run_deadline.0,
        max_enqueued: s.agents.max_enqueued,
        thread_max_messages: s.agents.thread_max_messages,
        shutdown_grace: s.gateway.shutdown_grace.0,
        openai,
        tls: None,
        client_tls: None,
    })
}

/// The gateway's config, from parts already checked: it is built last
/// because it may lower `max_connections`, with a warning, only once the
/// whole configuration is known to be valid.
fn gateway_config(
    s: &Settings,
    keys: GatewayKeys,
    rules: AccessRules,
    eventbus_listen: SocketAddr,
    bridge_listen: SocketAddr,
) -> switchboard_gateway::Config {
    let l = &s.limits;
    switchboard_gateway::Config {
        node: s.gateway.node.clone().unwrap_or_else(|| "gateway".into()),
        local_bus: None,
        eventbus_urls: match &s.gateway.eventbus_url {
            Some(urls) => urls.0.clone(),
            None => vec![format!("{}://{eventbus_listen}", scheme(&s.eventbus.tls_cert))],
        },
        agent_bridge_urls: match &s.gateway.agent_bridge_url {
            Some(urls) => urls.0.clone(),
            None => vec![format!("{}://{bridge_listen}", scheme(&s.agent_bridge.tls_cert))],
        },
        admin_key: keys.admin_key,
        anonymous: keys.anonymous,
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
        namespaces: rules.namespaces,
        rpc: rules.rpc,
        default_channels: s.gateway.default_channels.clone(),
        allowed_origins: s.gateway.allowed_origins.clone(),
        auth: keys.auth,
        tls: None,
        client_tls: None,
    }
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
