//! The tonic service `AgentBridge`: converts proto messages, calls the
//! `Bridge`, and maps its errors to statuses. Proto types stop here.

use std::pin::Pin;

use futures::Stream;
use switchboard_proto::{auth::KeyCheck, error::ErrorCode};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use switchboard_proto::agent::v1 as pb;

use crate::{
    Caller,
    runs::{Bridge, BridgeError, RunSpec},
    workers::ToWorker,
};

/// Metadata of a `Run` response: where the run's events are also published.
pub const RUN_ID: &str = "x-run-id";
pub const THREAD_ID: &str = "x-thread-id";
pub const CHANNEL: &str = "x-channel";
pub const POSITION_OFFSET: &str = "x-position-offset";
pub const POSITION_EPOCH: &str = "x-position-epoch";

pub struct AgentBridgeService {
    bridge: Bridge,
}

impl AgentBridgeService {
    pub fn new(bridge: Bridge) -> Self {
        AgentBridgeService { bridge }
    }
}

/// Maps a bridge error to a status that carries its code, so that callers
/// can tell `thread_busy` from `unknown_agent`.
fn status(e: BridgeError) -> Status {
    match e.error_code() {
        Ok(code) => code.status(e.to_string()),
        // A worker's own code means nothing to callers: the call failed.
        Err(_) => Status::aborted(e.to_string()),
    }
}

fn json_of(bytes: &[u8]) -> Result<serde_json::Value, Status> {
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| ErrorCode::InvalidFrame.status(format!("not JSON: {e}")))
}

