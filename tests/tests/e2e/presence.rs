//! Presence (SPEC §6): who is subscribed to a presence channel across
//! gateways and bus nodes, `join` and `leave` events that are not stored and
//! move no offset, entries sent again after a relink, and the entries of a
//! lost bus node expiring on Redis.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard_tests::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::{redis_url, unique};

/// A gateway named `node` on `bus_url` whose `room` namespace has presence.
async fn gateway_with_presence(bus_url: &str, node: &str) -> GatewayServer {
    GatewayServer::start_with(bus_url, |c| {
        c.node = node.to_owned();
        c.namespaces.insert("room".into(), gateway::Namespace { presence: true, ..Default::default() });
    })
    .await
}

fn id_of(ws: &Ws) -> String {
    ws.connected["connection_id"].as_str().unwrap().to_owned()
}

/// `GET /api/ws/channels/{channel}` on `gw`.
async fn channel_info(gw: &GatewayServer, channel: &str) -> Value {
    let (status, body) =
        http(gw.addr, "GET", &format!("/api/ws/channels/{channel}"), Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The `presence` list of a channel, as `(connection_id, node)` pairs sorted.
async fn listed(gw: &GatewayServer, channel: &str) -> Vec<(String, String)> {
    let info = channel_info(gw, channel).await;
    let mut entries: Vec<_> = info["presence"]
        .as_array()
        .unwrap_or_else(|| panic!("no presence list: {info}"))
        .iter()
        .map(|e| {
            assert_eq!(e["user_id"], Value::Null, "anonymous connections: {e}");
            (e["connection_id"].as_str().unwrap().to_owned(), e["node"].as_str().unwrap().to_owned())
        })
        .collect();
    entries.sort();
    entries
}

fn pairs(entries: &[(&Ws, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<_> = entries.iter().map(|(ws, node)| (id_of(ws), (*node).to_owned())).collect();
    out.sort();
    out
}

/// Reads the next frame and checks that it is the `change` event of
/// `connection` on `channel`, from `node`: offset 0, data `{connection_id, user_id, node}`.
async fn expect_presence(ws: &mut Ws, channel: &str, change: &str, connection: &str, node: &str) -> Value {
    let frame = ws.expect("event").await;
    assert_eq!(frame["channel"], channel, "{frame}");
    assert_eq!(frame["event"], change, "{frame}");
    assert_eq!(frame["offset"], 0, "not stored, so no offset: {frame}");
    assert_eq!(frame["data"], json!({ "connection_id": connection, "user_id": null, "node": node }), "{frame}");
    frame
}

/// Reads frames until the `change` event of `connection`, skipping only
/// other presence events (a subscriber's own join may or may not reach it
/// on a shared backend, whose feed of a new channel is still syncing).
async fn await_presence(ws: &mut Ws, change: &str, connection: &str) -> Value {
    loop {
        let frame = ws.expect("event").await;
        assert_eq!(frame["offset"], 0, "only presence events expected: {frame}");
        if frame["event"] == change && frame["data"]["connection_id"] == connection {
            return frame;
        }
        assert!(frame["event"] == "join" || frame["event"] == "leave", "{frame}");
    }
}

#[tokio::test]
async fn presence_lists_both_gateways_connections_and_announces_join_and_leave() {
    let bus = BusServer::memory().await;
    let (g1, g2) = (gateway_with_presence(&bus.url(), "g1").await, gateway_with_presence(&bus.url(), "g2").await);
    let channel = "room:lobby";
    let mut a = Ws::connect(&g1.ws_url("/ws")).await.unwrap();
    a.subscribe(channel).await;
    let a_id = id_of(&a);
    expect_presence(&mut a, channel, "join", &a_id, "g1").await;

    let mut b = Ws::connect(&g2.ws_url("/ws")).await.unwrap();
    b.subscribe(channel).await;
    let b_id = id_of(&b);
    expect_presence(&mut b, channel, "join", &b_id, "g2").await;
    expect_presence(&mut a, channel, "join", &b_id, "g2").await;

    // Either gateway lists both nodes' connections.
    let both = pairs(&[(&a, "g1"), (&b, "g2")]);
    assert_eq!(listed(&g1, channel).await, both);
    assert_eq!(listed(&g2, channel).await, both);
    // Beside the node's own subscribers.
    let info = channel_info(&g1, channel).await;
    assert_eq!(info["connection_ids"], json!([a_id]), "{info}");

    // A connection that goes leaves.
    drop(b);
    expect_presence(&mut a, channel, "leave", &b_id, "g2").await;
    assert_eq!(listed(&g2, channel).await, pairs(&[(&a, "g1")]));

    // So does one that unsubscribes.
    let mut c = Ws::connect(&g2.ws_url("/ws")).await.unwrap();
    let c_id = id_of(&c);
    c.subscribe(channel).await;
    expect_presence(&mut c, channel, "join", &c_id, "g2").await;
    expect_presence(&mut a, channel, "join", &c_id, "g2").await;
    c.send(json!({ "type": "unsubscribe", "channel": channel })).await;
    c.expect("unsubscribed").await;
    expect_presence(&mut a, channel, "leave", &c_id, "g2").await;
    assert_eq!(listed(&g1, channel).await, pairs(&[(&a, "g1")]));
}

#[tokio::test]
async fn join_and_leave_are_not_in_history_and_move_no_offset() {
    let bus = BusServer::memory().await;
    let gw = gateway_with_presence(&bus.url(), "g1").await;
    let mut client = bus_client(&bus.url()).await;
    let channel = "room:offsets";
    let mut a = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let a_id = id_of(&a);
    a.subscribe(channel).await;
    expect_presence(&mut a, channel, "join", &a_id, "g1").await;
    publish(&mut client, channel, "tick", json!(1)).await;
    assert_eq!(a.expect("event").await["offset"], 1);

    let mut b = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let b_id = id_of(&b);
    let subscribed = b.subscribe(channel).await;
    assert_eq!(subscribed["position"]["offset"], 1, "{subscribed}");
    expect_presence(&mut a, channel, "join", &b_id, "g1").await;
    expect_presence(&mut b, channel, "join", &b_id, "g1").await;
    drop(b);
    expect_presence(&mut a, channel, "leave", &b_id, "g1").await;

    // The next event continues the channel: no gap, no 4004.
    let ack = publish(&mut client, channel, "tick", json!(2)).await;
    assert_eq!(ack.offset, 2);
    let next = a.expect("event").await;
    assert_eq!((next["event"].clone(), next["offset"].clone()), (json!("tick"), json!(2)), "{next}");

    // Neither in the bus's history nor in the gateway's.
    let request = pb::HistoryRequest { channel: channel.into(), limit: 100, ..Default::default() };
    let history = client.history(request).await.unwrap().into_inner();
    let stored: Vec<_> = history.events.iter().map(|e| (e.event.as_str(), e.offset)).collect();
    assert_eq!(stored, [("tick", 1), ("tick", 2)]);
    let (status, body) =
        http(gw.addr, "GET", &format!("/api/ws/channels/{channel}/history"), Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let names: Vec<_> = body["events"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
    assert_eq!(names, [json!("tick"), json!("tick")], "{body}");

    // A client recovering from before the join gets the stored events only.
    let mut c = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let epoch = next["epoch"].clone();
    c.send(json!({ "type": "subscribe", "channel": channel, "since": { "offset": 0, "epoch": epoch } })).await;
    let subscribed = c.expect("subscribed").await;
    assert_eq!((subscribed["recovered"].clone(), subscribed["missed"].clone()), (json!(true), json!(2)));
    assert_eq!(c.expect("event").await["offset"], 1);
    assert_eq!(c.expect("event").await["offset"], 2);
}

#[tokio::test]
async fn a_namespace_without_presence_sends_no_join_or_leave_and_lists_nobody() {
    let bus = BusServer::memory().await;
    let gw = gateway_with_presence(&bus.url(), "g1").await;
    let (plain, room) = ("plain:x", "room:x");
    let mut a = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    a.subscribe(plain).await;
    a.subscribe(room).await;
    let a_id = id_of(&a);
    expect_presence(&mut a, room, "join", &a_id, "g1").await;

    // Subscribed to and left the plain channel, then joined the presence
    // one: the bus handles a stream's requests in order, so a join or leave
    // of the plain channel would reach `a` before this join.
    let mut b = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    b.subscribe(plain).await;
    b.send(json!({ "type": "unsubscribe", "channel": plain })).await;
    b.expect("unsubscribed").await;
    b.subscribe(room).await;
    expect_presence(&mut a, room, "join", &id_of(&b), "g1").await;

    let info = channel_info(&gw, plain).await;
    assert!(info.get("presence").is_none(), "{info}");
    let mut client = bus_client(&bus.url()).await;
    let listed = client.presence(pb::PresenceRequest { channel: plain.into() }).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    let listed = client.presence(pb::PresenceRequest { channel: room.into() }).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 2, "{listed:?}");
}

#[tokio::test]
async fn presence_entries_are_sent_again_after_a_relink() {
    let dir = tempfile::tempdir().unwrap();
    let mut bus = BusServer::embedded(dir.path().to_owned()).await;
    let gw = gateway_with_presence(&bus.url(), "g1").await;
    let channel = "room:relink";
    let mut a = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    a.subscribe(channel).await;
    let a_id = id_of(&a);
    expect_presence(&mut a, channel, "join", &a_id, "g1").await;
    assert_eq!(listed(&gw, channel).await, pairs(&[(&a, "g1")]));

    // The restarted bus knows nothing of `a` until the gateway tells it again.
    bus.restart().await;
    let mut client = bus_client(&bus.url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = client.presence(pb::PresenceRequest { channel: channel.into() }).await.unwrap().into_inner();
        if listed.entries.len() == 1 {
            assert_eq!(listed.entries[0].connection_id, id_of(&a));
            assert_eq!(listed.entries[0].node, "g1");
            break;
        }
        assert!(listed.entries.is_empty(), "{listed:?}");
        assert!(tokio::time::Instant::now() < deadline, "entries not sent again after the relink");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // To the restarted bus the entry is new: announced again, then the
    // connection goes on with the channel's events.
    expect_presence(&mut a, channel, "join", &a_id, "g1").await;
    publish(&mut client, channel, "tick", json!(1)).await;
    let frame = a.expect("event").await;
    assert_eq!((frame["event"].clone(), frame["offset"].clone()), (json!("tick"), json!(1)), "{frame}");
}

#[tokio::test]
async fn a_presence_request_for_an_invalid_channel_is_refused() {
    let bus = BusServer::memory().await;
    let gw = gateway_with_presence(&bus.url(), "g1").await;
    let mut client = bus_client(&bus.url()).await;
    for channel in ["", "room:bad name", &"r".repeat(256)] {
        let status = client.presence(pb::PresenceRequest { channel: channel.into() }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{channel:?}: {status}");
    }
    let (status, body) = http(gw.addr, "GET", "/api/ws/channels/room:bad%20name", Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_channel", "{body}");
}

/// A TCP proxy to `target`; cancelling the token closes its listener and
/// every connection through it, as if the node behind it lost the network.
async fn proxy(target: String) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = CancellationToken::new();
    let token = cut.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut inbound, _)) = accepted else { continue };
            let (target, token) = (target.clone(), token.clone());
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
    (addr.to_string(), cut)
}

/// A bus node on a shared backend whose presence entries live `ttl`.
async fn shared_bus(backend: eventbus::Backend, ttl: Duration) -> BusServer {
    BusServer::start(eventbus::Config {
        backend,
        presence_ttl: ttl,
        presence_refresh: ttl / 5,
        ..eventbus::Config::memory()
    })
    .await
}

#[tokio::test]
async fn presence_spans_bus_nodes_on_redis_and_a_lost_node_s_entries_expire() {
    let ttl = Duration::from_secs(2);
    let redis = redis_url();
    let (through, cut) = proxy(redis.trim_start_matches("redis://").trim_end_matches('/').to_owned()).await;
    let on = |url: String| eventbus::Backend::Redis { url };
    let (a, b) = (shared_bus(on(redis), ttl).await, shared_bus(on(format!("redis://{through}")), ttl).await);
    presence_spans_bus_nodes(a, b, cut, ttl).await;
}

#[tokio::test]
async fn presence_spans_bus_nodes_on_nats_and_a_lost_node_s_entries_expire() {
    // A nats-server of its own: the presence stream's TTL is the first node's.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _nats = crate::cluster::nats_server(port, dir.path());
    let ttl = Duration::from_secs(2);
    let (through, cut) = proxy(format!("127.0.0.1:{port}")).await;
    let on = |url: String| eventbus::Backend::Nats { url };
    let a = shared_bus(on(format!("nats://127.0.0.1:{port}")), ttl).await;
    let b = shared_bus(on(format!("nats://{through}")), ttl).await;
    presence_spans_bus_nodes(a, b, cut, ttl).await;
}

async fn presence_spans_bus_nodes(a: BusServer, b: BusServer, cut: CancellationToken, ttl: Duration) {
    let (ga, gb) = (gateway_with_presence(&a.url(), "ga").await, gateway_with_presence(&b.url(), "gb").await);
    let channel = unique("room");

    let mut s = Ws::connect(&ga.ws_url("/ws")).await.unwrap();
    s.subscribe(&channel).await;
    let s_since = tokio::time::Instant::now();
    // Joins and leaves on the other bus node reach it.
    let mut c = Ws::connect(&gb.ws_url("/ws")).await.unwrap();
    c.subscribe(&channel).await;
    let frame = await_presence(&mut s, "join", &id_of(&c)).await;
    assert_eq!(frame["data"]["node"], "gb", "{frame}");
    let mut d = Ws::connect(&gb.ws_url("/ws")).await.unwrap();
    d.subscribe(&channel).await;
    await_presence(&mut s, "join", &id_of(&d)).await;
    let d_id = id_of(&d);
    drop(d);
    await_presence(&mut s, "leave", &d_id).await;
    let both = pairs(&[(&s, "ga"), (&c, "gb")]);
    assert_eq!(listed(&ga, &channel).await, both);
    assert_eq!(listed(&gb, &channel).await, both);

    // Bus node `b` loses the backend: it can neither refresh nor remove its
    // entries, which the other node stops listing within the TTL.
    cut.cancel();
    let deadline = tokio::time::Instant::now() + ttl * 5;
    while listed(&ga, &channel).await != pairs(&[(&s, "ga")]) {
        assert!(tokio::time::Instant::now() < deadline, "the lost node's entries did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The live node's entry is refreshed: it outlives the TTL.
    while s_since.elapsed() < ttl * 2 {
        assert_eq!(listed(&ga, &channel).await, pairs(&[(&s, "ga")]), "a refreshed entry expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway process of the real binary on `bus`, configured by `config`.
fn gateway_process(bus: &crate::cli::Process, config: &std::path::Path) -> crate::cli::Process {
    crate::cli::Process::start_with(
        &["gateway", "--gateway-listen", "127.0.0.1:0", "--config", config.to_str().unwrap()],
        &[
            ("SWITCHBOARD_GATEWAY__EVENTBUS_URL", &bus.grpc),
            ("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY),
            ("SWITCHBOARD_AUTH__HS256_SECRET", "a-secret-of-at-least-32-characters-0"),
            ("SWITCHBOARD_AUTH__ANONYMOUS", "true"),
        ],
    )
}

#[tokio::test]
async fn a_killed_gateways_entries_are_dropped_with_leave_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "[namespaces.room]\npresence = true\n").unwrap();
    let bus = crate::cli::Process::start_with(
        &["eventbus", "--eventbus-listen", "127.0.0.1:0", "--backend", "memory"],
        &[("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY)],
    );
    let (survivor, mut doomed) = (gateway_process(&bus, &config), gateway_process(&bus, &config));
    let channel = unique("room");
    let mut watcher = Ws::connect(survivor.ws.as_deref().unwrap()).await.unwrap();
    watcher.subscribe(&channel).await;
    let mut victim = Ws::connect(doomed.ws.as_deref().unwrap()).await.unwrap();
    victim.subscribe(&channel).await;
    let victim_id = id_of(&victim);
    await_presence(&mut watcher, "join", &victim_id).await;

    // SIGKILL: its bus stream ends, and the bus drops what it owned.
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    await_presence(&mut watcher, "leave", &victim_id).await;
    let path = format!("/api/ws/channels/{channel}");
    let (status, info) = http(survivor.gateway_addr(), "GET", &path, Some(ADMIN_KEY), None).await.unwrap();
    assert_eq!(status, 200, "{info}");
    let listed: Vec<_> = info["presence"].as_array().unwrap().iter().map(|e| e["connection_id"].clone()).collect();
    assert_eq!(listed, [json!(id_of(&watcher))], "{info}");
}
