//! The writer: one thread that numbers, commits and announces every event.
//!
//! Publishers queue requests; the writer takes everything queued at once (up
//! to `MAX_BATCH`), assigns offsets, commits the whole group with one sync
//! (group commit), then hands each channel's new events to its subscribers
//! and answers the publishers. One writer means offsets are gap-free and
//! announcements are in offset order without any lock held across a sync.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    Event, IDEMPOTENCY_WINDOW, NewEvent, Position, Published,
    channel::{Channel, Channels, deliver_live},
    config::{Config, Fsync},
    error::BusError,
    now_ms,
    store::{Batch, ChannelMeta, IdempotencyRecord, Store},
};

/// Most requests committed together, and most payload bytes: a group is
/// large enough that one sync serves thousands of publishes, and bounded so
/// that a queue of large events does not become one huge transaction.
const MAX_BATCH: usize = 8192;
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

pub(crate) enum WriteRequest {
    Publish {
        event: NewEvent,
        reply: oneshot::Sender<Result<Published, BusError>>,
    },
    /// Drops events past their namespace's TTL and forgets old idempotency keys.
    Expire,
    /// Ends the writer once everything queued before it is done.
    Stop,
}

impl WriteRequest {
    fn payload_bytes(&self) -> usize {
        match self {
            WriteRequest::Publish { event, .. } => event.data.len(),
            _ => 0,
        }
    }
}

/// Runs the writer until `Stop`; meant for a dedicated thread.
pub(crate) fn run(
    channels: Arc<Channels>,
    config: Config,
    epoch: Arc<str>,
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<WriteRequest>,
) {
    let mut writer = Writer { channels, config, epoch, store, idempotency: HashMap::new(), ids: Ids::default() };
    writer.load_idempotency();
    let fsync = writer.config.fsync;
    let interval = writer.config.fsync_interval;
    let mut requests = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        if fsync == Fsync::Batch {
            std::thread::sleep(interval);
        }
        let mut bytes = first.payload_bytes();
        requests.push(first);
        while requests.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.payload_bytes();
                    requests.push(r);
                }
                Err(_) => break,
            }
        }
        if !writer.process(&mut requests) {
            return;
        }
    }
}

struct Writer {
    channels: Arc<Channels>,
    config: Config,
    /// The store's epoch, which every event it numbers carries.
    epoch: Arc<str>,
    store: Arc<dyn Store>,
    /// `(channel, key)` → the first result and when the key expires (Unix ms).
    idempotency: HashMap<(Arc<str>, String), (Published, i64)>,
    ids: Ids,
}

/// Event ids: UUIDv7, each greater than the one before (RFC 9562 §6.2,
/// method 2: a counter in the random bits, seeded anew each millisecond;
/// a clock that steps back keeps the newest millisecond seen).
/// The writer is the only caller, so no lock; the seed comes from the
/// thread's user-space generator rather than a system call per id.
#[derive(Default)]
struct Ids {
    ms: i64,
    rand_a: u16,
    counter: u64,
}

impl Ids {
    fn next(&mut self, now_ms: i64) -> String {
        // A clock that steps back does not take the ids back with it.
        let now_ms = now_ms.max(self.ms);
        if now_ms != self.ms {
            self.ms = now_ms;
            self.rand_a = rand::random::<u16>();
            // Two bits of room below the variant bits, so the counter never wraps.
            self.counter = rand::random::<u64>() >> 4;
        } else {
            self.counter += 1;
        }
        let mut random = [0u8; 10];
        random[..2].copy_from_slice(&self.rand_a.to_be_bytes());
        random[2..].copy_from_slice(&self.counter.to_be_bytes());
        let uuid = uuid::Builder::from_unix_timestamp_millis(now_ms as u64, &random).into_uuid();
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut text).to_owned()
    }
}

/// A channel touched by the batch being built.
struct Pending {
    channel: Arc<Channel>,
    top: u64,
    first: u64,
    events: Vec<Event>,
}

impl Writer {
    fn load_idempotency(&mut self) {
        match self.store.idempotency(now_ms()) {
            Ok(records) => {
                for r in records {
                    let published = Published {
                        event_id: r.event_id,
                        position: Position { offset: r.offset, epoch: self.epoch.clone() },
                        duplicate: true,
                    };
                    self.idempotency.insert((r.channel, r.key), (published, r.expires_ms));
                }
            }
            Err(e) => tracing::error!(cause = %e, "cannot load idempotency keys"),
        }
    }

