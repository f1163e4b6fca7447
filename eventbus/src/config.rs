//! Configuration of the event bus: pure data, validated by the binary.

use std::{collections::HashMap, path::PathBuf, time::Duration};

/// Where events are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Process memory; history is lost (and the epoch changes) on restart.
    Memory,
    /// A durable log in `data_dir`, on redb.
    Embedded,
    /// Shared by every bus node on the same Redis: streams, a Lua script, Pub/Sub.
    Redis { url: String },
    /// Shared by every bus node on the same NATS JetStream: a stream per channel.
    Nats { url: String },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Embedded => "embedded",
            Backend::Redis { .. } => "redis",
            Backend::Nats { .. } => "nats",
        }
    }
}

/// When the embedded backend syncs to disk before acknowledging a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Acknowledge after the data is synced; concurrent publishes share a sync.
    Always,
    /// Gather publishes for `fsync_interval`, sync once, then acknowledge them.
    Batch,
    /// Never sync explicitly: a crash of the machine may lose acknowledged events.
    Never,
}

/// History bounds of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Events kept per channel.
    pub size: u64,
    /// Age after which events are dropped.
    pub ttl: Duration,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        HistoryPolicy { size: 1000, ttl: Duration::from_secs(24 * 3600) }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    pub fsync_interval: Duration,
    /// The embedded store's page cache, in bytes.
    pub cache_bytes: usize,
    /// Largest event (name, data and meta), in bytes.
    pub max_event_bytes: usize,
    /// Most events replayed by a recovering subscription.
    pub recovery_max: u64,
    /// Most channels one `Subscribe` stream may hold.
    pub max_stream_channels: usize,
    /// Bounds of channels whose namespace is not in `namespaces`.
    pub history: HistoryPolicy,
    /// Bounds per namespace (`task` for `task:42`).
    pub namespaces: HashMap<String, HistoryPolicy>,
    /// Admin key required as `authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Name of this node in `Info`.
    pub node: String,
    /// gRPC over TLS (`eventbus.tls_cert`, `eventbus.tls_key`), requiring
    /// client certificates with `eventbus.tls_client_ca`.
    pub tls: Option<switchboard_tls::ServerTls>,
    /// How long a presence entry lives in a shared backend without being
    /// refreshed: the entries of a bus node that vanished without removing
    /// them are gone after this (SPEC §6: 30 s). Not a setting; tests shorten it.
    pub presence_ttl: Duration,
    /// How often a bus node refreshes the presence entries it owns in a
    /// shared backend: well within `presence_ttl`, so that a live node's
    /// entries never expire between two refreshes.
    pub presence_refresh: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Embedded,
            data_dir: PathBuf::from("./data"),
            fsync: Fsync::Always,
            fsync_interval: Duration::from_millis(2),
            cache_bytes: 64 << 20,
            max_event_bytes: 1024 * 1024,
            recovery_max: 1000,
            max_stream_channels: 100_000,
            history: HistoryPolicy::default(),
            namespaces: HashMap::new(),
            api_key: None,
            node: "eventbus".to_owned(),
            tls: None,
            presence_ttl: Duration::from_secs(30),
            presence_refresh: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// A memory-backed configuration, as unit tests and dev tools use.
    pub fn memory() -> Self {
        Config { backend: Backend::Memory, ..Config::default() }
    }

    /// Returns the history bounds of a channel.
    pub fn history_of(&self, channel: &str) -> HistoryPolicy {
        let ns = switchboard_proto::channel::namespace(channel);
        self.namespaces.get(ns).copied().unwrap_or(self.history)
    }
}
