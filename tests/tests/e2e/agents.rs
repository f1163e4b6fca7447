//! Agents through the gateway: runs streamed as AG-UI events, interrupts,
//! threads and their history, the thread channel, and commands.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_tests::*;

const SECRET: &str = "an-hs256-secret-for-agent-tests-0123";

/// The agent stack with echo at `delay` and a gateway that accepts tokens and anonymous clients.
async fn stack(delay: Duration) -> AgentStack {
    AgentStack::start(
        |b| b.echo_delay = delay,
        |g| g.auth = gateway::auth::AuthConfig::none().with_hs256(SECRET.as_bytes()),
    )
    .await
}

fn token(sub: &str) -> String {
    token_with(sub, &[])
}

fn token_with(sub: &str, roles: &[&str]) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": sub, "exp": exp, "roles": roles }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Reads `agent_event` frames until the run ends; returns their events.
async fn run_events(ws: &mut Ws) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let f = ws.recv().await.unwrap();
        if f["type"] != "agent_event" {
            continue;
        }
        assert_eq!(f["seq"], events.len() as u64 + 1, "seq numbers the run's events");
        let e = f["event"].clone();
        let done = e["type"] == "RUN_FINISHED" || e["type"] == "RUN_ERROR";
        events.push(e);
        if done {
            return events;
        }
    }
}

fn text(events: &[Value]) -> String {
    events.iter().filter(|e| e["type"] == "TEXT_MESSAGE_CONTENT").map(|e| e["delta"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn chat_message_streams_the_echo_run() {
    let s = stack(Duration::from_millis(5)).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "hello world", "agent": "echo", "id": 1 })).await;
    let run = ws.expect("run").await;
    assert_eq!(run["id"], 1);
    let thread = run["thread_id"].as_str().unwrap().to_owned();
    assert!(run["channel"].as_str().unwrap().starts_with(&format!("thread:{thread}#")));
    assert_eq!(run["position"]["offset"], 0);
    let events = run_events(&mut ws).await;
    assert_eq!(
        types(&events),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED"
        ]
    );
    assert_eq!(text(&events), "hello world");
    assert_eq!(events[0]["runId"], run["run_id"]);
    assert_eq!(events[0]["threadId"], thread.as_str());

    ws.send(json!({ "type": "chat_message", "content": "what time is it", "thread_id": thread })).await;
    ws.expect("run").await;
    let events = run_events(&mut ws).await;
    assert_eq!(&types(&events)[1..5], ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"]);
    assert_eq!(events[1]["toolCallName"], "get_time");
}

#[tokio::test]
async fn interrupt_ends_the_run_within_a_second_with_end_events() {
    let s = stack(Duration::from_millis(200)).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    ws.send(json!({ "type": "chat_message", "content": words.join(" ") })).await;
    let run = ws.expect("run").await;
    // Wait for the text message to open, then stop it.
    loop {
        let f = ws.recv().await.unwrap();
        if f["event"]["type"] == "TEXT_MESSAGE_CONTENT" {
            break;
        }
    }
    let asked = tokio::time::Instant::now();
    ws.send(json!({ "type": "interrupt_stream", "run_id": run["run_id"] })).await;
    let mut rest = Vec::new();
    loop {
        let f = ws.recv().await.unwrap();
        if f["type"] != "agent_event" {
            continue;
        }
        let done = f["event"]["type"] == "RUN_ERROR";
        rest.push(f["event"].clone());
        if done {
            break;
        }
    }
    assert!(asked.elapsed() < Duration::from_secs(1), "took {:?}", asked.elapsed());
    let t = types(&rest);
    assert_eq!(&t[t.len() - 2..], ["TEXT_MESSAGE_END", "RUN_ERROR"]);
    assert_eq!(rest.last().unwrap()["code"], "cancelled");
    // Interrupting again is harmless (answered `cancelled: false`), and the
    // thread is free for the next run.
    ws.send(json!({ "type": "interrupt_stream", "thread_id": run["thread_id"], "id": "again" })).await;
    let again = ws.expect("interrupted").await;
    assert_eq!(again["id"], "again");
    assert_eq!((&again["thread_id"], &again["cancelled"]), (&run["thread_id"], &json!(false)));
    ws.send(json!({ "type": "chat_message", "content": "again", "thread_id": run["thread_id"] })).await;
    ws.expect("run").await;
}

