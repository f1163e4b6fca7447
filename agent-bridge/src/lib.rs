//! The Switchboard agent bridge: runs of agents on threads, streamed as
//! AG-UI events (`switchboard.agent.v1.AgentBridge`).
//!
//! # Layout
//! - `runs`: the core: one run per thread, cancellation, deadlines, events
//!   numbered and published to the thread's channel, commands (its own
//!   `# Layout` lists its parts).
//! - `agui`: AG-UI ordering rules and the repair of a broken run.
//! - `echo`: the built-in `echo` agent.
//! - `threads`: durable thread storage, bounded: one row per message in the
//!   bridge's redb file, or (`threads::bus`) one event per message on the
//!   bus, where every bridge reads them.
//! - `service`: the tonic service; with `runs::bus` (bus messages), the only
//!   modules that build or read proto messages.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::{future::Future, path::PathBuf, time::Duration};

use tokio::net::TcpListener;

pub mod agui;
pub mod echo;
pub mod metrics;
pub mod openai;
pub mod runs;
pub mod service;
pub mod threads;
pub mod workers;

pub use runs::{Bridge, BridgeError, RunSpec};

/// Who a call or a cancel acts for: a user with its roles, or a service.
///
/// A service (empty `user_id`) reached the bridge with the admin key when one
/// is configured, so it may act for anyone and sees everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub roles: Vec<String>,
}

impl Caller {
    /// A service acting for anyone.
    pub fn service() -> Self {
        Caller::default()
    }

    pub fn is_service(&self) -> bool {
        self.user_id.is_empty()
    }

    /// Whether node-wide state (counts, workers) may be shown.
    pub fn is_admin(&self) -> bool {
        self.is_service() || self.roles.iter().any(|r| r == "admin")
    }
}

/// Where a bridge keeps its threads (`agent_bridge.threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadsAt {
    /// `threads.redb` in `data_dir`: for a bridge that serves every thread alone.
    #[default]
    Local,
    /// Channels on the event bus: for several bridges, any of which may
    /// serve a thread (SPEC §10).
    Bus,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where threads are kept with `ThreadsAt::Local`.
    pub data_dir: PathBuf,
    /// Where threads are kept: this bridge's file, or the bus.
    pub threads: ThreadsAt,
    /// The event bus, for thread channels and status events; none runs without.
    pub eventbus_url: Option<String>,
    /// The bus's service in this process (`switchboard up`): when set, the
    /// bridge calls it in place of `eventbus_url`, with no socket between.
    pub local_bus: Option<switchboard_proto::client::BusTransport>,
    /// Required from callers as `authorization: Bearer <key>`, and sent to the bus.
    pub api_key: Option<String>,
    /// The agent `default` names.
    pub default_agent: String,
    /// The echo agent's pace, one word per this.
    pub echo_delay: Duration,
    /// Each run's deadline.
    pub run_deadline: Duration,
    /// Most runs waiting for one thread (`agents.max_enqueued`).
    pub max_enqueued: usize,
    /// Messages each thread keeps, the newest (`agents.thread_max_messages`):
    /// older ones are dropped, and an agent gets at most this many.
    pub thread_max_messages: usize,
    /// How long shutdown waits for cancelled runs to end.
    pub shutdown_grace: Duration,
    /// The `openai` agent, when configured.
    pub openai: Option<openai::OpenAiConfig>,
    /// gRPC over TLS (`agent_bridge.tls_cert`, `agent_bridge.tls_key`),
    /// requiring client certificates with `agent_bridge.tls_client_ca`.
    pub tls: Option<switchboard_tls::ServerTls>,
    /// For an `https://` bus URL: the CA that signs it and the certificate
    /// presented to it (`tls.*`).
    pub client_tls: Option<switchboard_tls::ClientTls>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            threads: ThreadsAt::Local,
            eventbus_url: Some("http://127.0.0.1:50051".into()),
            local_bus: None,
            api_key: None,
            default_agent: "echo".into(),
            echo_delay: Duration::from_millis(20),
            run_deadline: Duration::from_secs(300),
            max_enqueued: 16,
            thread_max_messages: threads::DEFAULT_MAX_MESSAGES,
            shutdown_grace: Duration::from_secs(10),
            openai: None,
            tls: None,
            client_tls: None,
        }
    }
}

/// Opens the thread store and builds the bridge, binding nothing.
///
/// # Errors
/// When the thread store or the bus URL is unusable, or threads are to be
/// on the bus and there is none.
pub fn open(config: Config) -> Result<Bridge, Box<dyn std::error::Error + Send + Sync>> {
    let key = || switchboard_proto::auth::BearerKey::new(config.api_key.as_deref());
    let bus = match (&config.local_bus, &config.eventbus_url) {
        (Some(local), _) => Some(switchboard_proto::client::bus_over(local.clone(), key()?)),
        (None, Some(url)) => Some(switchboard_proto::client::bus(url, key()?, config.client_tls.as_ref())?),
        (None, None) => None,
    };
    let threads = match (config.threads, &bus) {
        (ThreadsAt::Local, _) => threads::Threads::open(&config.data_dir, config.thread_max_messages)?.into(),
        (ThreadsAt::Bus, Some(bus)) => {
            threads::ThreadStore::Bus(threads::bus::BusThreads::new(bus.clone(), config.thread_max_messages))
        }
        (ThreadsAt::Bus, None) => return Err("agent_bridge.threads: \"bus\" needs agent_bridge.eventbus_url".into()),
    };
    let openai = match &config.openai {
        Some(c) => Some(openai::OpenAi::new(c.clone())?),
        None => None,
    };
    Ok(Bridge::new(config, threads, bus, openai))
}

/// Serves the agent bridge on `listener` until `shutdown` completes.
///
/// # Errors
/// When the bridge cannot be opened or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let key = config.api_key.clone();
    let bridge = open(config)?;
    serve_bridge(bridge, key, listener, shutdown).await?;
    Ok(())
}

/// Serves an opened bridge.
pub async fn serve_bridge(
    bridge: Bridge,
    key: Option<String>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    use switchboard_proto::agent::v1::{
        agent_bridge_server::AgentBridgeServer, agent_worker_server::AgentWorkerServer,
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AgentBridgeServer<service::AgentBridgeService>>().await;
    reporter.set_serving::<AgentWorkerServer<service::AgentWorkerService>>().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let grace = bridge.shutdown_grace();
    tokio::spawn(bridge.clone().heartbeats(stop.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are built by the proto crate");
    let tls = bridge.server_tls();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(service::with_key(service::AgentBridgeService::new(bridge.clone()), key.clone()))
        .add_service(service::worker_with_key(service::AgentWorkerService::new(bridge.clone(), stop.clone()), key));
    let signal = async move {
        shutdown.await;
        // Runs first, while workers and the bus still answer.
        bridge.drain(grace).await;
        // Attached workers and the heartbeat task end here.
        stop.cancel();
    };
    match tls {
        Some(tls) => {
            let incoming = switchboard_tls::incoming(listener, tls, TLS_HANDSHAKE_TIMEOUT);
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
    }
}

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (Prometheus text) for the bridge until `shutdown`.
///
/// # Errors
/// When the listener fails.
pub async fn serve_metrics(
    bridge: Bridge,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    switchboard_metrics::serve(listener, move || bridge.metrics().render(), shutdown).await
}
