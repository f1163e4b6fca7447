//! The core of the event bus: channels, their subscribers, and the paths in
//! (publish, join) and out (history, channel lists).
//!
//! `Bus` is a cheap `Clone` handle around `Arc<Shared>`. Publishes go through
//! one writer thread (see `writer.rs`), which numbers events, commits them to
//! the store in groups and then hands them to live subscribers. Joins take the
//! channel's lock, replay what was missed from the store and register the
//! subscriber under that same lock, so that a subscriber sees every event
//! exactly once, in offset order, across replay and live delivery.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    Event, Position,
    config::Config,
    error::BusError,
    store::Store,
    writer::{Published, WriteRequest},
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
    pub(crate) store: Arc<dyn Store>,
    pub(crate) epoch: Arc<str>,
    /// Every known channel. A std lock: it is held only to look up or insert.
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    writer: mpsc::Sender<WriteRequest>,
    pub(crate) published_total: AtomicU64,
    pub(crate) metrics: crate::metrics::Metrics,
    subscriptions: AtomicU64,
    next_subscriber: AtomicU64,
}

pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    /// Position and subscribers. The writer and joins take this lock without
    /// any `.await` inside, so replay and live delivery cannot interleave.
    pub(crate) state: Mutex<ChannelState>,
}

pub(crate) struct ChannelState {
    /// Offset of the newest committed event.
    pub(crate) top: u64,
    /// Offset of the oldest stored event (`top + 1` when none is).
    pub(crate) first: u64,
    pub(crate) subscribers: HashMap<u64, Subscriber>,
    /// Commit groups of the writer that include this channel and have not
    /// updated `top` yet: while any does, the channel is not forgotten.
    pub(crate) writing: u32,
}

/// A new event, checked, before it has a position.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub channel: String,
    pub name: String,
    pub data: Bytes,
    pub idempotency_key: Option<String>,
    pub meta: Vec<(String, String)>,
}

/// What a subscription stream receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    Joined {
        channel: Arc<str>,
        position: Position,
        recovered: bool,
        missed: u64,
    },
    /// `code` is `invalid_argument` or `limit_exceeded`.
    JoinFailed {
        channel: String,
        code: &'static str,
        error: String,
    },
    Events(Arc<[Event]>),
    Left {
        channel: Arc<str>,
    },
}

/// The sending half of one subscription stream, registered in each channel it joined.
#[derive(Clone)]
pub(crate) struct Subscriber {
    tx: mpsc::Sender<Delivery>,
    /// Cancelled when the stream's queue overflowed: the stream then ends.
    lagged: CancellationToken,
}

impl Subscriber {
    /// Queues a delivery without waiting; a full queue marks the stream as lagging.
    pub(crate) fn deliver(&self, delivery: Delivery) -> bool {
        if self.tx.try_send(delivery).is_ok() {
            return true;
        }
        self.lagged.cancel();
        false
    }
}

/// One subscription stream: any number of channels, one queue.
pub struct Subscription {
    bus: Bus,
    id: u64,
    subscriber: Subscriber,
    /// By name: a stream may hold `max_stream_channels` of them.
    channels: HashMap<Arc<str>, Arc<Channel>>,
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
    pub(crate) fn new(config: Config, store: Arc<dyn Store>) -> (Bus, mpsc::Receiver<WriteRequest>) {
        let (writer, rx) = mpsc::channel(8192);
        let epoch = store.epoch();
        let bus = Bus {
            shared: Arc::new(Shared {
                config,
                store,
                epoch,
                channels: Mutex::default(),
                writer,
                published_total: AtomicU64::new(0),
                metrics: crate::metrics::Metrics::new(),
                subscriptions: AtomicU64::new(0),
                next_subscriber: AtomicU64::new(1),
            }),
        };
        (bus, rx)
    }

    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    pub fn backend(&self) -> &'static str {
        self.shared.config.backend.name()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Runs `f` on a channel's state, creating the channel when it is new.
    ///
    /// The state is locked before the channel map is released, so a channel
    /// cannot be forgotten (`forget_if_idle`) between being looked up and
    /// being joined or written to: locks are always taken map, then state.
    pub(crate) fn with_channel<R>(&self, name: &str, f: impl FnOnce(&Arc<Channel>, &mut ChannelState) -> R) -> R {
        let mut channels = self.shared.channels.lock().unwrap();
        let ch = match channels.get(name) {
            Some(ch) => ch.clone(),
            None => {
                let name: Arc<str> = Arc::from(name);
                let state = ChannelState { top: 0, first: 1, subscribers: HashMap::new(), writing: 0 };
                let ch = Arc::new(Channel { name: name.clone(), state: Mutex::new(state) });
                channels.insert(name, ch.clone());
                ch
            }
        };
        let mut st = ch.state.lock().unwrap();
        drop(channels);
        f(&ch, &mut st)
    }

