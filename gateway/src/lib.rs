//! The Switchboard gateway: browsers' WebSockets and the HTTP API, in front of
//! the event bus (and, later, the agent bridge).
//!
//! # Layout
//! - `Node` (here): owns the hub, the bus client and link, metrics and the
//!   shutdown machinery; `serve` runs one.
//! - `hub`: which connection listens to which channel, and each channel's one
//!   bus subscription; fan-out that writes each event frame once.
//! - `link`: the gRPC stream to the bus, with relinking and resubscription.
//! - `session`: one connection's protocol state machine.
//! - `queue`: the byte-bounded outbound queue of a connection.
//! - `protocol`: browser JSON frames (never the proto structs).
//! - `http`: the router: WebSocket endpoints and the HTTP API.
//! - `config`, `disconnect`, `metrics`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::serve::ListenerExt;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub mod agent;
pub mod auth;
pub mod config;
pub mod disconnect;
mod http;
pub mod hub;
pub mod jwks;
pub mod link;
pub mod metrics;
pub mod protocol;
pub mod queue;
mod session;

pub use config::{Access, Config, Limits, Namespace};

/// One gateway node.
pub struct Node {
    pub config: Config,
    pub hub: Arc<hub::Hub>,
    pub bus: link::BusClient,
    /// The agent bridge, when configured.
    pub bridge: Option<link::BridgeClient>,
    pub metrics: Arc<metrics::Metrics>,
    /// Cancelled when shutdown begins: sessions say goodbye and close.
    pub shutdown: CancellationToken,
    /// Tracks every session task, which axum's graceful shutdown does not.
    pub sessions: TaskTracker,
    shutting_down: AtomicBool,
}

impl Node {
    /// Whether this node should get traffic: linked to the bus and not shutting down.
    pub fn ready(&self) -> bool {
        self.hub.link_is_up() && !self.shutting_down.load(Ordering::Acquire)
    }
}

/// Serves the gateway on `listener` until `shutdown` completes, then closes
/// every connection with `disconnect` and `1001` within the grace period.
///
/// # Errors
/// When the configuration is unusable or the listener fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let bus = link::client(&config.eventbus_url, config.admin_key.as_deref())?;
    let bridge = match &config.agent_bridge_url {
        Some(url) => Some(link::bridge_client(url, config.admin_key.as_deref())?),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    // Room for a burst of joins and leaves; the hub answers `unavailable` past it.
    let (link_tx, link_rx) = mpsc::channel(65_536);
    let hub =
        Arc::new(hub::Hub::new(link_tx, config.limits.recovery_max, config.limits.max_subscriptions, metrics.clone()));
    let grace = config.shutdown_grace;
    let node = Arc::new(Node {
        config,
        hub: hub.clone(),
        bus: bus.clone(),
        bridge,
        metrics: metrics.clone(),
        shutdown: CancellationToken::new(),
        sessions: TaskTracker::new(),
        shutting_down: AtomicBool::new(false),
    });
    let link_stop = CancellationToken::new();
    let link = tokio::spawn(link::run(hub, bus, link_rx, metrics, link_stop.clone()));
    if let Some(jwks) = node.config.auth.jwks.clone() {
        tokio::spawn(jwks.run(link_stop.clone()));
    }

    let app = http::router(node.clone());
    let stopping = node.clone();
    // Frames are small and written as they come: Nagle's algorithm would hold
    // each one back until the client acknowledged the previous one.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(cause = %e, "cannot set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.shutting_down.store(true, Ordering::Release);
            stopping.shutdown.cancel();
        })
        .await;
    // axum does not wait for upgraded connections: the tracker does.
    node.shutting_down.store(true, Ordering::Release);
    node.shutdown.cancel();
    node.sessions.close();
    if tokio::time::timeout(grace, node.sessions.wait()).await.is_err() {
        tracing::warn!(remaining = node.sessions.len(), "shutdown grace period ran out");
    }
    link_stop.cancel();
    let _ = link.await;
    result?;
    Ok(())
}
