//! The tonic service `AgentBridge`: converts proto messages, calls the
//! `Bridge`, and maps its errors to statuses. Proto types stop here.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use subtle::ConstantTimeEq;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use switchboard_proto::agent::v1 as pb;

use crate::runs::{Bridge, BridgeError, RunSpec};

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

/// Maps a bridge error to a status whose message starts with the error code,
/// so that callers can tell `thread_busy` from `unknown_agent`.
fn status(e: BridgeError) -> Status {
    let message = format!("{}: {e}", e.code());
    match e {
        BridgeError::UnknownAgent(_) => Status::not_found(message),
        BridgeError::ThreadBusy(_) => Status::failed_precondition(message),
        BridgeError::PermissionDenied(_) => Status::permission_denied(message),
        BridgeError::InvalidInput(_) => Status::invalid_argument(message),
        BridgeError::UnknownMethod(_) => Status::unimplemented(message),
        BridgeError::Internal(_) => Status::internal(message),
    }
}

fn json_of(bytes: &[u8]) -> Result<serde_json::Value, Status> {
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("invalid_frame: not JSON: {e}")))
}

/// Checks `authorization: Bearer <key>` when a key is configured.
#[derive(Clone)]
pub struct KeyCheck(pub Option<Arc<[u8]>>);

impl tonic::service::Interceptor for KeyCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(key) = &self.0 else { return Ok(req) };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(key)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong api key"))
        }
    }
}

pub fn with_key(
    svc: AgentBridgeService,
    key: Option<String>,
) -> InterceptedService<pb::agent_bridge_server::AgentBridgeServer<AgentBridgeService>, KeyCheck> {
    InterceptedService::new(
        pb::agent_bridge_server::AgentBridgeServer::new(svc),
        KeyCheck(key.map(|k| Arc::from(k.into_bytes()))),
    )
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
        let cancelled = match request.into_inner().target {
            Some(Target::RunId(r)) => self.bridge.cancel(Some(&r), None),
            Some(Target::ThreadId(t)) => self.bridge.cancel(None, Some(&t)),
            None => return Err(Status::invalid_argument("invalid_frame: run_id or thread_id is required")),
        };
        Ok(Response::new(pb::CancelResponse { cancelled }))
    }

    async fn call(&self, request: Request<pb::CallRequest>) -> Result<Response<pb::CallResponse>, Status> {
        let req = request.into_inner();
        let params = json_of(&req.params)?;
        use pb::call_response::Outcome;
        let outcome = match self.bridge.call(&req.method, params).await {
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
