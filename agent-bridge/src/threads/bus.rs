//! Threads on the event bus, where every bridge of a cluster reads them
//! (`agent_bridge.threads = "bus"`, SPEC §10).
//!
//! Each thread has two channels, in namespaces that no client may subscribe
//! or publish to (the gateway refuses them):
//! - `thread_owner:<thread>`: who owns the thread. A bridge that finds it
//!   empty claims the thread with an `owner` event under the idempotency key
//!   `owner`, then reads the channel's first event: of two users racing to
//!   start the same thread, the bus stores one claim, and both read it.
//! - `thread_log:<thread>#<owner>`: one `message` event per message (user,
//!   assistant, tool) in AG-UI form. Appending publishes the new messages
//!   only; the bus keeps the newest (the namespace's `history_size`, which
//!   the binary sets to `agents.thread_max_messages`), and a read takes the
//!   newest `max_messages` of them.
//!
//! Owners never change, so each bridge caches the ones it has read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use switchboard_proto::{client::BusClient, eventbus::v1 as pb};

use super::ThreadError;

/// The namespace of threads' owners.
pub const OWNER_NAMESPACE: &str = "thread_owner";
/// The namespace of threads' messages.
pub const LOG_NAMESPACE: &str = "thread_log";
/// Most events one `History` read returns (the bus's bound).
const PAGE: u64 = 10_000;
/// Owners cached per bridge; the cache starts over past this.
const CACHED_OWNERS: usize = 65_536;

/// The thread store on the bus: a cheap handle.
#[derive(Clone)]
pub struct BusThreads {
    inner: Arc<Inner>,
}

struct Inner {
    bus: BusClient,
    max_messages: u64,
    /// Owners read or claimed. A std lock: held only for map updates.
    owners: Mutex<HashMap<String, String>>,
}

fn io(e: impl std::fmt::Display) -> ThreadError {
    ThreadError::Io(e.to_string())
}

/// The channel of a thread's owner.
pub fn owner_channel(thread: &str) -> String {
    format!("{OWNER_NAMESPACE}:{thread}")
}

/// The channel of a thread's messages.
pub fn log_channel(thread: &str, owner: &str) -> String {
    format!("{LOG_NAMESPACE}:{thread}#{owner}")
}

impl BusThreads {
    /// A store on `bus` keeping the newest `max_messages` (at least 1) of each thread.
    pub fn new(bus: BusClient, max_messages: usize) -> Self {
        let inner = Inner { bus, max_messages: max_messages.max(1) as u64, owners: Mutex::default() };
        BusThreads { inner: Arc::new(inner) }
    }

    pub fn max_messages(&self) -> usize {
        self.inner.max_messages as usize
    }

    /// Returns the owner of a thread, if it exists.
    pub async fn owner(&self, thread: &str) -> Result<Option<String>, ThreadError> {
        if let Some(owner) = self.inner.owners.lock().unwrap().get(thread) {
            return Ok(Some(owner.clone()));
        }
        let request = pb::HistoryRequest { channel: owner_channel(thread), limit: 1, ..Default::default() };
        let response = self.inner.bus.clone().history(request).await.map_err(|s| io(s.message()))?.into_inner();
        let Some(first) = response.events.first() else { return Ok(None) };
        let data: Value = serde_json::from_slice(&first.data).map_err(io)?;
        let owner = data["user_id"].as_str().ok_or_else(|| io("an owner event without `user_id`"))?.to_owned();
        let mut owners = self.inner.owners.lock().unwrap();
        if owners.len() >= CACHED_OWNERS {
            owners.clear();
        }
        owners.insert(thread.to_owned(), owner.clone());
        Ok(Some(owner))
    }

    /// Returns a thread's messages, oldest first: its newest `max_messages`.
    pub async fn messages(&self, thread: &str) -> Result<Vec<Value>, ThreadError> {
        let Some(owner) = self.owner(thread).await? else { return Ok(Vec::new()) };
        let channel = log_channel(thread, &owner);
        let mut bus = self.inner.bus.clone();
        let newest = |limit: u64| pb::HistoryRequest {
            channel: channel.clone(),
            limit: limit as u32,
            reverse: true,
            ..Default::default()
        };
        let first =
            bus.history(newest(self.inner.max_messages.min(PAGE))).await.map_err(|s| io(s.message()))?.into_inner();
        let mut events = first.events;
        events.reverse();
        if self.inner.max_messages > PAGE && events.len() as u64 == PAGE {
            // More than one read holds: forward from the oldest wanted, page by page.
            let top = first.position.map_or(0, |p| p.offset);
            let (mut after, epoch) = (top.saturating_sub(self.inner.max_messages), first_epoch(&events));
            events.clear();
            while after < top {
                let request = pb::HistoryRequest {
                    channel: channel.clone(),
                    since: Some(pb::StreamPosition { offset: after, epoch: epoch.clone() }),
                    limit: PAGE as u32,
                    reverse: false,
                };
                let page = bus.history(request).await.map_err(|s| io(s.message()))?.into_inner().events;
                let Some(last) = page.last() else { break };
                after = last.offset;
                events.extend(page.into_iter().filter(|e| e.offset <= top));
            }
        }
        events.iter().map(|e| serde_json::from_slice(&e.data).map_err(io)).collect()
    }

    /// Claims the thread for `owner` if new, and appends messages to it.
    ///
    /// # Errors
    /// `NotOwner` when the thread belongs to another user (nothing is written).
    pub async fn append(&self, thread: &str, owner: &str, messages: Vec<Value>) -> Result<(), ThreadError> {
        let found = match self.owner(thread).await? {
            Some(found) => found,
            None => self.claim(thread, owner).await?,
        };
        if found != owner {
            return Err(ThreadError::NotOwner(found));
        }
        let channel = log_channel(thread, owner);
        let mut bus = self.inner.bus.clone();
        // One at a time, each acknowledged: the log keeps the thread's order.
        for m in messages {
            let request = pb::PublishRequest {
                channel: channel.clone(),
                event: "message".into(),
                data: serde_json::to_vec(&m).map_err(io)?.into(),
                ..Default::default()
            };
            bus.publish(request).await.map_err(|s| io(s.message()))?;
        }
        Ok(())
    }

    /// Claims a thread nobody owned a moment ago; returns who owns it now.
    async fn claim(&self, thread: &str, owner: &str) -> Result<String, ThreadError> {
        let request = pb::PublishRequest {
            channel: owner_channel(thread),
            event: "owner".into(),
            data: json!({ "user_id": owner }).to_string().into(),
            idempotency_key: "owner".into(),
            ..Default::default()
        };
        self.inner.bus.clone().publish(request).await.map_err(|s| io(s.message()))?;
        self.owner(thread).await?.ok_or_else(|| io("the thread's owner was not stored"))
    }
}

fn first_epoch(events: &[pb::Event]) -> String {
    events.first().map(|e| e.epoch.clone()).unwrap_or_default()
}
