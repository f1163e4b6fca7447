//! Agent frames (SPEC §3.3): `chat_message`, `run_agent`, `interrupt_stream`
//! and `rpc`, forwarded to the agent bridge; a run's events come back as
//! `run` and `agent_event` frames.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use switchboard_proto::{agent::v1 as pb, error::ErrorCode};

use crate::{
    Node,
    protocol::{self, ChatMessage},
    queue::Outbound,
};

/// The user that runs of anonymous clients belong to. Anonymous clients are a
/// dev-mode convenience; their threads are shared among them.
pub const ANONYMOUS: &str = "anonymous";

/// Maps a bridge status to an `error.code` and message: the bridge's own
/// message when it sent a code, which it writes for clients.
pub(crate) fn status_error(status: &tonic::Status) -> (ErrorCode, String) {
    if let Some(code) = ErrorCode::of_status(status) {
        return (code, status.message().to_owned());
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            (ErrorCode::Unavailable, "the agent bridge is unavailable; try later".into())
        }
        _ => {
            tracing::error!(%status, "agent bridge call failed");
            (ErrorCode::Internal, "internal error".into())
        }
    }
}

/// What agent frames of one connection need.
#[derive(Clone)]
pub struct Context {
    pub node: Arc<Node>,
    pub queue: Arc<Outbound>,
    /// The user runs belong to: the authenticated user, or `anonymous`.
    pub user: String,
    /// The user's roles, from its token.
    pub roles: Vec<String>,
    /// Cancelled when the connection ends.
    pub gone: CancellationToken,
}

impl Context {
    fn push(&self, frame: String) {
        self.queue.push(Utf8Bytes::from(frame));
    }

    fn unavailable(&self, id: Option<&Value>) -> bool {
        if self.node.bridge.is_none() {
            self.push(protocol::error("unavailable", "no agent bridge is configured on this node", id));
            return true;
        }
        false
    }

    /// Refuses a new run while this node shuts down.
    fn draining(&self, id: Option<&Value>) -> bool {
        if self.node.draining.is_cancelled() {
            self.push(protocol::error("unavailable", "this node is shutting down; try another", id));
            return true;
        }
        false
    }

    /// `chat_message`: a run with the thread's history and one new user message.
    pub fn chat(&self, msg: ChatMessage, id: Option<Value>) {
        let input = json!({
            "threadId": msg.thread_id.clone().unwrap_or_default(),
            "messages": [{ "id": uuid::Uuid::new_v4().to_string(), "role": "user", "content": msg.content }],
            "tools": msg.tools.unwrap_or(json!([])),
            "context": msg.context.unwrap_or(json!([])),
            "state": msg.state.unwrap_or(json!({})),
            "forwardedProps": {},
        });
        let req = pb::RunRequest {
            agent: msg.agent.unwrap_or_default(),
            thread_id: msg.thread_id.unwrap_or_default(),
            input: input.to_string().into(),
            user_id: self.user.clone(),
            multitask: msg.multitask.unwrap_or_default(),
        };
        self.run(req, msg.on_disconnect.as_deref() == Some("cancel"), id);
    }

    /// `run_agent`: a run with a full `RunAgentInput`.
    pub fn run_agent(
        &self,
        agent: Option<String>,
        input: Value,
        multitask: Option<String>,
        cancel_on_disconnect: bool,
        id: Option<Value>,
    ) {
        let req = pb::RunRequest {
            agent: agent.unwrap_or_default(),
            thread_id: input["threadId"].as_str().unwrap_or_default().to_owned(),
            input: input.to_string().into(),
            user_id: self.user.clone(),
            multitask: multitask.unwrap_or_default(),
        };
        self.run(req, cancel_on_disconnect, id);
    }

    fn run(&self, req: pb::RunRequest, cancel_on_disconnect: bool, id: Option<Value>) {
        if self.unavailable(id.as_ref()) || self.draining(id.as_ref()) {
            return;
        }
        let ctx = self.clone();
        self.node.tasks.spawn(async move {
            let mut bridge = ctx.node.bridge.clone().expect("checked above");
            let response = match bridge.run(req).await {
                Ok(r) => r,
                Err(status) => {
                    let (code, message) = status_error(&status);
                    ctx.push(protocol::error(code.as_str(), &message, id.as_ref()));
                    return;
                }
            };
            let md = response.metadata();
            let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let (run_id, thread_id) = (get("x-run-id"), get("x-thread-id"));
            let position = match get("x-position-offset").parse::<u64>() {
                Ok(offset) => json!({ "offset": offset, "epoch": get("x-position-epoch") }),
                Err(_) => Value::Null,
            };
            ctx.push(protocol::frame(
                "run",
                id.as_ref(),
                json!({ "thread_id": thread_id, "run_id": run_id, "channel": get("x-channel"), "position": position }),
            ));
            let mut events = response.into_inner();
            let mut stopping = false;
            loop {
                let next = tokio::select! {
                    // Dropping the stream cancels the run on the bridge.
                    _ = ctx.gone.cancelled(), if cancel_on_disconnect => return,
                    // Shutdown: the run is stopped, and its repaired end still
                    // reaches the client before the connection closes.
                    _ = ctx.node.draining.cancelled(), if !stopping => {
                        stopping = true;
                        let target = Some(pb::cancel_request::Target::RunId(run_id.clone()));
                        let cancel = pb::CancelRequest { target, user_id: ctx.user.clone() };
                        if let Err(status) = bridge.cancel(cancel).await {
                            tracing::warn!(%status, run_id, "cannot cancel a run at shutdown");
                        }
                        continue;
                    }
                    next = events.message() => next,
                };
                match next {
                    Ok(Some(e)) => ctx.push(agent_event_frame(&e)),
                    Ok(None) => return,
                    Err(status) => {
                        let (code, message) = status_error(&status);
                        ctx.push(protocol::error(code.as_str(), &message, id.as_ref()));
                        return;
                    }
                }
            }
        });
    }

