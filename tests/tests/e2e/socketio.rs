//! Bad input on the Socket.IO endpoint (SPEC §3.6, §9), at the level of
//! Engine.IO and Socket.IO packets: a raw WebSocket speaks them, so that
//! what no well-behaved client sends can be sent. The flows of real clients
//! are in `tests/socketio/` (the official socket.io-client).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_tests::*;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// An Engine.IO connection over a WebSocket, its open packet read.
async fn engine(stack: &Stack) -> Socket {
    let url = stack.gateway.ws_url("/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = connect_async(url).await.unwrap();
    let open = text(&mut ws).await.expect("an open packet");
    assert!(open.starts_with("0{"), "{open}");
    let open: Value = serde_json::from_str(&open[1..]).unwrap();
    assert_eq!(open["pingInterval"], 30_000);
    ws
}

/// Connected to `/ws`: its connect packet and our `connected` event read.
async fn connected(stack: &Stack) -> Socket {
    let mut ws = engine(stack).await;
    send(&mut ws, "40/ws,").await;
    let ok = text(&mut ws).await.unwrap();
    assert!(ok.starts_with("40/ws,{\"sid\":"), "{ok}");
    let (name, arg) = event(&mut ws).await;
    assert_eq!(name, "connected");
    assert_eq!(arg.get("type"), None);
    ws
}

async fn send(ws: &mut Socket, text: &str) {
    ws.send(Message::Text(text.to_owned().into())).await.unwrap();
}

/// The next text message, skipping Engine.IO pings; `None` once closed.
async fn text(ws: &mut Socket) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message in time")? {
            Ok(Message::Text(t)) if t.as_str() == "2" => continue,
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// The next event of `/ws`: its name and argument.
async fn event(ws: &mut Socket) -> (String, Value) {
    let t = text(ws).await.expect("an event");
    let body = t.strip_prefix("42/ws,").unwrap_or_else(|| panic!("not an event of /ws: {t}"));
    let v: Value = serde_json::from_str(body).unwrap();
    (v[0].as_str().unwrap().to_owned(), v[1].clone())
}

/// Reads until the close frame; returns its code and the events before it.
async fn close(ws: &mut Socket) -> (Option<u16>, Vec<String>) {
    let mut before = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(c))) => return (c.map(|c| u16::from(c.code)), before),
            Some(Ok(Message::Text(t))) => before.push(t.to_string()),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return (None, before),
        }
    }
}

#[tokio::test]
async fn malformed_packets_and_unknown_events_get_named_errors_and_the_connection_stays() {
    let stack = Stack::start().await;
    let mut ws = connected(&stack).await;
    let cases = [
        ("42/ws,{\"not\":\"an array\"}", "invalid_frame"),
        ("42/ws,[not json", "invalid_frame"),
        ("42/ws,[5]", "invalid_frame"),
        ("42/ws,[\"teleport\",{}]", "unknown_type"),
        ("42/ws,[\"subscribe\",{\"channel\":7}]", "invalid_frame"),
        ("42/ws,[\"subscribe\",[1,2]]", "invalid_frame"),
        ("42/ws,[\"subscribe\",{\"channel\":\"no spaces allowed\"}]", "invalid_channel"),
        ("47/ws,[]", "invalid_frame"),
    ];
    for (packet, code) in cases {
        send(&mut ws, packet).await;
        let (name, arg) = event(&mut ws).await;
        assert_eq!((name.as_str(), arg["code"].as_str()), ("error", Some(code)), "for {packet}: {arg}");
        assert!(!arg["message"].as_str().unwrap().is_empty());
    }
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let (name, arg) = event(&mut ws).await;
    assert_eq!((name.as_str(), &arg["code"]), ("error", &Value::from("binary_not_supported")));
    // Still usable, and an ack id gets the reply as an ack.
    send(&mut ws, "42/ws,3[\"subscribe\",{\"channel\":\"missions\"}]").await;
    let ack = text(&mut ws).await.unwrap();
    let reply: Value = serde_json::from_str(ack.strip_prefix("43/ws,3").expect("an ack")).unwrap();
    assert_eq!(reply[0]["channel"], "missions");
    assert_eq!(reply[0].get("type"), None);
}

#[tokio::test]
async fn protocol_errors_past_the_budget_close_with_4501() {
    let stack = Stack::start().await;
    let mut ws = connected(&stack).await;
    for _ in 0..10 {
        send(&mut ws, "42/ws,oops").await;
    }
    let (code, before) = close(&mut ws).await;
    assert_eq!(code, Some(4501));
    let farewell = before.iter().find(|t| t.starts_with("42/ws,[\"disconnect_reason\"")).expect("a farewell");
    let v: Value = serde_json::from_str(&farewell[6..]).unwrap();
    assert_eq!((v[1]["code"].as_u64(), v[1]["reconnect"].as_bool()), (Some(4501), Some(false)));
    // No reconnect: Socket.IO's own disconnect packet follows it.
    assert!(before.iter().any(|t| t == "41/ws,"), "{before:?}");
}

#[tokio::test]
async fn an_unknown_namespace_gets_a_connect_error_and_events_before_a_connect_are_dropped() {
    let stack = Stack::start().await;
    let mut ws = engine(&stack).await;
    send(&mut ws, "42/ws,[\"subscribe\",{\"channel\":\"missions\"}]").await;
    send(&mut ws, "40/admin,").await;
    let refused = text(&mut ws).await.unwrap();
    let error: Value = serde_json::from_str(refused.strip_prefix("44/admin,").expect("a connect error")).unwrap();
    assert_eq!(error["message"], "Invalid namespace");
    // The engine stays open for a namespace we serve.
    send(&mut ws, "40").await;
    assert!(text(&mut ws).await.unwrap().starts_with("40{\"sid\":"));
    let connected = text(&mut ws).await.unwrap();
    assert!(connected.starts_with("42[\"connected\","), "{connected}");
    // A second namespace on the same connection is refused.
    send(&mut ws, "40/ws,").await;
    assert!(text(&mut ws).await.unwrap().starts_with("44/ws,"));
}

#[tokio::test]
async fn an_unknown_engine_packet_closes_with_1002() {
    let stack = Stack::start().await;
    let mut ws = connected(&stack).await;
    send(&mut ws, "9nonsense").await;
    assert_eq!(close(&mut ws).await.0, Some(1002));
}

#[tokio::test]
async fn bad_handshakes_are_refused_over_http() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let (status, body) = http(addr, "GET", "/socket.io/?EIO=3&transport=polling", None, None).await.unwrap();
    assert_eq!((status, body["code"].as_u64()), (400, Some(5)));
    let (status, body) = http(addr, "GET", "/socket.io/?EIO=4&transport=carrier-pigeon", None, None).await.unwrap();
    assert_eq!((status, body["code"].as_u64()), (400, Some(0)));
    let (status, body) = http(addr, "GET", "/socket.io/?EIO=4&transport=polling&sid=nope", None, None).await.unwrap();
    assert_eq!((status, body["code"].as_u64()), (400, Some(1)));
}

#[tokio::test]
async fn a_socketio_connection_counts_as_a_connection() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let count = || async move {
        let (_, stats) = http(addr, "GET", "/api/ws/stats", Some(ADMIN_KEY), None).await.unwrap();
        stats["total_connections"].as_u64().unwrap()
    };
    assert_eq!(count().await, 0);
    let mut ws = connected(&stack).await;
    assert_eq!(count().await, 1);
    send(&mut ws, "41/ws,").await;
    assert_eq!(close(&mut ws).await.0, Some(1000));
    assert_eq!(count().await, 0);
}