pub fn with_key(
    svc: AgentBridgeService,
    key: Option<String>,
) -> InterceptedService<pb::agent_bridge_server::AgentBridgeServer<AgentBridgeService>, KeyCheck> {
    InterceptedService::new(pb::agent_bridge_server::AgentBridgeServer::new(svc), KeyCheck::new(key.as_deref()))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_bridge_server::AgentBridge for AgentBridgeService {
    type RunStream = BoxStream<pb::AgentEvent>;

    async fn run(&self, request: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let req = request.into_inner();
        let spec = RunSpec {
            agent: req.agent,
            thread_id: req.thread_id,
            input: json_of(&req.input)?,
            user_id: req.user_id,
            multitask: req.multitask,
        };
        let started = self.bridge.start(spec).await.map_err(status)?;
        let events = ReceiverStream::new(started.events).map(|e| {
            Ok(pb::AgentEvent { run_id: e.run_id, thread_id: e.thread_id, seq: e.seq, r#type: e.kind, json: e.json })
        });
        let mut response = Response::new(Box::pin(events) as Self::RunStream);
        let md = response.metadata_mut();
        for (key, value) in [
            (RUN_ID, started.run_id),
            (THREAD_ID, started.thread_id),
            (CHANNEL, started.channel),
            (POSITION_OFFSET, started.position.as_ref().map(|p| p.0.to_string()).unwrap_or_default()),
            (POSITION_EPOCH, started.position.map(|p| p.1).unwrap_or_default()),
        ] {
            if let Ok(v) = value.parse() {
                md.insert(key, v);
            }
        }
        Ok(response)
    }

    async fn cancel(&self, request: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        use pb::cancel_request::Target;
        let req = request.into_inner();
        let caller = Caller { user_id: req.user_id, roles: Vec::new() };
        let stopped = match req.target {
            Some(Target::RunId(r)) => self.bridge.cancel(Some(&r), None, &caller).await,
            Some(Target::ThreadId(t)) => self.bridge.cancel(None, Some(&t), &caller).await,
            None => return Err(ErrorCode::InvalidFrame.status("run_id or thread_id is required")),
        }
        .map_err(status)?;
        Ok(Response::new(pb::CancelResponse {
            cancelled: stopped.cancelled,
            run_id: stopped.run_id,
            thread_id: stopped.thread_id,
        }))
    }

    async fn call(&self, request: Request<pb::CallRequest>) -> Result<Response<pb::CallResponse>, Status> {
        let req = request.into_inner();
        let params = json_of(&req.params)?;
        use pb::call_response::Outcome;
        let caller = Caller { user_id: req.user_id, roles: req.roles };
        let outcome = match self.bridge.call(&req.method, params, &caller).await {
            Ok(result) => Outcome::Result(result.to_string().into()),
            Err(e) => Outcome::Error(pb::CallError { code: e.code().into(), message: e.to_string() }),
        };
        Ok(Response::new(pb::CallResponse { outcome: Some(outcome) }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .bridge
            .agents()
            .into_iter()
            .map(|(name, source, capacity, load)| pb::AgentInfo { name, source: source.into(), capacity, load })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }
}

/// The tonic service `AgentWorker`: agent processes attach here.
pub struct AgentWorkerService {
    bridge: Bridge,
    /// Cancelled at shutdown: attached workers are let go.
    shutdown: tokio_util::sync::CancellationToken,
}

impl AgentWorkerService {
    pub fn new(bridge: Bridge, shutdown: tokio_util::sync::CancellationToken) -> Self {
        AgentWorkerService { bridge, shutdown }
    }
}

pub fn worker_with_key(
    svc: AgentWorkerService,
    key: Option<String>,
) -> InterceptedService<pb::agent_worker_server::AgentWorkerServer<AgentWorkerService>, KeyCheck> {
    InterceptedService::new(pb::agent_worker_server::AgentWorkerServer::new(svc), KeyCheck::new(key.as_deref()))
}

fn to_proto(m: ToWorker) -> pb::BridgeMessage {
    use pb::bridge_message::Message as M;
    let message = match m {
        ToWorker::Welcome { worker_id } => M::Welcome(pb::Welcome { worker_id }),
        ToWorker::StartRun { run_id, thread_id, agent, input } => {
            M::StartRun(pb::StartRun { run_id, thread_id, agent, input: input.to_string().into() })
        }
        ToWorker::CancelRun { run_id, reason } => M::CancelRun(pb::CancelRun { run_id, reason }),
        ToWorker::Call { call_id, method, params, caller } => M::Call(pb::Call {
            call_id,
            method,
            params: params.to_string().into(),
            user_id: caller.user_id,
            roles: caller.roles,
        }),
    };
    pb::BridgeMessage { message: Some(message) }
}

#[tonic::async_trait]
impl pb::agent_worker_server::AgentWorker for AgentWorkerService {
    type AttachStream = BoxStream<pb::BridgeMessage>;

    async fn attach(
        &self,
        request: Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        use pb::worker_message::Message as M;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::WorkerMessage { message: Some(M::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message of a worker must be `hello`")),
        };
        if hello.agents.is_empty() && hello.methods.is_empty() {
            return Err(Status::invalid_argument("a worker must name at least one agent or method"));
        }
        if hello.agents.iter().any(|a| a == "echo" || a.is_empty()) {
            return Err(Status::invalid_argument("agent names must be non-empty and not `echo`"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let workers = self.bridge.workers();
        let name = hello.worker_name.clone();
        let id =
            workers.attach(name.clone(), hello.agents.clone(), hello.methods, hello.max_concurrent_runs, tx.clone());
        self.bridge.metrics().workers.set(workers.list().len() as i64);
        let _ = tx.send(ToWorker::Welcome { worker_id: id.clone() }).await;
        tracing::info!(worker = %name, worker_id = %id, agents = ?hello.agents, "worker attached");
        let bridge = self.bridge.clone();
        bridge.announce_worker("agent_started", &id, &name, &hello.agents).await;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let workers = bridge.workers();
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                match message {
                    Ok(Some(pb::WorkerMessage { message: Some(M::Event(e)) })) => {
                        // JSON that does not parse becomes an event without a type,
                        // which the run's checks refuse: the run is repaired and ended.
                        let event = serde_json::from_slice(&e.json).unwrap_or(serde_json::Value::Null);
                        if !workers.event(&id, &e.run_id, event).await {
                            tracing::debug!(run_id = %e.run_id, "event for a run the worker does not serve or that ended");
                        }
                    }
                    Ok(Some(pb::WorkerMessage { message: Some(M::CallResult(r)) })) => {
                        let outcome = match r.error {
                            Some(e) => Err((e.code, e.message)),
                            None => serde_json::from_slice(&r.result)
                                .or_else(|_| if r.result.is_empty() { Ok(serde_json::Value::Null) } else { Err(()) })
                                .map_err(|_| {
                                    ("agent_error".to_owned(), "the worker answered with invalid JSON".to_owned())
                                }),
                        };
                        workers.call_result(&id, &r.call_id, outcome);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let agents = workers.detach(&id);
            bridge.metrics().workers.set(workers.list().len() as i64);
            tracing::info!(worker = %name, worker_id = %id, "worker detached");
            bridge.announce_worker("agent_stopped", &id, &name, &agents).await;
        });
        let stream = ReceiverStream::new(rx).map(|m| Ok(to_proto(m)));
        Ok(Response::new(Box::pin(stream) as Self::AttachStream))
    }
}
