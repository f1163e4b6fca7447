//! The `openai` agent against a local server replaying recorded
//! chat-completion streams.

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde_json::{Value, json};
use switchboard_tests::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Mutex,
};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/openai").join(name);
    std::fs::read_to_string(path).unwrap()
}

/// Reads one HTTP request and returns its body.
async fn read_request(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return Vec::new();
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
            .unwrap_or(0);
        while raw.len() < end + 4 + len {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        return raw[end + 4..].to_vec();
    }
}

/// A model server that answers every request with `status`, `content_type`
/// and `body`, and keeps the last request it got.
async fn model_server(status: u16, content_type: &'static str, body: String) -> (String, Arc<Mutex<Option<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(None));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let request = read_request(&mut s).await;
            *keep.lock().await = serde_json::from_slice(&request).ok();
            let head = format!("HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    (url, seen)
}

async fn env(base_url: String) -> AgentStack {
    let openai = agent_bridge::openai::OpenAiConfig {
        base_url,
        model: "gpt-4o-mini".into(),
        api_key: Some("sk-test".into()),
        timeout: Duration::from_secs(5),
    };
    AgentStack::start(|b| b.openai = Some(openai), |_| {}).await
}

async fn run(env: &AgentStack, content: &str) -> Vec<Value> {
    let mut ws = Ws::connect(&env.gateway.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "chat_message", "content": content, "agent": "openai" })).await;
    ws.expect("run").await;
    let mut events = Vec::new();
    loop {
        let f = ws.expect("agent_event").await;
        let done = f["event"]["type"] == "RUN_FINISHED" || f["event"]["type"] == "RUN_ERROR";
        events.push(f["event"].clone());
        if done {
            return events;
        }
    }
}

#[tokio::test]
async fn text_deltas_become_one_text_message() {
    let (url, seen) = model_server(200, "text/event-stream", fixture("text.sse")).await;
    let env = env(url).await;
    let events = run(&env, "say hello").await;
    assert_eq!(
        types(&events),
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED"
        ]
    );
    let text: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(text, "Hello there!");
    let request = seen.lock().await.clone().unwrap();
    assert_eq!(request["model"], "gpt-4o-mini");
    assert_eq!(request["stream"], true);
    assert_eq!(request["messages"], json!([{ "role": "user", "content": "say hello" }]));
}

#[tokio::test]
async fn streamed_tool_calls_are_grouped_by_index() {
    let (url, _) = model_server(200, "text/event-stream", fixture("tools.sse")).await;
    let env = env(url).await;
    let events = run(&env, "weather and time?").await;
    assert_eq!(
        types(&events),
        [
            "RUN_STARTED",
            "TOOL_CALL_START",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_START",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_ARGS",
            "TOOL_CALL_END",
            "TOOL_CALL_END",
            "RUN_FINISHED"
        ]
    );
    assert_eq!(
        (events[1]["toolCallId"].as_str(), events[1]["toolCallName"].as_str()),
        (Some("call_abc"), Some("get_weather"))
    );
    assert_eq!(
        (events[3]["toolCallId"].as_str(), events[3]["toolCallName"].as_str()),
        (Some("call_def"), Some("get_time"))
    );
    let args: String = events
        .iter()
        .filter(|e| e["type"] == "TOOL_CALL_ARGS" && e["toolCallId"] == "call_abc")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({ "city": "Paris" }));
}

#[tokio::test]
async fn errors_become_run_error() {
    let unauthorized = r#"{"error":{"message":"Incorrect API key provided: sk-test.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
    let (url, _) = model_server(401, "application/json", unauthorized.into()).await;
    let env1 = env(url).await;
    let events = run(&env1, "hi").await;
    assert_eq!(types(&events), ["RUN_STARTED", "RUN_ERROR"]);
    assert_eq!(events[1]["code"], "agent_error");
    assert!(events[1]["message"].as_str().unwrap().contains("Incorrect API key"), "{}", events[1]);

    let (url, _) = model_server(200, "text/event-stream", fixture("midstream_error.sse")).await;
    let env2 = env(url).await;
    let events = run(&env2, "hi").await;
    assert_eq!(
        types(&events),
        ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_ERROR"]
    );
    assert!(events[4]["message"].as_str().unwrap().contains("server had an error"));

    // Nobody listening at all.
    let env3 = env("http://127.0.0.1:9/v1".into()).await;
    let events = run(&env3, "hi").await;
    assert_eq!(types(&events), ["RUN_STARTED", "RUN_ERROR"]);
}