#[tokio::test]
async fn one_run_per_thread_unless_multitask() {
    let s = stack(Duration::from_millis(100)).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "one two three four five six" })).await;
    let first = ws.expect("run").await;
    let thread = first["thread_id"].clone();
    ws.send(json!({ "type": "chat_message", "content": "second", "thread_id": thread, "id": "busy" })).await;
    let err = loop {
        let f = ws.recv().await.unwrap();
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!((err["code"].as_str(), &err["id"]), (Some("thread_busy"), &json!("busy")));

    ws.send(json!({ "type": "chat_message", "content": "instead", "thread_id": thread, "multitask": "interrupt" }))
        .await;
    let mut first_end = None;
    let mut second = None;
    while first_end.is_none() || second.is_none() {
        let f = ws.recv().await.unwrap();
        if f["type"] == "run" {
            second = Some(f["run_id"].clone());
        } else if f["type"] == "agent_event" && f["run_id"] == first["run_id"] && f["event"]["type"] == "RUN_ERROR" {
            first_end = Some(f["event"]["code"].clone());
        }
    }
    assert_eq!(first_end.unwrap(), "cancelled");
    assert_ne!(second.unwrap(), first["run_id"]);
}

#[tokio::test]
async fn threads_keep_history_across_runs_and_restarts() {
    let mut s = stack(Duration::ZERO).await;
    let mut ws = Ws::connect(&s.gateway.ws_url(&format!("/ws?token={}", token("alice")))).await.unwrap();
    ws.expect("subscribed").await;
    ws.send(json!({ "type": "chat_message", "content": "first message" })).await;
    let thread = ws.expect("run").await["thread_id"].as_str().unwrap().to_owned();
    run_events(&mut ws).await;
    ws.send(json!({ "type": "chat_message", "content": "second message", "thread_id": thread })).await;
    ws.expect("run").await;
    run_events(&mut ws).await;

    // Another user may not use alice's thread.
    let mut bob = Ws::connect(&s.gateway.ws_url(&format!("/ws?token={}", token("bob")))).await.unwrap();
    bob.expect("subscribed").await;
    bob.send(json!({ "type": "chat_message", "content": "mine now", "thread_id": thread })).await;
    assert_eq!(bob.expect("error").await["code"], "permission_denied");

    ws.send(json!({ "type": "chat_message", "content": "what time is it", "thread_id": thread })).await;
    ws.expect("run").await;
    run_events(&mut ws).await;

    s.bridge.stop().await;
    let threads = agent_bridge::threads::Threads::open(s.data.path(), 1000).unwrap();
    let history = threads.messages(&thread).await.unwrap();
    let summary: Vec<(&str, &str)> =
        history.iter().take(4).map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect();
    assert_eq!(
        summary,
        [
            ("user", "first message"),
            ("assistant", "first message"),
            ("user", "second message"),
            ("assistant", "second message")
        ]
    );
    assert_eq!(threads.owner(&thread).await.unwrap().as_deref(), Some("alice"));
    // The tool call and its result are kept as AG-UI messages too, in order.
    let roles: Vec<&str> = history[4..].iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(history[5]["toolCalls"][0]["function"]["name"], "get_time");
    assert_eq!(history[6]["toolCallId"], history[5]["toolCalls"][0]["id"]);
    assert_eq!(history[7]["content"], "what time is it");
}

#[tokio::test]
async fn another_tab_watches_the_run_through_the_thread_channel() {
    let s = stack(Duration::from_millis(20)).await;
    let url = s.gateway.ws_url(&format!("/ws?token={}", token("carol")));
    let mut tab1 = Ws::connect(&url).await.unwrap();
    tab1.expect("subscribed").await;
    let mut tab2 = Ws::connect(&url).await.unwrap();
    tab2.expect("subscribed").await;
    tab1.send(json!({ "type": "chat_message", "content": "watch this happen", "on_disconnect": "continue" })).await;
    let run = tab1.expect("run").await;
    let channel = run["channel"].as_str().unwrap().to_owned();
    assert!(channel.ends_with("#carol"));
    // The second tab joins late and recovers the run from the start.
    let position = run["position"].clone();
    tab2.send(json!({ "type": "subscribe", "channel": channel, "since": position })).await;
    assert_eq!(tab2.expect("subscribed").await["recovered"], true);
    let mut seen = Vec::new();
    loop {
        let f = tab2.expect("event").await;
        assert_eq!(f["channel"], channel.as_str());
        assert_eq!(f["data"]["run_id"], run["run_id"]);
        assert_eq!(f["data"]["seq"], seen.len() as u64 + 1);
        seen.push(f["data"]["event"].clone());
        if f["event"] == "RUN_FINISHED" {
            break;
        }
    }
    assert_eq!(text(&seen), "watch this happen");
    // Other users may not watch.
    let mut dave = Ws::connect(&s.gateway.ws_url(&format!("/ws?token={}", token("dave")))).await.unwrap();
    dave.expect("subscribed").await;
    dave.send(json!({ "type": "subscribe", "channel": channel })).await;
    assert_eq!(dave.expect("error").await["code"], "permission_denied");
}

