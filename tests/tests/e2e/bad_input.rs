//! Every row of SPEC §9 that needs no authentication, each with its answer.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn malformed_frames_get_named_errors() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    let cases = [
        ("{not json", "invalid_json"),
        ("[1,2]", "invalid_frame"),
        (r#"{"channel":"a"}"#, "invalid_frame"),
        (r#"{"type":7}"#, "invalid_frame"),
        (r#"{"type":"subscribe","channel":["a"]}"#, "invalid_frame"),
        (r#"{"type":"subscribe"}"#, "invalid_frame"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
    ];
    for (text, code) in cases {
        ws.send_text(text).await;
        let err = ws.expect("error").await;
        assert_eq!(err["code"], code, "for {text}: {err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    // The connection is still usable.
    ws.subscribe("missions").await;
}

#[tokio::test]
async fn wrong_field_types_name_the_field_and_echo_the_id() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.send(json!({ "type": "unsubscribe", "channel": 5, "id": "x1" })).await;
    let err = ws.expect("error").await;
    assert_eq!(err["code"], "invalid_frame");
    assert_eq!(err["id"], "x1");
    assert!(err["message"].as_str().unwrap().contains("channel"), "{err}");
}

#[tokio::test]
async fn binary_frames_are_refused() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.send_message(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ws.expect("error").await["code"], "binary_not_supported");
}

#[tokio::test]
async fn ten_protocol_errors_in_a_minute_close_4501() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    for _ in 0..10 {
        ws.send_text("nope").await;
    }
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4501));
    assert_eq!(frames.iter().filter(|f| f["type"] == "error").count(), 10);
    let bye = frames.last().unwrap();
    assert_eq!(bye["type"], "disconnect");
    assert_eq!(bye["code"], 4501);
    assert_eq!(bye["reconnect"], false);
}

#[tokio::test]
async fn oversized_text_frames_close_1009() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(70 * 1024));
    ws.send_text(&big).await;
    let (closed, _) = ws.closed().await;
    assert_eq!(closed, Closed::Code(1009));
}

#[tokio::test]
async fn invalid_channel_names() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    for bad in ["", "has space", "slash/y", &"a".repeat(256)] {
        ws.send(json!({ "type": "subscribe", "channel": bad })).await;
        assert_eq!(ws.expect("error").await["code"], "invalid_channel", "{bad:?}");
    }
    ws.subscribe(&"a".repeat(255)).await;
}

#[tokio::test]
async fn duplicate_and_missing_subscriptions() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.subscribe("missions").await;
    ws.send(json!({ "type": "subscribe", "channel": "missions" })).await;
    assert_eq!(ws.expect("error").await["code"], "already_subscribed");
    ws.send(json!({ "type": "unsubscribe", "channel": "tasks" })).await;
    assert_eq!(ws.expect("error").await["code"], "not_subscribed");
}

#[tokio::test]
async fn subscription_limit() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.max_subscriptions = 3).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    for i in 0..3 {
        ws.subscribe(&format!("task:{i}")).await;
    }
    ws.send(json!({ "type": "subscribe", "channel": "task:3" })).await;
    assert_eq!(ws.expect("error").await["code"], "limit_exceeded");
}

#[tokio::test]
async fn frame_rate_limit_then_4006() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.limits.rate_per_second = 5;
        c.limits.rate_burst = 5;
    })
    .await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    for i in 0..30 {
        ws.send(json!({ "type": "ping", "id": i })).await;
    }
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4006));
    assert!(frames.iter().filter(|f| f["type"] == "pong").count() >= 5);
    assert!(frames.iter().any(|f| f["code"] == "rate_limited"));
}

#[tokio::test]
async fn connection_limit_answers_503_before_the_upgrade() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.max_connections = 2).await;
    let _a = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let _b = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let err = Ws::connect(&gw.ws_url("/ws")).await.err().expect("third connection must be refused");
    assert!(format!("{err:#}").contains("503"), "{err:#}");
}

#[tokio::test]
async fn grpc_publish_validation_stores_nothing() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let cases = [
        ("missions", b"{not json".to_vec()),
        ("bad channel", b"{}".to_vec()),
        ("missions", format!(r#"{{"pad":"{}"}}"#, "x".repeat(1024 * 1024)).into_bytes()),
        ("missions", format!("{}{}", "[".repeat(65), "]".repeat(65)).into_bytes()),
    ];
    for (channel, data) in cases {
        let status = client
            .publish(pb::PublishRequest {
                channel: channel.into(),
                event: "e".into(),
                data: data.into(),
                ..Default::default()
            })
            .await
            .expect_err("must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let h = client
        .history(pb::HistoryRequest { channel: "missions".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(h.events.is_empty());
    assert_eq!(h.position.unwrap().offset, 0);
}

#[tokio::test]
async fn heartbeat_keeps_a_live_client_and_closes_a_silent_one_with_4003() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_timeout = Duration::from_millis(200);
    })
    .await;
    assert_eq!(Ws::connect(&gw.ws_url("/ws")).await.unwrap().connected["heartbeat"]["interval"], json!(0.2));
    let mut silent = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let mut live = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    // The live client answers pings (tungstenite does so while reading) and
    // sends frames; the silent one reads nothing for a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        live.send(json!({ "type": "pong" })).await;
        let _ = live.recv_within(Duration::from_millis(100)).await;
    }
    let (closed, frames) = silent.closed().await;
    assert_eq!(closed, Closed::Code(4003));
    assert!(frames.iter().any(|f| f["type"] == "ping"), "JSON pings are sent every interval");
    live.send(json!({ "type": "ping", "id": 1 })).await;
    assert_eq!(live.expect("pong").await["id"], 1);
}
