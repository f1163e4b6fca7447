//! Agent workers attached over gRPC: dispatch, methods, cancellation, repair
//! of broken streams, and lost workers.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard_proto::agent::v1 as apb;
use switchboard_tests::*;
use tokio::sync::mpsc;

/// A worker in the test: what it receives, and a handle to send.
pub(crate) struct TestWorker {
    tx: mpsc::Sender<apb::WorkerMessage>,
    rx: tonic::Streaming<apb::BridgeMessage>,
    id: String,
}

impl TestWorker {
    pub(crate) async fn attach(
        bridge_url: &str,
        name: &str,
        agents: &[&str],
        methods: &[&str],
        max: u32,
    ) -> TestWorker {
        let mut client = apb::agent_worker_client::AgentWorkerClient::connect(bridge_url.to_owned()).await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let hello = apb::WorkerMessage {
            message: Some(apb::worker_message::Message::Hello(apb::Hello {
                worker_name: name.into(),
                agents: agents.iter().map(|s| s.to_string()).collect(),
                methods: methods.iter().map(|s| s.to_string()).collect(),
                max_concurrent_runs: max,
            })),
        };
        tx.send(hello).await.unwrap();
        let mut stream = client.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let Some(apb::bridge_message::Message::Welcome(w)) = next(&mut stream).await else {
            panic!("expected welcome")
        };
        TestWorker { tx, rx: stream, id: w.worker_id }
    }

    pub(crate) async fn recv(&mut self) -> apb::bridge_message::Message {
        next(&mut self.rx).await.expect("a bridge message")
    }

    async fn event(&self, run_id: &str, event: Value) {
        let m = apb::WorkerMessage {
            message: Some(apb::worker_message::Message::Event(apb::WorkerEvent {
                run_id: run_id.into(),
                json: event.to_string().into(),
            })),
        };
        self.tx.send(m).await.unwrap();
    }

    async fn start_run(&mut self) -> apb::StartRun {
        match self.recv().await {
            apb::bridge_message::Message::StartRun(s) => s,
            other => panic!("expected start_run, got {other:?}"),
        }
    }
}

async fn next(s: &mut tonic::Streaming<apb::BridgeMessage>) -> Option<apb::bridge_message::Message> {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("bridge message in time")
        .ok()
        .flatten()
        .and_then(|m| m.message)
}

async fn env() -> AgentStack {
    AgentStack::start(|_| {}, |_| {}).await
}

/// Reads this run's events until it ends.
async fn until_end(ws: &mut Ws) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = ws.recv().await.unwrap();
        if f["type"] != "agent_event" {
            continue;
        }
        let e = f["event"].clone();
        let done = e["type"] == "RUN_FINISHED" || e["type"] == "RUN_ERROR";
        out.push(e);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn a_worker_serves_runs_and_methods() {
    let e = env().await;
    let mut worker = TestWorker::attach(&e.bridge.url(), "py-like", &["scripted"], &["add"], 4).await;
    let mut ws = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "hi there", "agent": "scripted" })).await;
    let run = ws.expect("run").await;
    let start = worker.start_run().await;
    assert_eq!(start.run_id, run["run_id"].as_str().unwrap());
    assert_eq!(start.agent, "scripted");
    let input: Value = serde_json::from_slice(&start.input).unwrap();
    assert_eq!(input["messages"][0]["content"], "hi there", "the input carries the thread's history");
    let (r, t) = (start.run_id.as_str(), start.thread_id.as_str());
    for ev in [
        json!({ "type": "RUN_STARTED", "threadId": t, "runId": r }),
        json!({ "type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant" }),
        json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "hello from the worker" }),
        json!({ "type": "TEXT_MESSAGE_END", "messageId": "m1" }),
        json!({ "type": "RUN_FINISHED", "threadId": t, "runId": r }),
    ] {
        worker.event(r, ev).await;
    }
    let events = until_end(&mut ws).await;
    assert_eq!(
        types(&events),
        ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_FINISHED"]
    );

    // A second run on the thread gets the whole history.
    ws.send(json!({ "type": "chat_message", "content": "again", "agent": "scripted", "thread_id": t })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    let input: Value = serde_json::from_slice(&start.input).unwrap();
    let history: Vec<&str> =
        input["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(history, ["hi there", "hello from the worker", "again"]);
    worker.event(&start.run_id, json!({ "type": "RUN_STARTED" })).await;
    worker.event(&start.run_id, json!({ "type": "RUN_FINISHED" })).await;
    until_end(&mut ws).await;

    // Methods: by name, and through execute_command.
    for (frame, params) in [
        (json!({ "type": "rpc", "method": "add", "params": { "a": 1, "b": 2 }, "id": 1 }), json!({ "a": 1, "b": 2 })),
        (
            json!({ "type": "rpc", "method": "execute_command", "params": { "command": "add", "args": { "a": 1, "b": 2 } }, "id": 2 }),
            json!({ "a": 1, "b": 2 }),
        ),
    ] {
        ws.send(frame.clone()).await;
        let apb::bridge_message::Message::Call(call) = worker.recv().await else { panic!("expected a call") };
        assert_eq!(call.method, "add");
        assert_eq!(serde_json::from_slice::<Value>(&call.params).unwrap(), params);
        // The call names its caller: here an anonymous (dev) client without roles.
        assert_eq!((call.user_id.as_str(), call.roles.len()), ("anonymous", 0));
        let result = apb::WorkerMessage {
            message: Some(apb::worker_message::Message::CallResult(apb::CallResult {
                call_id: call.call_id,
                result: b"3".to_vec().into(),
                error: None,
            })),
        };
        worker.tx.send(result).await.unwrap();
        let resp = ws.expect("rpc_response").await;
        assert_eq!((&resp["id"], &resp["result"]), (&frame["id"], &json!(3)));
    }
    // Workers are node-wide state: shown to a service (or an admin), not to this client.
    ws.send(json!({ "type": "rpc", "method": "get_status", "id": 3 })).await;
    let status = ws.expect("rpc_response").await;
    assert_eq!(status["result"]["agents"][1]["name"], "scripted");
    assert!(status["result"].get("workers").is_none(), "{status}");
    let mut bridge = apb::agent_bridge_client::AgentBridgeClient::connect(e.bridge.url()).await.unwrap();
    let call = apb::CallRequest { method: "get_status".into(), ..Default::default() };
    let Some(apb::call_response::Outcome::Result(status)) = bridge.call(call).await.unwrap().into_inner().outcome
    else {
        panic!("get_status failed")
    };
    let status: Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["workers"][0]["id"], worker.id.as_str());
    assert_eq!(status["workers"][0]["agents"], json!(["scripted"]));
}

