//! The accept loop: TCP connections served by hyper with the router, each
//! bounded in time until its request is complete, and counted against
//! `max_connections` from the moment it is accepted (SPEC §9).
//!
//! `axum::serve` has no header read timeout and counts nothing, so a socket
//! that sends half a request and waits held a file descriptor forever. Here
//! hyper closes a connection whose headers are not complete within
//! `limits.header_timeout`; connections still in their HTTP phase are
//! counted (`Pending`). When the limit is reached, the oldest connection
//! that has not sent a whole request yet is closed to make room: a client
//! that completes its request in time is served while thousands of sockets
//! sit half-sent. A connection that has sent one is never evicted (an
//! HTTP/2 connection carries its WebSocket sessions for its whole life).
//! Only when sessions alone fill the node is a connection answered 503 at
//! once, without reading anything.
//!
//! With `Config::tls`, each connection's TLS handshake runs in its task,
//! within the same header deadline and counted and evictable the same way;
//! it takes the certificate current when it starts, so a reload never
//! touches an open connection. A client that does not speak TLS fails the
//! handshake and is closed.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::{either::Either, sync::CancellationToken};

use crate::Node;

/// Connections accepted whose HTTP phase has not ended (not yet upgraded to
/// a WebSocket, nor closed), oldest first, each with the sender that closes it.
#[derive(Debug, Default)]
pub struct Pending {
    inner: Mutex<PendingInner>,
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    /// Those that have not sent a whole request yet, with what closes them.
    evictable: BTreeMap<u64, oneshot::Sender<()>>,
    /// Those that have.
    requested: HashSet<u64>,
}

impl Pending {
    pub fn count(&self) -> usize {
        let inner = self.inner.lock().expect("pending lock");
        inner.evictable.len() + inner.requested.len()
    }

    /// Registers a connection; the receiver fires when it is evicted.
    fn enter(self: &Arc<Self>) -> (PendingGuard, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("pending lock");
        let id = inner.next;
        inner.next += 1;
        inner.evictable.insert(id, tx);
        (PendingGuard { pending: self.clone(), id }, rx)
    }

    /// A connection sent a whole request: it is no longer evicted.
    fn requested(&self, id: u64) {
        let mut inner = self.inner.lock().expect("pending lock");
        if inner.evictable.remove(&id).is_some() {
            inner.requested.insert(id);
        }
    }

    /// Closes the oldest connection that has sent no whole request; false
    /// when there is none. It stops counting at once, before its task has run.
    fn evict_oldest(&self) -> bool {
        let oldest = self.inner.lock().expect("pending lock").evictable.pop_first();
        oldest.map(|(_, close)| close.send(())).is_some()
    }
}

/// What a request's handler may do with the connection that carries it
/// (a request extension): a Server-Sent Events stream is a session, counted
/// by the hub rather than as a pending connection, and when its socket takes
/// nothing for `limits.write_timeout` its TCP connection is dropped, as a
/// WebSocket's is.
#[derive(Clone)]
pub struct ConnectionControl {
    pending: Arc<Pending>,
    id: u64,
    drop: CancellationToken,
}

impl ConnectionControl {
    /// The connection is a session from now on: it no longer counts as pending.
    pub fn is_session(&self) {
        let mut inner = self.pending.inner.lock().expect("pending lock");
        inner.evictable.remove(&self.id);
        inner.requested.remove(&self.id);
    }

    /// Drops the TCP connection, whatever it is doing.
    pub fn abort(&self) {
        self.drop.cancel();
    }
}

/// One pending connection; dropped when its HTTP phase ends.
struct PendingGuard {
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut inner = self.pending.inner.lock().expect("pending lock");
        if inner.evictable.remove(&self.id).is_none() {
            inner.requested.remove(&self.id);
        }
    }
}

/// What a connection accepted past `max_connections` is told before it is closed.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 84\r\n\r\n{\"error\":{\"code\":\"limit_exceeded\",\"message\":\"this node is at its connection limit\"}}";

/// Serves `app` on `listener` until `stop` is cancelled, then waits for
/// requests in flight (upgraded WebSockets are the sessions' business,
/// tracked by the node); the caller bounds that wait.
pub async fn run(listener: TcpListener, app: Router, node: Arc<Node>, stop: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    let header_timeout = node.config.limits.header_timeout;
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new()).enable_connect_protocol();
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let max = node.config.limits.max_connections;
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = switchboard_tls::accept(&listener) => accepted,
        };
        if node.open_connections() >= max && !node.pending.evict_oldest() {
            tokio::spawn(refuse(tcp));
            continue;
        }
        // Frames are small and written as they come: Nagle's algorithm would
        // hold each one back until the client acknowledged the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(cause = %e, "cannot set TCP_NODELAY");
        }
        let (guard, evicted) = node.pending.enter();
        // The router, telling `Pending` when the connection's first request is whole.
        let (router, pending, id) = (TowerToHyperService::new(app.clone()), node.pending.clone(), guard.id);
        let abort = CancellationToken::new();
        let control = ConnectionControl { pending: pending.clone(), id, drop: abort.clone() };
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            pending.requested(id);
            request.extensions_mut().insert(control.clone());
            hyper::service::Service::call(&router, request)
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let tls = node.config.tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            let serve = async {
                let io = match tls {
                    None => Either::Left(tcp),
                    Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => Either::Right(stream),
                        Ok(Err(e)) => return tracing::debug!(cause = %e, "tls handshake failed"),
                        Err(_) => return tracing::debug!("tls handshake timed out"),
                    },
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::trace!(cause = %e, "connection ended with an error");
                }
            };
            tokio::select! {
                () = serve => {}
                // Dropping the connection closes its socket.
                Ok(()) = evicted => tracing::debug!("pending connection closed to make room"),
                () = abort.cancelled() => tracing::debug!("connection dropped by its session"),
            }
            drop(guard);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers 503 and closes. The request is read and discarded for a moment
/// first: closing a socket with unread data resets it, and the client would
/// see the reset instead of the answer.
async fn refuse(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Best effort, without waiting: the socket's buffer takes this.
    let _ = tcp.try_write(FULL);
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
