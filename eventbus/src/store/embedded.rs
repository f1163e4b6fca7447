//! The `embedded` backend: a durable event log in one redb file.
//!
//! Tables:
//! - `chunks`: `(channel, offset of its last event)` → consecutive events of
//!   one channel written by one commit, at most `CHUNK_EVENTS` of them (see
//!   `Chunk` for the layout). One row per chunk rather than per event keeps
//!   the B-tree work of a busy channel, which appends and trims its history
//!   on every commit, to a few rows per commit. Keying a chunk by its last
//!   offset makes both "the chunk holding offset n" and "the chunks wholly
//!   below `first`" single range reads;
//! - `channels`: `channel` → `(top, first)`. A commit drops only whole
//!   chunks, so the chunk holding `first` may still have events below it;
//!   they are never served, and expiry (every second) rewrites that chunk
//!   without them;
//! - `idempotency`: `(channel, key)` → `(event_id, offset, expires_ms)`;
//! - `settings`: `"epoch"` → the epoch of this data directory.
//!
//! Files written before chunks kept one event per row, as JSON, in a table
//! `events`; `open` moves them into `chunks` in the same transaction that
//! drops the old table.
//!
//! redb commits are atomic and checksummed: a write torn by a crash is rolled
//! back when the file is next opened, never served. redb also locks the file,
//! so a second process on the same directory is refused.

use std::{borrow::Cow, path::Path, sync::Arc};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Batch, ChannelMeta, IdempotencyRecord, Store, new_epoch};
use crate::{Event, config::Fsync, error::StoreError};

const CHUNKS: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("chunks");
const CHANNELS: TableDefinition<'static, &str, (u64, u64)> = TableDefinition::new("channels");
const IDEMPOTENCY: TableDefinition<'static, (&str, &str), (&str, u64, i64)> = TableDefinition::new("idempotency");
const SETTINGS: TableDefinition<'static, &str, &str> = TableDefinition::new("settings");
/// One event per row, as files written before chunks hold them.
const LEGACY_EVENTS: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("events");

/// Most events in one chunk, and the size past which a chunk takes no more:
/// bounds what a history read loads beyond what it asked for.
const CHUNK_EVENTS: u32 = 64;
const CHUNK_BYTES: usize = 64 * 1024;

/// File name of the log inside the data directory.
pub const FILE_NAME: &str = "eventbus.redb";

pub struct EmbeddedStore {
    db: Database,
    epoch: Arc<str>,
    durability: Durability,
}

/// An event as files written before chunks hold it, after its 8-byte timestamp.
#[derive(Deserialize)]
struct Legacy<'a> {
    // Borrowed where the JSON text has no escapes, owned where it has.
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    meta: Vec<(String, String)>,
}

/// The events of one chunk value, oldest first, with their offsets.
///
/// Layout (lengths little endian): the number of events (4 bytes), then per
/// event its length (4 bytes) and a record: Unix milliseconds (8 bytes), id
/// and name (each a 1-byte length and the bytes), the number of meta pairs
/// (4 bytes), each key and value (a 4-byte length and the bytes), and the
/// data, verbatim, to the end of the record.
struct Chunk<'a> {
    rest: &'a [u8],
    offset: u64,
    left: usize,
}