#[tokio::test]
async fn a_lost_worker_ends_its_runs_with_agent_lost() {
    let e = env().await;
    let mut worker = TestWorker::attach(&e.bridge.url(), "fragile", &["fragile"], &[], 1).await;
    let mut ws = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "x", "agent": "fragile" })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    worker.event(&start.run_id, json!({ "type": "RUN_STARTED" })).await;
    worker.event(&start.run_id, json!({ "type": "TEXT_MESSAGE_START", "messageId": "m" })).await;
    worker.event(&start.run_id, json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "half a" })).await;
    // Wait until the content arrived, then the worker dies in the middle of the message.
    loop {
        let f = ws.recv().await.unwrap();
        if f["event"]["type"] == "TEXT_MESSAGE_CONTENT" {
            break;
        }
    }
    drop(worker);
    let rest = until_end(&mut ws).await;
    assert_eq!(types(&rest), ["TEXT_MESSAGE_END", "RUN_ERROR"]);
    assert_eq!(rest[1]["code"], "agent_lost");
    // Its agent is gone with it.
    ws.send(json!({ "type": "chat_message", "content": "x", "agent": "fragile", "id": 2 })).await;
    assert_eq!(ws.expect("error").await["code"], "unknown_agent");
}

#[tokio::test]
async fn broken_streams_are_repaired_and_cancels_reach_the_worker() {
    let e = env().await;
    let mut worker = TestWorker::attach(&e.bridge.url(), "sloppy", &["sloppy"], &[], 2).await;
    let mut ws = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    let mut dashboard = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    dashboard.subscribe("agents").await;

    // Content for a message that was never started.
    ws.send(json!({ "type": "chat_message", "content": "x", "agent": "sloppy" })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    worker.event(&start.run_id, json!({ "type": "RUN_STARTED" })).await;
    worker.event(&start.run_id, json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "nope", "delta": "x" })).await;
    let events = until_end(&mut ws).await;
    assert_eq!(types(&events), ["RUN_STARTED", "RUN_ERROR"]);
    assert_eq!(events[1]["code"], "agent_error");
    let apb::bridge_message::Message::CancelRun(c) = worker.recv().await else { panic!("the worker is told") };
    assert_eq!(c.run_id, start.run_id);
    let ev = dashboard.expect("event").await;
    assert_eq!(
        (ev["event"].as_str(), ev["data"]["run_id"].as_str()),
        (Some("agent_error"), Some(start.run_id.as_str()))
    );

    // An event over the size bound ends the run the same way.
    ws.send(json!({ "type": "chat_message", "content": "z", "agent": "sloppy" })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    worker.event(&start.run_id, json!({ "type": "RUN_STARTED" })).await;
    worker.event(&start.run_id, json!({ "type": "CUSTOM", "name": "blob", "value": "x".repeat(300 * 1024) })).await;
    let events = until_end(&mut ws).await;
    assert_eq!(events.last().unwrap()["code"], "agent_error");
    assert!(events.last().unwrap()["message"].as_str().unwrap().contains("over the limit"));
    let apb::bridge_message::Message::CancelRun(_) = worker.recv().await else { panic!("cancel_run") };

    // An interrupt reaches the worker, and the run ends even if it ignores it.
    ws.send(json!({ "type": "chat_message", "content": "y", "agent": "sloppy" })).await;
    let run = ws.expect("run").await;
    let start = worker.start_run().await;
    worker.event(&start.run_id, json!({ "type": "RUN_STARTED" })).await;
    let asked = tokio::time::Instant::now();
    ws.send(json!({ "type": "interrupt_stream", "run_id": run["run_id"] })).await;
    let events = until_end(&mut ws).await;
    assert!(asked.elapsed() < Duration::from_secs(1));
    assert_eq!(events.last().unwrap()["code"], "cancelled");
    let apb::bridge_message::Message::CancelRun(c) = worker.recv().await else { panic!("cancel_run") };
    assert_eq!(c.run_id, start.run_id);
}

