//! The core of the event bus: channels, their subscribers, and the paths in
//! (publish, join) and out (history, channel lists).
//!
//! `Bus` is a cheap `Clone` handle around `Arc<Shared>`, over one of two
//! engines (`Engine`): where events are numbered, kept, and heard.
//!
//! - **Local** (`memory`, `embedded`): one writer thread (see `writer.rs`)
//!   numbers events, commits them to the store in groups and then hands them
//!   to live subscribers. Joins take the channel's lock, replay what was
//!   missed from the store and register the subscriber under that same lock,
//!   so that a subscriber sees every event exactly once, in offset order,
//!   across replay and live delivery.
//! - **Shared** (`redis`, `nats`; see `broker.rs`): the backend numbers and
//!   keeps events; every bus node hears them on its live feed and feeds
//!   them in through `on_live`. A
//!   channel's feed is synced (subscribed, then its position read) before
//!   anyone joins it, and a join that must replay reads history while the
//!   live events that arrive meanwhile are buffered for it; the two are
//!   merged by offset and must be contiguous, or the join is not recovered.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::future::{BoxFuture, FutureExt};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    Event, NewEvent, Position, Published,
    broker::Broker,
    channel::{Channel, ChannelState, Channels, Delivery, Feed, Joining, Subscriber, deliver_live},
    config::Config,
    error::BusError,
    store::Store,
    writer::WriteRequest,
};

/// How many deliveries a subscription stream may have queued before it is
/// considered lagging and ended (the subscriber then resubscribes with its
/// position and recovers from history).
pub const SUBSCRIBER_QUEUE: usize = 4096;

#[derive(Clone)]
pub struct Bus {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) engine: Engine,
    /// The epoch of a local store; a shared backend keeps one per channel.
    pub(crate) epoch: Arc<str>,
    /// Every channel this node knows.
    pub(crate) channels: Arc<Channels>,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Presence entries (see `presence.rs`).
    pub(crate) presence: Arc<crate::presence::Presence>,
    next_subscriber: AtomicU64,
    next_join: AtomicU64,
}

/// Where events are numbered, kept and heard.
pub(crate) enum Engine {
    /// This process numbers events (the writer thread) and keeps them.
    Local { store: Arc<dyn Store>, writer: mpsc::Sender<WriteRequest> },
    /// A shared backend numbers and keeps them; every node hears them.
    Shared(Arc<dyn Broker>),
}

/// One subscription stream: any number of channels, one queue.
pub struct Subscription {
    pub(crate) bus: Bus,
    pub(crate) id: u64,
    subscriber: Subscriber,
    /// By name: a stream may hold `max_stream_channels` of them.
    channels: HashMap<Arc<str>, Arc<Channel>>,
    /// Presence entries this stream added, by channel and connection id;
    /// removed when it ends (see `presence.rs`).
    pub(crate) presence: std::collections::HashSet<(Arc<str>, String)>,
}

/// Deepest nesting of arrays and objects accepted in event data: every
/// JSON parser a subscriber may use (serde_json stops at 128) can read the
/// frame that carries it.
pub const MAX_NESTING: usize = 64;

