//! One connection: its protocol state machine (SPEC §3), heartbeat, limits,
//! and the writer task that drains its outbound queue into the socket.

use std::{collections::VecDeque, future::Future, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    Node, agent,
    auth::{self, Credentials},
    config::Access,
    disconnect::Disconnect,
    hub::{self, BROADCAST_CHANNEL, RecoveryJob, SubscribeError, Unsubscribed},
    link,
    metrics::CodeLabel,
    protocol::{self, ClientFrame, Request, Since},
    queue::Outbound,
};

/// Who is on the other end, as established before the upgrade.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// From a valid `?token=`.
    pub credentials: Option<Credentials>,
    /// No token and anonymous connections are not allowed: the client must
    /// send `authorize` within `auth.authorize_timeout`.
    pub must_authorize: bool,
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
    /// Who the client is, once a token said so.
    credentials: Option<Credentials>,
    /// When an unauthenticated connection that must authorize is closed.
    authorize_by: Option<Instant>,
    /// When the token expires (the grace period comes on top).
    expires: Option<Instant>,
    /// Cancelled when the connection ends (runs with `on_disconnect: cancel` stop).
    gone: tokio_util::sync::CancellationToken,
    bucket: TokenBucket,
    strikes: u32,
    /// Times of recent protocol errors, for the per-minute budget.
    errors: VecDeque<Instant>,
    /// The path form's channel, held back until the connection may
    /// subscribe: nothing of it is sent before `authorize` succeeds.
    pending: Option<(String, Option<Since>)>,
}

/// Runs a connection until it closes.
pub async fn run(node: Arc<Node>, socket: WebSocket, params: Params) {
    let id = Uuid::new_v4();
    let user = params.credentials.as_ref().map(|c| c.user_id.clone());
    let span = tracing::info_span!("connection", connection_id = %id, user_id = ?user);
    run_inner(node, socket, params, id).instrument(span).await
}

