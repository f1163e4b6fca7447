//! The core of the bridge: starting runs on threads, one at a time per
//! thread, streaming their checked events to the caller and to the thread's
//! channel on the bus, cancelling them, and the commands of SPEC §7.5.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use switchboard_proto::eventbus::v1 as bus_pb;

use crate::{
    BusClient, Config,
    agui::{Failure, Guard},
    echo,
    threads::Threads,
};

/// What went wrong starting a run or a call; `code()` is the browser's `error.code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("thread {0} has an active run")]
    ThreadBusy(String),
    #[error("thread {0} belongs to another user")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    UnknownMethod(String),
    #[error("{0}")]
    Internal(String),
}

impl BridgeError {
    pub fn code(&self) -> &'static str {
        match self {
            BridgeError::UnknownAgent(_) => "unknown_agent",
            BridgeError::ThreadBusy(_) => "thread_busy",
            BridgeError::PermissionDenied(_) => "permission_denied",
            BridgeError::InvalidInput(_) => "invalid_frame",
            BridgeError::UnknownMethod(_) => "unknown_method",
            BridgeError::Internal(_) => "internal",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub agent: String,
    pub thread_id: String,
    /// AG-UI `RunAgentInput`.
    pub input: Value,
    pub user_id: String,
    /// `reject` (default), `interrupt` or `enqueue`.
    pub multitask: String,
}

/// One event of a run, numbered.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    pub run_id: String,
    pub thread_id: String,
    pub seq: u64,
    pub kind: String,
    pub json: String,
}

/// A run that was accepted.
pub struct Started {
    pub run_id: String,
    pub thread_id: String,
    /// `thread:<id>#<user>`.
    pub channel: String,
    /// The thread channel's position before the run's first event, when the bus answered.
    pub position: Option<(u64, String)>,
    pub events: mpsc::Receiver<RunEvent>,
}

#[derive(Clone)]
pub struct Bridge {
    shared: Arc<Shared>,
}

struct Shared {
    config: Config,
    threads: Threads,
    bus: Option<BusClient>,
    /// Active run per thread. A std lock: held only for map updates.
    active: Mutex<HashMap<String, Active>>,
    /// Named modules switched by `module_control`.
    modules: Mutex<BTreeMap<String, bool>>,
}

