//! Frames of the clients our users already have (SPEC §3.5): `{method,
//! params}` without `type`, `module_control` and `heartbeat` frames, and
//! `gateway.default_channels`.

use serde_json::json;
use switchboard_tests::*;

#[tokio::test]
async fn aliased_frames_are_answered_like_their_originals() {
    let s = AgentStack::start(|_| {}, |g| g.default_channels = vec!["system".into()]).await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    // Subscribed without asking, so broadcasts on `system` arrive.
    assert_eq!(ws.expect("subscribed").await["channel"], "system");

    ws.send(json!({ "method": "get_status", "params": {}, "id": 1 })).await;
    let status = ws.expect("rpc_response").await;
    assert_eq!((&status["id"], &status["result"]["bridge"]), (&json!(1), &json!("ok")), "{status}");

    ws.send(json!({ "type": "module_control", "module": "vision", "enabled": true, "id": 2 })).await;
    let mut got = [ws.recv().await.unwrap(), ws.recv().await.unwrap()];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!((got[0]["channel"].as_str(), got[0]["event"].as_str()), (Some("system"), Some("module_status_changed")));
    assert_eq!((&got[1]["id"], &got[1]["result"]), (&json!(2), &json!({ "module": "vision", "enabled": true })));

    ws.send(json!({ "type": "heartbeat", "id": 3 })).await;
    assert_eq!(ws.expect("pong").await["id"], 3);
}

#[tokio::test]
async fn default_channels_respect_permissions() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |g| {
        g.default_channels = vec!["system".into(), "audit".into()];
        let ops = gateway::Namespace { subscribe: gateway::Access::Roles(vec!["ops".into()]), ..Default::default() };
        g.namespaces.insert("audit".into(), ops);
    })
    .await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    assert_eq!(ws.expect("subscribed").await["channel"], "system");
    // `audit` needs a role this anonymous connection lacks: skipped, without an error.
    ws.send(json!({ "type": "ping", "id": 1 })).await;
    assert_eq!(ws.expect("pong").await["id"], 1);
    let mut client = bus_client(&bus.url()).await;
    publish(&mut client, "audit", "login", json!({})).await;
    publish(&mut client, "system", "maintenance", json!({ "in": "5m" })).await;
    let event = ws.expect("event").await;
    assert_eq!((event["channel"].as_str(), event["event"].as_str()), (Some("system"), Some("maintenance")));
}
