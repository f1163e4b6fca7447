//! The hub: which connection listens to which channel on this node, and the
//! state of each channel's one subscription on the bus.
//!
//! Every method is synchronous and holds the hub lock only for map updates
//! and queue pushes, never across an `.await`. Events from the bus are
//! serialized once per node and the same frame is pushed to every listener.
//!
//! A listener goes through phases: `Waiting` until the bus confirms the
//! channel, `Recovering` while its missed events are fetched from history
//! (live events are buffered meanwhile), and `Live`. Each listener keeps the
//! last offset it was sent, so it sees every event once and in order across
//! recovery, live delivery and relinks of the bus.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;
use switchboard_proto::error::ErrorCode;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    disconnect::Disconnect,
    metrics::Metrics,
    protocol::{self, Position, Recovery, ServerFrame, Since},
    queue::Outbound,
};

/// The reserved channel of `POST /api/ws/broadcast/all`: every connection
/// receives its events without subscribing.
pub const BROADCAST_CHANNEL: &str = "broadcast";

/// What the hub asks of the bus link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCommand {
    Join {
        channel: Arc<str>,
        since: Option<Position>,
    },
    Leave {
        channel: Arc<str>,
    },
    /// A connection of this node listens to a presence channel (SPEC §6).
    PresenceJoin {
        channel: Arc<str>,
        connection: Uuid,
        user_id: Option<String>,
        node: Arc<str>,
    },
    /// It no longer does.
    PresenceLeave {
        channel: Arc<str>,
        connection: Uuid,
    },
}

/// A subscribe that failed, with its `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    AlreadySubscribed,
    LimitExceeded,
    Unavailable,
    UnknownConnection,
}

impl SubscribeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            SubscribeError::LimitExceeded => ErrorCode::LimitExceeded,
            SubscribeError::Unavailable => ErrorCode::Unavailable,
            SubscribeError::UnknownConnection => ErrorCode::Internal,
        }
    }
}

/// An event of a batch from the bus, with its frame already written.
pub struct Frame {
    pub offset: u64,
    pub epoch: Arc<str>,
    pub text: Utf8Bytes,
    pub timestamp_ms: i64,
}

/// Events fetched from history for a recovering listener.
pub struct Recovered {
    pub frames: Vec<Frame>,
    pub position: Position,
}

/// Work the hub hands back to its caller, which may `.await`.
#[derive(Debug, PartialEq, Eq)]
pub struct RecoveryJob {
    pub connection: Uuid,
    pub channel: Arc<str>,
    pub since: Since,
}

pub struct Hub {
    inner: Mutex<Inner>,
    link: mpsc::Sender<LinkCommand>,
    link_up: AtomicBool,
    /// The same as `link_up`, for those who wait for it.
    link_watch: tokio::sync::watch::Sender<bool>,
    recovery_max: u64,
    max_subscriptions: usize,
    metrics: Arc<Metrics>,
    /// Namespaces with `presence = true`: their listeners are announced to
    /// the bus, as connections of `node`.
    presence: HashSet<String>,
    node: Arc<str>,
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, Channel>,
    connections: HashMap<Uuid, Connection>,
    /// Connections per user id.
    users: HashMap<String, usize>,
    /// Listeners across all channels.
    subscriptions: usize,
}

pub struct Connection {
    pub queue: Arc<Outbound>,
    pub user_id: Option<String>,
    channels: HashSet<Arc<str>>,
    /// Of `channels`, those with an `unsubscribe` waiting for its
    /// `subscribed`: they do not count against `max_subscriptions`.
    leaving: usize,
}

struct Channel {
    link: LinkState,
    /// The newest event delivered on this node, or where the bus said the channel starts.
    position: Option<Position>,
    listeners: HashMap<Uuid, Listener>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// A join was sent; `resuming` when it carried our position after a relink.
    Pending {
        resuming: bool,
    },
    Active,
    /// A leave was sent and no one listens.
    Leaving,
    /// A leave was sent, then someone subscribed: join again once it is confirmed.
    Rejoining,
}