struct Active {
    run_id: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Bridge {
    pub fn new(config: Config, threads: Threads, bus: Option<BusClient>) -> Self {
        Bridge {
            shared: Arc::new(Shared { config, threads, bus, active: Mutex::default(), modules: Mutex::default() }),
        }
    }

    /// Agents this bridge can run: `(name, source, capacity, load)`.
    pub fn agents(&self) -> Vec<(String, &'static str, u32, u32)> {
        let load = self.shared.active.lock().unwrap().len() as u32;
        vec![("echo".to_owned(), "builtin", 0, load)]
    }

    /// Publishes a status event; failures are logged, never fatal.
    async fn announce(&self, channel: &str, event: &str, data: Value) {
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

    async fn position(&self, channel: &str) -> Option<(u64, String)> {
        let mut bus = self.shared.bus.clone()?;
        let req = bus_pb::HistoryRequest { channel: channel.into(), limit: 1, reverse: true, ..Default::default() };
        let resp = bus.history(req).await.ok()?.into_inner();
        resp.position.map(|p| (p.offset, p.epoch))
    }

    /// Starts a run, after the thread's active run ends when `multitask` asks for that.
    pub async fn start(&self, spec: RunSpec) -> Result<Started, BridgeError> {
        let agent = if spec.agent.is_empty() || spec.agent == "default" {
            self.shared.config.default_agent.clone()
        } else {
            spec.agent.clone()
        };
        if agent != "echo" {
            return Err(BridgeError::UnknownAgent(agent));
        }
        let mut input = match spec.input {
            Value::Null => json!({}),
            v @ Value::Object(_) => v,
            _ => return Err(BridgeError::InvalidInput("input must be a RunAgentInput object".into())),
        };
        let thread_id = Some(spec.thread_id.clone())
            .filter(|t| !t.is_empty())
            .or_else(|| input["threadId"].as_str().filter(|t| !t.is_empty()).map(str::to_owned))
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if switchboard_proto::channel::validate(&format!("thread:{thread_id}#{}", spec.user_id)).is_err() {
            return Err(BridgeError::InvalidInput("thread id or user id has characters a channel cannot".into()));
        }
        let threads = &self.shared.threads;
        match threads.owner(&thread_id).map_err(|e| BridgeError::Internal(e.to_string()))? {
            Some(owner) if owner != spec.user_id => return Err(BridgeError::PermissionDenied(thread_id)),
            _ => {}
        }
        let run_id = input["runId"]
            .as_str()
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

        // One run per thread.
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        loop {
            let waiting = {
                let mut active = self.shared.active.lock().unwrap();
                match active.get(&thread_id) {
                    Some(a) => {
                        if spec.multitask == "interrupt" {
                            a.cancel.cancel();
                        }
                        a.done.clone()
                    }
                    None => {
                        active.insert(
                            thread_id.clone(),
                            Active { run_id: run_id.clone(), cancel: cancel.clone(), done: done_rx.clone() },
                        );
                        break;
                    }
                }
            };
            if spec.multitask != "interrupt" && spec.multitask != "enqueue" {
                return Err(BridgeError::ThreadBusy(thread_id));
            }
            let mut waiting = waiting;
            let _ = waiting.wait_for(|done| *done).await;
        }

        // The history, and the new messages of this input.
        let history = threads.messages(&thread_id).map_err(|e| BridgeError::Internal(e.to_string()))?;
        let known: std::collections::HashSet<&str> = history.iter().filter_map(|m| m["id"].as_str()).collect();
        let new: Vec<Value> = input["messages"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["id"].as_str().is_none_or(|id| !known.contains(id))).cloned().collect())
            .unwrap_or_default();
        if let Err(e) = threads.append(&thread_id, &spec.user_id, &new) {
            self.finish(&thread_id, &run_id, &done_tx);
            return Err(BridgeError::Internal(e.to_string()));
        }
        let mut messages = history;
        messages.extend(new);
        input["messages"] = Value::Array(messages);
        input["threadId"] = json!(thread_id);
        input["runId"] = json!(run_id);

        let channel = format!("thread:{thread_id}#{}", spec.user_id);
        let position = self.position(&channel).await;
        let (tx, rx) = mpsc::channel(256);
        let bridge = self.clone();
        let run = Run {
            bridge,
            run_id: run_id.clone(),
            thread_id: thread_id.clone(),
            channel: channel.clone(),
            agent,
            user: spec.user_id,
        };
        tokio::spawn(run.drive(input, cancel, tx, done_tx));
        Ok(Started { run_id, thread_id, channel, position, events: rx })
    }

    fn finish(&self, thread_id: &str, run_id: &str, done: &watch::Sender<bool>) {
        let mut active = self.shared.active.lock().unwrap();
        if active.get(thread_id).is_some_and(|a| a.run_id == run_id) {
            active.remove(thread_id);
        }
        drop(active);
        let _ = done.send(true);
    }

    /// Cancels the active run with this run id or on this thread; idempotent.
    pub fn cancel(&self, run_id: Option<&str>, thread_id: Option<&str>) -> bool {
        let active = self.shared.active.lock().unwrap();
        let found = active.iter().find(|(t, a)| Some(a.run_id.as_str()) == run_id || Some(t.as_str()) == thread_id);
        match found {
            Some((_, a)) => {
                let fresh = !a.cancel.is_cancelled();
                a.cancel.cancel();
                fresh
            }
            None => false,
        }
    }

    /// Runs a command (SPEC §7.5).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, BridgeError> {
        match method {
            "get_status" => {
                let runs = self.shared.active.lock().unwrap().len();
                let modules = self.shared.modules.lock().unwrap().clone();
                let bus = match self.shared.bus.clone() {
                    Some(mut b) => b.info(bus_pb::InfoRequest {}).await.is_ok(),
                    None => false,
                };
                let agents: Vec<Value> = self
                    .agents()
                    .into_iter()
                    .map(|(name, source, capacity, load)| json!({ "name": name, "source": source, "capacity": capacity, "load": load }))
                    .collect();
                Ok(json!({
                    "bridge": "ok",
                    "bus_linked": bus,
                    "agents": agents,
                    "workers": [],
                    "runs_active": runs,
                    "modules": modules,
                    "timestamp": now_unix(),
                }))
            }
            "module_control" => {
                let module = params["module"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| BridgeError::InvalidInput("`module` must be a non-empty string".into()))?
                    .to_owned();
                let enabled = params["enabled"]
                    .as_bool()
                    .ok_or_else(|| BridgeError::InvalidInput("`enabled` must be a boolean".into()))?;
                self.shared.modules.lock().unwrap().insert(module.clone(), enabled);
                let state = json!({ "module": module, "enabled": enabled });
                self.announce("system", "module_status_changed", state.clone()).await;
                Ok(state)
            }
            "execute_command" => {
                let command = params["command"].as_str().unwrap_or_default();
                Err(BridgeError::UnknownMethod(format!("no worker registered the command {command:?}")))
            }
            other => Err(BridgeError::UnknownMethod(format!("unknown method {other:?}"))),
        }
    }
}

