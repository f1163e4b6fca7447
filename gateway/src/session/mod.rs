//! The protocol state machine of one connection (SPEC §3), whatever
//! carries its frames: opening, authentication and expiry, the frames a
//! client sends and the answers queued on its outbound queue. Its
//! transports (`ws`, and `sse`, which reads nothing) read the client's
//! frames into it and drain the queue.

mod access;
mod limits;
pub(crate) mod socketio;
pub(crate) mod sse;
mod ws;

use std::{sync::Arc, time::Duration};

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;
use switchboard_proto::error::ErrorCode;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    Node, agent,
    auth::{self, Credentials},
    config::Access,
    disconnect::Disconnect,
    hub::{self, BROADCAST_CHANNEL, RecoveryJob, SubscribeError, Unsubscribed},
    link,
    metrics::CodeLabel,
    protocol::{self, ClientFrame, ConnectedHeartbeat, ConnectedLimits, Request, RpcError, ServerFrame, Since},
    queue::Outbound,
};
use limits::Budget;

pub use ws::run;
pub(crate) use ws::{READ_BUFFER, WRITE_BUFFER};

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

pub(crate) struct Session {
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
    budget: Budget,
    /// The path form's channel, held back until the connection may
    /// subscribe: nothing of it is sent before `authorize` succeeds.
    pending: Option<(String, Option<Since>)>,
    /// Resolves when the connection's last publish is answered: the next one
    /// waits for it, so that a connection's publishes reach the bus, and
    /// are answered, in the order it sent them.
    last_publish: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What closes a connection when, as of now: the server shutting down, an
/// `authorize` that did not come in time, the token's expiry and grace.
pub(crate) struct Clock<'a> {
    shutdown: &'a tokio_util::sync::CancellationToken,
    authorize_by: Option<Instant>,
    expires: Option<Instant>,
}

impl Clock<'_> {
    /// Resolves with the close that comes first.
    pub(crate) async fn fired(self) -> Disconnect {
        tokio::select! {
            _ = self.shutdown.cancelled() => Disconnect::SHUTDOWN,
            _ = sleep_until(self.authorize_by) => Disconnect::UNAUTHORIZED,
            _ = sleep_until(self.expires) => Disconnect::TOKEN_EXPIRED,
        }
    }
}

// === impl Session ===

impl Session {
    /// Opens a connection: registers it with the hub (or closes its queue
    /// with `4502` over the user's limit), queues `connected`, and
    /// subscribes what it gets on open once it may.
    pub(crate) fn open(node: Arc<Node>, id: Uuid, queue: Arc<Outbound>, params: Params) -> Session {
        let limits = &node.config.limits;
        let mut session = Session {
            node: node.clone(),
            id,
            queue: queue.clone(),
            credentials: None,
            authorize_by: params.must_authorize.then(|| Instant::now() + node.config.auth.authorize_timeout),
            expires: None,
            gone: tokio_util::sync::CancellationToken::new(),
            budget: Budget::new(limits),
            pending: None,
            last_publish: None,
        };
        let user_id = params.credentials.as_ref().map(|c| c.user_id.clone());
        if !node.hub.add_connection(id, queue.clone(), user_id.clone(), limits.max_connections_per_user) {
            queue.close(Disconnect::USER_LIMIT);
            return session;
        }
        node.metrics.connections_accepted.inc();
        session.push(
            ServerFrame::Connected {
                connection_id: id,
                user_id: user_id.as_deref(),
                node: &node.config.node,
                heartbeat: ConnectedHeartbeat {
                    interval: node.config.heartbeat_interval.as_secs_f64(),
                    timeout: node.config.heartbeat_timeout.as_secs_f64(),
                },
                limits: ConnectedLimits {
                    max_message_bytes: limits.max_message_bytes,
                    max_subscriptions: limits.max_subscriptions,
                },
            }
            .to_json(None),
        );
        session.pending = params.channel.map(|channel| (channel, params.since));
        match params.credentials {
            Some(credentials) => session.authenticated(credentials),
            None if !params.must_authorize => session.subscribe_pending(),
            None => {}
        }
        session
    }