impl<'a> Chunk<'a> {
    fn new(value: &'a [u8], last: u64) -> Option<Chunk<'a>> {
        let mut rest = value;
        let count = take_len(&mut rest, 4)?;
        let first = (last + 1).checked_sub(count as u64).filter(|_| count > 0)?;
        Some(Chunk { rest, offset: first, left: count })
    }
}

impl<'a> Iterator for Chunk<'a> {
    /// An offset and its record, or `None` where the chunk is corrupt.
    type Item = Option<(u64, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let offset = self.offset;
        self.offset += 1;
        let record = take_len(&mut self.rest, 4).and_then(|len| {
            let (record, tail) = self.rest.split_at_checked(len)?;
            self.rest = tail;
            Some(record)
        });
        if record.is_none() {
            self.left = 0;
        }
        Some(record.map(|r| (offset, r)))
    }
}

/// Appends one event to a chunk value under construction.
fn push_record<'m>(
    out: &mut Vec<u8>,
    timestamp_ms: i64,
    id: &str,
    name: &str,
    meta: impl ExactSizeIterator<Item = (&'m str, &'m str)>,
    data: &[u8],
) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    for short in [id, name] {
        // Ids are UUIDs and names are checked to fit (SPEC §5).
        out.push(short.len() as u8);
        out.extend_from_slice(short.as_bytes());
    }
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    for (key, value) in meta {
        for s in [key, value] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    // Data was checked to be JSON on the way in: neither parsed nor escaped here.
    out.extend_from_slice(data);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Reads a length of `width` bytes (little endian) off the front of `rest`.
fn take_len(rest: &mut &[u8], width: usize) -> Option<usize> {
    let (len, tail) = rest.split_at_checked(width)?;
    *rest = tail;
    Some(len.iter().rev().fold(0usize, |n, &b| n << 8 | b as usize))
}

/// Reads a string with a length of `width` bytes off the front of `rest`.
fn take_str<'a>(rest: &mut &'a [u8], width: usize) -> Option<&'a str> {
    let len = take_len(rest, width)?;
    let (s, tail) = rest.split_at_checked(len)?;
    *rest = tail;
    std::str::from_utf8(s).ok()
}

fn timestamp_of(record: &[u8]) -> Option<i64> {
    record.first_chunk::<8>().map(|ts| i64::from_le_bytes(*ts))
}

/// Builds chunk values from a batch's events and inserts them.
struct ChunkWriter<'a> {
    value: Vec<u8>,
    count: u32,
    /// Channel and offset of the newest event in `value`.
    last: Option<(&'a str, u64)>,
}

impl<'a> ChunkWriter<'a> {
    fn push(&mut self, table: &mut Table<'_, (&str, u64), &[u8]>, event: &'a Event) -> Result<(), StoreError> {
        let follows = self.last.is_some_and(|(ch, last)| ch == &*event.channel && last + 1 == event.offset);
        if !follows || self.count == CHUNK_EVENTS || self.value.len() >= CHUNK_BYTES {
            self.flush(table)?;
        }
        if self.count == 0 {
            self.value.clear();
            self.value.extend_from_slice(&[0; 4]);
        }
        let meta = event.meta.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        push_record(&mut self.value, event.timestamp_ms, &event.id, &event.name, meta, &event.data);
        self.count += 1;
        self.last = Some((&event.channel, event.offset));
        Ok(())
    }