struct Listener {
    queue: Arc<Outbound>,
    /// Offset of the last event sent to this listener.
    last_offset: u64,
    phase: Phase,
    /// Replies owed to frames that came before the subscribe of `phase`
    /// (`subscribe`, `unsubscribe`, `subscribe` while the channel was not
    /// confirmed yet), sent in order before its own `subscribed`.
    earlier: Vec<Reply>,
    /// An `unsubscribe` (its id) that came before `subscribed` was sent: it
    /// is answered, and the listener removed, right after.
    leave: Option<Option<Value>>,
}

/// A reply the hub owes a client frame.
enum Reply {
    Subscribed(Option<Value>),
    Unsubscribed(Option<Value>),
}

/// What `Hub::unsubscribe` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribed {
    /// Done: the caller answers `unsubscribed`.
    Now,
    /// The subscribe is still waiting for the bus: its `subscribed` and then
    /// `unsubscribed` will be sent by the hub, in that order.
    AfterSubscribed,
    NotSubscribed,
}

enum Phase {
    Waiting { id: Option<Value> },
    Recovering { id: Option<Value>, since: Since, buffer: Vec<(u64, Utf8Bytes)>, fetching: bool },
    Live,
}

/// The `unsubscribed` frame a client's `unsubscribe` is answered with.
pub fn unsubscribed(channel: &str, id: Option<&Value>) -> Utf8Bytes {
    Utf8Bytes::from(ServerFrame::Unsubscribed { channel, reason: "client" }.to_json(id))
}

fn subscribed(channel: &str, id: Option<&Value>, position: &Position, recovery: Option<Recovery>) -> Utf8Bytes {
    Utf8Bytes::from(ServerFrame::Subscribed { channel, position, recovery }.to_json(id))
}

// === impl Hub ===

impl Hub {
    pub fn new(
        link: mpsc::Sender<LinkCommand>,
        recovery_max: u64,
        max_subscriptions: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Hub {
            inner: Mutex::default(),
            link,
            link_up: AtomicBool::new(false),
            link_watch: tokio::sync::watch::Sender::new(false),
            recovery_max,
            max_subscriptions,
            metrics,
            presence: HashSet::new(),
            node: Arc::from("gateway"),
        }
    }

    /// Announces the listeners of channels in `namespaces` to the bus as
    /// connections of `node` (presence, SPEC §6).
    pub fn with_presence(mut self, node: &str, namespaces: HashSet<String>) -> Self {
        self.node = Arc::from(node);
        self.presence = namespaces;
        self
    }

    /// Whether `channel`'s namespace tracks presence.
    pub fn has_presence(&self, channel: &str) -> bool {
        !self.presence.is_empty() && self.presence.contains(switchboard_proto::channel::namespace(channel))
    }

    fn presence_join(&self, channel: &Arc<str>, connection: Uuid, user_id: Option<String>) -> LinkCommand {
        LinkCommand::PresenceJoin { channel: channel.clone(), connection, user_id, node: self.node.clone() }
    }

    /// Tells the bus about a presence change; when the link cannot take it,
    /// the next relink sends every entry again.
    fn send_presence(&self, command: LinkCommand) {
        if self.link.try_send(command).is_err() {
            tracing::warn!("bus link saturated; a presence change waits for the next relink");
        }
    }

    pub fn recovery_max(&self) -> u64 {
        self.recovery_max
    }

    pub fn link_is_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for the bus link to be up; returns whether it is.
    pub async fn wait_for_link(&self, limit: std::time::Duration) -> bool {
        let mut up = self.link_watch.subscribe();
        matches!(tokio::time::timeout(limit, up.wait_for(|up| *up)).await, Ok(Ok(_)))
    }

