//! The accept loop: TCP connections served by hyper with the router, each
//! bounded in time until its request is complete, and counted against
//! `max_connections` from the moment it is accepted (SPEC §9).
//!
//! `axum::serve` has no header read timeout and counts nothing, so a socket
//! that sends half a request and waits held a file descriptor forever. Here
//! hyper closes a connection whose headers are not complete within
//! `limits.header_timeout`; connections still in their HTTP phase are
//! counted (`Pending`), and one accepted past the limit is answered 503 at
//! once without reading anything.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Node;

/// Connections accepted whose HTTP phase has not ended (not yet upgraded to
/// a WebSocket, nor closed).
#[derive(Debug, Default)]
pub struct Pending(AtomicUsize);

impl Pending {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>) -> PendingGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        PendingGuard(self.clone())
    }
}

/// One pending connection; dropped when its HTTP phase ends.
struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection accepted past `max_connections` is told before it is closed.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 84\r\n\r\n{\"error\":{\"code\":\"limit_exceeded\",\"message\":\"this node is at its connection limit\"}}";

/// Serves `app` on `listener` until `stop` is cancelled, then waits for
/// requests in flight (upgraded WebSockets are the sessions' business,
/// tracked by the node); the caller bounds that wait.
pub async fn run(listener: TcpListener, app: Router, node: Arc<Node>, stop: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(node.config.limits.header_timeout);
    builder.http2().timer(TokioTimer::new()).enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    let max = node.config.limits.max_connections;
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most often: let some close.
                    tracing::warn!(cause = %e, "accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if node.open_connections() >= max {
            // Best effort, without waiting: the socket's buffer takes this.
            let _ = tcp.try_write(FULL);
            continue;
        }
        // Frames are small and written as they come: Nagle's algorithm would
        // hold each one back until the client acknowledged the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(cause = %e, "cannot set TCP_NODELAY");
        }
        let guard = node.pending.enter();
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(cause = %e, "connection ended with an error");
            }
            drop(guard);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