#[tokio::test]
async fn an_anonymous_connection_may_watch_its_runs_thread_channel() {
    // Runs of anonymous connections belong to the user `anonymous`
    // (README): the thread channel they are named is theirs to subscribe to.
    let s = stack(Duration::from_millis(20)).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": "anyone there", "on_disconnect": "continue" })).await;
    let run = ws.expect("run").await;
    let channel = run["channel"].as_str().unwrap().to_owned();
    assert!(channel.ends_with("#anonymous"), "{channel}");
    ws.send(json!({ "type": "subscribe", "channel": channel, "since": run["position"] })).await;
    let reply = loop {
        let frame = ws.recv().await.unwrap();
        if frame["type"] != "agent_event" {
            break frame;
        }
    };
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
}

#[tokio::test]
async fn closing_a_connection_cancels_its_run_only_when_asked() {
    let s = stack(Duration::from_millis(50)).await;
    let url = s.gateway.ws_url(&format!("/ws?token={}", token("erin")));
    let mut watcher = Ws::connect(&url).await.unwrap();
    watcher.expect("subscribed").await;
    for (on_disconnect, expected) in [("cancel", "RUN_ERROR"), ("continue", "RUN_FINISHED")] {
        let mut tab = Ws::connect(&url).await.unwrap();
        tab.expect("subscribed").await;
        tab.send(json!({ "type": "chat_message", "content": "a b c d e f g h", "on_disconnect": on_disconnect })).await;
        let run = tab.expect("run").await;
        watcher.send(json!({ "type": "subscribe", "channel": run["channel"], "since": run["position"] })).await;
        watcher.expect("subscribed").await;
        drop(tab);
        let end = loop {
            let f = watcher.expect("event").await;
            if f["event"] == "RUN_FINISHED" || f["event"] == "RUN_ERROR" {
                break f;
            }
        };
        assert_eq!(end["event"], expected, "on_disconnect {on_disconnect}");
        watcher.send(json!({ "type": "unsubscribe", "channel": run["channel"] })).await;
        watcher.expect("unsubscribed").await;
    }
}

#[tokio::test]
async fn rpc_commands() {
    let s = stack(Duration::ZERO).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    ws.subscribe("system").await;
    ws.send(json!({ "type": "rpc", "method": "get_status", "id": 1 })).await;
    let status = ws.expect("rpc_response").await;
    assert_eq!(status["id"], 1);
    assert_eq!(status["result"]["bridge"], "ok");
    assert_eq!(status["result"]["bus_linked"], true);
    assert_eq!(status["result"]["agents"][0]["name"], "echo");
    assert_eq!(status["result"]["gateway"]["bus_linked"], true);
    // Counts are for admins (SPEC §7.5): this anonymous client sees none.
    assert!(status["result"]["gateway"].get("connections").is_none(), "{status}");
    assert!(status["result"].get("runs_active").is_none(), "{status}");
    let mut admin =
        Ws::connect(&s.gateway.ws_url(&format!("/ws?token={}", token_with("root", &["admin"])))).await.unwrap();
    admin.send(json!({ "type": "rpc", "method": "get_status", "id": 1 })).await;
    let status = loop {
        let f = admin.recv().await.unwrap();
        if f["type"] == "rpc_response" {
            break f;
        }
    };
    assert_eq!(status["result"]["gateway"]["connections"], 2, "{status}");
    assert_eq!(status["result"]["runs_active"], 0, "{status}");

    ws.send(json!({ "type": "rpc", "method": "module_control", "params": { "module": "vision", "enabled": true }, "id": 2 }))
        .await;
    let mut got = [ws.recv().await.unwrap(), ws.recv().await.unwrap()];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["type"], "event");
    assert_eq!((got[0]["channel"].as_str(), got[0]["event"].as_str()), (Some("system"), Some("module_status_changed")));
    assert_eq!(got[0]["data"], json!({ "module": "vision", "enabled": true }));
    assert_eq!(got[1]["result"], json!({ "module": "vision", "enabled": true }));

    for (method, params, code) in [
        ("teleport", json!({}), "unknown_method"),
        ("execute_command", json!({ "command": "reboot" }), "unknown_method"),
        ("module_control", json!({ "module": "vision" }), "invalid_frame"),
    ] {
        ws.send(json!({ "type": "rpc", "method": method, "params": params, "id": method })).await;
        let r = ws.expect("rpc_response").await;
        assert_eq!(r["error"]["code"], code, "{method}: {r}");
    }
    ws.send(json!({ "type": "chat_message", "content": "x", "agent": "nobody", "id": 9 })).await;
    let err = ws.expect("error").await;
    assert_eq!((err["code"].as_str(), &err["id"]), (Some("unknown_agent"), &json!(9)));
    drop(s.bus);
}

