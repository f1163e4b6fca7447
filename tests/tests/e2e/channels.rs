//! Subscribing, receiving and unsubscribing, through every endpoint.

use serde_json::json;
use switchboard_tests::*;

#[tokio::test]
async fn subscribe_broadcast_unsubscribe() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    assert_eq!(ws.connected["limits"]["max_subscriptions"], 128);
    assert!(ws.connected["connection_id"].as_str().unwrap().len() == 36);

    ws.send(json!({ "type": "subscribe", "channel": "missions", "id": 1 })).await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["id"], 1);
    assert_eq!(sub["position"]["offset"], 0);
    assert!(sub["timestamp"].as_f64().unwrap() > 1.0e9);

    let body = r#"{"channel":"missions","type":"mission_updated","message":{"id":7,"status":"go"}}"#;
    let (status, resp) =
        http(stack.gateway.addr, "POST", "/api/ws/broadcast", Some(ADMIN_KEY), Some(body)).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["status"], "broadcasted");
    assert_eq!(resp["subscribers"], 1);
    assert_eq!(resp["offset"], 1);

    let ev = ws.expect("event").await;
    assert_eq!(ev["channel"], "missions");
    assert_eq!(ev["event"], "mission_updated");
    assert_eq!(ev["data"], json!({ "id": 7, "status": "go" }));
    assert_eq!(ev["offset"], 1);
    assert_eq!(ev["id"], resp["event_id"]);
    assert_eq!(ev["epoch"], sub["position"]["epoch"]);

    ws.send(json!({ "type": "unsubscribe", "channel": "missions", "id": "u" })).await;
    let unsub = ws.expect("unsubscribed").await;
    assert_eq!(unsub["reason"], "client");
    assert_eq!(unsub["id"], "u");

    let mut client = stack.client().await;
    publish(&mut client, "missions", "after", json!(1)).await;
    // A ping answered proves that no event was queued before it.
    ws.send(json!({ "type": "ping", "id": 9 })).await;
    let pong = ws.expect("pong").await;
    assert_eq!(pong["id"], 9);
}

#[tokio::test]
async fn grpc_events_arrive_in_offset_order() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.subscribe("task:7").await;
    let mut client = stack.client().await;
    for i in 1..=50 {
        publish(&mut client, "task:7", "progress", json!({ "pct": i })).await;
    }
    for i in 1..=50u64 {
        let ev = ws.expect("event").await;
        assert_eq!(ev["offset"], i);
        assert_eq!(ev["data"]["pct"], i);
    }
}

#[tokio::test]
async fn path_endpoints_subscribe_on_open() {
    let stack = Stack::start().await;
    let mut ws = Ws::connect(&stack.gateway.ws_url("/ws/channel/missions")).await.unwrap();
    assert_eq!(ws.expect("subscribed").await["channel"], "missions");
    let mut task = Ws::connect(&stack.gateway.ws_url("/ws/tasks/42")).await.unwrap();
    assert_eq!(task.expect("subscribed").await["channel"], "task:42");
    let mut plain = Ws::connect(&stack.gateway.ws_url("/ws")).await.unwrap();
    plain.subscribe("task:42").await;

    let mut client = stack.client().await;
    publish(&mut client, "task:42", "done", json!({ "ok": true })).await;
    assert_eq!(task.expect("event").await["event"], "done");
    assert_eq!(plain.expect("event").await["event"], "done");
    publish(&mut client, "missions", "m", json!(null)).await;
    assert_eq!(ws.expect("event").await["data"], json!(null));
}

