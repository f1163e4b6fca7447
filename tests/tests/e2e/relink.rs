//! The gateway's bus link: relinking after the bus restarts, with no gap.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::*;

#[tokio::test]
async fn bus_restart_under_a_subscribed_client_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut bus = BusServer::embedded(dir.path().to_owned()).await;
    let gw = GatewayServer::start(&bus.url()).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.subscribe("missions").await;
    let mut client = bus_client(&bus.url()).await;
    for i in 1..=3 {
        publish(&mut client, "missions", "e", json!(i)).await;
    }
    for i in 1..=3u64 {
        assert_eq!(ws.expect("event").await["offset"], i);
    }

    bus.restart().await;
    // Published before the gateway has relinked: only the resubscription
    // from its last position can deliver these.
    let mut client = bus_client(&bus.url()).await;
    for i in 4..=6 {
        publish(&mut client, "missions", "e", json!(i)).await;
    }
    gw.wait_ready().await;
    publish(&mut client, "missions", "e", json!(7)).await;
    for i in 4..=7u64 {
        let ev = ws.expect("event").await;
        assert_eq!(ev["offset"], i, "no gap and no duplicate across the relink: {ev}");
        assert_eq!(ev["data"], json!(i));
    }
    // New subscribes work on the new link.
    let mut other = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    other.subscribe("missions").await;
}

#[tokio::test]
async fn a_bus_that_lost_its_history_closes_listeners_with_4004() {
    let mut bus = BusServer::memory().await;
    let gw = GatewayServer::start(&bus.url()).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.subscribe("missions").await;
    let mut client = bus_client(&bus.url()).await;
    publish(&mut client, "missions", "e", json!(1)).await;
    ws.expect("event").await;

    // A memory bus comes back with a new epoch: positions cannot be resumed.
    bus.restart().await;
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4004));
    let bye = frames.last().unwrap();
    assert_eq!(bye["type"], "disconnect");
    assert_eq!(bye["reconnect"], true);
}

#[tokio::test]
async fn readiness_follows_the_bus_link() {
    let mut bus = BusServer::memory().await;
    let gw = GatewayServer::start(&bus.url()).await;
    bus.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http(gw.addr, "GET", "/ready", None, None).await.unwrap();
        if status == 503 {
            assert_eq!(body["ready"], false);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never became unready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.send(json!({ "type": "subscribe", "channel": "missions", "id": 1 })).await;
    let err = ws.expect("error").await;
    assert_eq!(err["code"], "unavailable");
    assert_eq!(err["id"], 1);
    let (status, _) = http(gw.addr, "GET", "/health", None, None).await.unwrap();
    assert_eq!(status, 200, "liveness does not depend on the bus");
}
