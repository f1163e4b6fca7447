//! One connection: its protocol state machine (SPEC §3), heartbeat, limits,
//! and the writer task that drains its outbound queue into the socket.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use switchboard_proto::eventbus::v1 as pb;

use crate::{
    Node,
    config::Access,
    disconnect::Disconnect,
    hub::{BROADCAST_CHANNEL, SubscribeError},
    link,
    metrics::CodeLabel,
    protocol::{self, ClientFrame, Request, Since},
    queue::Outbound,
};

/// Who is on the other end, as established before the upgrade.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub user_id: Option<String>,
    pub roles: Vec<String>,
    /// Subscribed on open (`/ws/channel/{channel}`, `/ws/tasks/{id}`).
    pub channel: Option<String>,
    pub since: Option<Since>,
}

/// Rate-limited frames in a row after which the connection is closed with `4006`.
const RATE_STRIKES: u32 = 10;

/// How long a closing connection's writer may take to flush before it is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

struct Session {
    node: Arc<Node>,
    id: Uuid,
    queue: Arc<Outbound>,
    params: Params,
    bucket: TokenBucket,
    strikes: u32,
    /// Times of recent protocol errors, for the per-minute budget.
    errors: VecDeque<Instant>,
}

/// Runs a connection until it closes.
pub async fn run(node: Arc<Node>, socket: WebSocket, params: Params) {
    let id = Uuid::new_v4();
    let span = tracing::info_span!("connection", connection_id = %id, user_id = ?params.user_id);
    run_inner(node, socket, params, id).instrument(span).await
}