    /// `interrupt_stream`: cancels one of the user's runs, answered by
    /// `interrupted`; the run's own events say when it ended. Another user's
    /// run or thread is `permission_denied` (the bridge checks, for `user`).
    pub fn interrupt(&self, run_id: Option<String>, thread_id: Option<String>, id: Option<Value>) {
        use pb::cancel_request::Target;
        let target = match (run_id, thread_id) {
            (Some(r), _) => Target::RunId(r),
            (None, Some(t)) => Target::ThreadId(t),
            (None, None) => {
                self.push(protocol::error("invalid_frame", "`run_id` or `thread_id` is required", id.as_ref()));
                return;
            }
        };
        if self.unavailable(id.as_ref()) {
            return;
        }
        let ctx = self.clone();
        self.node.tasks.spawn(async move {
            let mut bridge = ctx.node.bridge.clone().expect("checked above");
            let request = pb::CancelRequest { target: Some(target), user_id: ctx.user.clone() };
            let frame = match bridge.cancel(request).await {
                Ok(resp) => {
                    let r = resp.into_inner();
                    protocol::frame(
                        "interrupted",
                        id.as_ref(),
                        json!({ "run_id": r.run_id, "thread_id": r.thread_id, "cancelled": r.cancelled }),
                    )
                }
                Err(status) => {
                    let (code, message) = status_error(&status);
                    protocol::error(code.as_str(), &message, id.as_ref())
                }
            };
            ctx.push(frame);
        });
    }

    /// `rpc`: answered by `rpc_response` with `result` or `error`.
    pub fn rpc(&self, method: String, params: Value, id: Option<Value>) {
        if self.unavailable(id.as_ref()) {
            return;
        }
        let ctx = self.clone();
        self.node.tasks.spawn(async move {
            let mut bridge = ctx.node.bridge.clone().expect("checked above");
            let status = method == "get_status";
            let req = pb::CallRequest {
                method,
                params: params.to_string().into(),
                user_id: ctx.user.clone(),
                roles: ctx.roles.clone(),
            };
            let body = match bridge.call(req).await {
                Ok(resp) => match resp.into_inner().outcome {
                    Some(pb::call_response::Outcome::Result(r)) => {
                        json!({ "result": serde_json::from_slice::<Value>(&r).unwrap_or(Value::Null) })
                    }
                    Some(pb::call_response::Outcome::Error(e)) => {
                        json!({ "error": { "code": e.code, "message": e.message } })
                    }
                    None => json!({ "result": null }),
                },
                Err(status) => {
                    let (code, message) = status_error(&status);
                    json!({ "error": { "code": code.as_str(), "message": message } })
                }
            };
            let mut body = body;
            if let (true, Some(result)) = (status, body.get_mut("result").and_then(Value::as_object_mut)) {
                // The bridge knows agents, workers and modules; the gateway adds
                // itself: readiness for everyone, counts for admins (SPEC §7.5).
                let (ready, bus_linked) = (ctx.node.ready(), ctx.node.hub.link_is_up());
                let gateway = if ctx.roles.iter().any(|r| r == "admin") {
                    let (connections, users, channels) = ctx.node.hub.stats();
                    json!({
                        "node": ctx.node.config.node,
                        "ready": ready,
                        "bus_linked": bus_linked,
                        "connections": connections,
                        "users": users,
                        "channels": channels.len(),
                    })
                } else {
                    json!({ "ready": ready, "bus_linked": bus_linked })
                };
                result.insert("gateway".into(), gateway);
            }
            ctx.push(protocol::frame("rpc_response", id.as_ref(), body));
        });
    }
}

/// Writes an `agent_event` frame, splicing the AG-UI event as the bridge sent it.
fn agent_event_frame(e: &pb::AgentEvent) -> String {
    let event = if serde_json::from_str::<serde::de::IgnoredAny>(&e.json).is_ok() { e.json.as_str() } else { "null" };
    format!(
        r#"{{"type":"agent_event","thread_id":{},"run_id":{},"seq":{},"event":{},"timestamp":{}}}"#,
        json!(e.thread_id),
        json!(e.run_id),
        e.seq,
        event,
        protocol::now()
    )
}
