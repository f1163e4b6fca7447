//! The agent bridges as the rest of the gateway sees them: runs, cancels
//! and calls in domain terms. The only module that sees agent proto types.
//!
//! `gateway.agent_bridge_url` may name several bridges (SPEC §10). Each
//! thread's runs go to one of them, chosen by rendezvous hashing on the
//! thread id (`order`): every bridge gets a score for the thread, and the
//! thread goes to the highest that answers. Adding a bridge moves only the
//! threads it now wins; losing one moves only the threads it had, to their
//! second choice. Threads live on the bus, so the bridge a thread moves to
//! reads its whole history. A run whose bridge dies mid-run is ended here
//! as the bridge would end it for a lost worker (SPEC §7.1): `END` events
//! for what was open, then `RUN_ERROR` with `code: "agent_lost"`, to the
//! client and to the thread channel.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard_proto::{
    agent::v1 as pb,
    auth::BearerKey,
    client::{self, BridgeClient},
    error::ErrorCode,
};
use switchboard_tls::ClientTls;
use tokio::time::Instant;

use crate::{bus::BusNodes, error::CallError, protocol::Position};

/// The agent bridges of `gateway.agent_bridge_url`: a cheap handle.
#[derive(Clone)]
pub struct Bridge {
    nodes: Arc<[BridgeNode]>,
    /// Where a lost run's repaired end is published, on its thread channel.
    bus: Option<Arc<BusNodes>>,
}

/// One bridge of the list.
struct BridgeNode {
    url: String,
    client: BridgeClient,
    /// Set when a call could not reach the bridge: until then it is tried
    /// only after the others, so that a dead bridge does not cost every run
    /// a failed connection.
    down_until: Mutex<Option<Instant>>,
}

/// How long a bridge that could not be reached is tried last.
const DOWN_FOR: Duration = Duration::from_secs(2);

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
    /// What is open in the run's stream, for the repair if its bridge is lost.
    open: Open,
    /// The `seq` of the last event received.
    seq: u64,
    /// Repaired events still to hand out, after the bridge was lost.
    repaired: VecDeque<AgentEvent>,
    /// Set once the stream ended, or was repaired.
    done: bool,
    bus: Option<Arc<BusNodes>>,
}

/// The messages and tool calls a run has open, and whether it ended.
#[derive(Default)]
struct Open {
    started: bool,
    ended: bool,
    messages: BTreeSet<String>,
    tool_calls: BTreeSet<String>,
}