    /// Handles one group of requests; returns false when the writer must stop.
    fn process(&mut self, requests: &mut Vec<WriteRequest>) -> bool {
        let now = now_ms();
        let epoch = self.epoch.clone();
        let mut keep_going = true;
        let mut expire = false;
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        let mut replies = Vec::new();
        let mut new_keys = Vec::new();
        let mut records = Vec::new();
        for request in requests.drain(..) {
            let (event, reply) = match request {
                WriteRequest::Publish { event, reply } => (event, reply),
                WriteRequest::Expire => {
                    expire = true;
                    continue;
                }
                WriteRequest::Stop => {
                    keep_going = false;
                    continue;
                }
            };
            let name: Arc<str> = match index.get_key_value(event.channel.as_str()) {
                Some((name, _)) => name.clone(),
                None => {
                    // Pinned (`writing`) until this group has updated it, so
                    // that it is not forgotten with a position in flight.
                    let (channel, top, first) = self.channels.with_channel(&event.channel, |ch, st| {
                        st.writing += 1;
                        (ch.clone(), st.top, st.first)
                    });
                    let name = channel.name.clone();
                    index.insert(name.clone(), pending.len());
                    pending.push(Pending { channel, top, first, events: Vec::new() });
                    name
                }
            };
            let known = event.idempotency_key.as_ref().and_then(|key| {
                self.idempotency.get(&(name.clone(), key.clone())).filter(|(_, expires)| *expires > now)
            });
            if let Some((first, _)) = known {
                replies.push((reply, Ok(first.clone())));
                continue;
            }
            let p = &mut pending[index[&name]];
            p.top += 1;
            let event_id = self.ids.next(now);
            let published = Published {
                event_id: event_id.clone(),
                position: Position { offset: p.top, epoch: epoch.clone() },
                duplicate: false,
            };
            if let Some(key) = event.idempotency_key {
                let expires_ms = now + IDEMPOTENCY_WINDOW.as_millis() as i64;
                let dup = Published { duplicate: true, ..published.clone() };
                self.idempotency.insert((name.clone(), key.clone()), (dup, expires_ms));
                new_keys.push((name.clone(), key.clone()));
                records.push(IdempotencyRecord {
                    channel: name.clone(),
                    key,
                    event_id: event_id.clone(),
                    offset: p.top,
                    expires_ms,
                });
            }
            p.events.push(Event {
                id: event_id,
                channel: name,
                name: event.name,
                data: event.data,
                offset: p.top,
                epoch: epoch.clone(),
                timestamp_ms: now,
                meta: event.meta,
            });
            replies.push((reply, Ok(published)));
        }

        let (mut touched, untouched): (Vec<Pending>, Vec<Pending>) =
            pending.into_iter().partition(|p| !p.events.is_empty());
        // Channels that only had duplicates are done; the others once updated.
        for p in &untouched {
            unpin(&self.channels, &p.channel);
        }
        if !touched.is_empty() {
            // The events move into the batch and back out after the commit: never copied.
            let mut batch = Batch { idempotency: records, ..Batch::default() };
            let mut counts = Vec::with_capacity(touched.len());
            for p in &mut touched {
                let size = self.config.history_of(&p.channel.name).size.max(1);
                let first = p.first.max(p.top.saturating_sub(size) + 1);
                batch.metas.push(ChannelMeta { channel: p.channel.name.clone(), top: p.top, first });
                counts.push(p.events.len());
                batch.events.append(&mut p.events);
            }
            if let Err(e) = self.store.commit(&batch) {
                tracing::error!(cause = %e, "commit failed");
                for key in new_keys {
                    self.idempotency.remove(&key);
                }
                for p in &touched {
                    unpin(&self.channels, &p.channel);
                }
                let msg = e.to_string();
                for (reply, _) in replies {
                    let _ = reply.send(Err(BusError::Store(crate::error::StoreError::Io(msg.clone()))));
                }
                return keep_going;
            }
            self.channels.published_total.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            let mut events = batch.events.into_iter();
            for ((p, meta), count) in touched.into_iter().zip(batch.metas).zip(counts) {
                let events: Arc<[Event]> = events.by_ref().take(count).collect();
                let mut st = p.channel.state.lock().unwrap();
                st.top = meta.top;
                st.first = meta.first;
                st.writing -= 1;
                deliver_live(&mut st, events);
            }
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        if expire {
            self.expire(now);
        }
        keep_going
    }

    fn expire(&mut self, now: i64) {
        self.idempotency.retain(|_, (_, expires)| *expires > now);
        let mut cutoffs = Vec::new();
        let mut channels = HashMap::new();
        for ch in self.channels.all() {
            let st = ch.state.lock().unwrap();
            if st.first <= st.top {
                let ttl = self.config.history_of(&ch.name).ttl;
                cutoffs.push((ch.name.clone(), now - ttl.as_millis() as i64));
                drop(st);
                channels.insert(ch.name.clone(), ch);
            }
        }
        match self.store.expire(&cutoffs, now) {
            Ok(changed) => {
                for (name, first) in changed {
                    if let Some(ch) = channels.get(&name) {
                        let mut st = ch.state.lock().unwrap();
                        st.first = st.first.max(first);
                    }
                }
            }
            Err(e) => tracing::error!(cause = %e, "expiry failed"),
        }
    }
}

/// Releases a channel a commit group pinned without updating it.
fn unpin(channels: &Channels, channel: &Arc<Channel>) {
    channel.state.lock().unwrap().writing -= 1;
    channels.forget_if_idle(channel);
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn ids_are_uuid_v7_and_always_increase() {
        let mut ids = Ids::default();
        let all: Vec<String> = (0..1000).map(|i| ids.next(1_790_000_000_000 + i / 400)).collect();
        for id in &all {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        for pair in all.windows(2) {
            assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
        }
        let ms = |id: &str| uuid::Uuid::parse_str(id).unwrap().get_timestamp().unwrap().to_unix();
        assert_eq!(ms(&all[0]), (1_790_000_000, 0));
        assert_eq!(ms(&all[999]), (1_790_000_000, 2_000_000));

        let after_step_back = ids.next(1_789_999_999_000);
        assert!(after_step_back > all[999], "{after_step_back} after {}", all[999]);
    }
}
