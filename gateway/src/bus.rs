//! The bus as the rest of the gateway sees it: the nodes of
//! `gateway.eventbus_url` and the one in use, and publishes and history reads
//! in domain terms. With `link.rs`, the only module that sees bus proto types.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use switchboard_proto::{
    auth::BearerKey,
    client::{self, BusClient, BusTransport},
    error::ErrorCode,
    eventbus::v1 as pb,
};
use switchboard_tls::ClientTls;

use crate::{
    error::CallError,
    protocol::{EventRef, Position, Since},
};

/// The bus nodes this gateway may link to, and the one it uses: publishes
/// and history go to the node the link is on.
pub struct BusNodes {
    nodes: Vec<Bus>,
    current: AtomicUsize,
}

/// A client of one bus node.
#[derive(Clone)]
pub struct Bus(BusClient);

/// Where the bus stored a published event.
#[derive(Debug, Clone)]
pub struct Published {
    pub offset: u64,
    pub event_id: String,
}

/// A connection subscribed to a presence channel, on some gateway node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresenceEntry {
    pub connection_id: String,
    /// `None` for an anonymous connection.
    pub user_id: Option<String>,
    pub node: String,
}

/// A page of a channel's history, read in place from the bus's answer so
/// that no event is copied on its way to a frame.
pub struct History(pb::HistoryResponse);

// === impl BusNodes ===

impl BusNodes {
    /// The nodes of `urls`, or this process's own bus when `local` is given
    /// (`switchboard up`), called in place.
    ///
    /// # Errors
    /// When there is no bus, or a URL or the key is malformed.
    pub fn new(
        urls: &[String],
        local: Option<BusTransport>,
        key: Option<&str>,
        tls: Option<&ClientTls>,
    ) -> Result<BusNodes, String> {
        let key = BearerKey::new(key).map_err(|e| format!("auth.admin_key: {e}"))?;
        let nodes = match local {
            Some(transport) => vec![Bus(client::bus_over(transport, key))],
            None if urls.is_empty() => return Err("gateway.eventbus_url: no URL given".into()),
            None => urls
                .iter()
                .map(|url| {
                    client::bus(url, key.clone(), tls).map(Bus).map_err(|e| format!("gateway.eventbus_url: {e}"))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(BusNodes { nodes, current: AtomicUsize::new(0) })
    }

    /// The node in use.
    pub fn current(&self) -> Bus {
        self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()].clone()
    }

    /// Moves to the next node, after the one in use was lost or did not answer.
    pub(crate) fn next(&self) {
        if self.nodes.len() > 1 {
            let now = self.current.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(node = now % self.nodes.len(), "trying the next event bus node");
        }
    }
}

// === impl Bus ===

impl Bus {
    /// Publishes `data` as `event` on `channel`.
    ///
    /// # Errors
    /// What to tell the client when the bus refused the event or did not answer.
    pub async fn publish(&self, channel: &str, event: String, data: &Value) -> Result<Published, CallError> {
        let request = pb::PublishRequest {
            channel: channel.to_owned(),
            event,
            data: data.to_string().into(),
            ..Default::default()
        };
        let resp = self.0.clone().publish(request).await.map_err(|s| status_error(&s))?.into_inner();
        Ok(Published { offset: resp.offset, event_id: resp.event_id })
    }

    /// Reads up to `limit` events of `channel` after `since` (from its
    /// first retained event without it).
    ///
    /// # Errors
    /// What to tell the client when the bus refused the read or did not answer.
    pub async fn history(&self, channel: &str, since: Option<&Since>, limit: u32) -> Result<History, CallError> {
        let request = pb::HistoryRequest {
            channel: channel.to_owned(),
            since: since.map(|p| pb::StreamPosition { offset: p.offset, epoch: p.epoch.clone() }),
            limit,
            reverse: false,
        };
        Ok(History(self.0.clone().history(request).await.map_err(|s| status_error(&s))?.into_inner()))
    }

    /// Where `channel` stands on the bus: its last offset and its epoch.
    ///
    /// # Errors
    /// What to tell the client when the bus refused the read or did not answer.
    pub async fn position(&self, channel: &str) -> Result<Option<Position>, CallError> {
        let request = pb::HistoryRequest { channel: channel.to_owned(), limit: 1, reverse: true, ..Default::default() };
        let resp = self.0.clone().history(request).await.map_err(|s| status_error(&s))?.into_inner();
        Ok(resp.position.map(position))
    }

    /// Who is subscribed to `channel` on every gateway node (SPEC §6).
    ///
    /// # Errors
    /// What to tell the client when the bus refused the read or did not answer.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, CallError> {
        let request = pb::PresenceRequest { channel: channel.to_owned() };
        let resp = self.0.clone().presence(request).await.map_err(|s| status_error(&s))?.into_inner();
        Ok(resp
            .entries
            .into_iter()
            .map(|e| PresenceEntry {
                connection_id: e.connection_id,
                user_id: Some(e.user_id).filter(|u| !u.is_empty()),
                node: e.node,
            })
            .collect())
    }

    /// The gRPC client, for the link's `Subscribe` stream.
    pub(crate) fn grpc(&self) -> BusClient {
        self.0.clone()
    }
}

// === impl History ===

impl History {
    pub fn events(&self) -> impl Iterator<Item = EventRef<'_>> {
        self.0.events.iter().map(event_ref)
    }

    /// The channel's position when it was read.
    pub fn position(&self) -> Option<Position> {
        self.0.position.clone().map(position)
    }
}

/// Reads a bus event in place.
pub fn event_ref(e: &pb::Event) -> EventRef<'_> {
    EventRef {
        channel: &e.channel,
        event: &e.event,
        data: &e.data,
        id: &e.event_id,
        offset: e.offset,
        epoch: &e.epoch,
        timestamp_ms: e.timestamp_ms,
    }
}

pub(crate) fn position(p: pb::StreamPosition) -> Position {
    Position { offset: p.offset, epoch: p.epoch }
}

/// Maps a bus status to an `error.code` and a message safe to show.
fn status_error(status: &tonic::Status) -> CallError {
    match status.code() {
        tonic::Code::InvalidArgument => CallError::new(ErrorCode::InvalidFrame, status.message()),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            CallError::new(ErrorCode::Unavailable, "the event bus is unavailable; try later")
        }
        _ => {
            tracing::error!(%status, "bus call failed");
            CallError::new(ErrorCode::Internal, "internal error")
        }
    }
}
