//! The `embedded` backend: a durable event log in one redb file.
//!
//! Tables:
//! - `events`: `(channel, offset)` → 8 bytes of Unix milliseconds (little
//!   endian), then the event as JSON;
//! - `channels`: `channel` → `(top, first)`;
//! - `idempotency`: `(channel, key)` → `(event_id, offset, expires_ms)`;
//! - `settings`: `"epoch"` → the epoch of this data directory.
//!
//! redb commits are atomic and checksummed: a write torn by a crash is rolled
//! back when the file is next opened, never served. redb also locks the file,
//! so a second process on the same directory is refused.

use std::{path::Path, sync::Arc};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Batch, ChannelMeta, IdempotencyRecord, Store, new_epoch};
use crate::{Event, config::Fsync, error::StoreError};

const EVENTS: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("events");
const CHANNELS: TableDefinition<'static, &str, (u64, u64)> = TableDefinition::new("channels");
const IDEMPOTENCY: TableDefinition<'static, (&str, &str), (&str, u64, i64)> = TableDefinition::new("idempotency");
const SETTINGS: TableDefinition<'static, &str, &str> = TableDefinition::new("settings");

/// File name of the log inside the data directory.
pub const FILE_NAME: &str = "eventbus.redb";

pub struct EmbeddedStore {
    db: Database,
    epoch: Arc<str>,
    durability: Durability,
}

/// The part of an event that is not in its key.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    id: &'a str,
    name: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    meta: Vec<(String, String)>,
}

impl EmbeddedStore {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// `StoreError::Locked` when another process has it open, `StoreError::Open`
    /// when the directory or file cannot be created or read.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<Self, StoreError> {
        let open_err = |cause: String| StoreError::Open { path: dir.display().to_string(), cause };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
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
            txn.open_table(EVENTS).map_err(io)?;
            txn.open_table(CHANNELS).map_err(io)?;
            txn.open_table(IDEMPOTENCY).map_err(io)?;
            txn.commit().map_err(io)?;
            epoch
        };
        Ok(EmbeddedStore { db, epoch, durability })
    }

    fn decode(&self, channel: &str, offset: u64, value: &[u8]) -> Result<Event, StoreError> {
        if value.len() < 8 {
            return Err(StoreError::Io(format!("corrupt event {channel}/{offset}")));
        }
        let timestamp_ms = i64::from_le_bytes(value[..8].try_into().unwrap());
        let stored: Stored<'_> = serde_json::from_slice(&value[8..]).map_err(io)?;
        Ok(Event {
            id: stored.id.to_owned(),
            channel: Arc::from(channel),
            name: stored.name.to_owned(),
            data: bytes::Bytes::copy_from_slice(stored.data.get().as_bytes()),
            offset,
            epoch: self.epoch.clone(),
            timestamp_ms,
            meta: stored.meta,
        })
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn encode(event: &Event) -> Result<Vec<u8>, StoreError> {
    // Data was checked to be JSON on the way in; a failure here is a bug upstream.
    let data: &RawValue = serde_json::from_slice(&event.data).map_err(io)?;
    let stored = Stored { id: &event.id, name: &event.name, data, meta: event.meta.clone() };
    let mut out = Vec::with_capacity(8 + event.data.len() + 64);
    out.extend_from_slice(&event.timestamp_ms.to_le_bytes());
    serde_json::to_writer(&mut out, &stored).map_err(io)?;
    Ok(out)
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
            let mut events = txn.open_table(EVENTS).map_err(io)?;
            for event in &batch.events {
                events.insert((&*event.channel, event.offset), encode(event)?.as_slice()).map_err(io)?;
            }
            let mut channels = txn.open_table(CHANNELS).map_err(io)?;
            for meta in &batch.metas {
                let old_first = channels.get(&*meta.channel).map_err(io)?.map(|v| v.value().1).unwrap_or(1);
                for offset in old_first..meta.first {
                    events.remove((&*meta.channel, offset)).map_err(io)?;
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
        let table = txn.open_table(EVENTS).map_err(io)?;
        let mut out = Vec::new();
        let start = after.saturating_add(1);
        for row in table.range((channel, start)..=(channel, u64::MAX)).map_err(io)?.take(limit) {
            let (k, v) = row.map_err(io)?;
            out.push(self.decode(channel, k.value().1, v.value())?);
        }
        Ok(out)
    }

    fn expire(&self, cutoffs: &[(Arc<str>, i64)], now_ms: i64) -> Result<Vec<(Arc<str>, u64)>, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        let mut changed = Vec::new();
        {
            let mut events = txn.open_table(EVENTS).map_err(io)?;
            let mut channels = txn.open_table(CHANNELS).map_err(io)?;
            for (channel, cutoff) in cutoffs {
                let mut expired = Vec::new();
                for row in events.range((&**channel, 0)..=(&**channel, u64::MAX)).map_err(io)? {
                    let (k, v) = row.map_err(io)?;
                    let ts = i64::from_le_bytes(v.value()[..8].try_into().unwrap_or_default());
                    if ts >= *cutoff {
                        break;
                    }
                    expired.push(k.value().1);
                }
                let Some(&last) = expired.last() else {
                    continue;
                };
                for offset in &expired {
                    events.remove((&**channel, *offset)).map_err(io)?;
                }
                let top = channels.get(&**channel).map_err(io)?.map(|v| v.value().0).unwrap_or(last);
                channels.insert(&**channel, (top, last + 1)).map_err(io)?;
                changed.push((channel.clone(), last + 1));
            }
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(io)?;
            idem.retain(|_, (_, _, expires_ms)| expires_ms > now_ms).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(changed)
    }
}
