//! Configuration of the gateway: pure data; the binary loads and checks it.

use std::{collections::HashMap, time::Duration};

/// Every limit of SPEC §9 that the gateway enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest text frame; bigger ones close the connection with `1009`.
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    /// Connections on this node; more get HTTP 503 before the upgrade.
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// Frames per second a client may send, and the burst above it.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Protocol errors per minute before closing with `4501`.
    pub protocol_errors_per_minute: usize,
    /// Bytes queued for a connection before it is closed with `4002`.
    pub outbound_queue_bytes: usize,
    /// Most events replayed to a recovering client.
    pub recovery_max: u64,
    /// How long a connection may take to send its request headers, and then
    /// its body; it is closed after that.
    pub header_timeout: Duration,
    /// How long a connection's socket may accept none of its queued frames
    /// before the connection is closed and dropped.
    pub write_timeout: Duration,
    /// How long a subscribe waits for the bus link (at start, or during a
    /// relink) before it is answered `unavailable`.
    pub link_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_subscriptions: 128,
            max_connections: 10_000,
            max_connections_per_user: 16,
            rate_per_second: 100,
            rate_burst: 200,
            protocol_errors_per_minute: 10,
            outbound_queue_bytes: 1024 * 1024,
            recovery_max: 1000,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            link_wait: Duration::from_secs(5),
        }
    }
}

/// Who may do something in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    None,
    Anonymous,
    Authenticated,
    Roles(Vec<String>),
}

/// Rules of one namespace (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub subscribe: Access,
    /// Client publishing; off unless a namespace allows it.
    pub publish: Access,
    /// Whether its channels list who is subscribed, across nodes, and send
    /// `join` and `leave` events to their subscribers.
    pub presence: bool,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace { subscribe: Access::Anonymous, publish: Access::None, presence: false }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Name of this node in frames and stats.
    pub node: String,
    /// Event bus nodes, such as `http://127.0.0.1:50051`: the link uses the
    /// first that answers, and the next one when it is lost.
    pub eventbus_urls: Vec<String>,
    /// The bus's service in this process (`switchboard up`): when set, the
    /// gateway calls it in place of `eventbus_urls`, with no socket between.
    pub local_bus: Option<switchboard_proto::client::BusTransport>,
    /// Agent bridges, such as `http://127.0.0.1:50052`: each thread's runs
    /// go to one of them, by rendezvous hashing on the thread id, and to the
    /// next when it cannot be reached. Without any, agent frames answer
    /// `unavailable`.
    pub agent_bridge_urls: Vec<String>,
    /// Key for the admin HTTP API, also sent to the bus as a bearer token.
    pub admin_key: Option<String>,
    /// Whether connections without a token are let in.
    pub anonymous: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long shutdown waits for connections to flush and close.
    pub shutdown_grace: Duration,
    pub limits: Limits,
    /// Rules by namespace; others get `Namespace::default()`.
    pub namespaces: HashMap<String, Namespace>,
    /// Who may call each RPC method (`rpc.<method>`); others get
    /// `Config::rpc_access`'s default.
    pub rpc: HashMap<String, Access>,
    /// Channels every connection is subscribed to on open, once it may
    /// (SPEC §3.5); those its namespace refuses it are skipped.
    pub default_channels: Vec<String>,
    /// Origins allowed to open WebSockets and call the API: exact origins,
    /// `scheme://host:*` for any port, or `*` for any origin. Requests without
    /// an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    /// How tokens are checked.
    pub auth: crate::auth::AuthConfig,
    /// With a certificate and key (`gateway.tls_cert`, `gateway.tls_key`),
    /// the listener serves HTTPS and WSS only; `ServerTls::reload` reads
    /// them again for new connections.
    pub tls: Option<switchboard_tls::ServerTls>,
    /// For `https://` bus and bridge URLs: the CA that signs them and the
    /// certificate presented to them (`tls.*`).
    pub client_tls: Option<switchboard_tls::ClientTls>,
}

/// The namespaces of the agent bridges' threads on the bus (the bridge's
/// `threads::bus::{OWNER_NAMESPACE, LOG_NAMESPACE}`; the gateway does not
/// depend on the bridge, so they are named again here).
pub const BRIDGE_NAMESPACES: [&str; 2] = ["thread_owner", "thread_log"];

