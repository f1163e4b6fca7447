//! Presence (SPEC §6): which connections of which gateway nodes are
//! subscribed to a channel, across every bus node of a shared backend.
//!
//! A gateway adds an entry with `presence_join` on its `Subscribe` stream
//! and removes it with `presence_leave`; the entry is owned by that stream,
//! and when the stream ends (the gateway is gone, or relinks) the bus
//! removes every entry it owned. A new entry and a removed one are announced
//! to the channel's subscribers on every bus node as events named `join` and
//! `leave`, with data `{connection_id, user_id, node}` and offset 0: they are
//! not stored, not in the history, and move no position (`Bus::on_presence`).
//!
//! Where entries are kept:
//! - **Local engines** (`memory`, `embedded`: one bus node): in this
//!   process (`Presence::owned`), and join/leave go straight to the
//!   channel's subscribers.
//! - **Shared engines**: a `PresenceStore`, which keeps every node's entries
//!   and announces join/leave to every node. Each entry there has an expiry;
//!   the owning node refreshes its entries every `presence_refresh`, and
//!   readers drop entries past their expiry, so the entries of a bus node
//!   that vanished without removing them are gone within `presence_ttl`.
//!   `RedisPresence` is in `redis.rs`, `NatsPresence` in `nats.rs`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::{
    Event,
    bus::{Bus, Subscription},
    channel::deliver_live,
    error::BusError,
    now_ms,
};

/// Longest connection id, user id or node name an entry may carry.
const MAX_FIELD: usize = 255;

/// A connection of a gateway node subscribed to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresenceEntry {
    pub connection_id: String,
    /// Empty for an anonymous connection.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub user_id: String,
    pub node: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl PresenceEntry {
    /// The data of its `join` and `leave` events: `{connection_id, user_id, node}`,
    /// `user_id` null for an anonymous connection.
    pub fn data(&self) -> Bytes {
        let user = (!self.user_id.is_empty()).then_some(self.user_id.as_str());
        let data = serde_json::json!({ "connection_id": self.connection_id, "user_id": user, "node": self.node });
        Bytes::from(data.to_string())
    }

    fn check(&self) -> Result<(), BusError> {
        if self.connection_id.is_empty() {
            return Err(BusError::InvalidArgument("presence entry without a connection id".into()));
        }
        let longest = self.connection_id.len().max(self.user_id.len()).max(self.node.len());
        if longest > MAX_FIELD {
            return Err(BusError::InvalidArgument(format!("presence fields are at most {MAX_FIELD} bytes")));
        }
        Ok(())
    }
}

/// A change of a channel's presence, announced as an event of that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Join,
    Leave,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Join => "join",
            Change::Leave => "leave",
        }
    }
}

/// Where a shared engine keeps every node's presence entries.
///
/// Calls are queued, not awaited (they come from a stream's loop and from
/// its `Drop`): an implementation applies them in the order they were made,
/// so a connection's join is never applied after its leave.
pub(crate) trait PresenceStore: Send + Sync {
    /// Records `entry` as owned by `owner` (a stream of some node), with an
    /// expiry `presence_ttl` away. When the channel had no live entry for
    /// that connection, announces a `join` to the channel's subscribers on
    /// every node, each of which hands it to `Bus::on_presence`.
    fn add(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry);
    /// Removes the entry, and announces a `leave`, when `owner` still owns it.
    fn remove(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry);
    /// Pushes back the expiry of entries `owner`s still own (and records
    /// again those the backend lost), announcing nothing.
    fn refresh(&self, entries: Vec<(Arc<str>, String, PresenceEntry)>);
    /// The live entries of a channel, of every node.
    fn list(&self, channel: Arc<str>) -> BoxFuture<'static, Result<Vec<PresenceEntry>, BusError>>;
}

/// The bus's presence: this node's entries, and the shared store when there is one.
pub(crate) struct Presence {
    /// Entries added through this node's streams, by channel and connection
    /// id, with the stream that owns each. A std lock: held for map updates.
    owned: Mutex<HashMap<Arc<str>, HashMap<String, Owned>>>,
    /// `None` for a local engine, whose entries are all in `owned`.
    store: Option<Arc<dyn PresenceStore>>,
    /// Tells this process's streams from other nodes' in a shared store.
    instance: u64,
}

struct Owned {
    stream: u64,
    entry: PresenceEntry,
}

impl Presence {
    /// Presence over `store` (refreshed every `refresh` by a task that ends
    /// with the bus), or kept in this process without one.
    pub(crate) fn new(store: Option<Arc<dyn PresenceStore>>, refresh: Duration) -> Arc<Presence> {
        let presence = Arc::new(Presence { owned: Mutex::default(), store, instance: rand::random::<u64>() });
        if presence.store.is_some() {
            tokio::spawn(refresh_every(Arc::downgrade(&presence), refresh));
        }
        presence
    }

