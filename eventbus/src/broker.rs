//! The seam between the bus core and a shared backend (`redis`, `nats`).
//!
//! A shared backend numbers and keeps events itself, so that every bus node
//! on it serves the same channels: it answers publishes with their
//! position, reads history by offset, and hears every stored event on a
//! node-level live feed that it hands to `Bus::on_live`. Everything else
//! (joins with recovery, buffering while a channel syncs, gap detection,
//! telling subscribers that history was lost) is the bus core's, the same
//! for every backend: see `bus.rs`.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{Event, NewEvent, Position, Published, error::BusError};

/// Where a publish's result goes.
pub(crate) type Reply = oneshot::Sender<Result<Published, BusError>>;

/// Channels with their positions, as `Broker::channels` lists them.
pub(crate) type Listed = Vec<(Arc<str>, Position)>;

/// A backend that numbers, keeps and announces events for every node on it.
pub(crate) trait Broker: Send + Sync + 'static {
    /// Queues an event; `reply` gets its position. Events queued one after
    /// the other get offsets in that order.
    fn publish(&self, event: NewEvent, reply: Reply) -> BoxFuture<'_, Result<(), BusError>>;

    /// Starts hearing a channel; the backend calls `Bus::listened` once
    /// every later event of it will be heard, and `Bus::on_live` for each.
    fn listen(&self, channel: Arc<str>);

    /// Stops hearing a channel that nobody on this node listens to.
    fn unlisten(&self, channel: Arc<str>);

    /// Reads a channel's position and, when `had` is in the same epoch, the
    /// events after it up to that position. When the backend holds fewer
    /// events than `had` says were delivered (it lost writes), the channel
    /// starts a new epoch, since those offsets must not be given again.
    fn sync(
        &self,
        channel: Arc<str>,
        had: Option<Position>,
    ) -> BoxFuture<'static, Result<(Position, Vec<Event>), BusError>>;

    /// Reads the events after `after` up to `to` (what a join replays),
    /// labelled with the epoch they were read in.
    fn range(&self, channel: Arc<str>, after: u64, to: u64) -> BoxFuture<'static, Result<Vec<Event>, BusError>>;

    /// Reads history: at most `limit` events after `since` (the newest ones
    /// first with `reverse`), and the channel's position.
    fn history(
        &self,
        channel: Arc<str>,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> BoxFuture<'static, Result<(Vec<Event>, Position), BusError>>;

    /// Lists channels whose name starts with `prefix`, with their positions.
    fn channels(&self, prefix: String) -> BoxFuture<'static, Result<Listed, BusError>>;

    /// Where every node's presence entries are kept, and joins and leaves
    /// announced to every node (see `presence.rs`); the engine starts it,
    /// once, when the bus is built.
    fn presence(&self) -> Arc<dyn crate::presence::PresenceStore>;
}

/// A shared backend's tasks, stopped by `BusHandle::stop`.
pub(crate) struct Tasks {
    pub(crate) stop: CancellationToken,
    pub(crate) handles: Vec<JoinHandle<()>>,
}

impl Tasks {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for handle in self.handles {
            let _ = handle.await;
        }
    }
}

// === the record both shared backends keep ===

/// An event as a shared backend keeps and carries it (its offset and epoch
/// are the backend's), as `encode` writes it.
#[derive(Deserialize)]
struct Wire<'a> {
    i: std::borrow::Cow<'a, str>,
    n: std::borrow::Cow<'a, str>,
    t: i64,
    #[serde(default)]
    m: Vec<(String, String)>,
    #[serde(borrow)]
    d: &'a RawValue,
}

/// Writes `Wire` around the event's data, which `Bus::check` has found to
/// be JSON: spliced in, not parsed again.
pub(crate) fn encode(id: &str, event: &NewEvent, timestamp_ms: i64) -> Result<String, BusError> {
    let data = std::str::from_utf8(&event.data).map_err(|e| BusError::InvalidJson(e.to_string()))?;
    let mut out = String::with_capacity(data.len() + event.name.len() + 80);
    out.push_str("{\"i\":");
    out.push_str(&json(id));
    out.push_str(",\"n\":");
    out.push_str(&json(&event.name));
    out.push_str(",\"t\":");
    out.push_str(&timestamp_ms.to_string());
    if !event.meta.is_empty() {
        out.push_str(",\"m\":");
        out.push_str(&json(&event.meta));
    }
    out.push_str(",\"d\":");
    out.push_str(data);
    out.push('}');
    Ok(out)
}

/// The JSON text of strings and string pairs, which cannot fail.
fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("strings serialize")
}

pub(crate) fn decode(channel: &Arc<str>, offset: u64, epoch: &Arc<str>, text: &[u8]) -> Option<Event> {
    let wire: Wire<'_> = serde_json::from_slice(text).ok()?;
    Some(Event {
        id: wire.i.into_owned(),
        channel: channel.clone(),
        name: wire.n.into_owned(),
        data: bytes::Bytes::copy_from_slice(wire.d.get().as_bytes()),
        offset,
        epoch: epoch.clone(),
        timestamp_ms: wire.t,
        meta: wire.m,
    })
}

/// A new epoch: random, so that no two histories of a channel share one.
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}