    /// Forgets a channel that never stored an event once nobody listens or
    /// writes to it (SPEC §9): joins of names that see no traffic must not
    /// grow the bus. A channel that stored events keeps its position, since
    /// offsets never restart within an epoch.
    pub(crate) fn forget_if_idle(&self, ch: &Arc<Channel>) {
        let mut channels = self.shared.channels.lock().unwrap();
        if !channels.get(&ch.name).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            return;
        }
        let idle = {
            let st = ch.state.lock().unwrap();
            st.top == 0 && st.writing == 0 && st.subscribers.is_empty()
        };
        if idle {
            channels.remove(&ch.name);
        }
    }

    /// Restores a channel's position from storage at startup.
    pub(crate) fn restore(&self, name: Arc<str>, top: u64, first: u64) {
        self.with_channel(&name, |_, st| {
            st.top = top;
            st.first = first;
        });
    }

    pub(crate) fn all_channels(&self) -> Vec<Arc<Channel>> {
        self.shared.channels.lock().unwrap().values().cloned().collect()
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
        self.shared.writer.send(WriteRequest::Publish { event, reply }).await.map_err(|_| BusError::ShuttingDown)?;
        Ok(async move {
            let result = rx.await.map_err(|_| BusError::ShuttingDown)?;
            shared.metrics.publish_duration.observe(started.elapsed().as_secs_f64());
            result
        })
    }

    pub(crate) fn writer(&self) -> &mpsc::Sender<WriteRequest> {
        &self.shared.writer
    }

    /// Opens a subscription stream whose deliveries arrive on the returned receiver.
    pub fn subscribe(&self) -> (Subscription, mpsc::Receiver<Delivery>, CancellationToken) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let lagged = CancellationToken::new();
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber { tx, lagged: lagged.clone() };
        (Subscription { bus: self.clone(), id, subscriber, channels: HashMap::new() }, rx, lagged)
    }

    /// Returns stored events after `since` (or from the oldest), and the channel's position.
    pub fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<Event>, Position), BusError> {
        switchboard_proto::channel::validate(channel)?;
        let (top, first) = self.position_of(channel);
        let after = since.unwrap_or(0).max(first.saturating_sub(1));
        // Events above `top` may be committed but not yet announced; they are left out
        // so that history never runs ahead of live delivery.
        let limit = limit.min(top.saturating_sub(after) as usize);
        let events = if reverse {
            let mut evs = self.shared.store.read(channel, top.saturating_sub(limit as u64).max(after), limit)?;
            evs.reverse();
            evs
        } else {
            self.shared.store.read(channel, after, limit)?
        };
        Ok((events, Position { offset: top, epoch: self.shared.epoch.clone() }))
    }

    fn position_of(&self, channel: &str) -> (u64, u64) {
        let ch = self.shared.channels.lock().unwrap().get(channel).cloned();
        match ch {
            Some(ch) => {
                let st = ch.state.lock().unwrap();
                (st.top, st.first)
            }
            None => (0, 1),
        }
    }

    /// Lists channels whose name starts with `prefix`: name, position, subscribers.
    pub fn channels(&self, prefix: &str) -> Vec<(Arc<str>, Position, u64)> {
        let mut out: Vec<_> = self
            .all_channels()
            .into_iter()
            .filter(|ch| ch.name.starts_with(prefix))
            .map(|ch| {
                let st = ch.state.lock().unwrap();
                let pos = Position { offset: st.top, epoch: self.shared.epoch.clone() };
                (ch.name.clone(), pos, st.subscribers.len() as u64)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.shared.channels.lock().unwrap().len() as u64,
            self.shared.subscriptions.load(Ordering::Relaxed),
            self.shared.published_total.load(Ordering::Relaxed),
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
            let position = Position { offset: st.top, epoch: self.bus.shared.epoch.clone() };
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
        let (ch, joined) =
            bus.with_channel(channel, |ch, st| (ch.clone(), join_locked(&bus, ch, st, id, &subscriber, since)));
        if joined {
            self.channels.insert(ch.name.clone(), ch);
        } else {
            bus.forget_if_idle(&ch);
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
        if ch.state.lock().unwrap().subscribers.remove(&self.id).is_some() {
            self.bus.shared.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        self.bus.forget_if_idle(ch);
    }
}

/// Replays what a joining subscriber missed and registers it, under the
/// channel's lock; returns whether it joined (its stream may be lagging).
fn join_locked(
    bus: &Bus,
    ch: &Channel,
    st: &mut ChannelState,
    id: u64,
    subscriber: &Subscriber,
    since: Option<Position>,
) -> bool {
    let channel: &str = &ch.name;
    let shared = &bus.shared;
    let position = Position { offset: st.top, epoch: shared.epoch.clone() };
    let mut replay = Vec::new();
    let mut recovered = false;
    if let Some(since) = since {
        let gap = st.top.saturating_sub(since.offset);
        recovered = *since.epoch == *shared.epoch
            && since.offset <= st.top
            && since.offset + 1 >= st.first
            && gap <= shared.config.recovery_max;
        if recovered && gap > 0 {
            match shared.store.read(channel, since.offset, gap as usize) {
                Ok(events) if events.len() as u64 == gap => replay = events,
                Ok(_) => recovered = false,
                Err(e) => {
                    tracing::error!(cause = %e, channel, "history read failed");
                    recovered = false;
                }
            }
        }
    }
    let missed = replay.len() as u64;
    let ok = subscriber.deliver(Delivery::Joined { channel: ch.name.clone(), position, recovered, missed })
        && (replay.is_empty() || subscriber.deliver(Delivery::Events(replay.into())));
    if ok {
        st.subscribers.insert(id, subscriber.clone());
        shared.subscriptions.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

impl Drop for Subscription {
    fn drop(&mut self) {
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
}