/// One AG-UI event of a run.
pub struct AgentEvent {
    pub thread_id: String,
    pub run_id: String,
    pub seq: u64,
    /// The AG-UI `type`.
    pub kind: String,
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
    /// Builds clients of `urls` that connect on first use; `bus`, when
    /// given, gets the repaired end of runs whose bridge was lost.
    ///
    /// # Errors
    /// When there is no URL, or a URL or the key is malformed.
    pub fn new(
        urls: &[String],
        key: Option<&str>,
        tls: Option<&ClientTls>,
        bus: Option<Arc<BusNodes>>,
    ) -> Result<Bridge, String> {
        if urls.is_empty() {
            return Err("gateway.agent_bridge_url: no URL given".into());
        }
        let key = BearerKey::new(key).map_err(|e| format!("auth.admin_key: {e}"))?;
        let nodes = urls
            .iter()
            .map(|url| {
                let client =
                    client::bridge(url, key.clone(), tls).map_err(|e| format!("gateway.agent_bridge_url: {e}"))?;
                Ok(BridgeNode { url: url.clone(), client, down_until: Mutex::new(None) })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Bridge { nodes: nodes.into(), bus })
    }

    /// Starts a run on the bridge that owns its thread (a new thread gets
    /// its id here, so that it is routed like any other); dropping it
    /// cancels the run on the bridge.
    ///
    /// # Errors
    /// What to tell the client when the bridge refused the run, or when no
    /// bridge answered.
    pub async fn run(&self, run: RunRequest) -> Result<Run, CallError> {
        let thread_id = if run.thread_id.is_empty() { uuid::Uuid::new_v4().to_string() } else { run.thread_id };
        let request = pb::RunRequest {
            agent: run.agent,
            thread_id,
            input: run.input,
            user_id: run.user_id,
            multitask: run.multitask,
        };
        let response = self
            .on_thread(&request.thread_id, |mut c| {
                let request = request.clone();
                async move { c.run(request).await }
            })
            .await?;
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
            open: Open::default(),
            seq: 0,
            repaired: VecDeque::new(),
            done: false,
            bus: self.bus.clone(),
        })
    }

    /// Cancels `target`'s runs of `user_id`: a thread's on the bridge that
    /// owns it; a run, which any bridge may hold, on every bridge.
    ///
    /// # Errors
    /// What to tell the client when the bridge refused the cancel (another
    /// user's run is `permission_denied`) or no bridge answered.
    pub async fn cancel(&self, target: CancelTarget, user_id: String) -> Result<Cancelled, CallError> {
        use pb::cancel_request::Target;
        let (target, thread) = match target {
            CancelTarget::Run(id) => (Target::RunId(id), None),
            CancelTarget::Thread(id) => (Target::ThreadId(id.clone()), Some(id)),
        };
        let request = pb::CancelRequest { target: Some(target), user_id };
        let cancel = |mut c: BridgeClient| {
            let request = request.clone();
            async move { c.cancel(request).await }
        };
        let answer = match thread {
            Some(thread) => self.on_thread(&thread, cancel).await?.into_inner(),
            None => self.on_every(cancel).await?,
        };
        Ok(Cancelled { run_id: answer.run_id, thread_id: answer.thread_id, cancelled: answer.cancelled })
    }

    /// Calls `method` for `user_id` with `roles`, on the first bridge that
    /// answers (workers attach to every bridge, so any may serve it).
    ///
    /// # Errors
    /// What to tell the client when no bridge took the call; a handler's
    /// own error is a `CallAnswer::Error`.
    pub async fn call(
        &self,
        method: String,
        params: &Value,
        user_id: String,
        roles: Vec<String>,
    ) -> Result<CallAnswer, CallError> {
        use pb::call_response::Outcome;
        let request = pb::CallRequest { method, params: params.to_string().into(), user_id, roles };
        let order: Vec<usize> = (0..self.nodes.len()).collect();
        let outcome = self
            .in_order(order, |mut c| {
                let request = request.clone();
                async move { c.call(request).await }
            })
            .await?
            .into_inner()
            .outcome;
        Ok(match outcome {
            Some(Outcome::Result(r)) => CallAnswer::Result(serde_json::from_slice(&r).unwrap_or(Value::Null)),
            Some(Outcome::Error(e)) => CallAnswer::Error { code: e.code, message: e.message },
            None => CallAnswer::Result(Value::Null),
        })
    }

    /// Calls the bridge that owns `thread`, or the next by rendezvous order
    /// while they cannot be reached.
    async fn on_thread<T, F, Fut>(&self, thread: &str, call: F) -> Result<tonic::Response<T>, CallError>
    where
        F: Fn(BridgeClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        self.in_order(order(&urls, thread), call).await
    }

    /// Calls the bridges in `order`, those known to be down last, until one
    /// answers; a bridge's own answer (an error code included) is final.
    async fn in_order<T, F, Fut>(&self, mut order: Vec<usize>, call: F) -> Result<tonic::Response<T>, CallError>
    where
        F: Fn(BridgeClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let now = Instant::now();
        // A stable sort: the bridges that are up keep their order, then the others.
        order.sort_by_key(|&i| self.nodes[i].down_until.lock().unwrap().is_some_and(|t| t > now));
        let mut last = None;
        for i in order {
            let node = &self.nodes[i];
            match call(node.client.clone()).await {
                Ok(response) => {
                    node.down_until.lock().unwrap().take();
                    return Ok(response);
                }
                Err(status) if unreachable(&status) => {
                    tracing::warn!(bridge = %node.url, %status, "agent bridge unreachable; trying the next");
                    *node.down_until.lock().unwrap() = Some(Instant::now() + DOWN_FOR);
                    last = Some(status);
                }
                Err(status) => return Err(status_error(&status)),
            }
        }
        Err(status_error(&last.unwrap_or_else(|| tonic::Status::unavailable("no agent bridge"))))
    }

    /// Cancels on every bridge that answers and returns the answer of the
    /// one that held the run: the one that cancelled it, or knew it.
    async fn on_every<F, Fut>(&self, call: F) -> Result<pb::CancelResponse, CallError>
    where
        F: Fn(BridgeClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::CancelResponse>, tonic::Status>>,
    {
        let answers = futures::future::join_all(self.nodes.iter().map(|n| call(n.client.clone()))).await;
        let mut best: Option<pb::CancelResponse> = None;
        let mut failure = None;
        for answer in answers {
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    let rank = |r: &pb::CancelResponse| (r.cancelled, !r.thread_id.is_empty());
                    if best.as_ref().is_none_or(|b| rank(&r) > rank(b)) {
                        best = Some(r);
                    }
                }
                // Another user's run: refused, whatever the others say.
                Err(status) if ErrorCode::of_status(&status) == Some(ErrorCode::PermissionDenied) => {
                    return Err(status_error(&status));
                }
                Err(status) => failure = Some(status),
            }
        }
        match (best, failure) {
            (Some(best), _) => Ok(best),
            (None, Some(status)) => Err(status_error(&status)),
            (None, None) => Err(CallError::new(ErrorCode::Unavailable, "the agent bridge is unavailable; try later")),
        }
    }
}