async fn run_inner(node: Arc<Node>, socket: WebSocket, params: Params, id: Uuid) {
    let limits = node.config.limits.clone();
    let queue = Arc::new(Outbound::new(limits.outbound_queue_bytes));
    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(write_loop(
        sink,
        queue.clone(),
        node.config.heartbeat_interval,
    ));
    let mut session = Session {
        node: node.clone(),
        id,
        queue: queue.clone(),
        bucket: TokenBucket::new(limits.rate_per_second, limits.rate_burst),
        strikes: 0,
        errors: VecDeque::new(),
        params,
    };
    let registered = node.hub.add_connection(
        id,
        queue.clone(),
        session.params.user_id.clone(),
        limits.max_connections_per_user,
    );
    if registered {
        node.metrics.connections_accepted.inc();
        session.push(protocol::frame(
            "connected",
            None,
            json!({
                "connection_id": id,
                "user_id": session.params.user_id,
                "node": node.config.node,
                "heartbeat": {
                    "interval": node.config.heartbeat_interval.as_secs_f64(),
                    "timeout": node.config.heartbeat_timeout.as_secs_f64(),
                },
                "limits": {
                    "max_message_bytes": limits.max_message_bytes,
                    "max_subscriptions": limits.max_subscriptions,
                },
            }),
        ));
        if let Some(channel) = session.params.channel.take() {
            let since = session.params.since.take();
            session.subscribe(channel, since, None);
        }
    } else {
        queue.close(Disconnect::USER_LIMIT);
    }

    let window = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let mut writer_done = false;
    let mut client_gone = false;
    while !writer_done {
        let open = queue.closing().is_none();
        tokio::select! {
            _ = node.shutdown.cancelled(), if open => queue.close(Disconnect::SHUTDOWN),
            _ = &mut writer => writer_done = true,
            _ = tokio::time::sleep_until(last_seen + window), if open => queue.close(Disconnect::NO_PONG),
            msg = stream.next(), if !client_gone => match msg {
                Some(Ok(msg)) => {
                    last_seen = Instant::now();
                    if !session.on_message(msg) {
                        client_gone = true;
                    }
                }
                Some(Err(err)) => {
                    client_gone = true;
                    if too_big(err) {
                        queue.close(Disconnect::MESSAGE_TOO_BIG);
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
    node.hub.remove_connection(id);
    let code = queue.closing().map_or(1000, |d| d.code);
    node.metrics
        .disconnects
        .get_or_create(&CodeLabel { code })
        .inc();
    if !writer_done
        && (client_gone && queue.closing().is_none()
            || tokio::time::timeout(CLOSE_FLUSH, &mut writer)
                .await
                .is_err())
    {
        writer.abort();
    }
    if !client_gone {
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

/// Whether a read error is the message-size limit.
fn too_big(err: axum::Error) -> bool {
    let inner = err.into_inner();
    matches!(
        inner.downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Drains the queue into the socket, sends heartbeats, and sends the
/// `disconnect` frame and the close frame when the queue is closed.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    queue: Arc<Outbound>,
    interval: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = queue.notified() => {}
            _ = ping.tick() => {
                queue.push(Utf8Bytes::from(protocol::frame("ping", None, json!({}))));
                if sink.feed(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
        let drained = queue.drain();
        for frame in drained.frames {
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
        }
        if let Some(d) = drained.close {
            let bye = protocol::frame(
                "disconnect",
                None,
                json!({ "code": d.code, "reason": d.reason, "reconnect": d.reconnect() }),
            );
            let _ = sink.feed(Message::Text(bye.into())).await;
            let close = CloseFrame {
                code: d.code,
                reason: Utf8Bytes::from(d.reason),
            };
            let _ = sink.send(Message::Close(Some(close))).await;
            return;
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

// === impl Session ===

impl Session {
    fn push(&self, frame: String) {
        self.queue.push(Utf8Bytes::from(frame));
    }

    fn error(&self, code: &str, message: &str, id: Option<&Value>) {
        self.push(protocol::error(code, message, id));
    }

    /// Handles one message; returns false when the client closed.
    fn on_message(&mut self, msg: Message) -> bool {
        match msg {
            Message::Text(text) => {
                if self.admit() {
                    match protocol::parse(&text) {
                        Ok(frame) => self.on_frame(frame),
                        Err(e) => {
                            self.error(e.code(), &e.message(), e.id());
                            self.protocol_error();
                        }
                    }
                }
            }
            Message::Binary(_) => {
                if self.admit() {
                    self.error(
                        "binary_not_supported",
                        "binary frames are not supported; send JSON text",
                        None,
                    );
                    self.protocol_error();
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return false,
        }
        true
    }

    /// Applies the frame rate limit; returns whether the frame may be handled.
    fn admit(&mut self) -> bool {
        self.node.metrics.messages_received.inc();
        if self.bucket.take(Instant::now()) {
            self.strikes = 0;
            return true;
        }
        self.strikes += 1;
        self.error("rate_limited", "too many frames; slow down", None);
        if self.strikes > RATE_STRIKES {
            self.queue.close(Disconnect::TOO_MANY_REQUESTS);
        }
        false
    }

    fn protocol_error(&mut self) {
        let now = Instant::now();
        self.errors.push_back(now);
        while self
            .errors
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.errors.pop_front();
        }
        if self.errors.len() >= self.node.config.limits.protocol_errors_per_minute {
            self.queue.close(Disconnect::PROTOCOL_ERRORS);
        }
    }

    fn on_frame(&mut self, frame: ClientFrame) {
        let id = frame.id;
        match frame.request {
            Request::Subscribe { channel, since } => self.subscribe(channel, since, id),
            Request::Unsubscribe { channel } => {
                if self.node.hub.unsubscribe(self.id, &channel) {
                    self.push(protocol::frame(
                        "unsubscribed",
                        id.as_ref(),
                        json!({ "channel": channel, "reason": "client" }),
                    ));
                } else {
                    self.error(
                        "not_subscribed",
                        &format!("not subscribed to {channel:?}"),
                        id.as_ref(),
                    );
                }
            }
            Request::Publish {
                channel,
                event,
                data,
            } => self.publish(channel, event, data, id),
            Request::Ping => self.push(protocol::frame("pong", id.as_ref(), json!({}))),
            Request::Pong => {}
            Request::Authorize { .. } | Request::Refresh { .. } => self.error(
                "unavailable",
                "token authentication is not enabled on this node",
                id.as_ref(),
            ),
            Request::Agent { kind } => self.error(
                "unavailable",
                &format!("`{kind}` needs the agent bridge, which is not available"),
                id.as_ref(),
            ),
        }
    }

    fn allowed(&self, access: &Access) -> bool {
        match access {
            Access::None => false,
            Access::Anonymous => true,
            Access::Authenticated => self.params.user_id.is_some(),
            Access::Roles(roles) => {
                self.params.user_id.is_some() && self.params.roles.iter().any(|r| roles.contains(r))
            }
        }
    }

    /// Checks the channel name and the namespace's rule for `access`.
    fn check_channel(&self, channel: &str, access: &Access, id: Option<&Value>) -> bool {
        if let Err(e) = switchboard_proto::channel::validate(channel) {
            self.error("invalid_channel", &e.to_string(), id);
            return false;
        }
        let user_limited = switchboard_proto::channel::allowed_users(channel)
            .map(|mut users| users.any(|u| Some(u) == self.params.user_id.as_deref()));
        if channel == BROADCAST_CHANNEL || user_limited == Some(false) || !self.allowed(access) {
            self.error(
                "permission_denied",
                &format!("not allowed on channel {channel:?}"),
                id,
            );
            return false;
        }
        true
    }

    fn subscribe(&mut self, channel: String, since: Option<Since>, id: Option<Value>) {
        let rule = self.node.config.namespace(&channel).subscribe;
        if !self.check_channel(&channel, &rule, id.as_ref()) {
            return;
        }
        match self
            .node
            .hub
            .subscribe(self.id, &channel, since, id.clone())
        {
            Ok(Some(job)) => {
                tokio::spawn(link::recover(
                    self.node.hub.clone(),
                    self.node.bus.clone(),
                    job,
                ));
            }
            Ok(None) => {}
            Err(e) => {
                let message = match e {
                    SubscribeError::AlreadySubscribed => {
                        format!("already subscribed to {channel:?}")
                    }
                    SubscribeError::LimitExceeded => {
                        format!(
                            "at most {} subscriptions per connection",
                            self.node.config.limits.max_subscriptions
                        )
                    }
                    SubscribeError::Unavailable => {
                        "the event bus is unavailable; try later".to_owned()
                    }
                    SubscribeError::UnknownConnection => "connection is closing".to_owned(),
                };
                self.error(e.code(), &message, id.as_ref());
            }
        }
    }

    fn publish(&mut self, channel: String, event: String, data: Value, id: Option<Value>) {
        let rule = self.node.config.namespace(&channel).publish;
        if !self.check_channel(&channel, &rule, id.as_ref()) {
            return;
        }
        let node = self.node.clone();
        let queue = self.queue.clone();
        let request = pb::PublishRequest {
            channel: channel.clone(),
            event,
            data: Bytes::from(data.to_string()),
            ..Default::default()
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let frame = match node.bus.clone().publish(request).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    protocol::frame(
                        "published",
                        id.as_ref(),
                        json!({ "channel": channel, "offset": resp.offset, "event_id": resp.event_id }),
                    )
                }
                Err(status) => {
                    let (code, message) = status_error(&status);
                    protocol::error(code, &message, id.as_ref())
                }
            };
            node.metrics
                .publish_duration
                .observe(started.elapsed().as_secs_f64());
            queue.push(Utf8Bytes::from(frame));
        });
    }
}

/// Maps a bus status to an `error.code` and a message safe to show.
pub fn status_error(status: &tonic::Status) -> (&'static str, String) {
    match status.code() {
        tonic::Code::InvalidArgument => ("invalid_frame", status.message().to_owned()),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => (
            "unavailable",
            "the event bus is unavailable; try later".to_owned(),
        ),
        _ => {
            tracing::error!(%status, "bus call failed");
            ("internal", "internal error".to_owned())
        }
    }
}

/// Frames per second with a burst allowance.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: burst as f64,
            rate: rate as f64,
            burst: burst as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket {
            tokens: 3.0,
            rate: 10.0,
            burst: 3.0,
            last: start,
        };
        assert!(b.take(start) && b.take(start) && b.take(start));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(100)));
    }
}