/// Returns how deeply arrays and objects nest in JSON text (strings are skipped).
fn nesting_depth(data: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in data {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Returns whether arrays and objects nest deeper than `max` in JSON text.
fn nested_deeper_than(data: &[u8], max: usize) -> bool {
    // Text with no more opening brackets than `max` cannot nest deeper: this
    // count (vectorized) spares nearly every event the stateful scan.
    data.iter().filter(|&&b| b == b'[' || b == b'{').count() > max && nesting_depth(data) > max
}

// === impl Bus ===

impl Bus {
    /// A bus over a local store; the receiver is the writer's.
    pub(crate) fn local(config: Config, store: Arc<dyn Store>) -> (Bus, mpsc::Receiver<WriteRequest>) {
        let (writer, rx) = mpsc::channel(8192);
        let epoch = store.epoch();
        (Bus::with_engine(config, Engine::Local { store, writer }, epoch), rx)
    }

    pub(crate) fn with_engine(config: Config, engine: Engine, epoch: Arc<str>) -> Bus {
        let broker = match &engine {
            Engine::Local { .. } => None,
            Engine::Shared(broker) => Some(broker.clone()),
        };
        let presence_store = broker.as_ref().map(|broker| broker.presence());
        let presence = crate::presence::Presence::new(presence_store, config.presence_refresh);
        Bus {
            shared: Arc::new(Shared {
                config,
                engine,
                channels: Arc::new(Channels::new(broker, epoch.clone())),
                epoch,
                metrics: crate::metrics::Metrics::new(),
                presence,
                next_subscriber: AtomicU64::new(1),
                next_join: AtomicU64::new(1),
            }),
        }
    }

    /// The epoch of the whole history, or `None` when each channel has its own.
    pub fn epoch(&self) -> Option<&str> {
        match self.shared.engine {
            Engine::Local { .. } => Some(&self.shared.epoch),
            Engine::Shared(_) => None,
        }
    }

    pub fn backend(&self) -> &'static str {
        self.shared.config.backend.name()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Looks up a known channel.
    pub(crate) fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.shared.channels.get(name)
    }

    /// Checks an event against the contract (SPEC §5, §9).
    pub fn check(&self, event: &NewEvent) -> Result<(), BusError> {
        switchboard_proto::channel::validate(&event.channel)?;
        if event.name.len() > 255 {
            return Err(BusError::InvalidArgument("event name is longer than 255 bytes".into()));
        }
        let size =
            event.name.len() + event.data.len() + event.meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let limit = self.shared.config.max_event_bytes;
        if size > limit {
            return Err(BusError::TooLarge { size, limit });
        }
        // UTF-8 first: serde_json skips over the bytes of strings it ignores.
        let text = std::str::from_utf8(&event.data)
            .map_err(|e| BusError::InvalidJson(format!("data is not valid UTF-8: {e}")))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| BusError::InvalidJson(e.to_string()))?;
        // Skipping strings does not decode their escapes, so a lone surrogate
        // (`"\ud800"`) would pass and be refused by every reader of the event
        // later; text with an escape is decoded once to find out.
        if memchr::memmem::find(&event.data, b"\\u").is_some() {
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| BusError::InvalidJson(e.to_string()))?;
        }
        if nested_deeper_than(&event.data, MAX_NESTING) {
            return Err(BusError::InvalidJson(format!("data is nested deeper than {MAX_NESTING} levels")));
        }
        if event.idempotency_key.as_ref().is_some_and(|k| k.len() > 255) {
            return Err(BusError::InvalidArgument("idempotency key is longer than 255 bytes".into()));
        }
        Ok(())
    }

    /// Stores an event and returns its position once it is committed.
    pub async fn publish(&self, event: NewEvent) -> Result<Published, BusError> {
        self.submit(event).await?.await
    }

    /// The local engine's writer and store.
    pub(crate) fn local_parts(&self) -> Option<(&mpsc::Sender<WriteRequest>, &Arc<dyn Store>)> {
        match &self.shared.engine {
            Engine::Local { store, writer } => Some((writer, store)),
            Engine::Shared(_) => None,
        }
    }

    /// Renders the bus's Prometheus metrics.
    pub fn render_metrics(&self) -> String {
        let (channels, subscriptions, published) = self.stats();
        let m = &self.shared.metrics;
        m.channels.set(channels as i64);
        m.subscriptions.set(subscriptions as i64);
        let counted = m.published.get();
        m.published.inc_by(published.saturating_sub(counted));
        m.render()
    }

    /// Queues an event for the writer and returns the future of its result.
    /// Events submitted one after another are stored in that order, however
    /// their results are awaited.
    pub async fn submit(
        &self,
        event: NewEvent,
    ) -> Result<impl Future<Output = Result<Published, BusError>> + use<>, BusError> {
        self.check(&event)?;
        let started = std::time::Instant::now();
        let shared = self.shared.clone();
        let (reply, rx) = oneshot::channel();
        // The writer counts what it stores; a shared backend's stores are counted here.
        let counted_here = match &self.shared.engine {
            Engine::Local { writer, .. } => {
                writer.send(WriteRequest::Publish { event, reply }).await.map_err(|_| BusError::ShuttingDown)?;
                false
            }
            Engine::Shared(broker) => {
                broker.publish(event, reply).await?;
                true
            }
        };
        Ok(async move {
            let result = rx.await.map_err(|_| BusError::ShuttingDown)?;
            shared.metrics.publish_duration.observe(started.elapsed().as_secs_f64());
            if counted_here && result.as_ref().is_ok_and(|p| !p.duplicate) {
                shared.channels.published_total.fetch_add(1, Ordering::Relaxed);
            }
            result
        })
    }

    /// Opens a subscription stream whose deliveries arrive on the returned receiver.
    pub fn subscribe(&self) -> (Subscription, mpsc::Receiver<Delivery>, CancellationToken) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let lagged = CancellationToken::new();
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber::new(tx, lagged.clone());
        let presence = Default::default();
        (Subscription { bus: self.clone(), id, subscriber, channels: HashMap::new(), presence }, rx, lagged)
    }

    /// Returns stored events after `since` (or from the oldest), and the channel's position.
    /// Store reads run on the blocking pool, never on the runtime's workers.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<Event>, Position), BusError> {
        switchboard_proto::channel::validate(channel)?;
        let store = match &self.shared.engine {
            Engine::Local { store, .. } => store.clone(),
            Engine::Shared(broker) => return broker.history(Arc::from(channel), since, limit, reverse).await,
        };
        let (top, first) = self.position_of(channel);
        let after = since.unwrap_or(0).max(first.saturating_sub(1));
        // Events above `top` may be committed but not yet announced; they are left out
        // so that history never runs ahead of live delivery.
        let limit = limit.min(top.saturating_sub(after) as usize);
        let name = channel.to_owned();
        let events = tokio::task::spawn_blocking(move || {
            if reverse {
                let mut evs = store.read(&name, top.saturating_sub(limit as u64).max(after), limit)?;
                evs.reverse();
                Ok(evs)
            } else {
                store.read(&name, after, limit)
            }
        })
        .await
        .map_err(|_| BusError::ShuttingDown)?
        .map_err(BusError::Store)?;
        Ok((events, Position { offset: top, epoch: self.shared.epoch.clone() }))
    }

    fn position_of(&self, channel: &str) -> (u64, u64) {
        let ch = self.shared.channels.get(channel);
        match ch {
            Some(ch) => {
                let st = ch.state.lock().unwrap();
                (st.top, st.first)
            }
            None => (0, 1),
        }
    }

    /// Lists channels whose name starts with `prefix`: name, position, and
    /// subscribers (on this node).
    pub async fn channels(&self, prefix: &str) -> Result<Vec<(Arc<str>, Position, u64)>, BusError> {
        let subscribers =
            |name: &str| self.channel(name).map_or(0, |ch| ch.state.lock().unwrap().subscribers.len() as u64);
        let mut out: Vec<_> = match &self.shared.engine {
            Engine::Local { .. } => self
                .shared
                .channels
                .all()
                .into_iter()
                .filter(|ch| ch.name.starts_with(prefix))
                .map(|ch| {
                    let st = ch.state.lock().unwrap();
                    let pos = Position { offset: st.top, epoch: st.epoch.clone() };
                    (ch.name.clone(), pos, st.subscribers.len() as u64)
                })
                .collect(),
            Engine::Shared(broker) => broker
                .channels(prefix.to_owned())
                .await?
                .into_iter()
                .map(|(name, pos)| {
                    let n = subscribers(&name);
                    (name, pos, n)
                })
                .collect(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.shared.channels.len() as u64,
            self.shared.channels.subscriptions.load(Ordering::Relaxed),
            self.shared.channels.published_total.load(Ordering::Relaxed),
        )
    }
}