#[tokio::test]
async fn one_bus_subscription_per_channel_per_node() {
    let stack = Stack::start().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = stack.ws().await;
        ws.subscribe("missions").await;
        clients.push(ws);
    }
    let mut bus = stack.client().await;
    let channels = bus.channels(pb::ChannelsRequest { prefix: "missions".into() }).await.unwrap().into_inner();
    assert_eq!(channels.channels.len(), 1);
    assert_eq!(channels.channels[0].subscribers, 1, "the node must hold one bus subscription, not one per client");

    publish(&mut bus, "missions", "e", json!({ "n": 1 })).await;
    for ws in &mut clients {
        assert_eq!(ws.expect("event").await["data"]["n"], 1);
    }

    // When the last listener leaves, the node leaves the channel on the bus.
    for ws in &mut clients {
        ws.send(json!({ "type": "unsubscribe", "channel": "missions" })).await;
        ws.expect("unsubscribed").await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = bus.channels(pb::ChannelsRequest { prefix: "missions".into() }).await.unwrap().into_inner();
        if c.channels[0].subscribers == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the node never left the channel");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn broadcast_all_reaches_every_connection() {
    let stack = Stack::start().await;
    let mut a = stack.ws().await;
    let mut b = stack.ws().await;
    b.subscribe("missions").await;
    let body = r#"{"type":"maintenance","data":{"in":"5m"}}"#;
    let (status, resp) =
        http(stack.gateway.addr, "POST", "/api/ws/broadcast/all", Some(ADMIN_KEY), Some(body)).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    for ws in [&mut a, &mut b] {
        let ev = ws.expect("event").await;
        assert_eq!(ev["channel"], "broadcast");
        assert_eq!(ev["event"], "maintenance");
        assert_eq!(ev["data"]["in"], "5m");
    }
}

#[tokio::test]
async fn client_publish_only_where_the_namespace_allows_it() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), open_chat).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.subscribe("chat:room1").await;
    ws.send(json!({ "type": "publish", "channel": "chat:room1", "event": "said", "data": { "text": "hi" }, "id": 5 }))
        .await;
    // The reply and the event may come in either order.
    let mut got = [ws.recv().await.unwrap(), ws.recv().await.unwrap()];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!(got[0]["type"], "event");
    assert_eq!(got[0]["data"]["text"], "hi");
    assert_eq!(got[1]["type"], "published");
    assert_eq!(got[1]["id"], 5);
    assert_eq!(got[1]["offset"], 1);

    ws.send(json!({ "type": "publish", "channel": "missions", "event": "forged", "data": {}, "id": 6 })).await;
    let err = ws.expect("error").await;
    assert_eq!(err["code"], "permission_denied");
    assert_eq!(err["id"], 6);
    let mut client = bus_client(&bus.url()).await;
    let h = client.history(pb::HistoryRequest { channel: "missions".into(), ..Default::default() }).await.unwrap();
    assert!(h.into_inner().events.is_empty(), "a refused publish must store nothing");
}

/// A connection's publishes are stored, delivered and answered in the order
/// it sent them, however many it has in flight (several runtime workers, so
/// that tasks could overtake each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connections_publishes_keep_their_order() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), open_chat).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.subscribe("chat:order").await;
    const N: u64 = 150;
    for i in 0..N {
        ws.send(json!({ "type": "publish", "channel": "chat:order", "event": "n", "data": { "i": i }, "id": i })).await;
    }
    let (mut events, mut replies) = (Vec::new(), Vec::new());
    while events.len() < N as usize || replies.len() < N as usize {
        let v = ws.recv().await.unwrap();
        match v["type"].as_str() {
            Some("event") => events.push((v["data"]["i"].as_u64().unwrap(), v["offset"].as_u64().unwrap())),
            Some("published") => replies.push((v["id"].as_u64().unwrap(), v["offset"].as_u64().unwrap())),
            _ => panic!("unexpected {v}"),
        }
    }
    let in_order: Vec<(u64, u64)> = (0..N).map(|i| (i, i + 1)).collect();
    assert_eq!(events, in_order, "events in the order published, offset i + 1 for the i-th");
    assert_eq!(replies, in_order, "replies in the order sent");
}

#[tokio::test]
async fn user_limited_channels_refuse_other_users() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.send(json!({ "type": "subscribe", "channel": "thread:1#alice" })).await;
    assert_eq!(ws.expect("error").await["code"], "permission_denied");
    ws.send(json!({ "type": "subscribe", "channel": "broadcast" })).await;
    assert_eq!(ws.expect("error").await["code"], "permission_denied");
}