#[tokio::test]
async fn without_a_bridge_agent_frames_are_unavailable() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.send(json!({ "type": "chat_message", "content": "hi", "id": 1 })).await;
    let err = ws.expect("error").await;
    assert_eq!((err["code"].as_str(), &err["id"]), (Some("unavailable"), &json!(1)));
    ws.send(json!({ "type": "interrupt_stream" })).await;
    assert_eq!(ws.expect("error").await["code"], "invalid_frame");
}

#[tokio::test]
async fn agui_http_endpoint_streams_server_sent_events() {
    let s = stack(Duration::ZERO).await;
    let input = json!({
        "threadId": "t-agui-1",
        "runId": "r-agui-1",
        "messages": [{ "id": "m1", "role": "user", "content": "over http" }],
        "tools": [], "context": [], "state": {}, "forwardedProps": {},
    });
    let (status, body) = http(s.gateway.addr, "POST", "/agui/echo", None, Some(&input.to_string())).await.unwrap();
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(events.first().unwrap()["type"], "RUN_STARTED");
    assert_eq!(events[0]["runId"], "r-agui-1");
    assert_eq!(events[0]["threadId"], "t-agui-1");
    assert_eq!(events.last().unwrap()["type"], "RUN_FINISHED");
    assert_eq!(text(&events), "over http");

    // A stock client sends the whole history back on the next turn: nothing
    // already stored is added twice, and anonymous callers may continue.
    let mut history = input["messages"].as_array().unwrap().clone();
    history.push(json!({ "id": events[1]["messageId"], "role": "assistant", "content": "over http" }));
    history.push(json!({ "id": "m2", "role": "user", "content": "second turn" }));
    let next = json!({ "threadId": "t-agui-1", "runId": "r-agui-2", "messages": history, "tools": [], "context": [], "state": {}, "forwardedProps": {} });
    let (status, body) = http(s.gateway.addr, "POST", "/agui/echo", None, Some(&next.to_string())).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&sse_events(&body)), "second turn");

    let (status, body) = http(s.gateway.addr, "POST", "/agui/nobody", None, Some(&input.to_string())).await.unwrap();
    assert_eq!(status, 404, "{body}");
    let (status, _) = http(s.gateway.addr, "POST", "/agui/echo", None, Some("[1]")).await.unwrap();
    assert_eq!(status, 400);
}

/// The AG-UI events of a Server-Sent Events body.
fn sse_events(body: &Value) -> Vec<Value> {
    body.as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn the_next_message_right_after_run_finished_is_accepted() {
    let s = stack(Duration::ZERO).await;
    let mut ws = Ws::connect(&s.gateway.ws_url(&format!("/ws?token={}", token("fay")))).await.unwrap();
    ws.expect("subscribed").await;
    ws.send(json!({ "type": "chat_message", "content": "turn 0" })).await;
    let run = ws.expect("run").await;
    let thread = run["thread_id"].clone();
    run_events(&mut ws).await;
    for i in 1..=10 {
        // Sent the moment RUN_FINISHED arrives: the thread is already free.
        ws.send(json!({ "type": "chat_message", "content": format!("turn {i}"), "thread_id": thread, "id": i })).await;
        let f = ws.recv().await.unwrap();
        assert_eq!(f["type"], "run", "turn {i}: {f}");
        assert_eq!(text(&run_events(&mut ws).await), format!("turn {i}"));
    }
    // The thread channel holds every run's events in order: each run ends before the next starts.
    let channel = run["channel"].as_str().unwrap();
    let (_, history) = http(
        s.gateway.addr,
        "GET",
        &format!("/api/ws/channels/{}/history?limit=1000", channel.replace('#', "%23")),
        Some(ADMIN_KEY),
        None,
    )
    .await
    .unwrap();
    let kinds: Vec<&str> = history["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    let starts = kinds.iter().filter(|k| **k == "RUN_STARTED").count();
    assert_eq!(starts, 11);
    let mut open = false;
    for k in &kinds {
        match *k {
            "RUN_STARTED" => {
                assert!(!open, "a run started before the previous one ended: {kinds:?}");
                open = true;
            }
            "RUN_FINISHED" | "RUN_ERROR" => open = false,
            _ => {}
        }
    }
}