// === impl Subscription ===

impl Subscription {
    /// Adds a channel. With `since`, replays the events after it when the
    /// whole gap is stored (SPEC §6), and reports `recovered: false` otherwise.
    pub fn join(&mut self, channel: &str, since: Option<Position>) {
        if let Err(e) = switchboard_proto::channel::validate(channel) {
            let failed =
                Delivery::JoinFailed { channel: channel.to_owned(), code: "invalid_argument", error: e.to_string() };
            self.subscriber.deliver(failed);
            return;
        }
        if let Some(ch) = self.channels.get(channel) {
            // Joining twice restarts nothing; answer with the current position.
            let st = ch.state.lock().unwrap();
            let position = Position { offset: st.top, epoch: st.epoch.clone() };
            self.subscriber.deliver(Delivery::Joined {
                channel: ch.name.clone(),
                position,
                recovered: since.is_some(),
                missed: 0,
            });
            return;
        }
        let max = self.bus.shared.config.max_stream_channels;
        if self.channels.len() >= max {
            let error = format!("at most {max} channels on one Subscribe stream (limits.max_stream_channels)");
            self.subscriber.deliver(Delivery::JoinFailed {
                channel: channel.to_owned(),
                code: "limit_exceeded",
                error,
            });
            return;
        }
        let (id, subscriber) = (self.id, self.subscriber.clone());
        let bus = self.bus.clone();
        let shared_backend = matches!(bus.shared.engine, Engine::Shared(_));
        let (ch, replay, resync) = bus.shared.channels.with_channel(channel, |ch, st| {
            // A position past what this node has heard, in its epoch: this
            // node lags behind the one the client (or a failed-over
            // gateway) came from, so it catches up before answering.
            let ahead = shared_backend
                && since.as_ref().is_some_and(|s| *s.epoch == *st.epoch && s.offset > st.top)
                && matches!(st.feed, Feed::Live);
            let (replay, resync) = match st.feed {
                Feed::Live if !ahead => (start_join(&bus, &ch.name, st, id, subscriber, since), None),
                // Answered once the feed is synced.
                _ => {
                    let seq = bus.shared.next_join.fetch_add(1, Ordering::Relaxed);
                    st.joining.insert(id, Joining { seq, subscriber, since, replaying: None });
                    (None, ahead.then(|| begin_sync(st, Vec::new())))
                }
            };
            (ch.clone(), replay, resync)
        });
        self.channels.insert(ch.name.clone(), ch.clone());
        if let Some(replay) = replay {
            bus.replay(ch.clone(), replay);
        }
        if let Some(generation) = resync {
            bus.resync(ch, generation);
        }
    }