    /// Registers a connection; refuses it when its user already has `max_per_user`.
    pub fn add_connection(&self, id: Uuid, queue: Arc<Outbound>, user_id: Option<String>, max_per_user: usize) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if let Some(user) = &user_id {
            let n = inner.users.entry(user.clone()).or_default();
            if *n >= max_per_user {
                return false;
            }
            *n += 1;
        }
        inner.connections.insert(id, Connection { queue, user_id, channels: HashSet::new(), leaving: 0 });
        self.metrics.connections.set(inner.connections.len() as i64);
        true
    }

    /// Sets the user of an anonymous connection that authorized; refuses it
    /// when that user already has `max_per_user` connections.
    pub fn set_user(&self, id: Uuid, user: &str, max_per_user: usize) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let Some(conn) = inner.connections.get_mut(&id) else {
            return false;
        };
        if conn.user_id.is_some() {
            return true;
        }
        let n = inner.users.entry(user.to_owned()).or_default();
        if *n >= max_per_user {
            return false;
        }
        *n += 1;
        conn.user_id = Some(user.to_owned());
        // Its presence entries now name the user.
        for channel in conn.channels.iter().filter(|c| self.has_presence(c)) {
            self.send_presence(self.presence_join(channel, id, conn.user_id.clone()));
        }
        true
    }

    /// Removes a connection and all its subscriptions.
    pub fn remove_connection(&self, id: Uuid) {
        let mut inner = self.inner.lock().unwrap();
        let Some(conn) = inner.connections.remove(&id) else {
            return;
        };
        if let Some(n) = conn.user_id.as_ref().and_then(|u| inner.users.get_mut(u)) {
            *n -= 1;
            if *n == 0 {
                inner.users.remove(conn.user_id.as_deref().unwrap_or_default());
            }
        }
        for channel in conn.channels {
            self.detach(&mut inner, &channel, id);
        }
        self.metrics.connections.set(inner.connections.len() as i64);
        self.update_gauges(&inner);
    }

    pub fn connection_count(&self) -> usize {
        self.inner.lock().unwrap().connections.len()
    }

    /// Returns the queue of a connection, to close it.
    pub fn connection_queue(&self, id: Uuid) -> Option<Arc<Outbound>> {
        self.inner.lock().unwrap().connections.get(&id).map(|c| c.queue.clone())
    }

    /// Closes every connection with `reason`.
    pub fn close_all(&self, reason: Disconnect) {
        let inner = self.inner.lock().unwrap();
        for conn in inner.connections.values() {
            conn.queue.close(reason);
        }
    }

    /// Subscribes a connection. The `subscribed` reply (and any recovered
    /// events) are queued when the channel is confirmed; a returned job must
    /// be run to fetch what a recovering listener missed.
    pub fn subscribe(
        &self,
        conn: Uuid,
        channel: &str,
        since: Option<Since>,
        id: Option<Value>,
    ) -> Result<Option<RecoveryJob>, SubscribeError> {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let connection = inner.connections.get_mut(&conn).ok_or(SubscribeError::UnknownConnection)?;
        if connection.channels.contains(channel) {
            let listener = inner.channels.get_mut(channel).and_then(|ch| ch.listeners.get_mut(&conn));
            return match listener {
                // Subscribe, unsubscribe, subscribe, all before the bus
                // confirmed: the listener stays, and owes the first two replies.
                Some(l) if l.leave.is_some() => {
                    l.resubscribe(since, id);
                    connection.leaving -= 1;
                    Ok(None)
                }
                _ => Err(SubscribeError::AlreadySubscribed),
            };
        }
        if connection.channels.len() - connection.leaving >= self.max_subscriptions {
            return Err(SubscribeError::LimitExceeded);
        }
        if !self.link_is_up() {
            return Err(SubscribeError::Unavailable);
        }
        let (queue, user_id) = (connection.queue.clone(), connection.user_id.clone());
        let name: Arc<str> = match inner.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(channel);
                let join = LinkCommand::Join { channel: name.clone(), since: None };
                if self.link.try_send(join).is_err() {
                    return Err(SubscribeError::Unavailable);
                }
                inner.channels.insert(
                    name.clone(),
                    Channel { link: LinkState::Pending { resuming: false }, position: None, listeners: HashMap::new() },
                );
                name
            }
        };
        connection.channels.insert(name.clone());
        let ch = inner.channels.get_mut(&name).expect("inserted above");
        if ch.link == LinkState::Leaving {
            ch.link = LinkState::Rejoining;
        }
        let phase = match since {
            Some(since) => Phase::Recovering { id, since, buffer: Vec::new(), fetching: false },
            None => Phase::Waiting { id },
        };
        let mut listener = Listener { queue, last_offset: 0, phase, earlier: Vec::new(), leave: None };
        let job = if ch.link == LinkState::Active {
            activate(&name, ch.position.as_ref(), conn, &mut listener)
        } else {
            None
        };
        ch.listeners.insert(conn, listener);
        inner.subscriptions += 1;
        self.update_gauges(inner);
        if self.has_presence(&name) {
            // After the channel's join: the bus announces it to the channel.
            self.send_presence(self.presence_join(&name, conn, user_id));
        }
        Ok(job)
    }

    /// Unsubscribes a connection. A subscribe that has not been answered
    /// yet is answered first, so that every frame gets its reply in order.
    pub fn unsubscribe(&self, conn: Uuid, channel: &str, id: Option<Value>) -> Unsubscribed {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        if !inner.connections.get(&conn).is_some_and(|c| c.channels.contains(channel)) {
            return Unsubscribed::NotSubscribed;
        }
        let listener = inner.channels.get_mut(channel).and_then(|ch| ch.listeners.get_mut(&conn));
        match listener {
            Some(l) if l.leave.is_some() => return Unsubscribed::NotSubscribed,
            Some(l) if !matches!(l.phase, Phase::Live) => {
                l.leave = Some(id);
                if let Some(c) = inner.connections.get_mut(&conn) {
                    c.leaving += 1;
                }
                return Unsubscribed::AfterSubscribed;
            }
            _ => {}
        }
        self.leave(inner, channel, conn);
        Unsubscribed::Now
    }

    /// Removes a listener from its channel and its connection.
    fn leave(&self, inner: &mut Inner, channel: &str, conn: Uuid) {
        if let Some(c) = inner.connections.get_mut(&conn) {
            c.channels.remove(channel);
        }
        self.detach(inner, channel, conn);
        self.update_gauges(inner);
    }

    /// Removes a listener whose `unsubscribe` waited for its `subscribed`,
    /// now that both are answered.
    fn leave_answered(&self, inner: &mut Inner, channel: &str, conn: Uuid) {
        if let Some(c) = inner.connections.get_mut(&conn) {
            c.leaving -= 1;
        }
        self.leave(inner, channel, conn);
    }

    fn detach(&self, inner: &mut Inner, channel: &str, conn: Uuid) {
        let Some(name) = inner.channels.get_key_value(channel).map(|(k, _)| k.clone()) else {
            return;
        };
        let ch = inner.channels.get_mut(channel).expect("present");
        if ch.listeners.remove(&conn).is_some() {
            inner.subscriptions -= 1;
            if self.has_presence(channel) {
                // Before the channel's leave, so that this node hears it too.
                self.send_presence(LinkCommand::PresenceLeave { channel: name.clone(), connection: conn });
            }
        }
        if ch.listeners.is_empty() {
            match ch.link {
                LinkState::Active | LinkState::Pending { .. } => {
                    if self.link.try_send(LinkCommand::Leave { channel: name }).is_ok() {
                        inner.channels.get_mut(channel).expect("present").link = LinkState::Leaving;
                    } else {
                        // The link is down or saturated; forget the channel and let the
                        // next relink not rejoin it.
                        inner.channels.remove(channel);
                    }
                }
                LinkState::Rejoining => ch.link = LinkState::Leaving,
                LinkState::Leaving => {}
            }
        }
    }

    /// The bus confirmed a channel. Returns recoveries to start.
    pub fn on_joined(&self, channel: &str, position: Position, recovered: bool) -> Vec<RecoveryJob> {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let Some(name) = inner.channels.get_key_value(channel).map(|(k, _)| k.clone()) else {
            return Vec::new();
        };
        let ch = inner.channels.get_mut(&name).expect("present");
        if ch.link == LinkState::Active && !recovered {
            // Unasked: the bus lost events of this channel (a shared backend
            // restarted empty, or failed over without them).
            tracing::warn!(channel, "the bus lost events of this channel; closing its connections with 4004");
            close_listeners(&inner.connections, ch);
            ch.position = Some(position);
            return Vec::new();
        }
        let LinkState::Pending { resuming } = ch.link else {
            return Vec::new();
        };
        if resuming && !recovered {
            // The bus lost what this node had not yet delivered: its listeners
            // must reconnect and recover on their own (SPEC §6).
            tracing::warn!(channel, "cannot resume channel after relink; closing its connections with 4004");
            close_listeners(&inner.connections, ch);
            ch.position = Some(position);
            ch.link = LinkState::Active;
            return Vec::new();
        }
        ch.link = LinkState::Active;
        if !resuming || ch.position.is_none() {
            ch.position = Some(position);
        }
        let mut jobs = Vec::new();
        let mut leaving = Vec::new();
        for (conn, listener) in ch.listeners.iter_mut() {
            jobs.extend(activate(&name, ch.position.as_ref(), *conn, listener));
            if listener.answer_leave(&name) {
                leaving.push(*conn);
            }
        }
        for conn in leaving {
            self.leave_answered(inner, &name, conn);
        }
        jobs
    }

    /// The bus confirmed a leave.
    pub fn on_left(&self, channel: &str) {
        let mut inner = self.inner.lock().unwrap();
        let Some((name, ch)) = inner.channels.get_key_value(channel) else {
            return;
        };
        match ch.link {
            LinkState::Leaving => {
                inner.channels.remove(channel);
            }
            LinkState::Rejoining => {
                let join = LinkCommand::Join { channel: name.clone(), since: None };
                if self.link.try_send(join).is_ok() {
                    inner.channels.get_mut(channel).expect("present").link = LinkState::Pending { resuming: false };
                }
            }
            _ => {}
        }
        self.update_gauges(&inner);
    }

    /// Fans a batch of one channel's events out to its listeners. An event
    /// that does not continue the channel (a gap, or a new epoch) means
    /// events were lost on the way: its listeners are closed with `4004`.
    pub fn on_events(&self, channel: &str, frames: &[Frame]) {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let Some(ch) = inner.channels.get_mut(channel) else {
            return;
        };
        if ch.link != LinkState::Active {
            return;
        }
        let mut sent = 0u64;
        for frame in frames {
            let Some(pos) = ch.position.as_mut() else {
                break;
            };
            if frame.offset <= pos.offset && *frame.epoch == *pos.epoch {
                continue;
            }
            if frame.offset != pos.offset + 1 || *frame.epoch != *pos.epoch {
                tracing::warn!(
                    channel,
                    offset = frame.offset,
                    last = pos.offset,
                    "gap in the channel; closing its connections with 4004"
                );
                pos.offset = frame.offset;
                pos.epoch = frame.epoch.to_string();
                close_listeners(&inner.connections, ch);
                continue;
            }
            pos.offset = frame.offset;
            pos.epoch = frame.epoch.to_string();
            for listener in ch.listeners.values_mut() {
                match &mut listener.phase {
                    Phase::Live => {
                        if frame.offset > listener.last_offset {
                            listener.last_offset = frame.offset;
                            listener.queue.push(frame.text.clone());
                            sent += 1;
                        }
                    }
                    Phase::Recovering { buffer, .. } => {
                        if buffer.len() as u64 > self.recovery_max {
                            listener.queue.close(Disconnect::SLOW);
                        } else {
                            buffer.push((frame.offset, frame.text.clone()));
                        }
                    }
                    Phase::Waiting { .. } => {}
                }
            }
        }
        self.metrics.messages_sent.inc_by(sent);
    }

    /// Delivers transient events of a channel (offset 0: presence `join`
    /// and `leave`) to its live listeners, outside of positions and gap checks.
    pub fn on_transient(&self, channel: &str, frames: &[Frame]) {
        let inner = self.inner.lock().unwrap();
        let Some(ch) = inner.channels.get(channel) else {
            return;
        };
        let mut sent = 0u64;
        for listener in ch.listeners.values().filter(|l| matches!(l.phase, Phase::Live)) {
            for frame in frames {
                listener.queue.push(frame.text.clone());
                sent += 1;
            }
        }
        self.metrics.messages_sent.inc_by(sent);
    }

    /// Delivers frames to every connection (the `broadcast` channel).
    pub fn on_broadcast(&self, frames: &[Frame]) {
        let inner = self.inner.lock().unwrap();
        for conn in inner.connections.values() {
            for frame in frames {
                conn.queue.push(frame.text.clone());
            }
        }
        self.metrics.messages_sent.inc_by((frames.len() * inner.connections.len()) as u64);
    }

    /// Completes a recovery with what history returned (or `None` when the
    /// bus could not be read).
    ///
    /// Only a listener that waits for a job (`fetching`) takes it, and every
    /// check comes before the listener is touched: once its subscribe's id is
    /// taken it must reach `Live`, or its `subscribed` would never be sent.
    pub fn finish_recovery(&self, job: &RecoveryJob, fetched: Option<Recovered>) {
        let mut inner = self.inner.lock().unwrap();
        let Some(ch) = inner.channels.get_mut(&job.channel) else {
            return;
        };
        let Some(current) = ch.position.clone() else {
            return;
        };
        let Some(listener) = ch.listeners.get_mut(&job.connection) else {
            return;
        };
        let Phase::Recovering { id, since, buffer, fetching: true } = &mut listener.phase else {
            return;
        };
        let id = id.take();
        let buffer = std::mem::take(buffer);
        let Some(fetched) = fetched else {
            listener.answer_earlier(&job.channel, &current);
            listener.queue.push(Utf8Bytes::from(protocol::error(
                ErrorCode::Unavailable.as_str(),
                "the event bus is unavailable",
                id.as_ref(),
            )));
            listener.phase = Phase::Live;
            listener.last_offset = current.offset;
            if listener.answer_leave(&job.channel) {
                self.leave_answered(&mut inner, &job.channel, job.connection);
            }
            return;
        };
        let merged = recovery::merge(since, &current, fetched, buffer, self.recovery_max);
        let position = Position { offset: merged.last, epoch: current.epoch.clone() };
        let missed = merged.frames.len() as u64;
        listener.answer_earlier(&job.channel, &position);
        listener.queue.push(subscribed(
            &job.channel,
            id.as_ref(),
            &position,
            Some(Recovery { recovered: merged.complete, missed }),
        ));
        for text in merged.frames {
            listener.queue.push(text);
        }
        listener.last_offset = merged.last;
        listener.phase = Phase::Live;
        if listener.answer_leave(&job.channel) {
            self.leave_answered(&mut inner, &job.channel, job.connection);
        }
    }

    /// The bus link was lost: new subscribes are refused until it is back.
    pub fn link_down(&self) {
        let _inner = self.inner.lock().unwrap();
        self.link_up.store(false, Ordering::Release);
        self.link_watch.send_replace(false);
    }

    /// The bus link is back: returns the joins to send (with positions, so
    /// that nothing published meanwhile is missed) and opens the hub again.
    pub fn relink(&self) -> Vec<LinkCommand> {
        let mut inner = self.inner.lock().unwrap();
        inner.channels.retain(|_, ch| ch.link != LinkState::Leaving);
        let mut joins = Vec::new();
        for (name, ch) in inner.channels.iter_mut() {
            let since = match ch.link {
                LinkState::Active | LinkState::Pending { resuming: true } => ch.position.clone(),
                _ => None,
            };
            ch.link = LinkState::Pending { resuming: since.is_some() };
            joins.push(LinkCommand::Join { channel: name.clone(), since });
        }
        // The presence entries of this node's connections, which the bus
        // dropped with the old stream, after the joins of their channels.
        for (name, ch) in inner.channels.iter().filter(|(name, _)| self.has_presence(name)) {
            for conn in ch.listeners.keys() {
                let user_id = inner.connections.get(conn).and_then(|c| c.user_id.clone());
                joins.push(self.presence_join(name, *conn, user_id));
            }
        }
        self.link_up.store(true, Ordering::Release);
        self.link_watch.send_replace(true);
        self.update_gauges(&inner);
        joins
    }

    /// Returns `(connections, users, {channel: listeners})` on this node.
    pub fn stats(&self) -> (usize, usize, Vec<(String, usize)>) {
        let inner = self.inner.lock().unwrap();
        let mut channels: Vec<_> =
            inner.channels.iter().map(|(k, v)| (k.to_string(), v.listeners.len())).filter(|(_, n)| *n > 0).collect();
        channels.sort();
        (inner.connections.len(), inner.users.len(), channels)
    }

    /// Returns the listeners of a channel and its position on this node.
    pub fn channel(&self, channel: &str) -> (Vec<Uuid>, Option<Position>) {
        let inner = self.inner.lock().unwrap();
        match inner.channels.get(channel) {
            Some(ch) => (ch.listeners.keys().copied().collect(), ch.position.clone()),
            None => (Vec::new(), None),
        }
    }

    fn update_gauges(&self, inner: &Inner) {
        self.metrics.subscriptions.set(inner.subscriptions as i64);
        self.metrics.channels.set(inner.channels.len() as i64);
    }
}

