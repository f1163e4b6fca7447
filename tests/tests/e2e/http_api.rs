//! The HTTP API (SPEC §4).

use serde_json::json;
use switchboard_tests::*;

#[tokio::test]
async fn admin_endpoints_need_the_key() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    for (method, path) in [
        ("GET", "/api/ws/stats"),
        ("GET", "/api/v1/websocket/status"),
        ("GET", "/api/ws/channels/missions"),
        ("GET", "/api/ws/channels/missions/history"),
        ("POST", "/api/ws/broadcast"),
        ("POST", "/api/ws/broadcast/all"),
        ("POST", "/api/ws/users/alice/send"),
        ("POST", "/api/ws/connections/00000000-0000-0000-0000-000000000000/disconnect"),
    ] {
        for key in [None, Some("wrong-key")] {
            let (status, body) = http(addr, method, path, key, Some("{}")).await.unwrap();
            assert_eq!(status, 401, "{method} {path} with {key:?}");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    // The key is checked before the body is read: a body announced over the
    // limit gets 401 without the key (413 is for those who hold it).
    let announce = |key: Option<&str>| {
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        format!(
            "POST /api/ws/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n{auth}Connection: close\r\n\r\n"
        )
    };
    for (key, expected) in [(None, "401"), (Some(ADMIN_KEY), "413")] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(announce(key).as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head[9..12], expected.as_bytes(), "an oversized body with key {key:?}");
    }
    let (status, info) = http(addr, "GET", "/api/ws/info", None, None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(info["limits"]["max_message_bytes"], 65536);
    // Every transport a client may pick is listed.
    assert_eq!((&info["endpoints"]["sse"], &info["endpoints"]["socketio"]), (&json!("/sse"), &json!("/socket.io/")));
    assert_eq!(info["endpoints"]["console"], "/");
}

#[tokio::test]
async fn stats_channels_and_history() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let mut a = stack.ws().await;
    let mut b = stack.ws().await;
    a.subscribe("missions").await;
    b.subscribe("missions").await;
    b.subscribe("task:1").await;
    let (status, stats) = http(addr, "GET", "/api/ws/stats", Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(stats["total_connections"], 2);
    assert_eq!(stats["total_channels"], 2);
    assert_eq!(stats["channels"]["missions"], 2);
    assert_eq!(stats["channels"]["task:1"], 1);
    let (_, status_v1) = http(addr, "GET", "/api/v1/websocket/status", Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status_v1["total_connections"], 2);

    let (_, ch) = http(addr, "GET", "/api/ws/channels/missions", Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(ch["subscribers"], 2);
    let ids = ch["connection_ids"].as_array().unwrap();
    assert!(ids.contains(&a.connected["connection_id"]));

    let mut client = stack.client().await;
    for i in 1..=3 {
        publish(&mut client, "missions", "e", json!({ "i": i })).await;
    }
    let (status, h) =
        http(addr, "GET", "/api/ws/channels/missions/history?since=1&limit=10", Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200, "{h}");
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["offset"], 2);
    assert_eq!(events[0]["data"]["i"], 2);
    assert_eq!(h["position"]["offset"], 3);
}

#[tokio::test]
async fn bad_bodies_get_json_errors() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let (status, body) = http(addr, "POST", "/api/ws/broadcast", Some(ADMIN_KEY), Some("{oops")).await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_json");
    let (status, body) =
        http(addr, "POST", "/api/ws/broadcast", Some(ADMIN_KEY), Some(r#"{"type":"x"}"#)).await.unwrap();
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("channel"));
    let (status, body) =
        http(addr, "POST", "/api/ws/broadcast", Some(ADMIN_KEY), Some(r#"{"channel":"no spaces","type":"x"}"#))
            .await
            .unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_channel");
}

#[tokio::test]
async fn broadcast_aliases_and_user_send() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let mut ws = stack.ws().await;
    ws.subscribe("tasks").await;
    let body = r#"{"channel":"tasks","event":"task_created","data":{"id":3}}"#;
    let (status, _) = http(addr, "POST", "/api/ws/broadcast", Some(ADMIN_KEY), Some(body)).await.unwrap();
    assert_eq!(status, 200);
    let ev = ws.expect("event").await;
    assert_eq!((ev["event"].as_str(), &ev["data"]), (Some("task_created"), &json!({ "id": 3 })));

    let (status, sent) =
        http(addr, "POST", "/api/ws/users/alice/send", Some(ADMIN_KEY), Some(r#"{"type":"note","data":{"x":1}}"#))
            .await
            .unwrap();
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["channel"], "user#alice");
    let mut client = stack.client().await;
    let h = client
        .history(pb::HistoryRequest { channel: "user#alice".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.events.len(), 1);
    assert_eq!(h.events[0].event, "note");
}

#[tokio::test]
async fn admin_disconnect_closes_with_4503() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    let id = ws.connected["connection_id"].as_str().unwrap().to_owned();
    let path = format!("/api/ws/connections/{id}/disconnect");
    let (status, _) = http(stack.gateway.addr, "POST", &path, Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200);
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4503));
    assert_eq!(frames.last().unwrap()["reconnect"], false);
    let (status, _) = http(stack.gateway.addr, "POST", &path, Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let stack = Stack::start().await;
    let addr = stack.gateway.addr;
    let mut ws = stack.ws().await;
    ws.subscribe("missions").await;
    let mut client = stack.client().await;
    publish(&mut client, "missions", "e", json!(1)).await;
    ws.expect("event").await;
    assert_eq!(http(addr, "GET", "/health", None, None).await.unwrap().0, 200);
    let (status, ready) = http(addr, "GET", "/ready", None, None).await.unwrap();
    assert_eq!((status, &ready["ready"]), (200, &json!(true)));
    let (status, metrics) = http(addr, "GET", "/metrics", None, None).await.unwrap();
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    for name in [
        "switchboard_connections 1",
        "switchboard_connections_accepted_total 1",
        "switchboard_subscriptions 1",
        "switchboard_channels 1",
        "switchboard_messages_sent_total 1",
        "switchboard_messages_received_total 1",
        "switchboard_broadcast_duration_seconds_count",
        "switchboard_publish_duration_seconds_count",
        "switchboard_bus_lag_seconds",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}
