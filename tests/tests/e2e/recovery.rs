//! Recovery with `since` (SPEC §6): full replay or `recovered: false`, never partial.

use serde_json::json;
use switchboard_tests::*;

async fn published(stack: &Stack, channel: &str, n: u64) -> String {
    let mut client = stack.client().await;
    let mut epoch = String::new();
    for i in 1..=n {
        epoch = publish(&mut client, channel, "tick", json!({ "i": i })).await.epoch;
    }
    epoch
}

async fn recovers_the_gap(with_live_listener: bool) {
    let stack = Stack::start().await;
    // With another listener, the node is already on the channel: the hub's
    // active path; without, the join and the history read race.
    let mut other = stack.ws().await;
    if with_live_listener {
        other.subscribe("missions").await;
    }
    let epoch = published(&stack, "missions", 5).await;
    let mut ws = stack.ws().await;
    ws.send(json!({ "type": "subscribe", "channel": "missions", "since": { "offset": 2, "epoch": epoch }, "id": "r" }))
        .await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["missed"], 3);
    assert_eq!(sub["id"], "r");
    assert_eq!(sub["position"]["offset"], 5);
    for i in 3..=5u64 {
        assert_eq!(ws.expect("event").await["offset"], i);
    }
    let mut client = stack.client().await;
    publish(&mut client, "missions", "tick", json!({ "i": 6 })).await;
    assert_eq!(ws.expect("event").await["offset"], 6, "live events follow the replay, without duplicates");
}

#[tokio::test]
async fn recovers_a_gap_when_the_node_is_new_to_the_channel() {
    recovers_the_gap(false).await;
}

#[tokio::test]
async fn recovers_a_gap_when_the_node_already_listens() {
    recovers_the_gap(true).await;
}

#[tokio::test]
async fn a_wrong_epoch_is_not_recovered() {
    let stack = Stack::start().await;
    published(&stack, "missions", 3).await;
    let mut ws = stack.ws().await;
    ws.send(json!({ "type": "subscribe", "channel": "missions", "since": { "offset": 1, "epoch": "not-the-epoch" } }))
        .await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["recovered"], false);
    assert_eq!(sub["missed"], 0);
    assert_eq!(sub["position"]["offset"], 3, "the current position, to start over from");
    let mut client = stack.client().await;
    publish(&mut client, "missions", "tick", json!({})).await;
    assert_eq!(ws.expect("event").await["offset"], 4, "no partial replay came before the live event");
}

#[tokio::test]
async fn trimmed_history_is_not_recovered_partially() {
    let mut config = eventbus::Config::memory();
    config.namespaces.insert("short".into(), eventbus::HistoryPolicy { size: 3, ..Default::default() });
    let bus = BusServer::start(config).await;
    let gw = GatewayServer::start(&bus.url()).await;
    let mut client = bus_client(&bus.url()).await;
    let mut epoch = String::new();
    for i in 0..10 {
        epoch = publish(&mut client, "short:x", "e", json!(i)).await.epoch;
    }
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "subscribe", "channel": "short:x", "since": { "offset": 2, "epoch": epoch.clone() } }))
        .await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["recovered"], false, "events 3..7 were trimmed");
    assert_eq!(sub["position"]["offset"], 10);

    // Within the window it recovers.
    let mut ws2 = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws2.send(json!({ "type": "subscribe", "channel": "short:x", "since": { "offset": 8, "epoch": epoch } })).await;
    let sub = ws2.expect("subscribed").await;
    assert_eq!(sub["recovered"], true);
    assert_eq!(ws2.expect("event").await["offset"], 9);
    assert_eq!(ws2.expect("event").await["offset"], 10);
}

#[tokio::test]
async fn since_query_parameter_recovers_on_open() {
    let stack = Stack::start().await;
    let epoch = published(&stack, "task:9", 4).await;
    let url = stack.gateway.ws_url(&format!("/ws/tasks/9?since=1:{epoch}"));
    let mut ws = Ws::connect(&url).await.unwrap();
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["recovered"], true);
    assert_eq!(sub["missed"], 3);
    for i in 2..=4u64 {
        assert_eq!(ws.expect("event").await["offset"], i);
    }
}

#[tokio::test]
async fn recovery_beyond_the_replay_limit_is_refused() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.recovery_max = 5).await;
    let mut client = bus_client(&bus.url()).await;
    let mut epoch = String::new();
    for i in 0..20 {
        epoch = publish(&mut client, "missions", "e", json!(i)).await.epoch;
    }
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "subscribe", "channel": "missions", "since": { "offset": 1, "epoch": epoch } })).await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["recovered"], false);
    assert_eq!(sub["position"]["offset"], 20);
}
