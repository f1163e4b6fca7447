//! What flows through the bus: events before and after they are stored,
//! positions in channels, and the answer to a publish.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;

/// An event as stored and delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// UUID (v7) given by the bus.
    pub id: String,
    pub channel: Arc<str>,
    /// The event's name (`mission_updated`).
    pub name: String,
    /// UTF-8 JSON, checked on the way in.
    pub data: Bytes,
    pub offset: u64,
    pub epoch: Arc<str>,
    pub timestamp_ms: i64,
    pub meta: Vec<(String, String)>,
}

/// A place in a channel: the last offset seen, and the epoch of its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
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

/// How long an idempotency key is remembered (SPEC §5).
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub event_id: String,
    pub position: Position,
    pub duplicate: bool,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}
