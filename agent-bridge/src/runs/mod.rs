//! Runs of agents on threads: the `Bridge` handle and starting a run, which
//! admits it, takes its thread, and hands it to its agent and its driver.
//!
//! # Layout
//! - `slots`: one run per thread, waiting for a thread, stopping runs.
//! - `driver`: one run's task, from its agent's first event to its end.
//! - `emitter`: each event numbered, serialized once, and sent on.
//! - `transcript`: what a run said, kept in its thread.
//! - `bus`: status events and thread channels on the event bus.
//! - `commands`: the commands of SPEC §7.5.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use switchboard_proto::{client::BusClient, error::ErrorCode};
use tokio::sync::mpsc;

use crate::{
    Config, echo,
    metrics::Metrics,
    openai::OpenAi,
    threads::{ThreadError, ThreadStore, bus as bus_threads},
    workers::{AgentMsg, Workers},
};

mod bus;
mod commands;
mod driver;
mod emitter;
mod slots;
mod transcript;

pub use driver::{MAX_EVENT_BYTES, MAX_EVENTS_PER_SECOND};
use driver::{Run, Source};
use slots::{Claim, Slots};

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

    /// The error's code of SPEC §3.4, or a worker's own code outside it.
    pub fn error_code(&self) -> Result<ErrorCode, &str> {
        Ok(match self {
            BridgeError::Worker(code, _) => return ErrorCode::from_name(code).ok_or(code),
            BridgeError::Unavailable(_) => ErrorCode::Unavailable,
            BridgeError::UnknownAgent(_) => ErrorCode::UnknownAgent,
            // The thread was busy, and the run waiting for it was stopped.
            BridgeError::ThreadBusy(_) | BridgeError::Cancelled => ErrorCode::ThreadBusy,
            BridgeError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            BridgeError::InvalidInput(_) => ErrorCode::InvalidFrame,
            BridgeError::UnknownMethod(_) => ErrorCode::UnknownMethod,
            BridgeError::Internal(_) => ErrorCode::Internal,
        })
    }

    pub fn code(&self) -> &str {
        match self.error_code() {
            Ok(code) => code.as_str(),
            Err(own) => own,
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

/// The bridge: a cheap handle on the state its runs and services share.
#[derive(Clone)]
pub struct Bridge {
    shared: Arc<Shared>,
}

struct Shared {
    config: Config,
    threads: ThreadStore,
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

/// A run that passed the checks made before it takes its thread.
struct Admitted {
    agent: String,
    /// The caller's `RunAgentInput`, an object.
    input: Value,
    thread_id: String,
    run_id: String,
}

impl Bridge {
    pub fn new(
        config: Config,
        threads: impl Into<ThreadStore>,
        bus: Option<BusClient>,
        openai: Option<OpenAi>,
    ) -> Self {
        Bridge {
            shared: Arc::new(Shared {
                config,
                threads: threads.into(),
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

    /// The TLS of the bridge's listener, when configured.
    pub fn server_tls(&self) -> Option<switchboard_tls::ServerTls> {
        self.shared.config.tls.clone()
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

    /// Shutdown (SPEC §11): no new run starts; every active and waiting run
    /// is cancelled, and this waits up to `limit` for the active ones to end
    /// as 7.1 says (repaired, published, delivered, kept in their thread).
    pub async fn drain(&self, limit: std::time::Duration) {
        self.shared.closing.store(true, std::sync::atomic::Ordering::Release);
        self.shared.slots.lock().unwrap().cancel_all();
        self.shared.runs.close();
        if tokio::time::timeout(limit, self.shared.runs.wait()).await.is_err() {
            tracing::warn!(remaining = self.shared.runs.len(), "runs still going when the grace period ran out");
        }
    }

    /// Starts a run, after the thread's active run ends when `multitask` asks for that.
    pub async fn start(&self, spec: RunSpec) -> Result<Started, BridgeError> {
        let user = spec.user_id.clone();
        let multitask = spec.multitask.clone();
        let Admitted { agent, input, thread_id, run_id } = self.admit(spec).await?;
        let Claim { cancel, done } = self.claim(&thread_id, &run_id, &user, &multitask).await?;
        // The thread is taken from here on: any refusal must give it back,
        // or the runs waiting for it would wait forever.
        let joined = match self.shared.threads.messages(&thread_id).await {
            Ok(history) => self.join_thread(input, history, &thread_id, &run_id, &user).await,
            Err(e) => Err(BridgeError::Internal(e.to_string())),
        };
        let input = match joined {
            Ok(input) => input,
            Err(e) => {
                self.release(&thread_id, &run_id, &done);
                return Err(e);
            }
        };
        let channel = format!("thread:{thread_id}#{user}");
        let position = self.position(&channel).await;
        let (agent_tx, agent_rx) = mpsc::channel(64);
        let source = match self.source(&agent, input, &thread_id, &run_id, agent_tx) {
            Ok(source) => source,
            Err(e) => {
                self.release(&thread_id, &run_id, &done);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let run = Run {
            bridge: self.clone(),
            run_id: run_id.clone(),
            thread_id: thread_id.clone(),
            channel: channel.clone(),
            agent,
            user,
        };
        self.shared.runs.spawn(run.drive(source, agent_rx, cancel, tx, done));
        Ok(Started { run_id, thread_id, channel, position, events: rx })
    }

    /// Checks what can be checked before the run takes its thread, and
    /// settles its agent, thread id and run id.
    async fn admit(&self, spec: RunSpec) -> Result<Admitted, BridgeError> {
        if self.shared.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BridgeError::Unavailable("the agent bridge is shutting down".into()));
        }
        let agent = if spec.agent.is_empty() || spec.agent == "default" {
            self.shared.config.default_agent.clone()
        } else {
            spec.agent
        };
        let builtin = agent == "echo" || (agent == "openai" && self.shared.openai.is_some());
        if !builtin && !self.shared.workers.serves(&agent) {
            return Err(BridgeError::UnknownAgent(agent));
        }
        let input = match spec.input {
            Value::Null => json!({}),
            v @ Value::Object(_) => v,
            _ => return Err(BridgeError::InvalidInput("input must be a RunAgentInput object".into())),
        };
        let thread_id = Some(spec.thread_id)
            .filter(|t| !t.is_empty())
            .or_else(|| input["threadId"].as_str().filter(|t| !t.is_empty()).map(str::to_owned))
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Its channel, and its log when threads are on the bus, must be channel names.
        let on_bus = matches!(self.shared.threads, ThreadStore::Bus(_));
        let (log, owner) = match on_bus {
            true => (
                Some(bus_threads::log_channel(&thread_id, &spec.user_id)),
                Some(bus_threads::owner_channel(&thread_id)),
            ),
            false => (None, None),
        };
        let channel = format!("thread:{thread_id}#{}", spec.user_id);
        if [Some(channel), log, owner].into_iter().flatten().any(|c| switchboard_proto::channel::validate(&c).is_err())
        {
            return Err(BridgeError::InvalidInput("thread id or user id has characters a channel cannot".into()));
        }
        match self.shared.threads.owner(&thread_id).await.map_err(|e| BridgeError::Internal(e.to_string()))? {
            Some(owner) if owner != spec.user_id => return Err(BridgeError::not_yours(&thread_id)),
            _ => {}
        }
        let run_id = input["runId"]
            .as_str()
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(Admitted { agent, input, thread_id, run_id })
    }

    /// Stores the input's messages the thread does not have yet, and
    /// returns the input the agent gets: the thread's newest
    /// `agents.thread_max_messages`, and the ids.
    ///
    /// A message is new when the thread does not know its id and it comes
    /// after every message the thread knows: a client that sends the whole
    /// history back (AG-UI clients do) also sends what the thread trimmed,
    /// which must not come back as new.
    ///
    /// # Errors
    /// `PermissionDenied` when another user appended to the thread first.
    async fn join_thread(
        &self,
        mut input: Value,
        history: Vec<Value>,
        thread_id: &str,
        run_id: &str,
        user: &str,
    ) -> Result<Value, BridgeError> {
        let new: Vec<Value> = {
            let known: HashSet<&str> = history.iter().filter_map(|m| m["id"].as_str()).collect();
            let sent = input["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
            let is_known = |m: &Value| m["id"].as_str().is_some_and(|id| known.contains(id));
            let after_known = sent.iter().rposition(is_known).map_or(0, |i| i + 1);
            sent[after_known..].to_vec()
        };
        // The owner is checked once more with the append, atomically: a new
        // thread is claimed by whoever appends first.
        self.shared.threads.append(thread_id, user, new.clone()).await.map_err(|e| match e {
            ThreadError::NotOwner(_) => BridgeError::not_yours(thread_id),
            e => BridgeError::Internal(e.to_string()),
        })?;
        let mut messages = history;
        messages.extend(new);
        let max = self.shared.threads.max_messages();
        if messages.len() > max {
            messages.drain(..messages.len() - max);
        }
        input["messages"] = Value::Array(messages);
        input["threadId"] = json!(thread_id);
        input["runId"] = json!(run_id);
        Ok(input)
    }

    /// Hands the run to its agent: the built-in echo or openai, or the
    /// least-loaded worker with room.
    fn source(
        &self,
        agent: &str,
        input: Value,
        thread_id: &str,
        run_id: &str,
        agent_tx: mpsc::Sender<AgentMsg>,
    ) -> Result<Source, BridgeError> {
        let (thread_id, run_id) = (thread_id.to_owned(), run_id.to_owned());
        if agent == "echo" {
            let delay = self.shared.config.echo_delay;
            return Ok(Source::Builtin(tokio::spawn(echo::run(input, thread_id, run_id, delay, agent_tx))));
        }
        if let (true, Some(openai)) = (agent == "openai", self.shared.openai.clone()) {
            return Ok(Source::Builtin(tokio::spawn(openai.run(input, thread_id, run_id, agent_tx))));
        }
        match self.shared.workers.dispatch(agent, &run_id, &thread_id, input, agent_tx) {
            Some(worker) => Ok(Source::Worker(worker)),
            None => Err(BridgeError::Unavailable(format!("every worker of agent {agent:?} is at capacity"))),
        }
    }
}
