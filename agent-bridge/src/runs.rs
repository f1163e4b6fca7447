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
    BusClient, Caller, Config,
    agui::{Failure, Guard},
    echo,
    metrics::{Metrics, RunLabels},
    openai::OpenAi,
    threads::{ThreadError, Threads},
    workers::{AgentMsg, Workers},
};

/// What went wrong starting a run or a call; `code()` is the browser's `error.code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("thread {0} has an active run")]
    ThreadBusy(String),
    /// Another user's thread or run; the message names nothing of theirs.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    UnknownMethod(String),
    #[error("{0}")]
    Unavailable(String),
    /// An error a worker answered a call with: its code and message.
    #[error("{1}")]
    Worker(String, String),
    #[error("{0}")]
    Internal(String),
    /// A run waiting for its thread was cancelled before it started.
    #[error("the run was cancelled while it waited for its thread")]
    Cancelled,
}

impl BridgeError {
    fn not_yours(thread_id: &str) -> Self {
        BridgeError::PermissionDenied(format!("thread {thread_id} belongs to another user"))
    }

    pub fn code(&self) -> &str {
        match self {
            BridgeError::Unavailable(_) => "unavailable",
            BridgeError::Worker(code, _) => code,
            BridgeError::UnknownAgent(_) => "unknown_agent",
            // The thread was busy, and the run waiting for it was stopped.
            BridgeError::ThreadBusy(_) | BridgeError::Cancelled => "thread_busy",
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

/// What a stop found: the run it stopped (or would have), and whether it
/// was running and is now being cancelled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stopped {
    pub run_id: String,
    pub thread_id: String,
    pub cancelled: bool,
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
    /// Active and waiting runs per thread. A std lock: held only for map updates.
    slots: Mutex<Slots>,
    /// Every run's task, for shutdown to wait for.
    runs: tokio_util::task::TaskTracker,
    /// Set at shutdown: no new run starts.
    closing: std::sync::atomic::AtomicBool,
    /// Named modules switched by `module_control`.
    modules: Mutex<BTreeMap<String, bool>>,
    workers: Workers,
    /// The `openai` agent, when configured.
    openai: Option<OpenAi>,
    metrics: Metrics,
}

#[derive(Default)]
struct Slots {
    /// The one active run of each busy thread.
    active: HashMap<String, Active>,
    /// Runs waiting for their thread (`multitask: enqueue` or `interrupt`),
    /// at most `max_enqueued` per thread.
    waiting: HashMap<String, Vec<Waiting>>,
    /// The latest runs that ended, `(run_id, thread_id, user)`, so that a
    /// stop by run id after the end still says whose run it was.
    ended: std::collections::VecDeque<(String, String, String)>,
}

/// How many ended runs `Slots::ended` remembers.
const ENDED_KEPT: usize = 4096;

/// A run waiting for its thread; cancelling it ends the wait.
struct Waiting {
    run_id: String,
    cancel: CancellationToken,
}

impl Slots {
    /// Forgets a waiting run.
    fn unqueue(&mut self, thread_id: &str, run_id: &str) {
        if let Some(w) = self.waiting.get_mut(thread_id) {
            w.retain(|w| w.run_id != run_id);
            if w.is_empty() {
                self.waiting.remove(thread_id);
            }
        }
    }
}

struct Active {
    run_id: String,
    /// Who started it: only this user (or a service) may stop it.
    user: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Bridge {
    pub fn new(config: Config, threads: Threads, bus: Option<BusClient>, openai: Option<OpenAi>) -> Self {
        Bridge {
            shared: Arc::new(Shared {
                config,
                threads,
                bus,
                slots: Mutex::default(),
                runs: tokio_util::task::TaskTracker::new(),
                closing: std::sync::atomic::AtomicBool::new(false),
                modules: Mutex::default(),
                workers: Workers::default(),
                openai,
                metrics: Metrics::new(),
            }),
        }
    }

    pub fn shutdown_grace(&self) -> std::time::Duration {
        self.shared.config.shutdown_grace
    }

    pub fn workers(&self) -> &Workers {
        &self.shared.workers
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Agents this bridge can run: `(name, source, capacity, load)`.
    pub fn agents(&self) -> Vec<(String, &'static str, u32, u32)> {
        let active = self.shared.slots.lock().unwrap().active.len() as u32;
        let mut by_agent: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for w in self.shared.workers.list() {
            for agent in &w.agents {
                let entry = by_agent.entry(agent.clone()).or_default();
                entry.0 += w.max_runs;
                entry.1 += w.load;
            }
        }
        let worker_load: u32 = by_agent.values().map(|(_, load)| *load).sum();
        let mut out = vec![("echo".to_owned(), "builtin", 0, active.saturating_sub(worker_load))];
        if self.shared.openai.is_some() {
            out.push(("openai".to_owned(), "builtin", 0, 0));
        }
        out.extend(by_agent.into_iter().map(|(name, (capacity, load))| (name, "worker", capacity, load)));
        out
    }

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

    async fn bus_linked(&self) -> bool {
        match self.shared.bus.clone() {
            Some(mut b) => b.info(bus_pb::InfoRequest {}).await.is_ok(),
            None => false,
        }
    }

    async fn position(&self, channel: &str) -> Option<(u64, String)> {
        let mut bus = self.shared.bus.clone()?;
        let req = bus_pb::HistoryRequest { channel: channel.into(), limit: 1, reverse: true, ..Default::default() };
        let resp = bus.history(req).await.ok()?.into_inner();
        resp.position.map(|p| (p.offset, p.epoch))
    }

    /// Shutdown (SPEC §11): no new run starts; every active and waiting run
    /// is cancelled, and this waits up to `limit` for the active ones to end
    /// as 7.1 says (repaired, published, delivered, kept in their thread).
    pub async fn drain(&self, limit: std::time::Duration) {
        self.shared.closing.store(true, std::sync::atomic::Ordering::Release);
        {
            let slots = self.shared.slots.lock().unwrap();
            let waiting = slots.waiting.values().flatten().map(|w| &w.cancel);
            for token in slots.active.values().map(|a| &a.cancel).chain(waiting) {
                token.cancel();
            }
        }
        self.shared.runs.close();
        if tokio::time::timeout(limit, self.shared.runs.wait()).await.is_err() {
            tracing::warn!(remaining = self.shared.runs.len(), "runs still going when the grace period ran out");
        }
    }

    /// Starts a run, after the thread's active run ends when `multitask` asks for that.
    pub async fn start(&self, spec: RunSpec) -> Result<Started, BridgeError> {
        if self.shared.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BridgeError::Unavailable("the agent bridge is shutting down".into()));
        }
        let agent = if spec.agent.is_empty() || spec.agent == "default" {
            self.shared.config.default_agent.clone()
        } else {
            spec.agent.clone()
        };
        let builtin = agent == "echo" || (agent == "openai" && self.shared.openai.is_some());
        if !builtin && !self.shared.workers.serves(&agent) {
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
            Some(owner) if owner != spec.user_id => return Err(BridgeError::not_yours(&thread_id)),
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
        let wait = spec.multitask == "interrupt" || spec.multitask == "enqueue";
        let mut queued = false;
        loop {
            let waiting = {
                let mut slots = self.shared.slots.lock().unwrap();
                let slots = &mut *slots;
                // Stopped while it waited (the thread's run ending wakes it too).
                if cancel.is_cancelled() {
                    slots.unqueue(&thread_id, &run_id);
                    return Err(BridgeError::Cancelled);
                }
                match slots.active.get(&thread_id) {
                    // Checked again here: the thread may have been started by
                    // another user after the owner check above.
                    Some(a) if a.user != spec.user_id => {
                        slots.unqueue(&thread_id, &run_id);
                        return Err(BridgeError::not_yours(&thread_id));
                    }
                    Some(_) if !wait => return Err(BridgeError::ThreadBusy(thread_id)),
                    Some(a) => {
                        if spec.multitask == "interrupt" {
                            a.cancel.cancel();
                        }
                        let done = a.done.clone();
                        if !queued {
                            let line = slots.waiting.entry(thread_id.clone()).or_default();
                            if line.len() >= self.shared.config.max_enqueued {
                                return Err(BridgeError::ThreadBusy(thread_id));
                            }
                            line.push(Waiting { run_id: run_id.clone(), cancel: cancel.clone() });
                            queued = true;
                        }
                        done
                    }
                    None => {
                        slots.unqueue(&thread_id, &run_id);
                        slots.active.insert(
                            thread_id.clone(),
                            Active {
                                run_id: run_id.clone(),
                                user: spec.user_id.clone(),
                                cancel: cancel.clone(),
                                done: done_rx.clone(),
                            },
                        );
                        break;
                    }
                }
            };
            let mut waiting = waiting;
            // `interrupt_stream` by thread id (or this run's id) ends the wait;
            // the loop then sees the cancellation.
            tokio::select! {
                _ = waiting.wait_for(|done| *done) => {}
                _ = cancel.cancelled() => {}
            }
        }

        // The history, and the new messages of this input.
        let history = threads.messages(&thread_id).map_err(|e| BridgeError::Internal(e.to_string()))?;
        let known: std::collections::HashSet<&str> = history.iter().filter_map(|m| m["id"].as_str()).collect();
        let new: Vec<Value> = input["messages"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["id"].as_str().is_none_or(|id| !known.contains(id))).cloned().collect())
            .unwrap_or_default();
        // The owner is checked once more with the append, atomically: a new
        // thread is claimed by whoever appends first.
        if let Err(e) = threads.append(&thread_id, &spec.user_id, &new) {
            self.finish(&thread_id, &run_id, &done_tx);
            return Err(match e {
                ThreadError::NotOwner(_) => BridgeError::not_yours(&thread_id),
                e => BridgeError::Internal(e.to_string()),
            });
        }
        let mut messages = history;
        messages.extend(new);
        input["messages"] = Value::Array(messages);
        input["threadId"] = json!(thread_id);
        input["runId"] = json!(run_id);

        let channel = format!("thread:{thread_id}#{}", spec.user_id);
        let position = self.position(&channel).await;
        // The agent: the built-in echo, or the least-loaded worker with room.
        let (agent_tx, agent_rx) = mpsc::channel(64);
        let source = if agent == "echo" {
            let delay = self.shared.config.echo_delay;
            Source::Builtin(tokio::spawn(echo::run(input, thread_id.clone(), run_id.clone(), delay, agent_tx)))
        } else if let (true, Some(openai)) = (builtin, self.shared.openai.clone()) {
            Source::Builtin(tokio::spawn(openai.run(input, thread_id.clone(), run_id.clone(), agent_tx)))
        } else {
            match self.shared.workers.dispatch(&agent, &run_id, &thread_id, input, agent_tx) {
                Some(worker) => Source::Worker(worker),
                None => {
                    self.finish(&thread_id, &run_id, &done_tx);
                    return Err(BridgeError::Unavailable(format!("every worker of agent {agent:?} is at capacity")));
                }
            }
        };
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
        self.shared.runs.spawn(run.drive(source, agent_rx, cancel, tx, done_tx));
        Ok(Started { run_id, thread_id, channel, position, events: rx })
    }

    fn finish(&self, thread_id: &str, run_id: &str, done: &watch::Sender<bool>) {
        let mut slots = self.shared.slots.lock().unwrap();
        if let Some(a) = slots.active.remove(thread_id) {
            if a.run_id == run_id {
                if slots.ended.len() == ENDED_KEPT {
                    slots.ended.pop_front();
                }
                slots.ended.push_back((a.run_id, thread_id.to_owned(), a.user));
            } else {
                slots.active.insert(thread_id.to_owned(), a);
            }
        }
        drop(slots);
        let _ = done.send(true);
    }

    /// Cancels the run with this run id, or every run of this thread (the
    /// active one and those waiting for it), for `caller`; idempotent. Only
    /// the user who started a run (or a service) may stop it, and only the
    /// owner of a thread may stop its runs.
    ///
    /// # Errors
    /// `PermissionDenied` when the run or the thread is another user's;
    /// nothing is cancelled then.
    pub fn cancel(
        &self,
        run_id: Option<&str>,
        thread_id: Option<&str>,
        caller: &Caller,
    ) -> Result<Stopped, BridgeError> {
        let allowed = |user: &str| caller.is_service() || caller.user_id == user;
        {
            let slots = self.shared.slots.lock().unwrap();
            // A waiting run is found by its id through its thread's active run:
            // they belong to the same user.
            let by_run =
                |t: &String| slots.waiting.get(t).is_some_and(|w| w.iter().any(|w| Some(w.run_id.as_str()) == run_id));
            let found = slots
                .active
                .iter()
                .find(|(t, a)| Some(a.run_id.as_str()) == run_id || Some(t.as_str()) == thread_id || by_run(t));
            if let Some((thread, a)) = found {
                if !allowed(&a.user) {
                    return Err(BridgeError::PermissionDenied("the run belongs to another user".into()));
                }
                let waiting = slots.waiting.get(thread).map(Vec::as_slice).unwrap_or_default();
                let mut stopped = Stopped { run_id: a.run_id.clone(), thread_id: thread.clone(), cancelled: false };
                let mut stop = |id: &str, token: &CancellationToken| {
                    stopped.cancelled |= !token.is_cancelled();
                    token.cancel();
                    if run_id == Some(id) {
                        stopped.run_id = id.to_owned();
                    }
                };
                match run_id {
                    Some(id) => {
                        let token = waiting.iter().find(|w| w.run_id == id).map_or(&a.cancel, |w| &w.cancel);
                        stop(id, token);
                    }
                    None => {
                        stop(&a.run_id, &a.cancel);
                        for w in waiting {
                            stop(&w.run_id, &w.cancel);
                        }
                    }
                }
                return Ok(stopped);
            }
            if let Some((run, thread, user)) = slots.ended.iter().rev().find(|(r, ..)| Some(r.as_str()) == run_id) {
                if !allowed(user) {
                    return Err(BridgeError::PermissionDenied("the run belongs to another user".into()));
                }
                return Ok(Stopped { run_id: run.clone(), thread_id: thread.clone(), cancelled: false });
            }
        }
        // Nothing running: say so, unless the thread is someone else's.
        if let Some(thread) = thread_id {
            let owner = self.shared.threads.owner(thread).map_err(|e| BridgeError::Internal(e.to_string()))?;
            if owner.is_some_and(|o| !allowed(&o)) {
                return Err(BridgeError::not_yours(thread));
            }
        }
        Ok(Stopped {
            run_id: run_id.unwrap_or_default().to_owned(),
            thread_id: thread_id.unwrap_or_default().to_owned(),
            cancelled: false,
        })
    }

    /// Runs a command (SPEC §7.5) for `caller`. Who may call which method is
    /// the gateway's check (`rpc.<method>`); here `get_status` shows node-wide
    /// state only to admins, and workers are told who called.
    pub async fn call(&self, method: &str, params: Value, caller: &Caller) -> Result<Value, BridgeError> {
        match method {
            "get_status" if !caller.is_admin() => {
                let modules = self.shared.modules.lock().unwrap().clone();
                let agents: Vec<Value> = self
                    .agents()
                    .into_iter()
                    .map(|(name, source, ..)| json!({ "name": name, "source": source }))
                    .collect();
                Ok(json!({
                    "bridge": "ok",
                    "bus_linked": self.bus_linked().await,
                    "agents": agents,
                    "modules": modules,
                    "timestamp": now_unix(),
                }))
            }
            "get_status" => {
                let runs = self.shared.slots.lock().unwrap().active.len();
                let modules = self.shared.modules.lock().unwrap().clone();
                let bus = self.bus_linked().await;
                let agents: Vec<Value> = self
                    .agents()
                    .into_iter()
                    .map(|(name, source, capacity, load)| json!({ "name": name, "source": source, "capacity": capacity, "load": load }))
                    .collect();
                Ok(json!({
                    "bridge": "ok",
                    "bus_linked": bus,
                    "agents": agents,
                    "workers": self.shared.workers.list().into_iter().map(|w| json!({
                        "id": w.id, "name": w.name, "agents": w.agents, "methods": w.methods,
                        "max_concurrent_runs": w.max_runs, "load": w.load,
                    })).collect::<Vec<_>>(),
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
                let command = params["command"].as_str().unwrap_or_default().to_owned();
                match self.shared.workers.call(&command, params["args"].clone(), caller).await {
                    Some(outcome) => outcome.map_err(|(code, message)| BridgeError::Worker(code, message)),
                    None => Err(BridgeError::UnknownMethod(format!("no worker registered the command {command:?}"))),
                }
            }
            other => match self.shared.workers.call(other, params, caller).await {
                Some(outcome) => outcome.map_err(|(code, message)| BridgeError::Worker(code, message)),
                None => Err(BridgeError::UnknownMethod(format!("unknown method {other:?}"))),
            },
        }
    }
}

/// Largest AG-UI event an agent may emit, in bytes of JSON.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Most events an agent may emit in one second.
pub const MAX_EVENTS_PER_SECOND: u32 = 2_000;

/// The size and rate bound of one run's events (SPEC §7.4).
#[derive(Default)]
struct Bounds {
    window: Option<std::time::Instant>,
    in_window: u32,
}

impl Bounds {
    fn admit(&mut self, event: &Value) -> Result<(), String> {
        let size = event.to_string().len();
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

/// Where a run's events come from.
enum Source {
    /// A built-in agent's task.
    Builtin(tokio::task::JoinHandle<()>),
    /// The id of the worker serving it.
    Worker(String),
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
        source: Source,
        mut agent_rx: mpsc::Receiver<AgentMsg>,
        cancel: CancellationToken,
        tx: mpsc::Sender<RunEvent>,
        done: watch::Sender<bool>,
    ) {
        let config = &self.bridge.shared.config;
        let started_at = std::time::Instant::now();
        let metrics = &self.bridge.shared.metrics;
        metrics.runs_active.inc();
        let task =
            json!({ "run_id": self.run_id, "thread_id": self.thread_id, "agent": self.agent, "user_id": self.user });
        self.bridge.announce("tasks", "run_started", task.clone()).await;

        // Events go to the thread channel through one ordered stream.
        let (publisher, published) = match self.bridge.shared.bus.clone().map(|mut bus| {
            let (ptx, prx) = mpsc::channel::<bus_pb::PublishRequest>(256);
            let task = tokio::spawn(async move {
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
            (ptx, task)
        }) {
            Some((ptx, task)) => (Some(ptx), Some(task)),
            None => (None, None),
        };

        let mut guard = Guard::default();
        let mut out = Emitter { run: &self, seq: 0, tx: &tx, publisher, caller_gone: false, messages: Vec::new() };
        let mut bounds = Bounds::default();
        let mut terminal = None;
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
                    Some(AgentMsg::Lost) => break Some((Failure::AgentLost, "the worker serving the run went away".to_owned())),
                    Some(AgentMsg::Event(event)) => match bounds.admit(&event).and_then(|()| guard.check(&event)) {
                        // The terminal event is held back until the thread is released.
                        Ok(()) if guard.ended() => {
                            terminal = Some(event);
                            break None;
                        }
                        Ok(()) => out.emit(event).await,
                        Err(rule) => break Some((Failure::AgentError, format!("the agent broke the rules of a run: {rule}"))),
                    },
                    None => break Some((Failure::AgentError, "the agent stopped without ending the run".to_owned())),
                },
            }
        };
        let workers = &self.bridge.shared.workers;
        match &source {
            Source::Builtin(task) => task.abort(),
            Source::Worker(worker) => {
                // A worker that broke the rules, or whose run was cancelled, is told to stop.
                if let Some((kind, message)) = failure.as_ref().filter(|(kind, _)| *kind != Failure::AgentLost) {
                    workers.cancel(worker, &self.run_id, message);
                    if *kind == Failure::AgentError {
                        let data = json!({ "agent": self.agent, "worker_id": worker, "run_id": self.run_id, "message": message });
                        self.bridge.announce("agents", "agent_error", data).await;
                    }
                }
                workers.finished(worker, &self.run_id);
            }
        }
        let ok = failure.is_none();
        let outcome = failure.as_ref().map_or("finished", |(kind, _)| kind.code());
        metrics.runs_active.dec();
        metrics
            .run_duration
            .get_or_create(&RunLabels { agent: self.agent.clone(), outcome: outcome.to_owned() })
            .observe(started_at.elapsed().as_secs_f64());
        let mut tail = match failure {
            Some((failure, message)) => guard.repair(failure, &message, &self.thread_id, &self.run_id),
            None => terminal.into_iter().collect(),
        };
        let last = tail.pop();
        for event in tail {
            out.emit(event).await;
        }
        // The end of a run, in an order a client can rely on: the terminal event
        // is on the thread channel (and everything before it), the run's
        // messages are in the thread, and the thread is free, before the
        // caller sees RUN_FINISHED or RUN_ERROR and perhaps sends the next message.
        let last = last.map(|event| out.number(event));
        if let Some((event, _)) = &last {
            out.publish(event).await;
        }
        drop(out.publisher.take());
        if let Some(task) = published {
            let _ = task.await;
        }
        let replies: Vec<Value> = std::mem::take(&mut out.messages);
        if let Err(e) = self.bridge.shared.threads.append(&self.thread_id, &self.user, &replies) {
            tracing::error!(cause = %e, "cannot store the run's messages");
        }
        self.bridge.finish(&self.thread_id, &self.run_id, &done);
        if let Some((event, seq)) = last {
            out.deliver(event, seq).await;
        }
        let mut task = task;
        task["duration_ms"] = json!(started_at.elapsed().as_millis() as u64);
        self.bridge.announce("tasks", if ok { "run_finished" } else { "run_failed" }, task).await;
    }
}

/// Returns the message with `id`, adding an empty one of `role` when new.
fn message<'m>(messages: &'m mut Vec<Value>, id: &str, role: &str) -> &'m mut Value {
    let i = match messages.iter().position(|m| m["id"] == id) {
        Some(i) => i,
        None => {
            messages.push(json!({ "id": id, "role": role }));
            messages.len() - 1
        }
    };
    &mut messages[i]
}

/// Numbers events and sends them to the caller and the thread channel.
struct Emitter<'a> {
    run: &'a Run,
    seq: u64,
    tx: &'a mpsc::Sender<RunEvent>,
    /// The run's ordered stream to the thread channel; taken to flush it.
    publisher: Option<mpsc::Sender<bus_pb::PublishRequest>>,
    caller_gone: bool,
    /// The assistant's text per message id, kept in the thread afterwards.
    messages: Vec<Value>,
}

impl Emitter<'_> {
    /// Keeps what the run says as AG-UI messages, in order and with the ids
    /// a client sees, so a client that sends its history back adds nothing twice.
    fn record(&mut self, kind: &str, e: &Value) {
        let text = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
        match kind {
            "TEXT_MESSAGE_START" => {
                message(&mut self.messages, &text("messageId"), "assistant");
            }
            "TEXT_MESSAGE_CONTENT" => {
                let m = message(&mut self.messages, &text("messageId"), "assistant");
                let content = format!("{}{}", m["content"].as_str().unwrap_or_default(), text("delta"));
                m["content"] = json!(content);
            }
            "TOOL_CALL_START" => {
                let parent = e["parentMessageId"].as_str().map(str::to_owned).unwrap_or_else(|| text("toolCallId"));
                let m = message(&mut self.messages, &parent, "assistant");
                let call = json!({ "id": text("toolCallId"), "type": "function", "function": { "name": text("toolCallName"), "arguments": "" } });
                match m["toolCalls"].as_array_mut() {
                    Some(calls) => calls.push(call),
                    None => m["toolCalls"] = json!([call]),
                }
            }
            "TOOL_CALL_ARGS" => {
                let id = text("toolCallId");
                let call = self
                    .messages
                    .iter_mut()
                    .filter_map(|m| m["toolCalls"].as_array_mut())
                    .flatten()
                    .find(|c| c["id"] == id.as_str());
                if let Some(call) = call {
                    let args =
                        format!("{}{}", call["function"]["arguments"].as_str().unwrap_or_default(), text("delta"));
                    call["function"]["arguments"] = json!(args);
                }
            }
            "TOOL_CALL_RESULT" => {
                let m = message(&mut self.messages, &text("messageId"), "tool");
                m["toolCallId"] = json!(text("toolCallId"));
                m["content"] = e["content"].clone();
            }
            _ => {}
        }
    }
    async fn emit(&mut self, event: Value) {
        let (event, seq) = self.number(event);
        self.publish(&event).await;
        self.deliver(event, seq).await;
    }

    /// Gives the event the next `seq` and records what it says.
    fn number(&mut self, event: Value) -> (Value, u64) {
        self.seq += 1;
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        self.record(&kind, &event);
        (event, self.seq)
    }

    /// Queues the event for the thread channel.
    async fn publish(&self, event: &Value) {
        if let Some(publisher) = &self.publisher {
            let data = json!({ "run_id": self.run.run_id, "seq": self.seq, "event": event });
            let req = bus_pb::PublishRequest {
                channel: self.run.channel.clone(),
                event: event["type"].as_str().unwrap_or_default().to_owned(),
                data: data.to_string().into(),
                ..Default::default()
            };
            let _ = publisher.send(req).await;
        }
    }

    /// Sends the event to the caller of `Run`, while it listens.
    async fn deliver(&mut self, event: Value, seq: u64) {
        if self.caller_gone {
            return;
        }
        let e = RunEvent {
            run_id: self.run.run_id.clone(),
            thread_id: self.run.thread_id.clone(),
            seq,
            kind: event["type"].as_str().unwrap_or_default().to_owned(),
            json: event.to_string(),
        };
        if self.tx.send(e).await.is_err() {
            self.caller_gone = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(dir: &std::path::Path) -> Bridge {
        let config = Config { echo_delay: std::time::Duration::ZERO, eventbus_url: None, ..Config::default() };
        Bridge::new(config, Threads::open(dir).unwrap(), None, None)
    }

    fn spec(user: &str, thread: &str, multitask: &str) -> RunSpec {
        RunSpec {
            agent: "echo".into(),
            thread_id: thread.into(),
            input: json!({ "messages": [{ "id": format!("{user}-{thread}"), "role": "user", "content": user }] }),
            user_id: user.into(),
            multitask: multitask.into(),
        }
    }

    /// Drains a run's events to its end.
    async fn finish(mut started: Started) {
        while started.events.recv().await.is_some() {}
    }

    /// The race between the owner check and the per-thread wait: alice holds
    /// a new thread's slot but has not stored it yet (no owner on record), and
    /// bob asks to wait for it, or to interrupt it. He is refused at once,
    /// and alice's run is left alone.
    #[tokio::test]
    async fn a_new_thread_held_by_one_user_is_refused_to_another() {
        let dir = tempfile::tempdir().unwrap();
        let b = bridge(dir.path());
        let cancel = CancellationToken::new();
        let (_done_tx, done_rx) = watch::channel(false);
        let alice = Active { run_id: "r1".into(), user: "alice".into(), cancel: cancel.clone(), done: done_rx };
        b.shared.slots.lock().unwrap().active.insert("t".into(), alice);
        for multitask in ["enqueue", "interrupt", ""] {
            let bob = tokio::time::timeout(std::time::Duration::from_secs(5), b.start(spec("bob", "t", multitask)))
                .await
                .expect("refused at once, not left waiting");
            assert_eq!(bob.err().map(|e| e.code().to_owned()).as_deref(), Some("permission_denied"), "{multitask}");
        }
        assert!(!cancel.is_cancelled(), "bob's `interrupt` did not stop alice's run");
        assert_eq!(b.shared.threads.owner("t").unwrap(), None, "bob did not claim the thread");
    }

    #[tokio::test]
    async fn only_the_runs_user_or_a_service_may_cancel_it() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bridge::new(
            Config { echo_delay: std::time::Duration::from_secs(1), eventbus_url: None, ..Config::default() },
            Threads::open(dir.path()).unwrap(),
            None,
            None,
        );
        let started = b.start(spec("alice", "t", "")).await.unwrap();
        let bob = Caller { user_id: "bob".into(), roles: vec!["admin".into()] };
        for (run, thread) in [(Some(started.run_id.as_str()), None), (None, Some("t"))] {
            assert!(matches!(b.cancel(run, thread, &bob), Err(BridgeError::PermissionDenied(_))));
        }
        let alice = Caller { user_id: "alice".into(), roles: vec![] };
        let stopped = b.cancel(None, Some("t"), &alice).unwrap();
        assert_eq!((stopped.run_id.as_str(), stopped.cancelled), (started.run_id.as_str(), true));
        let run_id = started.run_id.clone();
        finish(started).await;
        // Ended: nothing to cancel, but still not bob's to ask about, by thread or by run.
        assert!(matches!(b.cancel(None, Some("t"), &bob), Err(BridgeError::PermissionDenied(_))));
        assert!(matches!(b.cancel(Some(&run_id), None, &bob), Err(BridgeError::PermissionDenied(_))));
        let ended = b.cancel(Some(&run_id), None, &alice).unwrap();
        assert_eq!((ended.thread_id.as_str(), ended.cancelled), ("t", false));
        assert!(!b.cancel(None, Some("t"), &Caller::service()).unwrap().cancelled);
    }
}
