//! Storage backends of the event bus.
//!
//! A `Store` keeps numbered events, channel metadata and idempotency records.
//! It never numbers events itself: the writer (see `writer.rs`) assigns offsets
//! and hands the store whole batches, so a backend only has to make a batch
//! durable atomically.

use std::sync::Arc;

use crate::{Event, error::StoreError};

pub mod embedded;
pub mod memory;

/// Where a channel stands in storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMeta {
    pub channel: Arc<str>,
    /// Offset of the newest event ever stored (0 for none).
    pub top: u64,
    /// Offset of the oldest event still stored (`top + 1` when none is).
    pub first: u64,
}

/// A remembered idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub channel: Arc<str>,
    pub key: String,
    pub event_id: String,
    pub offset: u64,
    /// Unix milliseconds after which the key is forgotten.
    pub expires_ms: i64,
}

/// What one commit makes durable, atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// New events, in offset order per channel.
    pub events: Vec<Event>,
    /// The new metadata of every channel the batch touches.
    pub metas: Vec<ChannelMeta>,
    pub idempotency: Vec<IdempotencyRecord>,
}

pub trait Store: Send + Sync + 'static {
    /// The epoch of everything this store holds: new when its history is new.
    fn epoch(&self) -> Arc<str>;

    /// Returns every channel with stored state.
    fn channels(&self) -> Result<Vec<ChannelMeta>, StoreError>;

    /// Returns the idempotency records not expired at `now_ms`.
    fn idempotency(&self, now_ms: i64) -> Result<Vec<IdempotencyRecord>, StoreError>;

    /// Stores a batch atomically; events below each meta's `first` are no longer served.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;

    /// Returns up to `limit` events of `channel` with offsets above `after`, oldest first.
    fn read(&self, channel: &str, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;

    /// Drops events older than `cutoff_ms` and forgets expired idempotency
    /// keys; returns the new `first` of each channel that changed.
    fn expire(&self, channels: &[(Arc<str>, i64)], now_ms: i64) -> Result<Vec<(Arc<str>, u64)>, StoreError>;
}

/// Returns a new random epoch.
pub(crate) fn new_epoch() -> Arc<str> {
    let n: u64 = rand::random();
    Arc::from(format!("{n:016x}"))
}