    fn flush(&mut self, table: &mut Table<'_, (&str, u64), &[u8]>) -> Result<(), StoreError> {
        if let Some((channel, last)) = self.last.take() {
            self.value[..4].copy_from_slice(&self.count.to_le_bytes());
            table.insert((channel, last), self.value.as_slice()).map_err(io)?;
        }
        self.count = 0;
        Ok(())
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the log in `dir`; `cache_bytes` bounds redb's page
    /// cache (its own default is 1 GiB, which a busy log fills over hours).
    ///
    /// # Errors
    /// `StoreError::Locked` when another process has it open, `StoreError::Open`
    /// when the directory or file cannot be created or read.
    pub fn open(dir: &Path, fsync: Fsync, cache_bytes: usize) -> Result<Self, StoreError> {
        let open_err = |cause: String| StoreError::Open { path: dir.display().to_string(), cause };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder().set_cache_size(cache_bytes).create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: dir.display().to_string() },
            other => open_err(other.to_string()),
        })?;
        let durability = match fsync {
            Fsync::Never => Durability::None,
            Fsync::Always | Fsync::Batch => Durability::Immediate,
        };
        let epoch = {
            let txn = db.begin_write().map_err(io)?;
            let epoch = {
                let mut settings = txn.open_table(SETTINGS).map_err(io)?;
                let existing = settings.get("epoch").map_err(io)?.map(|v| v.value().to_owned());
                match existing {
                    Some(epoch) => Arc::from(epoch),
                    None => {
                        let epoch = new_epoch();
                        settings.insert("epoch", &*epoch).map_err(io)?;
                        epoch
                    }
                }
            };
            txn.open_table(CHUNKS).map_err(io)?;
            txn.open_table(CHANNELS).map_err(io)?;
            txn.open_table(IDEMPOTENCY).map_err(io)?;
            if txn.list_tables().map_err(io)?.any(|t| t.name() == LEGACY_EVENTS.name()) {
                migrate(&txn)?;
                txn.delete_table(LEGACY_EVENTS).map_err(io)?;
            }
            txn.commit().map_err(io)?;
            epoch
        };
        Ok(EmbeddedStore { db, epoch, durability })
    }

    fn decode(&self, channel: &str, offset: u64, record: &[u8]) -> Result<Event, StoreError> {
        let corrupt = || StoreError::Io(format!("corrupt event {channel}/{offset}"));
        let (timestamp, mut rest) = record.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let id = take_str(&mut rest, 1).ok_or_else(corrupt)?.to_owned();
        let name = take_str(&mut rest, 1).ok_or_else(corrupt)?.to_owned();
        let count = take_len(&mut rest, 4).ok_or_else(corrupt)?;
        let mut meta = Vec::with_capacity(count.min(rest.len()));
        for _ in 0..count {
            let key = take_str(&mut rest, 4).ok_or_else(corrupt)?.to_owned();
            let value = take_str(&mut rest, 4).ok_or_else(corrupt)?.to_owned();
            meta.push((key, value));
        }
        Ok(Event {
            id,
            channel: Arc::from(channel),
            name,
            data: bytes::Bytes::copy_from_slice(rest),
            offset,
            epoch: self.epoch.clone(),
            timestamp_ms: i64::from_le_bytes(*timestamp),
            meta,
        })
    }
}

/// Moves the rows of a file written before chunks into `chunks`, one event per chunk.
fn migrate(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let old = txn.open_table(LEGACY_EVENTS).map_err(io)?;
    let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
    let mut value = Vec::new();
    for row in old.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        let (channel, offset) = k.value();
        let corrupt = |cause: &str| StoreError::Io(format!("corrupt event {channel}/{offset}: {cause}"));
        let (timestamp, json) = v.value().split_first_chunk::<8>().ok_or_else(|| corrupt("too short"))?;
        let legacy: Legacy<'_> = serde_json::from_slice(json).map_err(|e| corrupt(&e.to_string()))?;
        value.clear();
        value.extend_from_slice(&1u32.to_le_bytes());
        let meta = legacy.meta.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let data = legacy.data.get().as_bytes();
        push_record(&mut value, i64::from_le_bytes(*timestamp), &legacy.id, &legacy.name, meta, data);
        chunks.insert((channel, offset), value.as_slice()).map_err(io)?;
    }
    Ok(())
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Offsets of the chunks of `channel` whose events all lie below `first`.
fn chunks_below(chunks: &Table<'_, (&str, u64), &[u8]>, channel: &str, first: u64) -> Result<Vec<u64>, StoreError> {
    chunks.range((channel, 0)..(channel, first)).map_err(io)?.map(|row| Ok(row.map_err(io)?.0.value().1)).collect()
}

