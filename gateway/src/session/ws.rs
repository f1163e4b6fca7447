//! The WebSocket transport of a session (its read-error rule, writer ends
//! and bounded writes serve Socket.IO's WebSocket too): reads the client's messages into
//! it, watches the heartbeat, and runs the writer task that drains the
//! outbound queue into the socket and performs the closing handshake.

use std::{future::Future, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream::SplitSink};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::{Params, Session};
use crate::{Node, disconnect::Disconnect, protocol::ServerFrame, queue::Outbound};

/// The read buffer of a WebSocket, allocated for every connection up front:
/// tungstenite's default (128 KiB) would be most of an idle connection's
/// memory. Client frames are mostly small; bigger ones are read in pieces of
/// this size, up to `max_message_bytes`. Measured: 256 bytes brings an idle
/// connection to 5.8 KiB of RSS (BENCHMARKS.md).
pub(crate) const READ_BUFFER: usize = 256;

/// How much a connection's writer gathers before writing to the socket; the
/// buffer grows only while frames are waiting, and the writer flushes after
/// every batch it takes from the queue.
pub(crate) const WRITE_BUFFER: usize = 64 * 1024;

/// How long a closing connection's writer may take to flush before it is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// Runs a connection until it closes.
pub async fn run(node: Arc<Node>, socket: WebSocket, params: Params) {
    let id = Uuid::new_v4();
    let user = params.credentials.as_ref().map(|c| c.user_id.clone());
    let span = tracing::info_span!("connection", connection_id = %id, user_id = ?user);
    run_inner(node, socket, params, id).instrument(span).await
}

async fn run_inner(node: Arc<Node>, socket: WebSocket, params: Params, id: Uuid) {
    let limits = &node.config.limits;
    let queue = Arc::new(Outbound::new(limits.outbound_queue_bytes));
    let (sink, mut stream) = socket.split();
    let mut writer =
        tokio::spawn(write_loop(sink, queue.clone(), node.config.heartbeat_interval, limits.write_timeout));
    let mut session = Session::open(node.clone(), id, queue.clone(), params);

    let window = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let mut writer_done = None;
    let mut client_gone = false;
    while writer_done.is_none() {
        let open = queue.closing().is_none();
        let clock = session.clock();
        tokio::select! {
            reason = clock.fired(), if open => queue.close(reason),
            // Whatever closes it, a closing connection gets no more events
            // and leaves the stats and its channels now, not when its socket
            // has taken the rest (it may never).
            _ = queue.closed(), if open => node.hub.remove_connection(id),
            end = &mut writer => writer_done = Some(end.unwrap_or(WriterEnd::Broken)),
            _ = tokio::time::sleep_until(last_seen + window), if open => queue.close(Disconnect::NO_PONG),
            msg = stream.next(), if !client_gone => match msg {
                Some(Ok(msg)) => {
                    last_seen = Instant::now();
                    match msg {
                        Message::Text(text) => session.on_text(&text),
                        Message::Binary(_) => session.on_binary(),
                        Message::Ping(_) | Message::Pong(_) => {}
                        Message::Close(_) => {
                            queue.close(Disconnect::CLIENT_CLOSED);
                            client_gone = true;
                        }
                    }
                }
                Some(Err(err)) => {
                    client_gone = true;
                    if let Some(reason) = read_error(err) {
                        queue.close(reason);
                    }
                }
                None => client_gone = true,
            },
        }
        if client_gone && queue.closing().is_none() {
            // The peer left without a close we asked for: nothing more to send.
            break;
        }
    }
    let code = session.end();
    if writer_done.is_none() {
        if client_gone && queue.closing().is_none() {
            writer.abort();
        } else {
            // The writer has its own deadline per write, so this ends.
            writer_done = Some(writer.await.unwrap_or(WriterEnd::Broken));
        }
    }
    // A socket that took nothing is dropped now: no closing handshake.
    if !client_gone && writer_done == Some(WriterEnd::Closed) {
        // The closing handshake: read until the client's close, so that it
        // reads everything we sent before the socket goes away.
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    tracing::debug!(code, "connection closed");
}

/// The close a read error calls for (SPEC §9), when the socket can still
/// take one: a frame over the limit, invalid UTF-8 in a text frame, or a
/// WebSocket protocol violation. Other errors are a connection that broke.
pub(super) fn read_error(err: axum::Error) -> Option<Disconnect> {
    match err.into_inner().downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some(Disconnect::MESSAGE_TOO_BIG),
        tungstenite::Error::Utf8(_) => Some(Disconnect::INVALID_UTF8),
        tungstenite::Error::Protocol(_) => Some(Disconnect::PROTOCOL_VIOLATION),
        _ => None,
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriterEnd {
    /// It sent the `disconnect` and close frames.
    Closed,
    /// The socket broke, or took nothing for `write_timeout`.
    Broken,
}

/// Drains the queue into the socket, sends heartbeats, and sends the
/// `disconnect` frame and the close frame when the queue is closed. Every
/// write has `write_timeout` to complete: a socket that takes nothing for
/// that long is given up (SPEC §9), and dropping it closes the TCP connection.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    queue: Arc<Outbound>,
    interval: Duration,
    write_timeout: Duration,
) -> WriterEnd {
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = queue.notified() => {}
            _ = ping.tick() => {
                queue.push(Utf8Bytes::from(ServerFrame::Ping {}.to_json(None)));
                if !within(write_timeout, sink.feed(Message::Ping(Bytes::new()))).await {
                    return WriterEnd::Broken;
                }
            }
        }
        let drained = queue.drain();
        for frame in drained.frames {
            if !within(write_timeout, sink.feed(Message::Text(frame))).await {
                return WriterEnd::Broken;
            }
        }
        if drained.close == Some(Disconnect::CLIENT_CLOSED) {
            // Sends the answer to the client's close frame, queued by the socket.
            return if within(write_timeout, sink.close()).await { WriterEnd::Closed } else { WriterEnd::Broken };
        }
        if let Some(d) = drained.close {
            let bye = d.frame();
            let close = CloseFrame { code: d.code, reason: Utf8Bytes::from(d.reason) };
            let sent = within(write_timeout, sink.feed(Message::Text(bye.into()))).await
                && within(write_timeout, sink.send(Message::Close(Some(close)))).await;
            return if sent { WriterEnd::Closed } else { WriterEnd::Broken };
        }
        if !within(write_timeout, sink.flush()).await {
            return WriterEnd::Broken;
        }
    }
}

/// Whether a write completed, without error, within `limit`.
pub(super) async fn within(limit: Duration, write: impl Future<Output = Result<(), axum::Error>>) -> bool {
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}