    fn owner(&self, stream: u64) -> String {
        format!("{:016x}.{stream}", self.instance)
    }

    /// Refreshes every entry this node owns in the shared store.
    fn refresh(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let entries: Vec<_> = {
            let owned = self.owned.lock().unwrap();
            owned
                .iter()
                .flat_map(|(channel, entries)| {
                    entries.values().map(|o| (channel.clone(), self.owner(o.stream), o.entry.clone()))
                })
                .collect()
        };
        if !entries.is_empty() {
            store.refresh(entries);
        }
    }
}

/// Refreshes the node's entries every `every` until the bus is gone.
async fn refresh_every(presence: Weak<Presence>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(presence) = presence.upgrade() else {
            return;
        };
        presence.refresh();
    }
}

// === impl Bus ===

impl Bus {
    /// Adds (or updates) an entry owned by stream `stream`.
    fn presence_add(&self, stream: u64, channel: Arc<str>, entry: PresenceEntry) {
        let presence = &self.shared.presence;
        let new = {
            let mut owned = presence.owned.lock().unwrap();
            let entries = owned.entry(channel.clone()).or_default();
            entries.insert(entry.connection_id.clone(), Owned { stream, entry: entry.clone() }).is_none()
        };
        match &presence.store {
            Some(store) => store.add(&channel, &presence.owner(stream), &entry),
            None if new => self.on_presence(&channel, Change::Join, entry.data()),
            None => {}
        }
    }

    /// Removes an entry if stream `stream` still owns it (another stream
    /// may have taken it over: a gateway that relinked).
    fn presence_remove(&self, stream: u64, channel: &Arc<str>, connection_id: &str) {
        let presence = &self.shared.presence;
        let removed = {
            let mut owned = presence.owned.lock().unwrap();
            let Some(entries) = owned.get_mut(channel) else {
                return;
            };
            if entries.get(connection_id).is_none_or(|o| o.stream != stream) {
                return;
            }
            let removed = entries.remove(connection_id).expect("checked").entry;
            if entries.is_empty() {
                owned.remove(channel);
            }
            removed
        };
        match &presence.store {
            Some(store) => store.remove(channel, &presence.owner(stream), &removed),
            None => self.on_presence(channel, Change::Leave, removed.data()),
        }
    }

    /// Hands a join or leave to the channel's subscribers on this node, as
    /// an event with offset 0 that `on_live`'s offset checks never see.
    pub(crate) fn on_presence(&self, channel: &str, change: Change, data: Bytes) {
        let Some(ch) = self.channel(channel) else {
            return; // Nobody here listens to it.
        };
        let mut st = ch.state.lock().unwrap();
        let event = Event {
            id: uuid::Uuid::now_v7().to_string(),
            channel: ch.name.clone(),
            name: change.name().to_owned(),
            data,
            offset: 0,
            epoch: st.epoch.clone(),
            timestamp_ms: now_ms(),
            meta: Vec::new(),
        };
        deliver_live(&mut st, Arc::from([event]));
    }

    /// Returns who is subscribed to `channel`, on every node, by connection id.
    ///
    /// # Errors
    /// An invalid channel name; a shared backend that cannot be read.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BusError> {
        switchboard_proto::channel::validate(channel)?;
        let presence = &self.shared.presence;
        let mut entries = match &presence.store {
            Some(store) => store.list(Arc::from(channel)).await?,
            None => presence
                .owned
                .lock()
                .unwrap()
                .get(channel)
                .map(|entries| entries.values().map(|o| o.entry.clone()).collect())
                .unwrap_or_default(),
        };
        entries.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        Ok(entries)
    }
}

// === impl Subscription ===

impl Subscription {
    /// Adds a presence entry owned by this stream.
    ///
    /// # Errors
    /// An invalid channel name, or an entry without a connection id or with
    /// fields over 255 bytes; nothing is added.
    pub fn presence_join(&mut self, channel: &str, entry: PresenceEntry) -> Result<(), BusError> {
        switchboard_proto::channel::validate(channel)?;
        entry.check()?;
        let channel: Arc<str> = Arc::from(channel);
        self.presence.insert((channel.clone(), entry.connection_id.clone()));
        self.bus.presence_add(self.id, channel, entry);
        Ok(())
    }

    /// Removes a presence entry this stream added.
    pub fn presence_leave(&mut self, channel: &str, connection_id: &str) {
        if let Some((channel, connection_id)) = self.presence.take(&(Arc::from(channel), connection_id.to_owned())) {
            self.bus.presence_remove(self.id, &channel, &connection_id);
        }
    }