    /// The connection's clock as it stands: what closes it when, apart
    /// from its transport's heartbeat.
    pub(crate) fn clock(&self) -> Clock<'_> {
        Clock {
            shutdown: &self.node.shutdown,
            authorize_by: self.authorize_by,
            expires: self.expires.map(|t| t + self.node.config.auth.expiry_grace),
        }
    }

    /// Takes the connection out of the hub (it gets nothing more and leaves
    /// its channels), ends its runs that stop on disconnect, and counts the
    /// close; returns its code. Called once its transport is done.
    pub(crate) fn end(&self) -> u16 {
        self.node.hub.remove_connection(self.id);
        self.gone.cancel();
        let code = self.queue.closing().map_or(1000, |d| d.code);
        self.node.metrics.disconnects.get_or_create(&CodeLabel { code }).inc();
        code
    }

    fn push(&self, frame: String) {
        self.queue.push(Utf8Bytes::from(frame));
    }

    fn error(&self, code: &str, message: &str, id: Option<&Value>) {
        self.push(protocol::error(code, message, id));
    }

    /// Handles one text frame of the client.
    pub(crate) fn on_text(&mut self, text: &str) {
        if self.admit() {
            self.on_parsed(protocol::parse(text));
        }
    }

    /// Handles a client frame already read as JSON (a Socket.IO event's
    /// fields with its name as `type`), with the admission of a text frame.
    pub(crate) fn on_value(&mut self, value: Value) {
        if self.admit() {
            self.on_parsed(protocol::parse_value(value));
        }
    }

    /// Handles a message of the transport that carries no frame (a
    /// malformed Socket.IO packet): an `invalid_frame` protocol error.
    pub(crate) fn on_malformed(&mut self, message: &str) {
        if self.admit() {
            self.error("invalid_frame", message, None);
            self.protocol_error();
        }
    }

    fn on_parsed(&mut self, parsed: Result<ClientFrame, protocol::FrameError>) {
        match parsed {
            Ok(frame) => self.on_frame(frame),
            Err(e) => {
                self.error(e.code(), &e.message(), e.id());
                self.protocol_error();
            }
        }
    }

    /// Handles a binary frame: the protocol is JSON text.
    pub(crate) fn on_binary(&mut self) {
        if self.admit() {
            self.error("binary_not_supported", "binary frames are not supported; send JSON text", None);
            self.protocol_error();
        }
    }

    /// Applies the frame rate limit; returns whether the frame may be handled.
    fn admit(&mut self) -> bool {
        self.node.metrics.messages_received.inc();
        match self.budget.admit(Instant::now()) {
            Ok(()) => true,
            Err(close) => {
                self.error("rate_limited", "too many frames; slow down", None);
                if let Some(d) = close {
                    self.queue.close(d);
                }
                false
            }
        }
    }

    fn protocol_error(&mut self) {
        if let Some(d) = self.budget.protocol_error(Instant::now()) {
            self.queue.close(d);
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
            Request::Ping => self.push(ServerFrame::Pong {}.to_json(id.as_ref())),
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
                    let message = format!("not allowed to call {method:?}");
                    let error = RpcError { code: ErrorCode::PermissionDenied.as_str(), message: &message };
                    self.push(ServerFrame::RpcResponse { result: None, error: Some(error) }.to_json(id.as_ref()));
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
        access::allowed(self.credentials.as_ref(), access)
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
                    && access::readable_by(c, Some(&credentials.user_id));
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
        let frame = ServerFrame::Authorized {
            user_id: c.map(|c| c.user_id.as_str()),
            expires_at: c.and_then(|c| c.expires_at),
        };
        self.push(frame.to_json(id));
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
        access::may(self.credentials.as_ref(), channel, access)
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
        let (done, next) = tokio::sync::oneshot::channel::<()>();
        let previous = self.last_publish.replace(next);
        self.node.tasks.spawn(async move {
            // Answered, or dropped with its task: either way it is done.
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let started = Instant::now();
            let frame = match node.bus.current().publish(&channel, event, &data).await {
                Ok(published) => ServerFrame::Published {
                    channel: &channel,
                    offset: published.offset,
                    event_id: &published.event_id,
                }
                .to_json(id.as_ref()),
                Err(e) => e.frame(id.as_ref()),
            };
            node.metrics.publish_duration.observe(started.elapsed().as_secs_f64());
            queue.push(Utf8Bytes::from(frame));
            drop(done);
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

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Converts a token's `exp` (Unix seconds) to an instant.
fn instant_of(exp: Option<u64>) -> Option<Instant> {
    // To the nanosecond, not the second: connections holding one token
    // expire at one instant.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Some(Instant::now() + Duration::from_secs(exp?).saturating_sub(now))
}