/// The bridges of `urls` in the order a thread tries them: by rendezvous
/// score, highest first. The score is a stable hash of the URL and the
/// thread id (FNV-1a, then a 64-bit finalizer), so every gateway node, of
/// any version, routes a thread the same way; it does not depend on the
/// list's order, and a bridge added or removed changes only the threads it
/// wins or had.
pub fn order(urls: &[&str], thread_id: &str) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = urls.iter().enumerate().map(|(i, url)| (score(url, thread_id), i)).collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, i)| i).collect()
}

fn score(url: &str, thread_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // A separator that neither part contains keeps ("ab", "c") apart from ("a", "bc").
    for b in url.bytes().chain([0xff]).chain(thread_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // splitmix64's finalizer: FNV alone leaves the high bits of similar keys alike.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether a call failed because the bridge could not be reached, rather
/// than because the bridge answered so: then the next bridge is tried.
fn unreachable(status: &tonic::Status) -> bool {
    ErrorCode::of_status(status).is_none() && status.code() == tonic::Code::Unavailable
}

// === impl Run ===

impl Run {
    /// The run's next event; `None` once it ended. When the bridge is lost
    /// mid-run, the events that end it follow (SPEC §7.1, `agent_lost`).
    ///
    /// # Errors
    /// Never once the run was accepted; kept for callers that handle it.
    pub async fn next(&mut self) -> Result<Option<AgentEvent>, CallError> {
        if let Some(e) = self.repaired.pop_front() {
            return Ok(Some(e));
        }
        if self.done {
            return Ok(None);
        }
        match self.events.message().await {
            Ok(Some(e)) => {
                self.seq = e.seq;
                self.open.record(&e.r#type, &e.json);
                Ok(Some(AgentEvent {
                    thread_id: e.thread_id,
                    run_id: e.run_id,
                    seq: e.seq,
                    kind: e.r#type,
                    json: e.json,
                }))
            }
            Ok(None) if self.open.ended => {
                self.done = true;
                Ok(None)
            }
            end => {
                if let Err(status) = end {
                    tracing::warn!(run_id = %self.run_id, %status, "agent bridge lost during a run");
                }
                self.lost().await;
                Ok(self.repaired.pop_front())
            }
        }
    }

    /// Ends a run whose bridge went away, as the bridge ends one whose
    /// worker went away, and publishes the end to the thread channel (the
    /// bridge that would have is gone).
    async fn lost(&mut self) {
        self.done = true;
        for event in self.open.repair(&self.thread_id, &self.run_id) {
            self.seq += 1;
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            if let (Some(bus), false) = (&self.bus, self.channel.is_empty()) {
                let data = json!({ "event": event, "run_id": self.run_id, "seq": self.seq });
                if let Err(e) = bus.current().publish(&self.channel, kind.clone(), &data).await {
                    tracing::warn!(message = %e.message, run_id = %self.run_id, "cannot publish a lost run's end");
                }
            }
            self.repaired.push_back(AgentEvent {
                thread_id: self.thread_id.clone(),
                run_id: self.run_id.clone(),
                seq: self.seq,
                kind,
                json: event.to_string(),
            });
        }
    }
}

// === impl Open ===

impl Open {
    /// Records what an event of `kind` opens or closes; only those events are parsed.
    fn record(&mut self, kind: &str, json: &str) {
        #[derive(serde::Deserialize)]
        struct Ids {
            #[serde(rename = "messageId")]
            message_id: Option<String>,
            #[serde(rename = "toolCallId")]
            tool_call_id: Option<String>,
        }
        let ids = || serde_json::from_str::<Ids>(json).unwrap_or(Ids { message_id: None, tool_call_id: None });
        match kind {
            "RUN_STARTED" => self.started = true,
            "RUN_FINISHED" | "RUN_ERROR" => self.ended = true,
            "TEXT_MESSAGE_START" => self.messages.extend(ids().message_id),
            "TEXT_MESSAGE_END" => {
                if let Some(id) = ids().message_id {
                    self.messages.remove(&id);
                }
            }
            "TOOL_CALL_START" => self.tool_calls.extend(ids().tool_call_id),
            "TOOL_CALL_END" => {
                if let Some(id) = ids().tool_call_id {
                    self.tool_calls.remove(&id);
                }
            }
            _ => {}
        }
    }

    /// The events that end the run as lost: `END` for what is open, then `RUN_ERROR`.
    fn repair(&mut self, thread_id: &str, run_id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if !self.started {
            out.push(json!({ "type": "RUN_STARTED", "threadId": thread_id, "runId": run_id }));
        }
        for id in std::mem::take(&mut self.tool_calls) {
            out.push(json!({ "type": "TOOL_CALL_END", "toolCallId": id }));
        }
        for id in std::mem::take(&mut self.messages) {
            out.push(json!({ "type": "TEXT_MESSAGE_END", "messageId": id }));
        }
        out.push(json!({ "type": "RUN_ERROR", "message": "the agent bridge serving the run went away", "code": "agent_lost" }));
        self.ended = true;
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(urls: &[&str], threads: &[String]) -> Vec<usize> {
        threads.iter().map(|t| order(urls, t)[0]).collect()
    }

    #[test]
    fn rendezvous_spreads_threads_and_moves_few_when_a_bridge_joins() {
        let threads: Vec<String> = (0..3000).map(|i| format!("thread-{i}")).collect();
        let two = ["http://10.0.0.1:50052", "http://10.0.0.2:50052"];
        let three = ["http://10.0.0.1:50052", "http://10.0.0.2:50052", "http://10.0.0.3:50052"];
        let before = owners(&two, &threads);
        let on_first = before.iter().filter(|&&i| i == 0).count();
        assert!((1300..1700).contains(&on_first), "about half each: {on_first} of 3000");
        let after = owners(&three, &threads);
        let moved: Vec<usize> = (0..threads.len()).filter(|&i| before[i] != after[i]).collect();
        assert!(moved.iter().all(|&i| after[i] == 2), "a thread moves only to the new bridge");
        assert!((800..1200).contains(&moved.len()), "about a third moves: {}", moved.len());
        // The list's order does not matter, and the second choice is the owner once the first is gone.
        let reversed = [three[2], three[1], three[0]];
        for t in &threads[..100] {
            let named = |urls: &[&'static str]| order(urls, t).into_iter().map(|i| urls[i]).collect::<Vec<_>>();
            assert_eq!(named(&three), named(&reversed));
            let without_first: Vec<&str> = three.iter().copied().filter(|u| *u != named(&three)[0]).collect();
            assert_eq!(named(&without_first)[0], named(&three)[1]);
        }
    }

    #[test]
    fn a_lost_run_closes_what_is_open_and_ends_agent_lost() {
        let mut open = Open::default();
        open.record("RUN_STARTED", r#"{"type":"RUN_STARTED"}"#);
        open.record("TEXT_MESSAGE_START", r#"{"type":"TEXT_MESSAGE_START","messageId":"m1"}"#);
        open.record("TEXT_MESSAGE_END", r#"{"type":"TEXT_MESSAGE_END","messageId":"m1"}"#);
        open.record("TEXT_MESSAGE_START", r#"{"type":"TEXT_MESSAGE_START","messageId":"m2"}"#);
        open.record("TOOL_CALL_START", r#"{"type":"TOOL_CALL_START","toolCallId":"c"}"#);
        let out = open.repair("t", "r");
        assert_eq!(
            out,
            [
                json!({ "type": "TOOL_CALL_END", "toolCallId": "c" }),
                json!({ "type": "TEXT_MESSAGE_END", "messageId": "m2" }),
                json!({ "type": "RUN_ERROR", "message": "the agent bridge serving the run went away", "code": "agent_lost" }),
            ]
        );
        assert!(open.repair("t", "r").is_empty(), "an ended run is not ended twice");
        let mut unstarted = Open::default();
        assert_eq!(unstarted.repair("t", "r")[0]["type"], "RUN_STARTED");
    }
}
