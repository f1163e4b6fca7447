//! The agent bridge as the rest of the gateway sees it: runs, cancels and
//! calls in domain terms. The only module that sees agent proto types.

use serde_json::Value;
use switchboard_proto::{
    agent::v1 as pb,
    auth::BearerKey,
    client::{self, BridgeClient},
    error::ErrorCode,
};
use switchboard_tls::ClientTls;

use crate::{error::CallError, protocol::Position};

/// A client of the agent bridge.
#[derive(Clone)]
pub struct Bridge(BridgeClient);

/// A run to start.
pub struct RunRequest {
    /// Empty for the bridge's default agent.
    pub agent: String,
    pub thread_id: String,
    /// The `RunAgentInput`, as JSON.
    pub input: bytes::Bytes,
    pub user_id: String,
    /// What to do when the thread is busy; empty for the bridge's default.
    pub multitask: String,
}

/// A started run: where it runs, and its events as the bridge sends them.
pub struct Run {
    pub run_id: String,
    pub thread_id: String,
    /// The thread channel that gets the run's events.
    pub channel: String,
    /// The thread channel's position before the run, when the bridge knew it.
    pub position: Option<Position>,
    events: tonic::Streaming<pb::AgentEvent>,
}

/// One AG-UI event of a run.
pub struct AgentEvent {
    pub thread_id: String,
    pub run_id: String,
    pub seq: u64,
    /// The event as the agent sent it, passed on without re-encoding.
    pub json: String,
}

/// Which runs a cancel stops.
pub enum CancelTarget {
    Run(String),
    /// Every run of the thread, waiting ones included.
    Thread(String),
}

/// What a cancel did.
pub struct Cancelled {
    pub run_id: String,
    pub thread_id: String,
    pub cancelled: bool,
}

/// What a call answered: its handler's result, or its handler's error (a
/// worker may answer with codes of its own, passed on as they are).
pub enum CallAnswer {
    Result(Value),
    Error { code: String, message: String },
}

// === impl Bridge ===

impl Bridge {
    /// Builds a client that connects on first use.
    ///
    /// # Errors
    /// When the URL or the key is malformed.
    pub fn new(url: &str, key: Option<&str>, tls: Option<&ClientTls>) -> Result<Bridge, String> {
        let key = BearerKey::new(key).map_err(|e| format!("auth.admin_key: {e}"))?;
        client::bridge(url, key, tls).map(Bridge).map_err(|e| format!("gateway.agent_bridge_url: {e}"))
    }

    /// Starts a run; dropping it cancels the run on the bridge.
    ///
    /// # Errors
    /// What to tell the client when the bridge refused the run or did not answer.
    pub async fn run(&self, run: RunRequest) -> Result<Run, CallError> {
        let request = pb::RunRequest {
            agent: run.agent,
            thread_id: run.thread_id,
            input: run.input,
            user_id: run.user_id,
            multitask: run.multitask,
        };
        let response = self.0.clone().run(request).await.map_err(|s| status_error(&s))?;
        let md = response.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let position = get("x-position-offset")
            .parse::<u64>()
            .ok()
            .map(|offset| Position { offset, epoch: get("x-position-epoch") });
        Ok(Run {
            run_id: get("x-run-id"),
            thread_id: get("x-thread-id"),
            channel: get("x-channel"),
            position,
            events: response.into_inner(),
        })
    }

    /// Cancels `target`'s runs of `user_id`.
    ///
    /// # Errors
    /// What to tell the client when the bridge refused the cancel (another
    /// user's run is `permission_denied`) or did not answer.
    pub async fn cancel(&self, target: CancelTarget, user_id: String) -> Result<Cancelled, CallError> {
        use pb::cancel_request::Target;
        let target = match target {
            CancelTarget::Run(id) => Target::RunId(id),
            CancelTarget::Thread(id) => Target::ThreadId(id),
        };
        let request = pb::CancelRequest { target: Some(target), user_id };
        let r = self.0.clone().cancel(request).await.map_err(|s| status_error(&s))?.into_inner();
        Ok(Cancelled { run_id: r.run_id, thread_id: r.thread_id, cancelled: r.cancelled })
    }

    /// Calls `method` for `user_id` with `roles`.
    ///
    /// # Errors
    /// What to tell the client when the bridge did not take the call; a
    /// handler's own error is a `CallAnswer::Error`.
    pub async fn call(
        &self,
        method: String,
        params: &Value,
        user_id: String,
        roles: Vec<String>,
    ) -> Result<CallAnswer, CallError> {
        use pb::call_response::Outcome;
        let request = pb::CallRequest { method, params: params.to_string().into(), user_id, roles };
        let outcome = self.0.clone().call(request).await.map_err(|s| status_error(&s))?.into_inner().outcome;
        Ok(match outcome {
            Some(Outcome::Result(r)) => CallAnswer::Result(serde_json::from_slice(&r).unwrap_or(Value::Null)),
            Some(Outcome::Error(e)) => CallAnswer::Error { code: e.code, message: e.message },
            None => CallAnswer::Result(Value::Null),
        })
    }
}

// === impl Run ===

impl Run {
    /// The run's next event; `None` once it ended.
    ///
    /// # Errors
    /// What to tell the client when the stream broke.
    pub async fn next(&mut self) -> Result<Option<AgentEvent>, CallError> {
        let event = self.events.message().await.map_err(|s| status_error(&s))?;
        Ok(event.map(|e| AgentEvent { thread_id: e.thread_id, run_id: e.run_id, seq: e.seq, json: e.json }))
    }
}

/// Maps a bridge status to an `error.code` and message: the bridge's own
/// message when it sent a code, which it writes for clients.
fn status_error(status: &tonic::Status) -> CallError {
    if let Some(code) = ErrorCode::of_status(status) {
        return CallError::new(code, status.message());
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            CallError::new(ErrorCode::Unavailable, "the agent bridge is unavailable; try later")
        }
        _ => {
            tracing::error!(%status, "agent bridge call failed");
            CallError::new(ErrorCode::Internal, "internal error")
        }
    }
}