    /// Removes a channel and confirms with `Left`.
    pub fn leave(&mut self, channel: &str) {
        if let Some(ch) = self.channels.remove(channel) {
            self.detach(&ch);
        }
        self.subscriber.deliver(Delivery::Left { channel: Arc::from(channel) });
    }

    fn detach(&self, ch: &Arc<Channel>) {
        {
            let mut st = ch.state.lock().unwrap();
            st.joining.remove(&self.id);
            if st.subscribers.remove(&self.id).is_some() {
                self.bus.shared.channels.subscribed(false);
            }
        }
        self.bus.shared.channels.forget_if_idle(ch);
    }
}

/// A replay to read for a joining subscriber: the events after `after` up to `to`.
pub(crate) struct Replay {
    id: u64,
    seq: u64,
    after: u64,
    to: u64,
}

/// Answers a join on a live channel at once, or starts its replay: with
/// `since` in the channel's epoch and a gap of at most `recovery_max`, the
/// subscriber waits in `joining`, collecting live events, while the gap is read.
fn start_join(
    bus: &Bus,
    channel: &Arc<str>,
    st: &mut ChannelState,
    id: u64,
    subscriber: Subscriber,
    since: Option<Position>,
) -> Option<Replay> {
    let shared = &bus.shared;
    let position = Position { offset: st.top, epoch: st.epoch.clone() };
    let recoverable = since.as_ref().is_some_and(|since| {
        *since.epoch == *st.epoch
            && since.offset <= st.top
            && since.offset + 1 >= st.first
            && st.top - since.offset <= shared.config.recovery_max
    });
    match since {
        Some(since) if recoverable && since.offset < st.top => {
            let seq = shared.next_join.fetch_add(1, Ordering::Relaxed);
            let replay = Replay { id, seq, after: since.offset, to: st.top };
            st.joining.insert(id, Joining { seq, subscriber, since: Some(since), replaying: Some(Vec::new()) });
            Some(replay)
        }
        _ => {
            let joined = Delivery::Joined { channel: channel.clone(), position, recovered: recoverable, missed: 0 };
            if subscriber.deliver(joined) {
                st.subscribers.insert(id, subscriber);
                shared.channels.subscribed(true);
            }
            None
        }
    }
}