async fn run_inner(node: Arc<Node>, socket: WebSocket, params: Params, id: Uuid) {
    let limits = node.config.limits.clone();
    let queue = Arc::new(Outbound::new(limits.outbound_queue_bytes));
    let (sink, mut stream) = socket.split();
    let mut writer =
        tokio::spawn(write_loop(sink, queue.clone(), node.config.heartbeat_interval, limits.write_timeout));
    let mut session = Session {
        node: node.clone(),
        id,
        queue: queue.clone(),
        credentials: None,
        authorize_by: params.must_authorize.then(|| Instant::now() + node.config.auth.authorize_timeout),
        expires: None,
        gone: tokio_util::sync::CancellationToken::new(),
        bucket: TokenBucket::new(limits.rate_per_second, limits.rate_burst),
        strikes: 0,
        errors: VecDeque::new(),
        pending: None,
    };
    let user_id = params.credentials.as_ref().map(|c| c.user_id.clone());
    let registered = node.hub.add_connection(id, queue.clone(), user_id.clone(), limits.max_connections_per_user);
    if registered {
        node.metrics.connections_accepted.inc();
        session.push(protocol::frame(
            "connected",
            None,
            json!({
                "connection_id": id,
                "user_id": user_id,
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
        session.pending = params.channel.map(|channel| (channel, params.since));
        match params.credentials {
            Some(credentials) => session.authenticated(credentials),
            None if !params.must_authorize => session.subscribe_pending(),
            None => {}
        }
    } else {
        queue.close(Disconnect::USER_LIMIT);
    }

    let window = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let mut writer_done = None;
    let mut client_gone = false;
    while writer_done.is_none() {
        let open = queue.closing().is_none();
        tokio::select! {
            _ = node.shutdown.cancelled(), if open => queue.close(Disconnect::SHUTDOWN),
            // Whatever closes it, a closing connection gets no more events
            // and leaves the stats and its channels now, not when its socket
            // has taken the rest (it may never).
            _ = queue.closed(), if open => node.hub.remove_connection(id),
            end = &mut writer => writer_done = Some(end.unwrap_or(WriterEnd::Broken)),
            _ = tokio::time::sleep_until(last_seen + window), if open => queue.close(Disconnect::NO_PONG),
            _ = sleep_until(session.authorize_by), if open => queue.close(Disconnect::UNAUTHORIZED),
            _ = sleep_until(session.expires.map(|t| t + node.config.auth.expiry_grace)), if open => {
                queue.close(Disconnect::TOKEN_EXPIRED)
            }
            msg = stream.next(), if !client_gone => match msg {
                Some(Ok(msg)) => {
                    last_seen = Instant::now();
                    if !session.on_message(msg) {
                        client_gone = true;
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
    node.hub.remove_connection(id);
    session.gone.cancel();
    let code = queue.closing().map_or(1000, |d| d.code);
    node.metrics.disconnects.get_or_create(&CodeLabel { code }).inc();
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

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Converts a token's `exp` (Unix seconds) to an instant.
fn instant_of(exp: Option<u64>) -> Option<Instant> {
    let exp = exp?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    Some(Instant::now() + Duration::from_secs(exp.saturating_sub(now)))
}

/// The close a read error calls for (SPEC §9), when the socket can still
/// take one: a frame over the limit, invalid UTF-8 in a text frame, or a
/// WebSocket protocol violation. Other errors are a connection that broke.
fn read_error(err: axum::Error) -> Option<Disconnect> {
    match err.into_inner().downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some(Disconnect::MESSAGE_TOO_BIG),
        tungstenite::Error::Utf8(_) => Some(Disconnect::INVALID_UTF8),
        tungstenite::Error::Protocol(_) => Some(Disconnect::PROTOCOL_VIOLATION),
        _ => None,
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
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
                queue.push(Utf8Bytes::from(protocol::frame("ping", None, json!({}))));
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
            let bye = protocol::frame(
                "disconnect",
                None,
                json!({ "code": d.code, "reason": d.reason, "reconnect": d.reconnect() }),
            );
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
async fn within(limit: Duration, write: impl Future<Output = Result<(), axum::Error>>) -> bool {
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
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
                    self.error("binary_not_supported", "binary frames are not supported; send JSON text", None);
                    self.protocol_error();
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => {
                self.queue.close(Disconnect::CLIENT_CLOSED);
                return false;
            }
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
        while self.errors.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60)) {
            self.errors.pop_front();
        }
        if self.errors.len() >= self.node.config.limits.protocol_errors_per_minute {
            self.queue.close(Disconnect::PROTOCOL_ERRORS);
        }
    }

    fn on_frame(&mut self, frame: ClientFrame) {
        let id = frame.id;
        let open = matches!(frame.request, Request::Authorize { .. } | Request::Ping | Request::Pong);
        if self.authorize_by.is_some() && !open {
            self.error("unauthorized", "send `authorize` with a token first", id.as_ref());
            return;
        }
        match frame.request {
            Request::Subscribe { channel, since } => self.subscribe(channel, since, id),
            Request::Unsubscribe { channel } => match self.node.hub.unsubscribe(self.id, &channel, id.clone()) {
                Unsubscribed::Now => {
                    self.queue.push(hub::unsubscribed(&channel, id.as_ref()));
                }
                Unsubscribed::AfterSubscribed => {}
                Unsubscribed::NotSubscribed => {
                    self.error("not_subscribed", &format!("not subscribed to {channel:?}"), id.as_ref());
                }
            },
            Request::Publish { channel, event, data } => self.publish(channel, event, data, id),
            Request::Ping => self.push(protocol::frame("pong", id.as_ref(), json!({}))),
            Request::Pong => {}
            Request::Authorize { token } => self.authorize(&token, id),
            Request::Refresh { token } => self.refresh(&token, id),
            Request::Rpc { method, params } => {
                // `execute_command` runs a worker's method: both rules apply.
                let command = (method == "execute_command").then(|| params["command"].as_str()).flatten();
                let permitted = |m: &str| self.allowed(&self.node.config.rpc_access(m));
                if permitted(&method) && command.is_none_or(permitted) {
                    self.agent().rpc(method, params, id);
                } else {
                    let error =
                        json!({ "code": "permission_denied", "message": format!("not allowed to call {method:?}") });
                    self.push(protocol::frame("rpc_response", id.as_ref(), json!({ "error": error })));
                }
            }
            Request::ChatMessage(msg) => self.agent().chat(msg, id),
            Request::RunAgent { agent, input, multitask, on_disconnect } => {
                self.agent().run_agent(agent, input, multitask, on_disconnect.as_deref() == Some("cancel"), id)
            }
            Request::InterruptStream { run_id, thread_id } => self.agent().interrupt(run_id, thread_id, id),
        }
    }

    fn agent(&self) -> agent::Context {
        agent::Context {
            node: self.node.clone(),
            queue: self.queue.clone(),
            user: self.user_id().unwrap_or(agent::ANONYMOUS).to_owned(),
            roles: self.credentials.as_ref().map(|c| c.roles.clone()).unwrap_or_default(),
            gone: self.gone.clone(),
        }
    }

    fn user_id(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.user_id.as_str())
    }

    fn allowed(&self, access: &Access) -> bool {
        match access {
            Access::None => false,
            Access::Anonymous => true,
            Access::Authenticated => self.credentials.is_some(),
            Access::Roles(roles) => {
                self.credentials.as_ref().is_some_and(|c| c.roles.iter().any(|r| roles.contains(r)))
            }
        }
    }

    /// Takes the credentials of a valid token: the personal channel and the
    /// token's `channels` are subscribed, then the path form's channel, and
    /// the token's expiry is enforced.
    ///
    /// A token's `channels` claim grants its channels whatever their
    /// namespace's rule (the token is signed by us), but not a user-limited
    /// channel of other users, nor the reserved broadcast channel.
    fn authenticated(&mut self, credentials: Credentials) {
        self.expires = instant_of(credentials.expires_at);
        self.authorize_by = None;
        // `auth::verify` refuses user ids that cannot form this name.
        let personal = format!("user#{}", credentials.user_id);
        let claimed: Vec<String> = credentials
            .channels
            .iter()
            .filter(|c| {
                let ok = switchboard_proto::channel::validate(c).is_ok()
                    && c.as_str() != BROADCAST_CHANNEL
                    && *c != &personal
                    && readable_by(c, Some(&credentials.user_id));
                if !ok {
                    tracing::warn!(channel = %c, "a token's `channels` claim names a channel it cannot grant");
                }
                ok
            })
            .cloned()
            .collect();
        self.credentials = Some(credentials);
        for channel in std::iter::once(personal).chain(claimed) {
            self.subscribe_unchecked(channel, None, None);
        }
        self.subscribe_pending();
    }

    /// Subscribes what a connection gets on open once it may: the path
    /// form's channel, with the checks (and errors) of a `subscribe` frame,
    /// and `gateway.default_channels`, skipping those it may not read.
    fn subscribe_pending(&mut self) {
        if let Some((channel, since)) = self.pending.take() {
            self.subscribe(channel, since, None);
        }
        for channel in self.node.config.default_channels.clone() {
            let rule = self.node.config.namespace(&channel).subscribe;
            if self.may(&channel, &rule).is_ok() {
                self.subscribe_unchecked(channel, None, None);
            }
        }
    }

    fn authorized_frame(&self, id: Option<&Value>) {
        let c = self.credentials.as_ref();
        self.push(protocol::frame(
            "authorized",
            id,
            json!({ "user_id": c.map(|c| &c.user_id), "expires_at": c.and_then(|c| c.expires_at) }),
        ));
    }

    fn authorize(&mut self, token: &str, id: Option<Value>) {
        let credentials = match auth::verify(&self.node.config.auth, token) {
            Ok(c) => c,
            Err(e) => {
                self.error("unauthorized", &e.0, id.as_ref());
                if self.authorize_by.is_some() {
                    self.queue.close(Disconnect::UNAUTHORIZED);
                }
                return;
            }
        };
        match self.user_id() {
            Some(user) if user != credentials.user_id => {
                self.error("unauthorized", "a connection cannot change its user; reconnect", id.as_ref());
            }
            Some(_) => {
                // Re-authorizing as the same user refreshes roles and expiry.
                self.expires = instant_of(credentials.expires_at);
                self.credentials = Some(credentials);
                self.authorized_frame(id.as_ref());
            }
            None => {
                let max = self.node.config.limits.max_connections_per_user;
                if !self.node.hub.set_user(self.id, &credentials.user_id, max) {
                    self.queue.close(Disconnect::USER_LIMIT);
                    return;
                }
                self.credentials = Some(credentials.clone());
                self.authorized_frame(id.as_ref());
                self.authenticated(credentials);
            }
        }
    }

    fn refresh(&mut self, token: &str, id: Option<Value>) {
        let Some(user) = self.user_id().map(str::to_owned) else {
            self.error("unauthorized", "nothing to refresh; send `authorize`", id.as_ref());
            return;
        };
        match auth::verify(&self.node.config.auth, token) {
            Ok(c) if c.user_id == user => {
                self.expires = instant_of(c.expires_at);
                self.credentials = Some(c);
                self.authorized_frame(id.as_ref());
            }
            Ok(_) => self.error("unauthorized", "the token is for another user", id.as_ref()),
            Err(e) => self.error("unauthorized", &e.0, id.as_ref()),
        }
    }

    /// Checks the channel name and the namespace's rule for `access`;
    /// answers the error when refused.
    fn check_channel(&self, channel: &str, access: &Access, id: Option<&Value>) -> bool {
        match self.may(channel, access) {
            Ok(()) => true,
            Err((code, message)) => {
                self.error(code, &message, id);
                false
            }
        }
    }

    /// Whether this connection may use `channel` under `access`, or why not.
    fn may(&self, channel: &str, access: &Access) -> Result<(), (&'static str, String)> {
        switchboard_proto::channel::validate(channel).map_err(|e| ("invalid_channel", e.to_string()))?;
        // Without a token the connection is the user `anonymous`, whose runs'
        // thread channels it may watch like any user its own.
        let user = self.user_id().unwrap_or(crate::agent::ANONYMOUS);
        if channel == BROADCAST_CHANNEL || !readable_by(channel, Some(user)) || !self.allowed(access) {
            return Err(("permission_denied", format!("not allowed on channel {channel:?}")));
        }
        Ok(())
    }

    fn subscribe(&mut self, channel: String, since: Option<Since>, id: Option<Value>) {
        let rule = self.node.config.namespace(&channel).subscribe;
        if !self.check_channel(&channel, &rule, id.as_ref()) {
            return;
        }
        self.subscribe_unchecked(channel, since, id);
    }

    /// Subscribes without the permission check: for server-side subscriptions.
    /// While the bus link is down (at start, or during a relink), the
    /// subscribe waits for it up to `limits.link_wait` before `unavailable`.
    fn subscribe_unchecked(&mut self, channel: String, since: Option<Since>, id: Option<Value>) {
        let attempt = self.node.hub.subscribe(self.id, &channel, since.clone(), id.clone());
        if attempt == Err(SubscribeError::Unavailable) && !self.node.hub.link_is_up() {
            let (node, conn, queue) = (self.node.clone(), self.id, self.queue.clone());
            self.node.tasks.spawn(async move {
                let result = match node.hub.wait_for_link(node.config.limits.link_wait).await {
                    true => node.hub.subscribe(conn, &channel, since, id.clone()),
                    false => Err(SubscribeError::Unavailable),
                };
                subscribed_or_error(&node, &queue, &channel, result, id.as_ref());
            });
            return;
        }
        subscribed_or_error(&self.node, &self.queue, &channel, attempt, id.as_ref());
    }

    fn publish(&mut self, channel: String, event: String, data: Value, id: Option<Value>) {
        let rule = self.node.config.namespace(&channel).publish;
        if !self.check_channel(&channel, &rule, id.as_ref()) {
            return;
        }
        let node = self.node.clone();
        let queue = self.queue.clone();
        self.node.tasks.spawn(async move {
            let started = Instant::now();
            let frame = match node.bus.current().publish(&channel, event, &data).await {
                Ok(published) => protocol::frame(
                    "published",
                    id.as_ref(),
                    json!({ "channel": channel, "offset": published.offset, "event_id": published.event_id }),
                ),
                Err(e) => e.frame(id.as_ref()),
            };
            node.metrics.publish_duration.observe(started.elapsed().as_secs_f64());
            queue.push(Utf8Bytes::from(frame));
        });
    }
}

/// Starts the recovery a subscribe asked for, or answers its error.
fn subscribed_or_error(
    node: &Arc<Node>,
    queue: &Outbound,
    channel: &str,
    result: Result<Option<RecoveryJob>, SubscribeError>,
    id: Option<&Value>,
) {
    match result {
        Ok(Some(job)) => {
            node.tasks.spawn(link::recover(node.hub.clone(), node.bus.current(), job));
        }
        Ok(None) => {}
        Err(e) => {
            let message = match e {
                SubscribeError::AlreadySubscribed => format!("already subscribed to {channel:?}"),
                SubscribeError::LimitExceeded => {
                    format!("at most {} subscriptions per connection", node.config.limits.max_subscriptions)
                }
                SubscribeError::Unavailable => "the event bus is unavailable; try later".to_owned(),
                SubscribeError::UnknownConnection => "connection is closing".to_owned(),
            };
            queue.push(Utf8Bytes::from(protocol::error(e.code().as_str(), &message, id)));
        }
    }
}

/// The user-limited `#` rule (SPEC §6): whether `user` is among the users a
/// channel name lists, or the channel lists none.
fn readable_by(channel: &str, user: Option<&str>) -> bool {
    switchboard_proto::channel::allowed_users(channel).is_none_or(|mut users| users.any(|u| Some(u) == user))
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
        TokenBucket { tokens: burst as f64, rate: rate as f64, burst: burst as f64, last: Instant::now() }
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
        let mut b = TokenBucket { tokens: 3.0, rate: 10.0, burst: 3.0, last: start };
        assert!(b.take(start) && b.take(start) && b.take(start));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(100)));
    }
}
