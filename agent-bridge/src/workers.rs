//! Agent workers (SPEC §5 `AgentWorker`): processes in any language that
//! attach over gRPC, serve runs of the agents they name, and answer the
//! methods they register. Runs go to the least-loaded worker of an agent,
//! within its `max_concurrent_runs`; a worker that disappears ends its runs
//! with `RUN_ERROR {code: "agent_lost"}`, and they are never re-executed.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::Caller;

/// What a run hears from its agent.
#[derive(Debug)]
pub enum AgentMsg {
    Event(Value),
    /// The worker serving the run went away.
    Lost,
}

/// What the bridge tells a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ToWorker {
    Welcome { worker_id: String },
    StartRun { run_id: String, thread_id: String, agent: String, input: Value },
    CancelRun { run_id: String, reason: String },
    Call { call_id: String, method: String, params: Value, caller: Caller },
}

/// A worker's answer to a call: a result, or `(code, message)`.
pub type CallOutcome = Result<Value, (String, String)>;

/// How long a call to a worker may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Worker {
    name: String,
    agents: Vec<String>,
    methods: Vec<String>,
    max_runs: u32,
    tx: mpsc::Sender<ToWorker>,
    /// Runs this worker serves: where their events go.
    runs: HashMap<String, mpsc::Sender<AgentMsg>>,
    calls: HashMap<String, oneshot::Sender<CallOutcome>>,
}

/// Every attached worker. A std lock: held only for map updates.
#[derive(Default)]
pub struct Workers {
    inner: Mutex<HashMap<String, Worker>>,
    next_call: AtomicU64,
}

/// A worker as `get_status` and `ListAgents` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub id: String,
    pub name: String,
    pub agents: Vec<String>,
    pub methods: Vec<String>,
    pub max_runs: u32,
    pub load: u32,
}

impl Workers {
    /// Registers a worker after its `hello`.
    pub fn attach(
        &self,
        name: String,
        agents: Vec<String>,
        methods: Vec<String>,
        max_runs: u32,
        tx: mpsc::Sender<ToWorker>,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let worker = Worker {
            name,
            agents,
            methods,
            max_runs: max_runs.max(1),
            tx,
            runs: HashMap::new(),
            calls: HashMap::new(),
        };
        self.inner.lock().unwrap().insert(id.clone(), worker);
        id
    }

    /// Removes a worker: its runs hear `Lost`, its calls fail. Returns its agents.
    pub fn detach(&self, id: &str) -> Vec<String> {
        let Some(worker) = self.inner.lock().unwrap().remove(id) else { return Vec::new() };
        for (_, run) in worker.runs {
            // After the events already queued, never instead of them.
            tokio::spawn(async move {
                let _ = run.send(AgentMsg::Lost).await;
            });
        }
        for (_, call) in worker.calls {
            let _ = call.send(Err(("agent_lost".into(), "the worker went away".into())));
        }
        worker.agents
    }

    pub fn list(&self) -> Vec<WorkerInfo> {
        let inner = self.inner.lock().unwrap();
        let mut out: Vec<WorkerInfo> = inner
            .iter()
            .map(|(id, w)| WorkerInfo {
                id: id.clone(),
                name: w.name.clone(),
                agents: w.agents.clone(),
                methods: w.methods.clone(),
                max_runs: w.max_runs,
                load: w.runs.len() as u32,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    pub fn serves(&self, agent: &str) -> bool {
        self.inner.lock().unwrap().values().any(|w| w.agents.iter().any(|a| a == agent))
    }

    /// Hands a run to the least-loaded worker of `agent` with room for it.
    /// Returns the worker's id, or `None` when every such worker is full.
    pub fn dispatch(
        &self,
        agent: &str,
        run_id: &str,
        thread_id: &str,
        input: Value,
        events: mpsc::Sender<AgentMsg>,
    ) -> Option<String> {
        let mut inner = self.inner.lock().unwrap();
        let (id, worker) = inner
            .iter_mut()
            .filter(|(_, w)| w.agents.iter().any(|a| a == agent) && (w.runs.len() as u32) < w.max_runs)
            .min_by_key(|(_, w)| w.runs.len())?;
        let start =
            ToWorker::StartRun { run_id: run_id.into(), thread_id: thread_id.into(), agent: agent.into(), input };
        worker.tx.try_send(start).ok()?;
        worker.runs.insert(run_id.to_owned(), events);
        Some(id.clone())
    }

    /// Routes an event a worker sent for one of its runs, waiting while the
    /// run is behind (which slows the worker's stream, never drops an event);
    /// false for a run it does not serve, or one that already ended.
    pub async fn event(&self, worker: &str, run_id: &str, event: Value) -> bool {
        let sender = self.inner.lock().unwrap().get(worker).and_then(|w| w.runs.get(run_id).cloned());
        match sender {
            Some(tx) => tx.send(AgentMsg::Event(event)).await.is_ok(),
            None => false,
        }
    }

    /// Tells the worker to stop a run (cancellation, or a protocol error).
    pub fn cancel(&self, worker: &str, run_id: &str, reason: &str) {
        if let Some(w) = self.inner.lock().unwrap().get(worker) {
            let _ = w.tx.try_send(ToWorker::CancelRun { run_id: run_id.into(), reason: reason.into() });
        }
    }

    /// Forgets a finished run.
    pub fn finished(&self, worker: &str, run_id: &str) {
        if let Some(w) = self.inner.lock().unwrap().get_mut(worker) {
            w.runs.remove(run_id);
        }
    }

    /// Calls `method` on a worker that registered it.
    pub async fn call(&self, method: &str, params: Value, caller: &Caller) -> Option<CallOutcome> {
        let (tx, rx) = oneshot::channel();
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed).to_string();
        let worker_id = {
            let mut inner = self.inner.lock().unwrap();
            let (id, worker) = inner.iter_mut().find(|(_, w)| w.methods.iter().any(|m| m == method))?;
            let call =
                ToWorker::Call { call_id: call_id.clone(), method: method.into(), params, caller: caller.clone() };
            if worker.tx.try_send(call).is_err() {
                return Some(Err(("unavailable".into(), "the worker is not keeping up".into())));
            }
            worker.calls.insert(call_id.clone(), tx);
            id.clone()
        };
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(("agent_lost".into(), "the worker went away".into())),
            Err(_) => Err(("timeout".into(), format!("no answer within {CALL_TIMEOUT:?}"))),
        };
        if let Some(w) = self.inner.lock().unwrap().get_mut(&worker_id) {
            w.calls.remove(&call_id);
        }
        Some(outcome)
    }

    /// Resolves a call with the worker's answer.
    pub fn call_result(&self, worker: &str, call_id: &str, outcome: CallOutcome) {
        let tx = self.inner.lock().unwrap().get_mut(worker).and_then(|w| w.calls.remove(call_id));
        if let Some(tx) = tx {
            let _ = tx.send(outcome);
        }
    }
}
