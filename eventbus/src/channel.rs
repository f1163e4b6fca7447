//! Channels as one bus node holds them: each one's position, live
//! subscribers and waiting joins, under its own lock; and the registry of
//! them all. The writer (local engines) and the bus core (joins, a shared
//! backend's feed) both work on these, and neither on the other.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Event, Position, broker::Broker};

/// Every channel this node knows. Locks are always taken map, then state.
pub(crate) struct Channels {
    map: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    /// The shared backend that numbers events, if any: it is told which
    /// channels to hear, and new channels start syncing with it.
    broker: Option<Arc<dyn Broker>>,
    /// The epoch new channels start in (a local store's; a shared backend
    /// gives each channel its own once synced).
    epoch: Arc<str>,
    /// Live channel subscriptions, over every channel.
    pub(crate) subscriptions: AtomicU64,
    /// Events stored through this node.
    pub(crate) published_total: AtomicU64,
}

pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    /// Position and subscribers. The writer and joins take this lock without
    /// any `.await` inside, so replay and live delivery cannot interleave.
    pub(crate) state: Mutex<ChannelState>,
}

pub(crate) struct ChannelState {
    /// Offset of the newest committed event (delivered, for a shared backend).
    pub(crate) top: u64,
    /// Offset of the oldest stored event (`top + 1` when none is).
    pub(crate) first: u64,
    pub(crate) epoch: Arc<str>,
    pub(crate) subscribers: HashMap<u64, Subscriber>,
    /// Commit groups of the writer that include this channel and have not
    /// updated `top` yet: while any does, the channel is not forgotten.
    pub(crate) writing: u32,
    /// Whether `top` follows the live feed (always, for a local engine).
    pub(crate) feed: Feed,
    /// Subscribers waiting for the feed to sync or for their replay.
    pub(crate) joining: HashMap<u64, Joining>,
    /// Counts syncs started: only the latest one's result is taken.
    pub(crate) sync_generation: u64,
}

/// The live feed of a channel on a shared backend.
#[derive(Debug)]
pub(crate) enum Feed {
    /// `top` is the last event heard, and every later one will be heard.
    Live,
    /// Being (re)synced: events heard meanwhile wait here, in order.
    Syncing { heard: Vec<Event> },
}

/// A subscriber not yet registered in `subscribers`.
pub(crate) struct Joining {
    /// This join's number: a replay answers only the join that started it.
    pub(crate) seq: u64,
    pub(crate) subscriber: Subscriber,
    pub(crate) since: Option<Position>,
    /// While its replay is read: the live events heard meanwhile.
    pub(crate) replaying: Option<Vec<Event>>,
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
    pub(crate) fn new(tx: mpsc::Sender<Delivery>, lagged: CancellationToken) -> Subscriber {
        Subscriber { tx, lagged }
    }

    /// Queues a delivery without waiting; a full queue marks the stream as lagging.
    pub(crate) fn deliver(&self, delivery: Delivery) -> bool {
        if self.tx.try_send(delivery).is_ok() {
            return true;
        }
        self.lagged.cancel();
        false
    }
}

impl Channels {
    pub(crate) fn new(broker: Option<Arc<dyn Broker>>, epoch: Arc<str>) -> Channels {
        Channels {
            map: Mutex::default(),
            broker,
            epoch,
            subscriptions: AtomicU64::new(0),
            published_total: AtomicU64::new(0),
        }
    }

    /// Runs `f` on a channel's state, creating the channel when it is new.
    ///
    /// The state is locked before the channel map is released, so a channel
    /// cannot be forgotten (`forget_if_idle`) between being looked up and
    /// being joined or written to: locks are always taken map, then state.
    pub(crate) fn with_channel<R>(&self, name: &str, f: impl FnOnce(&Arc<Channel>, &mut ChannelState) -> R) -> R {
        let mut channels = self.map.lock().unwrap();
        let ch = match channels.get(name) {
            Some(ch) => ch.clone(),
            None => {
                let name: Arc<str> = Arc::from(name);
                let feed = match self.broker {
                    None => Feed::Live,
                    Some(_) => Feed::Syncing { heard: Vec::new() },
                };
                let state = ChannelState {
                    top: 0,
                    first: 1,
                    epoch: self.epoch.clone(),
                    subscribers: HashMap::new(),
                    writing: 0,
                    feed,
                    joining: HashMap::new(),
                    sync_generation: 0,
                };
                let ch = Arc::new(Channel { name: name.clone(), state: Mutex::new(state) });
                channels.insert(name.clone(), ch.clone());
                if let Some(broker) = &self.broker {
                    // Heard from now on; its position is read once it is.
                    broker.listen(name);
                }
                ch
            }
        };
        let mut st = ch.state.lock().unwrap();
        drop(channels);
        f(&ch, &mut st)
    }

    /// Forgets a channel that never stored an event once nobody listens or
    /// writes to it (SPEC §9): joins of names that see no traffic must not
    /// grow the bus. A channel that stored events locally keeps its
    /// position, since offsets never restart within an epoch; with a shared
    /// backend the position is the backend's, so every channel nobody
    /// listens to is forgotten (and no longer heard).
    pub(crate) fn forget_if_idle(&self, ch: &Arc<Channel>) {
        let mut channels = self.map.lock().unwrap();
        if !channels.get(&ch.name).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            return;
        }
        let shared_backend = self.broker.is_some();
        let idle = {
            let st = ch.state.lock().unwrap();
            (st.top == 0 || shared_backend) && st.writing == 0 && st.subscribers.is_empty() && st.joining.is_empty()
        };
        if idle {
            channels.remove(&ch.name);
            if let Some(broker) = &self.broker {
                broker.unlisten(ch.name.clone());
            }
        }
    }

    /// Looks up a known channel.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.map.lock().unwrap().get(name).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// Restores a channel's position from storage at startup.
    pub(crate) fn restore(&self, name: Arc<str>, top: u64, first: u64) {
        self.with_channel(&name, |_, st| {
            st.top = top;
            st.first = first;
        });
    }

    pub(crate) fn all(&self) -> Vec<Arc<Channel>> {
        self.map.lock().unwrap().values().cloned().collect()
    }

    /// Counts a subscriber registered in a channel (or gone from one).
    pub(crate) fn subscribed(&self, added: bool) {
        if added {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        } else {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Hands events to a channel's subscribers, and to the ones replaying,
/// which get them after their replay.
pub(crate) fn deliver_live(st: &mut ChannelState, events: Arc<[Event]>) {
    st.subscribers.retain(|_, s| s.deliver(Delivery::Events(events.clone())));
    for joining in st.joining.values_mut() {
        if let Some(heard) = &mut joining.replaying {
            heard.extend(events.iter().cloned());
        }
    }
}