/// One run being driven.
struct Run {
    bridge: Bridge,
    run_id: String,
    thread_id: String,
    channel: String,
    agent: String,
    user: String,
}

impl Run {
    async fn drive(
        self,
        input: Value,
        cancel: CancellationToken,
        tx: mpsc::Sender<RunEvent>,
        done: watch::Sender<bool>,
    ) {
        let config = &self.bridge.shared.config;
        let started_at = std::time::Instant::now();
        let task =
            json!({ "run_id": self.run_id, "thread_id": self.thread_id, "agent": self.agent, "user_id": self.user });
        self.bridge.announce("tasks", "run_started", task.clone()).await;

        // Events go to the thread channel through one ordered stream.
        let publisher = self.bridge.shared.bus.clone().map(|mut bus| {
            let (ptx, prx) = mpsc::channel::<bus_pb::PublishRequest>(256);
            tokio::spawn(async move {
                match bus.publish_stream(tokio_stream::wrappers::ReceiverStream::new(prx)).await {
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
            ptx
        });

        let (agent_tx, mut agent_rx) = mpsc::channel(64);
        let agent =
            tokio::spawn(echo::run(input, self.thread_id.clone(), self.run_id.clone(), config.echo_delay, agent_tx));
        let mut guard = Guard::default();
        let mut out = Emitter {
            run: &self,
            seq: 0,
            tx: &tx,
            publisher: publisher.as_ref(),
            caller_gone: false,
            texts: BTreeMap::new(),
        };
        let deadline = tokio::time::sleep(config.run_deadline);
        tokio::pin!(deadline);
        let failure = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Some((Failure::Cancelled, "the run was cancelled".to_owned())),
                _ = &mut deadline => break Some((Failure::Timeout, "the run passed its deadline".to_owned())),
                _ = tx.closed(), if !out.caller_gone => {
                    // The caller dropped the Run call: that cancels the run.
                    out.caller_gone = true;
                    cancel.cancel();
                }
                event = agent_rx.recv() => match event {
                    Some(event) => match guard.check(&event) {
                        Ok(()) => {
                            out.emit(event).await;
                            if guard.ended() {
                                break None;
                            }
                        }
                        Err(rule) => break Some((Failure::AgentError, format!("the agent broke AG-UI ordering: {rule}"))),
                    },
                    None => break Some((Failure::AgentError, "the agent stopped without ending the run".to_owned())),
                },
            }
        };
        agent.abort();
        let ok = failure.is_none();
        if let Some((failure, message)) = failure {
            for event in guard.repair(failure, &message, &self.thread_id, &self.run_id) {
                out.emit(event).await;
            }
        }
        let replies: Vec<Value> =
            out.texts.iter().map(|(id, text)| json!({ "id": id, "role": "assistant", "content": text })).collect();
        if let Err(e) = self.bridge.shared.threads.append(&self.thread_id, &self.user, &replies) {
            tracing::error!(cause = %e, "cannot store the run's messages");
        }
        let mut task = task;
        task["duration_ms"] = json!(started_at.elapsed().as_millis() as u64);
        self.bridge.announce("tasks", if ok { "run_finished" } else { "run_failed" }, task).await;
        self.bridge.finish(&self.thread_id, &self.run_id, &done);
    }
}

/// Numbers events and sends them to the caller and the thread channel.
struct Emitter<'a> {
    run: &'a Run,
    seq: u64,
    tx: &'a mpsc::Sender<RunEvent>,
    publisher: Option<&'a mpsc::Sender<bus_pb::PublishRequest>>,
    caller_gone: bool,
    /// The assistant's text per message id, kept in the thread afterwards.
    texts: BTreeMap<String, String>,
}

impl Emitter<'_> {
    async fn emit(&mut self, event: Value) {
        self.seq += 1;
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        if let ("TEXT_MESSAGE_CONTENT", Some(id), Some(delta)) =
            (kind.as_str(), event["messageId"].as_str(), event["delta"].as_str())
        {
            self.texts.entry(id.to_owned()).or_default().push_str(delta);
        }
        let json = event.to_string();
        if let Some(publisher) = self.publisher {
            let data = json!({ "run_id": self.run.run_id, "seq": self.seq, "event": event });
            let req = bus_pb::PublishRequest {
                channel: self.run.channel.clone(),
                event: kind.clone(),
                data: data.to_string().into(),
                ..Default::default()
            };
            let _ = publisher.send(req).await;
        }
        if !self.caller_gone {
            let e = RunEvent {
                run_id: self.run.run_id.clone(),
                thread_id: self.run.thread_id.clone(),
                seq: self.seq,
                kind,
                json,
            };
            if self.tx.send(e).await.is_err() {
                self.caller_gone = true;
            }
        }
    }
}