/// Puts a channel's feed into `Syncing` (keeping what it heard) and returns
/// the new sync's generation: only that sync's result will be taken.
fn begin_sync(st: &mut ChannelState, heard: Vec<Event>) -> u64 {
    match &mut st.feed {
        Feed::Syncing { heard: held } => held.extend(heard),
        Feed::Live => st.feed = Feed::Syncing { heard },
    }
    st.sync_generation += 1;
    st.sync_generation
}

/// Whether `events` are exactly the offsets `after + 1 ..= to` of `epoch`, in order.
fn contiguous(events: &[Event], epoch: &str, after: u64, to: u64) -> bool {
    to >= after
        && events.len() as u64 == to - after
        && events.iter().zip(after + 1..).all(|(e, offset)| e.offset == offset && *e.epoch == *epoch)
}

// === the paths of replays and of shared backends' live feeds ===

impl Bus {
    /// Reads a joining subscriber's replay off the channel's lock, then answers it.
    fn replay(&self, ch: Arc<Channel>, replay: Replay) {
        let bus = self.clone();
        let limit = (replay.to - replay.after) as usize;
        let read: BoxFuture<'static, Result<Vec<Event>, BusError>> = match &self.shared.engine {
            Engine::Local { store, .. } => {
                let (store, name, after) = (store.clone(), ch.name.clone(), replay.after);
                async move {
                    tokio::task::spawn_blocking(move || store.read(&name, after, limit))
                        .await
                        .map_err(|_| BusError::ShuttingDown)?
                        .map_err(BusError::Store)
                }
                .boxed()
            }
            Engine::Shared(broker) => broker.range(ch.name.clone(), replay.after, replay.to),
        };
        tokio::spawn(async move {
            let events = read.await;
            bus.on_replayed(&ch, replay, events);
        });
    }

    /// Answers a joining subscriber whose replay was read: `Joined`, the
    /// replay, then what was heard meanwhile; or, when the replay is not the
    /// whole gap, `recovered: false` and nothing of it.
    fn on_replayed(&self, ch: &Arc<Channel>, replay: Replay, events: Result<Vec<Event>, BusError>) {
        let mut st = ch.state.lock().unwrap();
        if st.joining.get(&replay.id).is_none_or(|j| j.seq != replay.seq) {
            return; // It left meanwhile (and may have joined again).
        }
        let joining = st.joining.remove(&replay.id).expect("checked");
        let events = events.unwrap_or_else(|e| {
            tracing::error!(cause = %e, channel = &*ch.name, "history read failed");
            Vec::new()
        });
        let same_epoch = joining.since.as_ref().is_some_and(|s| *s.epoch == *st.epoch);
        let recovered = same_epoch && contiguous(&events, &st.epoch, replay.after, replay.to);
        let heard = joining.replaying.unwrap_or_default();
        let subscriber = joining.subscriber;
        let ok = if recovered {
            let position = Position { offset: replay.to, epoch: st.epoch.clone() };
            let missed = events.len() as u64;
            subscriber.deliver(Delivery::Joined { channel: ch.name.clone(), position, recovered, missed })
                && subscriber.deliver(Delivery::Events(events.into()))
                && (heard.is_empty() || subscriber.deliver(Delivery::Events(heard.into())))
        } else {
            let position = Position { offset: st.top, epoch: st.epoch.clone() };
            subscriber.deliver(Delivery::Joined { channel: ch.name.clone(), position, recovered, missed: 0 })
        };
        if ok {
            st.subscribers.insert(replay.id, subscriber);
            self.shared.channels.subscribed(true);
        }
    }

    /// Events heard on a shared backend's live feed, in the order it
    /// published them. A gap, or a new epoch, starts a resync.
    pub(crate) fn on_live(&self, channel: &str, events: Vec<Event>) {
        let Some(ch) = self.channel(channel) else {
            return;
        };
        let mut st = ch.state.lock().unwrap();
        if let Feed::Syncing { heard } = &mut st.feed {
            heard.extend(events);
            return;
        }
        if let Some(rest) = self.apply_live(&ch.name, &mut st, events, false) {
            let generation = begin_sync(&mut st, rest);
            drop(st);
            self.resync(ch, generation);
        }
    }

    /// Delivers the events that continue the channel; returns the rest from
    /// the first that does not, when one does not. An offset already
    /// delivered is skipped when `after_sync` (the sync read it too);
    /// otherwise it is a sign that the backend lost writes and numbers them again,
    /// and starts a resync, which finds out.
    fn apply_live(
        &self,
        channel: &str,
        st: &mut ChannelState,
        events: Vec<Event>,
        after_sync: bool,
    ) -> Option<Vec<Event>> {
        let mut next = Vec::new();
        let mut events = events.into_iter();
        let mut rest = None;
        for e in events.by_ref() {
            if after_sync && *e.epoch == *st.epoch && e.offset <= st.top {
                continue;
            }
            if *e.epoch == *st.epoch && e.offset == st.top + 1 {
                st.top = e.offset;
                next.push(e);
                continue;
            }
            tracing::warn!(channel, offset = e.offset, top = st.top, "gap in the live feed; resyncing");
            rest = Some(std::iter::once(e).collect::<Vec<_>>());
            break;
        }
        if !next.is_empty() {
            deliver_live(st, next.into());
        }
        rest.map(|mut rest| {
            rest.extend(events);
            rest
        })
    }

    /// Marks every channel as syncing and syncs it again: after the live
    /// feed was lost (a reconnect to the backend), whatever was published meanwhile
    /// is read from the stream.
    pub(crate) fn resync_all(&self) {
        for ch in self.shared.channels.all() {
            let generation = begin_sync(&mut ch.state.lock().unwrap(), Vec::new());
            self.resync(ch, generation);
        }
    }

    /// The Pub/Sub subscription of a channel is confirmed: it is synced from here.
    pub(crate) fn listened(&self, channel: &str) {
        if let Some(ch) = self.channel(channel) {
            let generation = begin_sync(&mut ch.state.lock().unwrap(), Vec::new());
            self.resync(ch, generation);
        }
    }

    /// Reads a channel's position (and what it missed) from the shared
    /// backend and hands both to `on_synced` as sync `generation`. Retried
    /// with backoff while the backend cannot be reached, until the channel
    /// is forgotten or a later sync has begun.
    fn resync(&self, ch: Arc<Channel>, generation: u64) {
        let Engine::Shared(broker) = &self.shared.engine else {
            return;
        };
        let (bus, broker) = (self.clone(), broker.clone());
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(50);
            loop {
                if !bus.channel(&ch.name).is_some_and(|c| Arc::ptr_eq(&c, &ch)) {
                    return;
                }
                let Some(had) = bus.sync_position(&ch, generation) else {
                    return; // A later sync took over.
                };
                match broker.sync(ch.name.clone(), had).await {
                    Ok((position, fill)) => {
                        bus.on_synced(&ch, generation, position, fill);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, channel = &*ch.name, "cannot sync channel; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// The channel's position before sync `generation`, if it had one; `None`
    /// when a later sync has begun.
    fn sync_position(&self, ch: &Channel, generation: u64) -> Option<Option<Position>> {
        let st = ch.state.lock().unwrap();
        (st.sync_generation == generation)
            .then(|| (!st.epoch.is_empty()).then(|| Position { offset: st.top, epoch: st.epoch.clone() }))
    }

    /// A channel's feed is synced: its position is `position` and `fill`
    /// holds the events after the position it had before, up to it. Live
    /// subscribers either continue with `fill`, or, when it cannot be
    /// continued (the backend lost events or was emptied: a new epoch), are
    /// told with an unrecovered `Joined` at the new position (a gateway then
    /// closes its clients with `4004`). Joins that waited are answered.
    pub(crate) fn on_synced(&self, ch: &Arc<Channel>, generation: u64, position: Position, fill: Vec<Event>) {
        let mut st = ch.state.lock().unwrap();
        if generation != st.sync_generation || !matches!(st.feed, Feed::Syncing { .. }) {
            return; // A later sync is under way, or this one came too late.
        }
        let Feed::Syncing { heard } = std::mem::replace(&mut st.feed, Feed::Live) else {
            unreachable!("checked above");
        };
        if !st.epoch.is_empty() {
            let continues = *position.epoch == *st.epoch && contiguous(&fill, &position.epoch, st.top, position.offset);
            if continues {
                if !fill.is_empty() {
                    deliver_live(&mut st, fill.into());
                }
            } else {
                tracing::warn!(
                    channel = &*ch.name,
                    "the backend lost events of this channel; subscribers must recover"
                );
                for joining in st.joining.values_mut() {
                    // Their replay can no longer be merged: answered unrecovered.
                    if joining.replaying.is_some() {
                        joining.since = None;
                    }
                }
                let lost = Delivery::Joined {
                    channel: ch.name.clone(),
                    position: position.clone(),
                    recovered: false,
                    missed: 0,
                };
                st.subscribers.retain(|_, s| s.deliver(lost.clone()));
            }
        }
        st.top = position.offset;
        st.epoch = position.epoch;
        if let Some(rest) = self.apply_live(&ch.name, &mut st, heard, true) {
            let generation = begin_sync(&mut st, rest);
            drop(st);
            self.resync(ch.clone(), generation);
            return;
        }
        let waiting: Vec<u64> = st.joining.iter().filter(|(_, j)| j.replaying.is_none()).map(|(id, _)| *id).collect();
        let mut replays = Vec::new();
        for id in waiting {
            let joining = st.joining.remove(&id).expect("listed");
            replays.extend(start_join(self, &ch.name, &mut st, id, joining.subscriber, joining.since));
        }
        drop(st);
        for replay in replays {
            self.replay(ch.clone(), replay);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Entries first: their `leave` reaches the channels' subscribers.
        self.drop_presence();
        for ch in std::mem::take(&mut self.channels).into_values() {
            self.detach(&ch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{nested_deeper_than, nesting_depth};

    #[test]
    fn nesting_depth_skips_strings() {
        assert_eq!(nesting_depth(b"1"), 0);
        assert_eq!(nesting_depth(br#"{"a":[1,{"b":2}]}"#), 3);
        assert_eq!(nesting_depth(br#"{"a":"[[[{{{\"]]]"}"#), 1);
        assert_eq!(nesting_depth("[".repeat(100).as_bytes()), 100);
    }

    #[test]
    fn many_brackets_side_by_side_are_not_deep() {
        let wide = format!("[{}]", vec!["[]"; 200].join(","));
        assert!(!nested_deeper_than(wide.as_bytes(), 64));
        assert!(!nested_deeper_than(format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes(), 64));
        assert!(nested_deeper_than(format!("{}{}", "[".repeat(65), "]".repeat(65)).as_bytes(), 64));
    }

    /// A store whose next read waits until it is let go: a recovering
    /// join's replay held open, at the edge of this unit test.
    struct HeldRead {
        inner: crate::store::memory::MemoryStore,
        release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl crate::store::Store for HeldRead {
        fn epoch(&self) -> std::sync::Arc<str> {
            self.inner.epoch()
        }
        fn channels(&self) -> Result<Vec<crate::store::ChannelMeta>, crate::StoreError> {
            self.inner.channels()
        }
        fn idempotency(&self, now_ms: i64) -> Result<Vec<crate::store::IdempotencyRecord>, crate::StoreError> {
            self.inner.idempotency(now_ms)
        }
        fn commit(&self, batch: &crate::store::Batch) -> Result<(), crate::StoreError> {
            self.inner.commit(batch)
        }
        fn read(&self, channel: &str, after: u64, limit: usize) -> Result<Vec<crate::Event>, crate::StoreError> {
            let held = self.release.lock().unwrap().take();
            if let Some(release) = held {
                let _ = release.recv();
            }
            self.inner.read(channel, after, limit)
        }
        fn expire(
            &self,
            channels: &[(std::sync::Arc<str>, i64)],
            now_ms: i64,
        ) -> Result<Vec<(std::sync::Arc<str>, u64)>, crate::StoreError> {
            self.inner.expire(channels, now_ms)
        }
    }

    fn tick(channel: &str, i: u64) -> crate::NewEvent {
        let data = bytes::Bytes::from(i.to_string());
        crate::NewEvent { channel: channel.into(), name: "tick".into(), data, idempotency_key: None, meta: Vec::new() }
    }

    fn offsets(delivery: crate::Delivery) -> Vec<u64> {
        match delivery {
            crate::Delivery::Events(events) => events.iter().map(|e| e.offset).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    /// While a recovering join's replay is being read, the writer goes on
    /// committing (to that channel too) and other channels' subscribers get
    /// their live events; the recovery then gets its gap and what came meanwhile.
    #[tokio::test]
    async fn a_replay_being_read_stalls_no_live_delivery() {
        use crate::{Delivery, Position};
        let store = std::sync::Arc::new(HeldRead {
            inner: crate::store::memory::MemoryStore::new(),
            release: Default::default(),
        });
        let (bus, rx) = super::Bus::local(crate::Config::memory(), store.clone());
        let (channels, config, epoch) = (bus.shared.channels.clone(), bus.config().clone(), bus.shared.epoch.clone());
        let writer_store: std::sync::Arc<dyn crate::store::Store> = store.clone();
        std::thread::spawn(move || crate::writer::run(channels, config, epoch, writer_store, rx));
        for i in 1..=3 {
            bus.publish(tick("a", i)).await.unwrap();
        }
        let (release, held) = std::sync::mpsc::channel();
        *store.release.lock().unwrap() = Some(held);
        let (mut recovering, mut recovered, _) = bus.subscribe();
        recovering.join("a", Some(Position { offset: 1, epoch: bus.shared.epoch.clone() }));

        let (mut live, mut heard, _) = bus.subscribe();
        live.join("b", None);
        assert!(matches!(heard.recv().await.unwrap(), Delivery::Joined { recovered: false, .. }));
        assert_eq!(bus.publish(tick("b", 1)).await.unwrap().position.offset, 1);
        assert_eq!(offsets(heard.recv().await.unwrap()), [1]);
        assert_eq!(bus.publish(tick("a", 4)).await.unwrap().position.offset, 4);
        assert!(recovered.try_recv().is_err(), "answered before its replay was read");

        release.send(()).unwrap();
        match recovered.recv().await.unwrap() {
            Delivery::Joined { recovered, position, .. } => assert!(recovered && position.offset == 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(offsets(recovered.recv().await.unwrap()), [2, 3]);
        assert_eq!(offsets(recovered.recv().await.unwrap()), [4]);
    }
}
