//! What the bridge says on the event bus: status events on `agents`,
//! `tasks` and `system`, and each run's events on its thread channel. The
//! only part of the runs that sees bus proto types.

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use switchboard_proto::eventbus::v1 as bus_pb;

use super::Bridge;

/// One run's ordered stream of events to its thread channel (`PublishStream`).
pub(super) struct ThreadStream {
    channel: String,
    tx: mpsc::Sender<bus_pb::PublishRequest>,
    /// Reads the bus's answers and logs the events it did not store; ends
    /// once the bus has answered for the last event.
    answers: JoinHandle<()>,
}

impl ThreadStream {
    pub(super) async fn send(&self, event: &str, data: Bytes) {
        let req = bus_pb::PublishRequest {
            channel: self.channel.clone(),
            event: event.to_owned(),
            data,
            ..Default::default()
        };
        let _ = self.tx.send(req).await;
    }

    /// Ends the stream and waits for the bus's last answer.
    pub(super) async fn close(self) {
        drop(self.tx);
        let _ = self.answers.await;
    }
}

impl Bridge {
    /// Publishes `agent_heartbeat` for every worker every 30 s (SPEC §7.6).
    pub async fn heartbeats(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for w in self.shared.workers.list() {
                let data = json!({ "worker_id": w.id, "worker": w.name, "agents": w.agents, "load": w.load });
                self.announce("agents", "agent_heartbeat", data).await;
            }
        }
    }

    /// Announces a worker's agents as started or stopped.
    pub async fn announce_worker(&self, event: &str, worker_id: &str, name: &str, agents: &[String]) {
        for agent in agents {
            let data = json!({ "agent": agent, "worker_id": worker_id, "worker": name });
            self.announce("agents", event, data).await;
        }
    }

    /// Publishes a status event; failures are logged, never fatal.
    pub async fn announce(&self, channel: &str, event: &str, data: Value) {
        let Some(mut bus) = self.shared.bus.clone() else { return };
        let req = bus_pb::PublishRequest {
            channel: channel.into(),
            event: event.into(),
            data: data.to_string().into(),
            ..Default::default()
        };
        if let Err(status) = bus.publish(req).await {
            tracing::warn!(%status, channel, event, "cannot publish to the bus");
        }
    }

    pub(super) async fn bus_linked(&self) -> bool {
        match self.shared.bus.clone() {
            Some(mut b) => b.info(bus_pb::InfoRequest {}).await.is_ok(),
            None => false,
        }
    }

    /// The channel's last position, when the bus answers.
    pub(super) async fn position(&self, channel: &str) -> Option<(u64, String)> {
        let mut bus = self.shared.bus.clone()?;
        let req = bus_pb::HistoryRequest { channel: channel.into(), limit: 1, reverse: true, ..Default::default() };
        let resp = bus.history(req).await.ok()?.into_inner();
        resp.position.map(|p| (p.offset, p.epoch))
    }

    /// Opens a run's stream to `channel`, when there is a bus. One stream,
    /// so that the channel keeps the run's events in their order.
    pub(super) fn thread_stream(&self, channel: &str) -> Option<ThreadStream> {
        let mut bus = self.shared.bus.clone()?;
        let (tx, rx) = mpsc::channel::<bus_pb::PublishRequest>(256);
        let answers = tokio::spawn(async move {
            match bus.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                Ok(resp) => {
                    let mut answers = resp.into_inner();
                    while let Ok(Some(a)) = answers.message().await {
                        if let Some(e) = a.error {
                            tracing::warn!(message = %e.message, "thread event not stored");
                        }
                    }
                }
                Err(status) => tracing::warn!(%status, "cannot publish run events"),
            }
        });
        Some(ThreadStream { channel: channel.to_owned(), tx, answers })
    }
}