/// Rewrites the chunk that holds offset `first` without its events below `first`.
fn cut_boundary(chunks: &mut Table<'_, (&str, u64), &[u8]>, channel: &str, first: u64) -> Result<(), StoreError> {
    let (last, value) = {
        let Some(row) = chunks.range((channel, first)..=(channel, u64::MAX)).map_err(io)?.next() else {
            return Ok(());
        };
        let (k, v) = row.map_err(io)?;
        let last = k.value().1;
        let corrupt = || StoreError::Io(format!("corrupt chunk {channel}/{last}"));
        let chunk = Chunk::new(v.value(), last).ok_or_else(corrupt)?;
        if chunk.offset >= first {
            return Ok(());
        }
        let mut value = ((last + 1 - first) as u32).to_le_bytes().to_vec();
        for record in chunk {
            let (offset, record) = record.ok_or_else(corrupt)?;
            if offset >= first {
                value.extend_from_slice(&(record.len() as u32).to_le_bytes());
                value.extend_from_slice(record);
            }
        }
        (last, value)
    };
    chunks.insert((channel, last), value.as_slice()).map_err(io)?;
    Ok(())
}

impl Store for EmbeddedStore {
    fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    fn channels(&self) -> Result<Vec<ChannelMeta>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(CHANNELS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (top, first) = v.value();
            out.push(ChannelMeta { channel: Arc::from(k.value()), top, first });
        }
        Ok(out)
    }

    fn idempotency(&self, now_ms: i64) -> Result<Vec<IdempotencyRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(IDEMPOTENCY).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (channel, key) = k.value();
            let (event_id, offset, expires_ms) = v.value();
            if expires_ms > now_ms {
                out.push(IdempotencyRecord {
                    channel: Arc::from(channel),
                    key: key.to_owned(),
                    event_id: event_id.to_owned(),
                    offset,
                    expires_ms,
                });
            }
        }
        Ok(out)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(self.durability).map_err(io)?;
        {
            let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
            let mut writer = ChunkWriter { value: Vec::new(), count: 0, last: None };
            for event in &batch.events {
                writer.push(&mut chunks, event)?;
            }
            writer.flush(&mut chunks)?;
            let mut channels = txn.open_table(CHANNELS).map_err(io)?;
            for meta in &batch.metas {
                for last in chunks_below(&chunks, &meta.channel, meta.first)? {
                    chunks.remove((&*meta.channel, last)).map_err(io)?;
                }
                channels.insert(&*meta.channel, (meta.top, meta.first)).map_err(io)?;
            }
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(io)?;
            for r in &batch.idempotency {
                idem.insert((&*r.channel, r.key.as_str()), (r.event_id.as_str(), r.offset, r.expires_ms))
                    .map_err(io)?;
            }
        }
        txn.commit().map_err(io)
    }

    fn read(&self, channel: &str, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let first = txn.open_table(CHANNELS).map_err(io)?.get(channel).map_err(io)?.map_or(1, |v| v.value().1);
        let table = txn.open_table(CHUNKS).map_err(io)?;
        let start = after.saturating_add(1).max(first);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for row in table.range((channel, start)..=(channel, u64::MAX)).map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let last = k.value().1;
            let corrupt = || StoreError::Io(format!("corrupt chunk {channel}/{last}"));
            for record in Chunk::new(v.value(), last).ok_or_else(corrupt)? {
                let (offset, record) = record.ok_or_else(corrupt)?;
                if offset >= start {
                    out.push(self.decode(channel, offset, record)?);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    fn expire(&self, cutoffs: &[(Arc<str>, i64)], now_ms: i64) -> Result<Vec<(Arc<str>, u64)>, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        let mut changed = Vec::new();
        {
            let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
            let mut channels = txn.open_table(CHANNELS).map_err(io)?;
            for (channel, cutoff) in cutoffs {
                let Some((top, first)) = channels.get(&**channel).map_err(io)?.map(|v| v.value()) else {
                    continue;
                };
                // Events are stored in time order: the new first is the first one not expired.
                let mut new_first = first;
                'scan: for row in chunks.range((&**channel, first)..=(&**channel, u64::MAX)).map_err(io)? {
                    let (k, v) = row.map_err(io)?;
                    let last = k.value().1;
                    let corrupt = || StoreError::Io(format!("corrupt chunk {channel}/{last}"));
                    for record in Chunk::new(v.value(), last).ok_or_else(corrupt)? {
                        let (offset, record) = record.ok_or_else(corrupt)?;
                        if offset < first {
                            continue;
                        }
                        if timestamp_of(record).ok_or_else(corrupt)? >= *cutoff {
                            break 'scan;
                        }
                        new_first = offset + 1;
                    }
                }
                if new_first > first {
                    for last in chunks_below(&chunks, channel, new_first)? {
                        chunks.remove((&**channel, last)).map_err(io)?;
                    }
                    channels.insert(&**channel, (top, new_first)).map_err(io)?;
                    changed.push((channel.clone(), new_first));
                }
                // Commits drop whole chunks only; what trimming or expiry left below
                // `first` in the chunk that holds it goes here, within a second.
                cut_boundary(&mut chunks, channel, new_first)?;
            }
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(io)?;
            idem.retain(|_, (_, _, expires_ms)| expires_ms > now_ms).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE_BYTES: usize = 16 << 20;

    fn event(channel: &str, offset: u64, meta: Vec<(String, String)>) -> Event {
        Event {
            id: format!("id-{offset}"),
            channel: Arc::from(channel),
            name: "mission_updated".to_owned(),
            data: bytes::Bytes::from(format!(r#"{{"status":"\u00e9t\u00e9 \"ok\"","n":[{offset},2.5,null]}}"#)),
            offset,
            epoch: Arc::from(""),
            timestamp_ms: 1_790_000_000_000 + offset as i64,
            meta,
        }
    }

    fn commit(store: &EmbeddedStore, events: &[Event], metas: &[(&str, u64, u64)]) {
        let metas = metas.iter().map(|&(c, top, first)| ChannelMeta { channel: Arc::from(c), top, first }).collect();
        store.commit(&Batch { events: events.to_vec(), metas, idempotency: Vec::new() }).unwrap();
    }

    fn stamped(store: &EmbeddedStore, events: &[Event]) -> Vec<Event> {
        events.iter().map(|e| Event { epoch: store.epoch(), ..e.clone() }).collect()
    }

    #[test]
    fn events_read_back_as_written_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let meta = vec![("trace".to_owned(), "ü".repeat(300)), (String::new(), String::new())];
        // 150 events of one channel: three chunks; then a second channel.
        let mut written: Vec<Event> =
            (1..=150).map(|o| event("mission:7", o, if o == 70 { meta.clone() } else { vec![] })).collect();
        written.extend((1..=2).map(|o| event("task:1", o, vec![])));
        {
            let store = EmbeddedStore::open(dir.path(), Fsync::Always, CACHE_BYTES).unwrap();
            commit(&store, &written, &[("mission:7", 150, 1), ("task:1", 2, 1)]);
        }
        let store = EmbeddedStore::open(dir.path(), Fsync::Always, CACHE_BYTES).unwrap();
        let expected = stamped(&store, &written);
        assert_eq!(store.read("mission:7", 0, 1000).unwrap(), expected[..150]);
        assert_eq!(store.read("mission:7", 63, 3).unwrap(), expected[63..66]);
        assert_eq!(store.read("mission:7", 149, 10).unwrap(), expected[149..150]);
        assert_eq!(store.read("mission:7", 150, 10).unwrap(), []);
        assert_eq!(store.read("task:1", 0, 10).unwrap(), expected[150..]);
    }

    #[test]
    fn trimmed_events_are_never_read_and_whole_chunks_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Fsync::Never, CACHE_BYTES).unwrap();
        let written: Vec<Event> = (1..=100).map(|o| event("c", o, vec![])).collect();
        commit(&store, &written[..70], &[("c", 70, 1)]);
        commit(&store, &written[70..], &[("c", 100, 66)]);
        let expected = stamped(&store, &written);
        // Offsets 1..=64 formed a chunk now wholly below `first` and dropped;
        // 65 shares a chunk with 66..=70 and is kept but not served.
        assert_eq!(store.read("c", 0, 1000).unwrap(), expected[65..]);
        assert_eq!(store.read("c", 64, 2).unwrap(), expected[65..67]);
        let txn = store.db.begin_read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        let lasts: Vec<u64> = chunks.iter().unwrap().map(|r| r.unwrap().0.value().1).collect();
        assert_eq!(lasts, [70, 100]);
        drop((chunks, txn));

        // Expiry with nothing old enough still removes 65 from the disk.
        assert_eq!(store.expire(&[(Arc::from("c"), 0)], 0).unwrap(), []);
        let txn = store.db.begin_read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        let boundary = chunks.get(("c", 70)).unwrap().unwrap();
        let offsets: Vec<u64> = Chunk::new(boundary.value(), 70).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(offsets, [66, 67, 68, 69, 70]);
        assert_eq!(store.read("c", 0, 1000).unwrap(), expected[65..]);
    }

    #[test]
    fn expiry_moves_first_past_old_events_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Fsync::Never, CACHE_BYTES).unwrap();
        let written: Vec<Event> = (1..=100).map(|o| event("c", o, vec![])).collect();
        commit(&store, &written, &[("c", 100, 1)]);
        // Offsets 1..=79 are older than the cutoff.
        let changed = store.expire(&[(Arc::from("c"), 1_790_000_000_080)], 0).unwrap();
        assert_eq!(changed, [(Arc::from("c"), 80)]);
        assert_eq!(store.channels().unwrap(), [ChannelMeta { channel: Arc::from("c"), top: 100, first: 80 }]);
        assert_eq!(store.read("c", 0, 1000).unwrap(), stamped(&store, &written[79..]));
        assert_eq!(store.expire(&[(Arc::from("c"), 1_790_000_000_080)], 0).unwrap(), []);
    }

    #[test]
    fn files_with_one_json_event_per_row_are_moved_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut settings = txn.open_table(SETTINGS).unwrap();
                settings.insert("epoch", "00000000000000aa").unwrap();
                let mut events = txn.open_table(LEGACY_EVENTS).unwrap();
                for offset in [2u64, 3] {
                    let mut value = (40 + offset as i64).to_le_bytes().to_vec();
                    let json =
                        format!(r#"{{"id":"e{offset}","name":"n\"\t","data":{{"a":[{offset}]}},"meta":[["k","v"]]}}"#);
                    value.extend_from_slice(json.as_bytes());
                    events.insert(("c", offset), value.as_slice()).unwrap();
                }
                txn.open_table(CHANNELS).unwrap().insert("c", (3, 2)).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), Fsync::Always, CACHE_BYTES).unwrap();
        assert_eq!(&*store.epoch(), "00000000000000aa");
        let read = store.read("c", 0, 10).unwrap();
        let summary: Vec<_> = read.iter().map(|e| (e.id.as_str(), e.offset, e.timestamp_ms, &e.data[..])).collect();
        assert_eq!(summary, [("e2", 2, 42, &br#"{"a":[2]}"#[..]), ("e3", 3, 43, &br#"{"a":[3]}"#[..])]);
        assert_eq!(read[0].meta, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(read[1].name, "n\"\t", "escaped text in the old JSON is unescaped");
        let txn = store.db.begin_read().unwrap();
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == LEGACY_EVENTS.name()));
    }

    #[test]
    fn truncated_chunks_are_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Fsync::Never, CACHE_BYTES).unwrap();
        let mut value = 1u32.to_le_bytes().to_vec();
        let e = event("c", 1, vec![("key".to_owned(), "value".to_owned())]);
        push_record(&mut value, 1, &e.id, &e.name, [("key", "value")].into_iter(), &e.data);
        for cut in [2, 6, 14, 20, 30] {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(CHUNKS).unwrap().insert(("c", 1), &value[..cut]).unwrap();
            txn.open_table(CHANNELS).unwrap().insert("c", (1, 1)).unwrap();
            txn.commit().unwrap();
            let err = store.read("c", 0, 10).unwrap_err().to_string();
            assert!(err.contains("corrupt") && err.contains("c/1"), "cut at {cut}: {err}");
        }
    }
}
