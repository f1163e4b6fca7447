//! The Switchboard event bus: channels of ordered, offset-numbered events,
//! served over gRPC (`switchboard.eventbus.v1.EventBus`).
//!
//! # Layout
//! - `event`: what flows through: events, positions, publish answers.
//! - `channel`: each channel's position, subscribers and waiting joins, and
//!   the registry of them.
//! - `bus`: the core: publishing, joins with recovery, a shared backend's
//!   feed, history.
//! - `writer`: the one thread that numbers, commits and announces events of
//!   the local engine (`memory`, `embedded`).
//! - `store`: the storage trait and its `memory` and `embedded` backends.
//! - `broker`: the seam of the shared engines, and the record they keep.
//! - `redis`: the shared engine on Redis (streams, a Lua script, Pub/Sub).
//! - `nats`: the shared engine on NATS JetStream (a stream per channel).
//! - `presence`: who is subscribed to a channel across nodes, and its
//!   `join`/`leave` events; kept in process, or in a shared engine's store.
//! - `service`: the tonic service, the only module that sees proto types.
//! - `config`, `error`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod broker;
pub mod bus;
mod channel;
pub mod config;
pub mod error;
mod event;
pub mod metrics;
mod nats;
mod presence;
mod redis;
mod service;
pub mod store;
mod writer;

pub use bus::Bus;
pub use channel::Delivery;
pub use config::{Backend, Config, Fsync, HistoryPolicy};
pub use error::{BusError, StoreError};
pub use event::{Event, NewEvent, Position, Published};
pub(crate) use event::{IDEMPOTENCY_WINDOW, now_ms};
pub use presence::PresenceEntry;
pub use service::in_process;

/// Opens the configured store (or connects to the shared backend) and
/// returns a running bus core, without binding anything. The writer thread
/// or the backend's tasks run until `stop` is awaited.
///
/// # Errors
/// When the data directory cannot be opened, or another process holds it;
/// when the shared backend cannot be reached.
pub async fn open(config: Config) -> Result<(Bus, BusHandle), StoreError> {
    let store: Arc<dyn store::Store> = match &config.backend {
        Backend::Memory => Arc::new(store::memory::MemoryStore::new()),
        Backend::Embedded => {
            Arc::new(store::embedded::EmbeddedStore::open(&config.data_dir, config.fsync, config.cache_bytes)?)
        }
        Backend::Redis { url } => {
            let url = url.clone();
            let (bus, tasks) = redis::open(config, &url).await?;
            return Ok((bus.clone(), BusHandle { bus, thread: None, tasks: Some(tasks) }));
        }
        Backend::Nats { url } => {
            let url = url.clone();
            let (bus, tasks) = nats::open(config, &url).await?;
            return Ok((bus.clone(), BusHandle { bus, thread: None, tasks: Some(tasks) }));
        }
    };
    let channels = store.channels()?;
    let (bus, rx) = Bus::local(config, store.clone());
    for meta in channels {
        bus.shared.channels.restore(meta.channel, meta.top, meta.first);
    }
    let (channels, config, epoch) = (bus.shared.channels.clone(), bus.config().clone(), bus.shared.epoch.clone());
    let thread = std::thread::Builder::new()
        .name("eventbus-writer".into())
        .spawn(move || writer::run(channels, config, epoch, store, rx))
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok((bus.clone(), BusHandle { bus, thread: Some(thread), tasks: None }))
}

/// Owns the writer thread, or the shared backend's tasks, of a bus opened with `open`.
pub struct BusHandle {
    bus: Bus,
    thread: Option<std::thread::JoinHandle<()>>,
    tasks: Option<broker::Tasks>,
}

impl BusHandle {
    /// Finishes queued writes, stops the writer (or the backend's tasks) and waits for it.
    pub async fn stop(mut self) {
        if let Some((writer, _)) = self.bus.local_parts() {
            let _ = writer.send(writer::WriteRequest::Stop).await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(tasks) = self.tasks.take() {
            tasks.stop().await;
        }
    }
}

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the event bus on `listener` until `shutdown` completes.
///
/// # Errors
/// When the store cannot be opened or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (bus, handle) = open(config).await?;
    serve_bus(bus.clone(), listener, shutdown).await?;
    handle.stop().await;
    Ok(())
}

/// Serves an opened bus; `serve` is this plus `open` and `stop`.
pub async fn serve_bus(
    bus: Bus,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let token = CancellationToken::new();
    let expiry = tokio::spawn(expire_every_second(bus.clone(), token.clone()));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<switchboard_proto::eventbus::v1::event_bus_server::EventBusServer<service::EventBusService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are built by the proto crate");
    let api_key = bus.config().api_key.clone();
    let tls = bus.config().tls.clone();
    let svc = service::EventBusService::new(bus, token.clone());
    let stop = token.clone();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(service::with_key(svc, api_key));
    let signal = async move {
        shutdown.await;
        // Live subscription streams end here; otherwise they would hold the server open.
        stop.cancel();
    };
    let result = match tls {
        Some(tls) => {
            let incoming = switchboard_tls::incoming(listener, tls, TLS_HANDSHAKE_TIMEOUT);
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
    };
    token.cancel();
    let _ = expiry.await;
    result
}

/// Expires the local engine's events and idempotency keys (Redis expires its own).
async fn expire_every_second(bus: Bus, token: CancellationToken) {
    let Some((writer, _)) = bus.local_parts() else {
        return;
    };
    let writer = writer.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {
                if writer.send(writer::WriteRequest::Expire).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Serves `GET /metrics` (Prometheus text) for the bus until `shutdown`.
///
/// # Errors
/// When the listener fails.
pub async fn serve_metrics(
    bus: Bus,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    switchboard_metrics::serve(listener, move || bus.render_metrics(), shutdown).await
}
