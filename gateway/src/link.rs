//! The bus link: this node's one `Subscribe` stream to the event bus, and
//! the recoveries of listeners that subscribe with a position.
//!
//! The link joins a channel when the first local listener subscribes and
//! leaves it when the last one goes. When the stream breaks it reconnects
//! with backoff, to the next bus node of `gateway.eventbus_url` when there
//! are several (`BusNodes`), and rejoins every channel from the last
//! position this node delivered, so listeners see no gap (or are closed
//! with `4004` when the bus cannot serve it).

use std::{sync::Arc, time::Duration};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use switchboard_proto::eventbus::v1 as pb;

use crate::{
    bus::{self, Bus, BusNodes},
    hub::{BROADCAST_CHANNEL, Frame, Hub, LinkCommand, Recovered, RecoveryJob},
    metrics::Metrics,
    protocol::{self, EventRef, Position},
};

fn join(channel: &str, since: Option<Position>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Join(pb::Join {
            channel: channel.to_owned(),
            since: since.map(|p| pb::StreamPosition { offset: p.offset, epoch: p.epoch }),
        })),
    }
}

fn command(cmd: LinkCommand) -> pb::SubscribeRequest {
    match cmd {
        LinkCommand::Join { channel, since } => join(&channel, since),
        LinkCommand::Leave { channel } => pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Leave(pb::Leave { channel: channel.to_string() })),
        },
        LinkCommand::PresenceJoin { channel, connection, user_id, node } => pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::PresenceJoin(pb::PresenceJoin {
                channel: channel.to_string(),
                connection_id: connection.to_string(),
                user_id: user_id.unwrap_or_default(),
                node: node.to_string(),
            })),
        },
        LinkCommand::PresenceLeave { channel, connection } => pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::PresenceLeave(pb::PresenceLeave {
                channel: channel.to_string(),
                connection_id: connection.to_string(),
            })),
        },
    }
}

/// Writes the frame of a bus event once.
fn frame(e: &EventRef<'_>) -> Frame {
    Frame {
        offset: e.offset,
        epoch: Arc::from(e.epoch),
        text: Utf8Bytes::from(protocol::event_frame(e)),
        timestamp_ms: e.timestamp_ms,
    }
}

/// Runs the link until `shutdown`.
pub async fn run(
    hub: Arc<Hub>,
    nodes: Arc<BusNodes>,
    mut commands: mpsc::Receiver<LinkCommand>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut broadcast: Option<Position> = None;
    loop {
        // Commands queued while the link was down are covered by `relink`.
        while commands.try_recv().is_ok() {}
        let (tx, rx) = mpsc::channel(1024);
        let bus = nodes.current();
        let mut subscriber = bus.grpc();
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = subscriber.subscribe(ReceiverStream::new(rx)) => r,
        };
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(%status, "event bus unreachable; retrying");
                nodes.next();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut joins = vec![join(BROADCAST_CHANNEL, broadcast.clone())];
        joins.extend(hub.relink().into_iter().map(command));
        let mut linked = true;
        for j in joins {
            if tx.send(j).await.is_err() {
                linked = false;
                break;
            }
        }
        if linked {
            tracing::info!("linked to the event bus");
            backoff = Duration::from_millis(50);
        }
        while linked {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    hub.link_down();
                    return;
                }
                Some(cmd) = commands.recv() => linked = tx.send(command(cmd)).await.is_ok(),
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => handle(&hub, &bus, &metrics, &mut broadcast, resp),
                    Ok(None) => linked = false,
                    Err(status) => {
                        tracing::warn!(%status, "event bus stream ended");
                        linked = false;
                    }
                },
            }
        }
        hub.link_down();
        nodes.next();
    }
}

fn handle(hub: &Arc<Hub>, bus: &Bus, metrics: &Metrics, broadcast: &mut Option<Position>, resp: pb::SubscribeResponse) {
    use pb::subscribe_response::Response as R;
    match resp.response {
        Some(R::Joined(joined)) => {
            if let Some(err) = joined.error {
                tracing::error!(channel = %joined.channel, message = %err.message, "bus refused a join");
                return;
            }
            let position = joined.position.map(bus::position).unwrap_or(Position { offset: 0, epoch: String::new() });
            if joined.channel == BROADCAST_CHANNEL {
                if broadcast.is_none() || !joined.recovered {
                    *broadcast = Some(position);
                }
                return;
            }
            for job in hub.on_joined(&joined.channel, position, joined.recovered) {
                tokio::spawn(recover(hub.clone(), bus.clone(), job));
            }
        }
        Some(R::Events(batch)) => {
            let started = std::time::Instant::now();
            let mut i = 0;
            while i < batch.events.len() {
                // Runs of one channel share one pass over the hub; events
                // with offset 0 (presence `join` and `leave`) are not stored
                // and move no position, so they run apart.
                let channel = &batch.events[i].channel;
                let transient = batch.events[i].offset == 0;
                let end = batch.events[i..]
                    .iter()
                    .position(|e| &e.channel != channel || (e.offset == 0) != transient)
                    .map_or(batch.events.len(), |n| i + n);
                let frames: Vec<Frame> = batch.events[i..end].iter().map(|e| frame(&bus::event_ref(e))).collect();
                if let Some(last) = frames.last() {
                    let lag = (protocol::now() - last.timestamp_ms as f64 / 1000.0).max(0.0);
                    metrics.bus_lag.set(lag);
                }
                if channel == BROADCAST_CHANNEL {
                    if let Some(last) = batch.events[i..end].last() {
                        *broadcast = Some(Position { offset: last.offset, epoch: last.epoch.clone() });
                    }
                    hub.on_broadcast(&frames);
                } else if transient {
                    hub.on_transient(channel, &frames);
                } else {
                    hub.on_events(channel, &frames);
                }
                i = end;
            }
            metrics.broadcast_duration.observe(started.elapsed().as_secs_f64());
        }
        Some(R::Left(left)) => hub.on_left(&left.channel),
        None => {}
    }
}

/// Fetches what a recovering listener missed and completes its subscribe.
pub(crate) async fn recover(hub: Arc<Hub>, bus: Bus, job: RecoveryJob) {
    let fetched = match bus.history(&job.channel, Some(&job.since), hub_recovery_limit(&hub)).await {
        Ok(history) => history
            .position()
            .map(|position| Recovered { frames: history.events().map(|e| frame(&e)).collect(), position }),
        Err(e) => {
            tracing::warn!(message = %e.message, channel = %job.channel, "history read failed");
            None
        }
    };
    hub.finish_recovery(&job, fetched);
}

fn hub_recovery_limit(hub: &Hub) -> u32 {
    (hub.recovery_max() + 1).min(u32::MAX as u64) as u32
}
