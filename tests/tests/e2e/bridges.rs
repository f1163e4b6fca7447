//! Several agent bridges (SPEC §10), as processes of the real binary: one
//! bus, two bridges keeping their threads on it, and a gateway given both.
//! Each thread's runs go to the bridge rendezvous hashing gives it, one
//! worker attached to both bridges serves them, and a bridge killed with
//! SIGKILL mid-run loses that run as `agent_lost` while the thread's next
//! message runs on the other bridge with the thread's whole history.

use serde_json::{Value, json};
use switchboard_proto::{agent::v1 as apb, auth::BearerKey};
use switchboard_tests::*;
use tokio::sync::mpsc;

use crate::cli::Process;

/// The bus, the bridges on it and a gateway on both.
struct Cluster {
    _bus: Process,
    /// The bridges, in the order the gateway was given them.
    bridges: Vec<Process>,
    /// Their URLs, as the gateway was given them.
    urls: Vec<String>,
    gateway: Process,
    _data: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start() -> Cluster {
        let key = ("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY);
        let bus = Process::start_with(&["eventbus", "--eventbus-listen", "127.0.0.1:0", "--backend", "memory"], &[key]);
        let mut bridges = Vec::new();
        let mut data = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let args =
                ["agent-bridge", "--agent-bridge-listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()];
            let env = [
                ("SWITCHBOARD_AGENT_BRIDGE__EVENTBUS_URL", bus.grpc.as_str()),
                ("SWITCHBOARD_AGENT_BRIDGE__THREADS", "bus"),
                key,
            ];
            bridges.push(Process::start_with(&args, &env));
            data.push(dir);
        }
        let urls: Vec<String> = bridges.iter().map(|b| b.bridge.clone().unwrap()).collect();
        let gateway = Process::start_with(
            &["gateway", "--gateway-listen", "127.0.0.1:0"],
            &[
                ("SWITCHBOARD_GATEWAY__EVENTBUS_URL", &bus.grpc),
                ("SWITCHBOARD_GATEWAY__AGENT_BRIDGE_URL", &urls.join(",")),
                key,
                ("SWITCHBOARD_AUTH__HS256_SECRET", "a-secret-of-at-least-32-characters-0"),
                ("SWITCHBOARD_AUTH__ANONYMOUS", "true"),
            ],
        );
        Cluster { _bus: bus, bridges, urls, gateway, _data: data }
    }

    /// The index of the bridge that owns `thread` while every bridge is up.
    fn owner(&self, thread: &str) -> usize {
        let urls: Vec<&str> = self.urls.iter().map(String::as_str).collect();
        gateway::bridge::order(&urls, thread)[0]
    }

    /// Thread ids, at least `each` owned by every bridge.
    fn threads(&self, each: usize) -> Vec<String> {
        let mut counts = vec![0; self.urls.len()];
        let mut out = Vec::new();
        let mut i = 0;
        while counts.iter().any(|&c| c < each) {
            let thread = format!("spread-{i}");
            counts[self.owner(&thread)] += 1;
            out.push(thread);
            i += 1;
        }
        out
    }

    async fn ws(&self) -> Ws {
        // The gateway's bus link comes up a moment after it listens.
        let url = self.gateway.ws.clone().unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match Ws::connect(&url).await {
                Ok(ws) => return ws,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("gateway never answered: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }
}

/// One worker attached to every bridge: the runs it is given, by bridge.
struct Worker {
    starts: mpsc::Receiver<(usize, apb::StartRun)>,
    /// Each attachment's stream to its bridge.
    to: Vec<mpsc::Sender<apb::WorkerMessage>>,
}

impl Worker {
    async fn attach(urls: &[String], agent: &str) -> Worker {
        let (starts_tx, starts) = mpsc::channel(64);
        let mut to = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let channel = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
            let key = BearerKey::new(Some(ADMIN_KEY)).unwrap();
            let mut client = apb::agent_worker_client::AgentWorkerClient::with_interceptor(channel, key);
            let (tx, rx) = mpsc::channel(64);
            let hello = apb::worker_message::Message::Hello(apb::Hello {
                worker_name: "both".into(),
                agents: vec![agent.into()],
                methods: vec![],
                max_concurrent_runs: 64,
            });
            tx.send(apb::WorkerMessage { message: Some(hello) }).await.unwrap();
            let mut stream = client.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            let welcome = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap().unwrap();
            assert!(matches!(welcome.message, Some(apb::bridge_message::Message::Welcome(_))), "{welcome:?}");
            let starts_tx = starts_tx.clone();
            tokio::spawn(async move {
                // Ends when the bridge goes away.
                while let Ok(Some(m)) = stream.message().await {
                    if let Some(apb::bridge_message::Message::StartRun(s)) = m.message {
                        let _ = starts_tx.send((i, s)).await;
                    }
                }
            });
            to.push(tx);
        }
        Worker { starts, to }
    }

    /// The next run given to the worker, and by which bridge.
    async fn start_run(&mut self) -> (usize, apb::StartRun) {
        tokio::time::timeout(WAIT, self.starts.recv()).await.expect("a run in time").expect("a run")
    }

    async fn send(&self, bridge: usize, run: &apb::StartRun, events: &[Value]) {
        for e in events {
            let event = apb::WorkerEvent { run_id: run.run_id.clone(), json: e.to_string().into() };
            let m = apb::WorkerMessage { message: Some(apb::worker_message::Message::Event(event)) };
            self.to[bridge].send(m).await.unwrap();
        }
    }

    /// Starts the run and opens its reply message, which says `text`.
    async fn begin(&self, bridge: usize, run: &apb::StartRun, text: &str) {
        let (t, r, m) = (&run.thread_id, &run.run_id, format!("reply-{}", run.run_id));
        let events = [
            json!({ "type": "RUN_STARTED", "threadId": t, "runId": r }),
            json!({ "type": "TEXT_MESSAGE_START", "messageId": m, "role": "assistant" }),
            json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": m, "delta": text }),
        ];
        self.send(bridge, run, &events).await;
    }

    /// Serves the whole run: one message saying `text`.
    async fn reply(&self, bridge: usize, run: &apb::StartRun, text: &str) {
        self.begin(bridge, run, text).await;
        let (t, r, m) = (&run.thread_id, &run.run_id, format!("reply-{}", run.run_id));
        let events = [
            json!({ "type": "TEXT_MESSAGE_END", "messageId": m }),
            json!({ "type": "RUN_FINISHED", "threadId": t, "runId": r }),
        ];
        self.send(bridge, run, &events).await;
    }
}

/// `(role, content)` of each message of a run's input.
fn history(run: &apb::StartRun) -> Vec<(String, String)> {
    let input: Value = serde_json::from_slice(&run.input).unwrap();
    input["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
}

/// Sends a chat message on `thread` and returns the `run` frame.
async fn chat(ws: &mut Ws, thread: &str, content: &str) -> Value {
    ws.send(json!({ "type": "chat_message", "content": content, "thread_id": thread, "agent": "scripted" })).await;
    let run = ws.expect("run").await;
    assert_eq!(run["thread_id"], thread);
    run
}

/// Reads the run's AG-UI events until (and with) the one of type `until`.
async fn events_until(ws: &mut Ws, until: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = ws.expect("agent_event").await;
        let done = f["event"]["type"] == until;
        out.push(f);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn runs_on_many_threads_spread_over_both_bridges_and_one_worker_serves_them() {
    let c = Cluster::start();
    let mut worker = Worker::attach(&c.urls, "scripted").await;
    let mut ws = c.ws().await;
    let threads = c.threads(4);
    let mut served = vec![0; c.urls.len()];
    for round in 0..2 {
        for thread in &threads {
            let content = format!("{thread} message {round}");
            let run = chat(&mut ws, thread, &content).await;
            let (bridge, start) = worker.start_run().await;
            assert_eq!(bridge, c.owner(thread), "{thread} runs on the bridge rendezvous hashing gives it");
            assert_eq!(start.run_id, run["run_id"].as_str().unwrap());
            let mut expected = Vec::new();
            for earlier in 0..round {
                let said = format!("{thread} message {earlier}");
                expected.push(("user".to_owned(), said.clone()));
                expected.push(("assistant".to_owned(), format!("reply: {said}")));
            }
            expected.push(("user".to_owned(), content.clone()));
            assert_eq!(history(&start), expected, "the thread's history, kept on the bus");
            worker.reply(bridge, &start, &format!("reply: {content}")).await;
            let events = events_until(&mut ws, "RUN_FINISHED").await;
            assert_eq!(events.len(), 5, "{events:?}");
            served[bridge] += 1;
        }
    }
    assert!(served.iter().all(|&n| n >= 8), "both bridges served runs: {served:?}");
}

#[tokio::test]
async fn a_bridge_killed_mid_run_loses_the_run_and_the_other_continues_its_thread_with_its_history() {
    let mut c = Cluster::start();
    let mut worker = Worker::attach(&c.urls, "scripted").await;
    let mut ws = c.ws().await;
    let thread = "killed-mid-run";
    let owner = c.owner(thread);
    let mut watcher = c.ws().await;
    watcher.subscribe(&format!("thread:{thread}#anonymous")).await;

    chat(&mut ws, thread, "one").await;
    let (bridge, start) = worker.start_run().await;
    assert_eq!(bridge, owner);
    worker.reply(bridge, &start, "reply one").await;
    events_until(&mut ws, "RUN_FINISHED").await;

    // The second run is under way on the owner when the owner is killed.
    let lost = chat(&mut ws, thread, "two").await;
    let (bridge, start) = worker.start_run().await;
    assert_eq!(bridge, owner);
    worker.begin(bridge, &start, "half a rep").await;
    let before = events_until(&mut ws, "TEXT_MESSAGE_CONTENT").await;
    c.bridges[owner].child.kill().unwrap();
    c.bridges[owner].child.wait().unwrap();

    let after = events_until(&mut ws, "RUN_ERROR").await;
    let kinds: Vec<&str> = after.iter().map(|f| f["event"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["TEXT_MESSAGE_END", "RUN_ERROR"], "the open message is closed, then the run ends");
    let end = &after[1];
    assert_eq!(end["event"]["code"], "agent_lost", "{end}");
    assert_eq!(end["run_id"], lost["run_id"]);
    let seqs: Vec<u64> = before.iter().chain(&after).map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the repaired end continues the run's seq");

    // Other tabs see the end on the thread channel too.
    loop {
        let e = watcher.expect("event").await;
        if e["data"]["run_id"] == lost["run_id"] && e["event"] == "RUN_ERROR" {
            assert_eq!(e["data"]["event"]["code"], "agent_lost");
            break;
        }
    }

    // The next message runs on the other bridge, with the thread's history.
    chat(&mut ws, thread, "three").await;
    let (bridge, start) = worker.start_run().await;
    assert_ne!(bridge, owner, "the thread moved to the bridge that is left");
    assert_eq!(
        history(&start),
        pairs(&[("user", "one"), ("assistant", "reply one"), ("user", "two"), ("user", "three")]),
        "the whole history: the lost run's message too, but not the half of its reply never kept"
    );
    worker.reply(bridge, &start, "reply three").await;
    let events = events_until(&mut ws, "RUN_FINISHED").await;
    assert_eq!(events[2]["event"]["delta"], "reply three");
}

/// Two bridges' thread stores on one bus: of two users racing to start the
/// same thread one owns it, both stores agree on who, and either reads the
/// thread's newest messages, oldest first.
#[tokio::test]
async fn threads_on_the_bus_have_one_owner_and_keep_their_newest_messages() {
    use agent_bridge::threads::{ThreadError, bus::BusThreads};
    let bus = BusServer::memory().await;
    let store = || {
        let key = BearerKey::new(None).unwrap();
        BusThreads::new(switchboard_proto::client::bus(&bus.url(), key, None).unwrap(), 3)
    };
    let (a, b) = (store(), store());
    let msg = |i: usize| json!({ "id": format!("m{i}"), "role": "user", "content": format!("message {i}") });
    let (alice, bob) = tokio::join!(a.append("raced", "alice", vec![msg(0)]), b.append("raced", "bob", vec![msg(0)]));
    let winner = match (alice, bob) {
        (Ok(()), Err(ThreadError::NotOwner(owner))) | (Err(ThreadError::NotOwner(owner)), Ok(())) => owner,
        other => panic!("exactly one user owns the thread: {other:?}"),
    };
    // The loser's error named the winner, and each store reads the same owner.
    let loser = if winner == "alice" { "bob" } else { "alice" };
    assert_eq!(a.owner("raced").await.unwrap().as_deref(), Some(winner.as_str()));
    assert_eq!(b.owner("raced").await.unwrap().as_deref(), Some(winner.as_str()));
    assert!(matches!(a.append("raced", loser, vec![msg(9)]).await, Err(ThreadError::NotOwner(_))));

    for i in 1..6 {
        a.append("raced", &winner, vec![msg(i)]).await.unwrap();
    }
    let contents: Vec<String> =
        b.messages("raced").await.unwrap().iter().map(|m| m["content"].as_str().unwrap().to_owned()).collect();
    assert_eq!(contents, ["message 3", "message 4", "message 5"], "the newest three, oldest first");
    assert!(b.messages("never-started").await.unwrap().is_empty());
    assert_eq!(b.owner("never-started").await.unwrap(), None);
}

/// `interrupt_stream` reaches a run on whichever bridge it is: by run id
/// (which any bridge may hold, so every bridge is asked) and by thread id
/// (which goes to the thread's bridge).
#[tokio::test]
async fn interrupts_reach_runs_on_either_bridge() {
    let c = Cluster::start();
    let mut worker = Worker::attach(&c.urls, "scripted").await;
    let mut ws = c.ws().await;
    let threads = c.threads(1);
    let on: Vec<&String> = (0..c.urls.len()).map(|b| threads.iter().find(|t| c.owner(t) == b).unwrap()).collect();
    for (bridge, thread) in on.iter().enumerate() {
        for by_thread in [false, true] {
            let run = chat(&mut ws, thread, "long").await;
            let (served_by, start) = worker.start_run().await;
            assert_eq!(served_by, bridge);
            worker.begin(served_by, &start, "a long ").await;
            events_until(&mut ws, "TEXT_MESSAGE_CONTENT").await;
            let target = if by_thread { json!({ "thread_id": thread }) } else { json!({ "run_id": run["run_id"] }) };
            let mut frame = json!({ "type": "interrupt_stream", "id": "stop" });
            frame.as_object_mut().unwrap().extend(target.as_object().unwrap().clone());
            ws.send(frame).await;
            let (mut interrupted, mut end) = (None, None);
            while interrupted.is_none() || end.is_none() {
                let f = ws.recv().await.unwrap();
                match f["type"].as_str().unwrap() {
                    "interrupted" => interrupted = Some(f),
                    "agent_event" if f["event"]["type"] == "RUN_ERROR" => end = Some(f),
                    "agent_event" => assert_eq!(f["event"]["type"], "TEXT_MESSAGE_END", "{f}"),
                    _ => panic!("unexpected {f}"),
                }
            }
            let interrupted = interrupted.unwrap();
            assert_eq!((&interrupted["run_id"], interrupted["cancelled"].as_bool()), (&run["run_id"], Some(true)));
            assert_eq!(interrupted["thread_id"], thread.as_str());
            assert_eq!(end.unwrap()["event"]["code"], "cancelled");
        }
    }
}
