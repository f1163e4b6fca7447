//! The driver of one run, in its own task: it relays the agent's events
//! through the checks of SPEC §7.1 and §7.4 until the run ends, fails, is
//! cancelled or passes its deadline, then ends the run in an order a client
//! can rely on.

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    Bridge, RunEvent,
    emitter::{Emitter, Event},
};
use crate::{
    agui::{Failure, Guard},
    metrics::RunLabels,
    workers::AgentMsg,
};

/// Largest AG-UI event an agent may emit, in bytes of JSON.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Most events an agent may emit in one second.
pub const MAX_EVENTS_PER_SECOND: u32 = 2_000;

/// Where a run's events come from.
pub(super) enum Source {
    /// A built-in agent's task.
    Builtin(tokio::task::JoinHandle<()>),
    /// The id of the worker serving it.
    Worker(String),
}

/// One run being driven.
pub(super) struct Run {
    pub(super) bridge: Bridge,
    pub(super) run_id: String,
    pub(super) thread_id: String,
    pub(super) channel: String,
    pub(super) agent: String,
    pub(super) user: String,
}

/// Why a run ended without its agent's end: the `RUN_ERROR` it gets, and its message.
type Failed = (Failure, String);

impl Run {
    /// Drives the run from its agent's first event to the announcement that it ended.
    /// `done` is set once the thread is free for its next run.
    pub(super) async fn drive(
        self,
        source: Source,
        mut agent_rx: mpsc::Receiver<AgentMsg>,
        cancel: CancellationToken,
        tx: mpsc::Sender<RunEvent>,
        done: watch::Sender<bool>,
    ) {
        let started_at = std::time::Instant::now();
        self.bridge.shared.metrics.runs_active.inc();
        let mut task =
            json!({ "run_id": self.run_id, "thread_id": self.thread_id, "agent": self.agent, "user_id": self.user });
        self.bridge.announce("tasks", "run_started", task.clone()).await;

        let mut out = Emitter::new(&self, &tx, self.bridge.thread_stream(&self.channel));
        let mut guard = Guard::default();
        let ending = self.relay(&mut agent_rx, &cancel, &tx, &mut guard, &mut out).await;
        let failure = ending.as_ref().err();
        self.stop_agent(&source, failure).await;
        self.observe(started_at, failure);
        let ok = ending.is_ok();
        let tail = match ending {
            Ok(terminal) => vec![terminal],
            Err((failure, message)) => {
                guard.repair(failure, &message, &self.thread_id, &self.run_id).into_iter().map(Event::new).collect()
            }
        };
        self.end(out, tail, &done).await;

        task["duration_ms"] = json!(started_at.elapsed().as_millis() as u64);
        self.bridge.announce("tasks", if ok { "run_finished" } else { "run_failed" }, task).await;
    }

    /// Relays the agent's checked events until the run ends or fails.
    ///
    /// # Returns
    /// The agent's terminal event, held back until the thread is released,
    /// or why the run failed.
    async fn relay(
        &self,
        agent_rx: &mut mpsc::Receiver<AgentMsg>,
        cancel: &CancellationToken,
        tx: &mpsc::Sender<RunEvent>,
        guard: &mut Guard,
        out: &mut Emitter<'_>,
    ) -> Result<Event, Failed> {
        let mut bounds = Bounds::default();
        let deadline = tokio::time::sleep(self.bridge.shared.config.run_deadline);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err((Failure::Cancelled, "the run was cancelled".to_owned())),
                _ = &mut deadline => return Err((Failure::Timeout, "the run passed its deadline".to_owned())),
                _ = tx.closed(), if !out.caller_gone => {
                    // The caller dropped the Run call: that cancels the run.
                    out.caller_gone = true;
                    cancel.cancel();
                }
                event = agent_rx.recv() => match event {
                    Some(AgentMsg::Lost) => {
                        return Err((Failure::AgentLost, "the worker serving the run went away".to_owned()));
                    }
                    Some(AgentMsg::Event(value)) => {
                        let event = Event::new(value);
                        match bounds.admit(&event).and_then(|()| guard.check(&event.value)) {
                            Ok(()) if guard.ended() => return Ok(event),
                            Ok(()) => out.emit(event).await,
                            Err(rule) => {
                                return Err((Failure::AgentError, format!("the agent broke the rules of a run: {rule}")));
                            }
                        }
                    }
                    None => return Err((Failure::AgentError, "the agent stopped without ending the run".to_owned())),
                },
            }
        }
    }

    /// Stops the agent. A worker that broke the rules, or whose run was
    /// cancelled, is told to stop; one that broke them is also announced.
    async fn stop_agent(&self, source: &Source, failure: Option<&Failed>) {
        let workers = &self.bridge.shared.workers;
        match source {
            Source::Builtin(task) => task.abort(),
            Source::Worker(worker) => {
                if let Some((kind, message)) = failure.filter(|(kind, _)| *kind != Failure::AgentLost) {
                    workers.cancel(worker, &self.run_id, message);
                    if *kind == Failure::AgentError {
                        let data = json!({ "agent": self.agent, "worker_id": worker, "run_id": self.run_id, "message": message });
                        self.bridge.announce("agents", "agent_error", data).await;
                    }
                }
                workers.finished(worker, &self.run_id);
            }
        }
    }

    /// Counts the run out of the active ones and records how long it took.
    fn observe(&self, started_at: std::time::Instant, failure: Option<&Failed>) {
        let metrics = &self.bridge.shared.metrics;
        let outcome = failure.map_or("finished", |(kind, _)| kind.code());
        metrics.runs_active.dec();
        metrics
            .run_duration
            .get_or_create(&RunLabels { agent: self.agent.clone(), outcome: outcome.to_owned() })
            .observe(started_at.elapsed().as_secs_f64());
    }

    /// Sends the run's last events, ending with its terminal one.
    ///
    /// The end comes in an order a client can rely on: the terminal event
    /// is on the thread channel (and everything before it), the run's
    /// messages are in the thread, and the thread is free, before the caller
    /// sees RUN_FINISHED or RUN_ERROR and perhaps sends the next message.
    async fn end(&self, mut out: Emitter<'_>, mut tail: Vec<Event>, done: &watch::Sender<bool>) {
        let last = tail.pop();
        for event in tail {
            out.emit(event).await;
        }
        let last = last.map(|event| out.number(event));
        if let Some((event, seq)) = &last {
            out.publish(event, *seq).await;
        }
        out.flush().await;
        if let Err(e) = self.bridge.shared.threads.append(&self.thread_id, &self.user, out.take_messages()).await {
            tracing::error!(cause = %e, "cannot store the run's messages");
        }
        self.bridge.release(&self.thread_id, &self.run_id, done);
        if let Some((event, seq)) = last {
            out.deliver(event, seq).await;
        }
    }
}

/// The size and rate bound of one run's events (SPEC §7.4).
#[derive(Default)]
struct Bounds {
    window: Option<std::time::Instant>,
    in_window: u32,
}

impl Bounds {
    fn admit(&mut self, event: &Event) -> Result<(), String> {
        let size = event.size();
        if size > MAX_EVENT_BYTES {
            return Err(format!("an event of {size} bytes is over the limit of {MAX_EVENT_BYTES}"));
        }
        let now = std::time::Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < std::time::Duration::from_secs(1) => self.in_window += 1,
            _ => {
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.in_window > MAX_EVENTS_PER_SECOND {
            return Err(format!("more than {MAX_EVENTS_PER_SECOND} events in a second"));
        }
        Ok(())
    }
}
