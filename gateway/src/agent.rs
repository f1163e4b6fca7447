//! Agent frames (SPEC §3.3): `chat_message`, `run_agent`, `interrupt_stream`
//! and `rpc`, forwarded to the agent bridge; a run's events come back as
//! `run` and `agent_event` frames.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    Node,
    bridge::{CallAnswer, CancelTarget, RunRequest},
    protocol::{self, ChatMessage, RpcError, ServerFrame, agent_event_frame},
    queue::Outbound,
};

/// The user that runs of anonymous clients belong to. Anonymous clients are a
/// dev-mode convenience; their threads are shared among them.
pub const ANONYMOUS: &str = "anonymous";

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
        let req = RunRequest {
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
        let req = RunRequest {
            agent: agent.unwrap_or_default(),
            thread_id: input["threadId"].as_str().unwrap_or_default().to_owned(),
            input: input.to_string().into(),
            user_id: self.user.clone(),
            multitask: multitask.unwrap_or_default(),
        };
        self.run(req, cancel_on_disconnect, id);
    }

    fn run(&self, req: RunRequest, cancel_on_disconnect: bool, id: Option<Value>) {
        if self.unavailable(id.as_ref()) || self.draining(id.as_ref()) {
            return;
        }
        let ctx = self.clone();
        self.node.tasks.spawn(async move {
            let bridge = ctx.node.bridge.clone().expect("checked above");
            let mut run = match bridge.run(req).await {
                Ok(run) => run,
                Err(e) => {
                    ctx.push(e.frame(id.as_ref()));
                    return;
                }
            };
            let frame = ServerFrame::Run {
                thread_id: &run.thread_id,
                run_id: &run.run_id,
                channel: &run.channel,
                position: run.position.as_ref(),
            };
            ctx.push(frame.to_json(id.as_ref()));
            let mut stopping = false;
            loop {
                let next = tokio::select! {
                    // Dropping the stream cancels the run on the bridge.
                    _ = ctx.gone.cancelled(), if cancel_on_disconnect => return,
                    // Shutdown: the run is stopped, and its repaired end still
                    // reaches the client before the connection closes.
                    _ = ctx.node.draining.cancelled(), if !stopping => {
                        stopping = true;
                        let target = CancelTarget::Run(run.run_id.clone());
                        if let Err(e) = bridge.cancel(target, ctx.user.clone()).await {
                            tracing::warn!(message = %e.message, run_id = %run.run_id, "cannot cancel a run at shutdown");
                        }
                        continue;
                    }
                    next = run.next() => next,
                };
                match next {
                    Ok(Some(e)) => ctx.push(agent_event_frame(&e.thread_id, &e.run_id, e.seq, &e.json)),
                    Ok(None) => return,
                    Err(e) => {
                        ctx.push(e.frame(id.as_ref()));
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
        let target = match (run_id, thread_id) {
            (Some(r), _) => CancelTarget::Run(r),
            (None, Some(t)) => CancelTarget::Thread(t),
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
            let bridge = ctx.node.bridge.clone().expect("checked above");
            let frame = match bridge.cancel(target, ctx.user.clone()).await {
                Ok(r) => {
                    ServerFrame::Interrupted { run_id: &r.run_id, thread_id: &r.thread_id, cancelled: r.cancelled }
                        .to_json(id.as_ref())
                }
                Err(e) => e.frame(id.as_ref()),
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
            let bridge = ctx.node.bridge.clone().expect("checked above");
            let status = method == "get_status";
            let (mut result, error) = match bridge.call(method, &params, ctx.user.clone(), ctx.roles.clone()).await {
                Ok(CallAnswer::Result(result)) => (Some(result), None),
                Ok(CallAnswer::Error { code, message }) => (None, Some((code, message))),
                Err(e) => (None, Some((e.code.as_str().to_owned(), e.message))),
            };
            if let (true, Some(result)) = (status, result.as_mut().and_then(Value::as_object_mut)) {
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
            let error = error.as_ref().map(|(code, message)| RpcError { code, message });
            ctx.push(ServerFrame::RpcResponse { result, error }.to_json(id.as_ref()));
        });
    }
}