/// The default allowed origins: pages served from this machine.
pub fn localhost_origins() -> Vec<String> {
    ["http://localhost:*", "http://127.0.0.1:*", "https://localhost:*", "https://127.0.0.1:*"]
        .map(String::from)
        .to_vec()
}

/// Whether `origin` matches one of `allowed`.
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|pattern| {
        pattern == "*"
            || pattern == origin
            || pattern.strip_suffix(":*").is_some_and(|base| {
                origin == base
                    || origin
                        .strip_prefix(base)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            })
    })
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: "gateway".to_owned(),
            eventbus_urls: vec!["http://127.0.0.1:50051".to_owned()],
            local_bus: None,
            agent_bridge_urls: Vec::new(),
            admin_key: None,
            anonymous: true,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
            namespaces: HashMap::new(),
            rpc: HashMap::new(),
            default_channels: Vec::new(),
            allowed_origins: localhost_origins(),
            auth: crate::auth::AuthConfig::none(),
            tls: None,
            client_tls: None,
        }
    }
}

impl Config {
    /// The namespaces with `presence = true`.
    pub fn presence_namespaces(&self) -> std::collections::HashSet<String> {
        self.namespaces.iter().filter(|(_, ns)| ns.presence).map(|(name, _)| name.clone()).collect()
    }

    /// The rules of `channel`'s namespace. The agent bridges' thread store
    /// (`thread_owner`, `thread_log`) is never open to clients, whatever
    /// is configured: its channels are how bridges share threads.
    pub fn namespace(&self, channel: &str) -> Namespace {
        let ns = switchboard_proto::channel::namespace(channel);
        if BRIDGE_NAMESPACES.contains(&ns) {
            return Namespace { subscribe: Access::None, publish: Access::None, presence: false };
        }
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }

    /// Who may call `method` (SPEC §7.5): as configured; otherwise everyone
    /// where anonymous connections are allowed (dev), else `module_control`
    /// needs the `admin` role and every other method a token.
    pub fn rpc_access(&self, method: &str) -> Access {
        if let Some(access) = self.rpc.get(method) {
            return access.clone();
        }
        match method {
            _ if self.anonymous => Access::Anonymous,
            "module_control" => Access::Roles(vec!["admin".to_owned()]),
            _ => Access::Authenticated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_defaults_follow_the_mode_unless_configured() {
        let production = Config { anonymous: false, ..Config::default() };
        assert_eq!(production.rpc_access("module_control"), Access::Roles(vec!["admin".into()]));
        assert_eq!(production.rpc_access("get_status"), Access::Authenticated);
        assert_eq!(production.rpc_access("a_worker_method"), Access::Authenticated);
        let dev = Config::default();
        assert_eq!(dev.rpc_access("module_control"), Access::Anonymous);
        let configured = Config {
            rpc: HashMap::from([("get_status".to_owned(), Access::Roles(vec!["ops".into()]))]),
            ..Config::default()
        };
        assert_eq!(configured.rpc_access("get_status"), Access::Roles(vec!["ops".into()]));
    }

    #[test]
    fn the_bridges_thread_store_is_closed_to_clients_whatever_is_configured() {
        let open = Namespace { subscribe: Access::Anonymous, publish: Access::Anonymous, presence: false };
        let config =
            Config { namespaces: HashMap::from([("thread_log".to_owned(), open.clone())]), ..Config::default() };
        for channel in ["thread_log:t#alice", "thread_owner:t"] {
            let ns = config.namespace(channel);
            assert_eq!((ns.subscribe, ns.publish), (Access::None, Access::None), "{channel}");
        }
        assert_eq!(config.namespace("thread:t#alice").subscribe, Access::Anonymous);
    }

    #[test]
    fn origins_match_exactly_or_by_port_wildcard() {
        let allowed = localhost_origins();
        assert!(origin_allowed(&allowed, "http://localhost:3000"));
        assert!(origin_allowed(&allowed, "http://localhost"));
        assert!(origin_allowed(&allowed, "https://127.0.0.1:8443"));
        assert!(!origin_allowed(&allowed, "http://localhost.evil.com"));
        assert!(!origin_allowed(&allowed, "http://localhost:80.evil.com"));
        assert!(!origin_allowed(&allowed, "https://example.com"));
        assert!(origin_allowed(&["https://app.example.com".into()], "https://app.example.com"));
        assert!(origin_allowed(&["*".into()], "https://anything.example"));
    }
}