    /// Removes every entry this stream added: it ended.
    pub(crate) fn drop_presence(&mut self) {
        for (channel, connection_id) in std::mem::take(&mut self.presence) {
            self.bus.presence_remove(self.id, &channel, &connection_id);
        }
    }
}

/// Presence changes a shared store may have queued; past this many the
/// newest are dropped with a warning (a lost add comes back with the next
/// refresh, a lost removal expires).
pub(crate) const PRESENCE_QUEUE: usize = 65_536;

/// The payload of a join or leave on a shared backend's live feed:
/// `presence join <data>` or `presence leave <data>`.
pub(crate) fn change_message(change: Change, entry: &PresenceEntry) -> Vec<u8> {
    let mut payload = format!("presence {} ", change.name()).into_bytes();
    payload.extend_from_slice(&entry.data());
    payload
}

/// Decodes a join or leave heard on a channel's Pub/Sub channel, which
/// carries the event's data after `presence join ` or `presence leave `.
pub(crate) fn decode_message(payload: &[u8]) -> Option<(Change, Bytes)> {
    let (change, data) = if let Some(data) = payload.strip_prefix(b"presence join ") {
        (Change::Join, data)
    } else {
        (Change::Leave, payload.strip_prefix(b"presence leave ")?)
    };
    Some((change, Bytes::copy_from_slice(data)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    use crate::{Config, Delivery, store::memory::MemoryStore};

    fn entry(connection_id: &str) -> PresenceEntry {
        PresenceEntry { connection_id: connection_id.into(), user_id: "alice".into(), node: "g".into() }
    }

    /// The names and offsets of the events queued for a subscription stream.
    fn events(rx: &mut mpsc::Receiver<Delivery>) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Ok(d) = rx.try_recv() {
            if let Delivery::Events(events) = d {
                out.extend(events.iter().map(|e| (e.name.clone(), e.offset)));
            }
        }
        out
    }

    #[tokio::test]
    async fn entries_belong_to_the_stream_that_added_them_last() {
        let (bus, _writer) = Bus::local(Config::memory(), Arc::new(MemoryStore::new()));
        let (mut watcher, mut seen, _) = bus.subscribe();
        watcher.join("room:1", None);
        let (mut old, _rx1, _) = bus.subscribe();
        let (mut new, _rx2, _) = bus.subscribe();

        old.presence_join("room:1", entry("c")).unwrap();
        assert_eq!(events(&mut seen), [("join".to_owned(), 0)]);
        // A gateway that relinked adds it again on its new stream: no second join.
        new.presence_join("room:1", entry("c")).unwrap();
        assert!(events(&mut seen).is_empty());
        // The old stream ending removes nothing it no longer owns.
        drop(old);
        assert!(events(&mut seen).is_empty());
        assert_eq!(bus.presence("room:1").await.unwrap(), [entry("c")]);
        // Its owner ending removes it, with a leave.
        drop(new);
        assert_eq!(events(&mut seen), [("leave".to_owned(), 0)]);
        assert!(bus.presence("room:1").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_entries_are_refused() {
        let (bus, _writer) = Bus::local(Config::memory(), Arc::new(MemoryStore::new()));
        let (mut sub, _rx, _) = bus.subscribe();
        assert!(sub.presence_join("bad name", entry("c")).is_err());
        assert!(sub.presence_join("room:1", entry("")).is_err());
        assert!(sub.presence_join("room:1", entry(&"c".repeat(256))).is_err());
        assert!(bus.presence("room:1").await.unwrap().is_empty());
        assert!(matches!(bus.presence("bad name").await, Err(BusError::InvalidChannel(_))));
    }

    #[test]
    fn pubsub_messages_decode_to_changes() {
        let (change, data) = decode_message(br#"presence join {"connection_id":"c"}"#).unwrap();
        assert_eq!((change, &data[..]), (Change::Join, &br#"{"connection_id":"c"}"#[..]));
        assert_eq!(decode_message(b"presence leave {}").unwrap().0, Change::Leave);
        assert!(decode_message(b"3 epoch {}").is_none());
    }

    #[test]
    fn entry_data_has_a_null_user_for_anonymous_connections() {
        let entry = PresenceEntry { connection_id: "c".into(), user_id: String::new(), node: "g".into() };
        let data: serde_json::Value = serde_json::from_slice(&entry.data()).unwrap();
        assert_eq!(data, serde_json::json!({ "connection_id": "c", "user_id": null, "node": "g" }));
        let back: PresenceEntry = serde_json::from_slice(&entry.data()).unwrap();
        assert_eq!(back, entry);
    }
}
