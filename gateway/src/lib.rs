//! The Switchboard gateway: browsers' WebSockets and the HTTP API, in front of
//! the event bus and the agent bridge.
//!
//! # Layout
//! - `Node` (here): owns the hub, the bus nodes and link, the bridge client,
//!   metrics and the shutdown machinery; `serve` runs one.
//! - `server`: the accept loop, with header deadlines and the count of
//!   connections still in their HTTP phase.
//! - `hub`: which connection listens to which channel, and each channel's one
//!   bus subscription; fan-out that writes each event frame once.
//! - `bus`, `bridge`: the event bus and the agent bridge as the rest of the
//!   gateway calls them, in domain terms; `error`: what a failed call tells
//!   the client.
//! - `link`: the gRPC stream to the bus, with relinking and resubscription.
//! - `session`: one connection's protocol state machine; `agent`: its agent
//!   frames; `auth`, `jwks`: token checks and keys.
//! - `queue`: the byte-bounded outbound queue of a connection.
//! - `protocol`: browser JSON frames (never the proto structs).
//! - `http`: the router: WebSocket endpoints and the HTTP API; `console`:
//!   the embedded console page.
//! - `config`, `disconnect`, `metrics`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub mod agent;
pub mod auth;
pub mod bridge;
pub mod bus;
pub mod config;
mod console;
pub mod disconnect;
pub mod error;
mod http;
pub mod hub;
pub mod jwks;
pub mod link;
pub mod metrics;
pub mod protocol;
pub mod queue;
pub mod server;
mod session;

pub use config::{Access, Config, Limits, Namespace};

/// One gateway node.
pub struct Node {
    pub config: Config,
    pub hub: Arc<hub::Hub>,
    pub bus: Arc<bus::BusNodes>,
    /// The agent bridges, when configured.
    pub bridge: Option<bridge::Bridge>,
    pub metrics: Arc<metrics::Metrics>,
    /// Cancelled when shutdown begins: runs started here are cancelled (and
    /// their last events still delivered), and no new run starts.
    pub draining: CancellationToken,
    /// Cancelled once runs are done or the first half of the grace period
    /// is over: sessions say goodbye and close.
    pub shutdown: CancellationToken,
    /// Tracks every task a session starts (runs, calls, publishes,
    /// recoveries), so that shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Tracks every session task, which axum's graceful shutdown does not.
    pub sessions: TaskTracker,
    /// Connections accepted and still in their HTTP phase.
    pub pending: Arc<server::Pending>,
    shutting_down: AtomicBool,
}

impl Node {
    /// Whether this node should get traffic: linked to the bus and not shutting down.
    pub fn ready(&self) -> bool {
        self.hub.link_is_up() && !self.shutting_down.load(Ordering::Acquire)
    }

    /// Connections that count against `max_connections`: sessions, and
    /// connections that have not finished their request yet.
    pub fn open_connections(&self) -> usize {
        self.hub.connection_count() + self.pending.count()
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
    let bus = Arc::new(bus::BusNodes::new(
        &config.eventbus_urls,
        config.local_bus.clone(),
        config.admin_key.as_deref(),
        config.client_tls.as_ref(),
    )?);
    let bridge = match config.agent_bridge_urls.as_slice() {
        [] => None,
        urls => {
            Some(bridge::Bridge::new(urls, config.admin_key.as_deref(), config.client_tls.as_ref(), Some(bus.clone()))?)
        }
    };
    let metrics = Arc::new(metrics::Metrics::new());
    // Room for a burst of joins and leaves; the hub answers `unavailable` past it.
    let (link_tx, link_rx) = mpsc::channel(65_536);
    let hub = hub::Hub::new(link_tx, config.limits.recovery_max, config.limits.max_subscriptions, metrics.clone())
        .with_presence(&config.node, config.presence_namespaces());
    let hub = Arc::new(hub);
    let grace = config.shutdown_grace;
    let node = Arc::new(Node {
        config,
        hub: hub.clone(),
        bus: bus.clone(),
        bridge,
        metrics: metrics.clone(),
        draining: CancellationToken::new(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        sessions: TaskTracker::new(),
        pending: Arc::default(),
        shutting_down: AtomicBool::new(false),
    });
    let link_stop = CancellationToken::new();
    let link = tokio::spawn(link::run(hub, bus, link_rx, metrics, link_stop.clone()));
    if let Some(jwks) = node.config.auth.jwks.clone() {
        tokio::spawn(jwks.run(link_stop.clone()));
    }

    let app = http::router(node.clone());
    let accepting = CancellationToken::new();
    let server = tokio::spawn(server::run(listener, app, node.clone(), accepting.clone()));
    shutdown.await;

    // Shutdown (SPEC §11), within `grace`: readiness goes false and nothing
    // new is accepted; runs started here are cancelled and their repaired
    // ends delivered; then every connection gets `disconnect` and `1001`
    // after what is queued for it.
    let deadline = tokio::time::Instant::now() + grace;
    node.shutting_down.store(true, Ordering::Release);
    accepting.cancel();
    node.draining.cancel();
    node.tasks.close();
    if tokio::time::timeout_at(deadline - grace / 2, node.tasks.wait()).await.is_err() {
        tracing::warn!(remaining = node.tasks.len(), "runs and calls still going at half the grace period");
    }
    node.shutdown.cancel();
    node.sessions.close();
    // The server does not wait for upgraded connections: the tracker does.
    if tokio::time::timeout_at(deadline, node.sessions.wait()).await.is_err() {
        tracing::warn!(remaining = node.sessions.len(), "shutdown grace period ran out");
    }
    match tokio::time::timeout_at(deadline, server).await {
        Ok(_) => {}
        Err(_) => tracing::warn!("HTTP requests still in flight when the grace period ran out"),
    }
    link_stop.cancel();
    let _ = link.await;
    Ok(())
}