#[tokio::test]
async fn runs_go_to_the_least_loaded_worker_within_capacity() {
    let e = env().await;
    let mut a = TestWorker::attach(&e.bridge.url(), "a", &["pool"], &[], 1).await;
    let mut b = TestWorker::attach(&e.bridge.url(), "b", &["pool"], &[], 1).await;
    let mut ws = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "1", "agent": "pool" })).await;
    ws.expect("run").await;
    ws.send(json!({ "type": "chat_message", "content": "2", "agent": "pool" })).await;
    ws.expect("run").await;
    // Each worker got one run.
    let (ra, rb) = (a.start_run().await, b.start_run().await);
    assert_ne!(ra.run_id, rb.run_id);
    ws.send(json!({ "type": "chat_message", "content": "3", "agent": "pool", "id": 3 })).await;
    let err = ws.expect("error").await;
    assert_eq!((err["code"].as_str(), &err["id"]), (Some("unavailable"), &json!(3)), "both are at capacity");
}

/// A thread past `agents.thread_max_messages` keeps its newest messages, and
/// its agent gets only those, oldest first; a client that sends the whole
/// history back (as AG-UI clients do) does not bring the trimmed ones back.
#[tokio::test]
async fn a_thread_over_its_bound_hands_the_agent_only_its_newest_messages() {
    let e = AgentStack::start(
        |b| {
            b.thread_max_messages = 5;
            b.echo_delay = Duration::ZERO;
        },
        |_| {},
    )
    .await;
    let mut worker = TestWorker::attach(&e.bridge.url(), "bounded", &["scripted"], &[], 1).await;
    let mut ws = Ws::connect(&e.gateway.ws_url("/ws")).await.unwrap();
    // Four echo turns: eight messages, three more than the bound.
    let mut thread = String::new();
    for i in 0..4 {
        let mut frame = json!({ "type": "chat_message", "content": format!("turn {i}"), "agent": "echo" });
        if !thread.is_empty() {
            frame["thread_id"] = json!(thread);
        }
        ws.send(frame).await;
        thread = ws.expect("run").await["thread_id"].as_str().unwrap().to_owned();
        assert_eq!(until_end(&mut ws).await.last().unwrap()["type"], "RUN_FINISHED");
    }
    let summary = |input: &Value| -> Vec<(String, String)> {
        input["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
    };

    ws.send(json!({ "type": "chat_message", "content": "turn 4", "agent": "scripted", "thread_id": thread })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    let input: Value = serde_json::from_slice(&start.input).unwrap();
    assert_eq!(
        summary(&input),
        pairs(&[
            ("user", "turn 2"),
            ("assistant", "turn 2"),
            ("user", "turn 3"),
            ("assistant", "turn 3"),
            ("user", "turn 4")
        ]),
        "the newest five, oldest first"
    );
    let (r, t) = (start.run_id.as_str(), start.thread_id.as_str());
    for ev in [
        json!({ "type": "RUN_STARTED", "threadId": t, "runId": r }),
        json!({ "type": "TEXT_MESSAGE_START", "messageId": "reply-4", "role": "assistant" }),
        json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "reply-4", "delta": "reply 4" }),
        json!({ "type": "TEXT_MESSAGE_END", "messageId": "reply-4" }),
        json!({ "type": "RUN_FINISHED", "threadId": t, "runId": r }),
    ] {
        worker.event(r, ev).await;
    }
    assert_eq!(until_end(&mut ws).await.last().unwrap()["type"], "RUN_FINISHED");

    // The whole history as a client remembers it, with a message the thread
    // trimmed long ago in front, and one new message.
    let mut history = vec![json!({ "id": "gone", "role": "user", "content": "trimmed long ago" })];
    history.extend(input["messages"].as_array().unwrap().iter().cloned());
    history.push(json!({ "id": "reply-4", "role": "assistant", "content": "reply 4" }));
    history.push(json!({ "id": "turn-5", "role": "user", "content": "turn 5" }));
    let input = json!({ "threadId": thread, "messages": history, "tools": [], "context": [], "state": {} });
    ws.send(json!({ "type": "run_agent", "agent": "scripted", "input": input })).await;
    ws.expect("run").await;
    let start = worker.start_run().await;
    let input: Value = serde_json::from_slice(&start.input).unwrap();
    assert_eq!(
        summary(&input),
        pairs(&[
            ("user", "turn 3"),
            ("assistant", "turn 3"),
            ("user", "turn 4"),
            ("assistant", "reply 4"),
            ("user", "turn 5")
        ]),
    );
}