/// Closes every connection listening to `ch` with `4004`: it cannot be
/// given what it missed, so it must reconnect and recover (SPEC §6).
fn close_listeners(connections: &HashMap<Uuid, Connection>, ch: &Channel) {
    for conn in ch.listeners.keys() {
        if let Some(c) = connections.get(conn) {
            c.queue.close(Disconnect::INSUFFICIENT_STATE);
        }
    }
}

/// Moves a listener on once its channel is active: a plain subscribe is
/// answered now; a recovery is handed back as a job.
fn activate(
    channel: &Arc<str>,
    position: Option<&Position>,
    conn: Uuid,
    listener: &mut Listener,
) -> Option<RecoveryJob> {
    let position = position?;
    match &mut listener.phase {
        Phase::Waiting { id } => {
            let id = id.take();
            listener.answer_earlier(channel, position);
            listener.queue.push(subscribed(channel, id.as_ref(), position, None));
            listener.last_offset = position.offset;
            listener.phase = Phase::Live;
            None
        }
        Phase::Recovering { since, fetching, .. } if !*fetching => {
            *fetching = true;
            Some(RecoveryJob { connection: conn, channel: channel.clone(), since: since.clone() })
        }
        _ => None,
    }
}

// === impl Listener ===

impl Listener {
    /// A subscribe after an `unsubscribe` that is still waiting: the earlier
    /// subscribe and unsubscribe will be answered first, then this one. Its
    /// `since` applies unless a recovery is already being fetched.
    fn resubscribe(&mut self, since: Option<Since>, id: Option<Value>) {
        let leave = self.leave.take().flatten();
        let earlier_id = match &mut self.phase {
            Phase::Waiting { id: first } => {
                let first = first.take();
                if let Some(since) = since {
                    self.phase = Phase::Recovering { id, since, buffer: Vec::new(), fetching: false };
                } else {
                    self.phase = Phase::Waiting { id };
                }
                first
            }
            Phase::Recovering { id: first, since: old, fetching, .. } => {
                if let (Some(since), false) = (since, *fetching) {
                    *old = since;
                }
                std::mem::replace(first, id)
            }
            Phase::Live => None,
        };
        self.earlier.push(Reply::Subscribed(earlier_id));
        self.earlier.push(Reply::Unsubscribed(leave));
    }

    /// Sends the replies owed to earlier frames, before this subscribe's own.
    fn answer_earlier(&mut self, channel: &str, position: &Position) {
        for reply in self.earlier.drain(..) {
            let frame = match reply {
                Reply::Subscribed(id) => subscribed(channel, id.as_ref(), position, None),
                Reply::Unsubscribed(id) => unsubscribed(channel, id.as_ref()),
            };
            self.queue.push(frame);
        }
    }

    /// Answers an `unsubscribe` that waited for `subscribed`; returns whether
    /// the listener must now be removed.
    fn answer_leave(&mut self, channel: &str) -> bool {
        if !matches!(self.phase, Phase::Live) {
            return false;
        }
        match self.leave.take() {
            Some(id) => {
                self.queue.push(unsubscribed(channel, id.as_ref()));
                true
            }
            None => false,
        }
    }
}

mod recovery;

#[cfg(test)]
mod tests;
