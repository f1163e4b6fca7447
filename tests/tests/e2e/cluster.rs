//! Several bus nodes and gateways on a shared Redis or NATS JetStream (SPEC
//! §10), through the real binary: events published on any node reach every
//! gateway in order with gap-free offsets; history, recovery and
//! idempotency across nodes; a gateway failing over when its bus node is
//! killed; and a backend that loses a channel, loses writes, or restarts
//! under subscribed clients.
//!
//! They use the Redis at `SWITCHBOARD_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and the NATS at `SWITCHBOARD_TEST_NATS_URL`
//! (default `nats://127.0.0.1:4222`; `.ci/run` starts both when they do not
//! run), each on channels of its own, and start their own `redis-server` or
//! `nats-server` when they restart it.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard_tests::*;

use crate::cli::Process;

pub(crate) fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A channel name no other test or run uses.
pub(crate) fn unique(namespace: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{namespace}:{:x}{:x}", nanos, std::process::id())
}

fn nats_url() -> String {
    std::env::var("SWITCHBOARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A shared backend, by URL.
#[derive(Clone, Copy)]
enum Backend {
    Redis,
    Nats,
}

fn bus_node_on(backend: Backend, url: &str) -> Process {
    let (name, key) = match backend {
        Backend::Redis => ("redis", "SWITCHBOARD_EVENTBUS__REDIS_URL"),
        Backend::Nats => ("nats", "SWITCHBOARD_EVENTBUS__NATS_URL"),
    };
    Process::start_with(
        &["eventbus", "--eventbus-listen", "127.0.0.1:0", "--backend", name],
        &[(key, url), ("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY)],
    )
}

fn gateway_node(buses: &[&Process]) -> Process {
    let urls: Vec<&str> = buses.iter().map(|b| b.grpc.as_str()).collect();
    Process::start_with(
        &["gateway", "--gateway-listen", "127.0.0.1:0"],
        &[
            ("SWITCHBOARD_GATEWAY__EVENTBUS_URL", &urls.join(",")),
            ("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY),
            ("SWITCHBOARD_AUTH__HS256_SECRET", "a-secret-of-at-least-32-characters-0"),
            ("SWITCHBOARD_AUTH__ANONYMOUS", "true"),
        ],
    )
}

async fn bus_of(bus: &Process) -> BusClient {
    bus_client_with_key(&bus.grpc, Some(ADMIN_KEY)).await
}

async fn client_of(gateway: &Process) -> Ws {
    Ws::connect(gateway.ws.as_deref().unwrap()).await.unwrap()
}

/// Reads `n` event frames and returns them; anything else fails.
async fn events(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(ws.expect("event").await);
    }
    out
}

fn offsets(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["offset"].as_u64().unwrap()).collect()
}

async fn publish_keyed(bus: &mut BusClient, channel: &str, key: &str) -> pb::PublishResponse {
    let request = pb::PublishRequest {
        channel: channel.into(),
        event: "keyed".into(),
        data: b"{}".to_vec().into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    bus.publish(request).await.unwrap().into_inner()
}

#[tokio::test]
async fn redis_nodes_share_channels_history_recovery_and_idempotency() {
    nodes_share_channels_history_recovery_and_idempotency(Backend::Redis, &redis_url()).await;
}

#[tokio::test]
async fn nats_nodes_share_channels_history_recovery_and_idempotency() {
    nodes_share_channels_history_recovery_and_idempotency(Backend::Nats, &nats_url()).await;
}

async fn nodes_share_channels_history_recovery_and_idempotency(backend: Backend, url: &str) {
    let channel = unique("task");
    let (mut a, b) = (bus_node_on(backend, url), bus_node_on(backend, url));
    let g1 = gateway_node(&[&a, &b]);
    let g2 = gateway_node(&[&b, &a]);
    let (mut c1, mut c2) = (client_of(&g1).await, client_of(&g2).await);
    c1.subscribe(&channel).await;
    c2.subscribe(&channel).await;

    // Published alternately through both nodes: one order, one epoch, no gap.
    let (mut pa, mut pb) = (bus_of(&a).await, bus_of(&b).await);
    for i in 0..40 {
        let bus = if i % 2 == 0 { &mut pa } else { &mut pb };
        let ack = publish(bus, &channel, "tick", json!({ "i": i })).await;
        assert_eq!(ack.offset, i + 1, "{ack:?}");
    }
    let mut epoch = None;
    for ws in [&mut c1, &mut c2] {
        let got = events(ws, 40).await;
        assert_eq!(offsets(&got), (1..=40).collect::<Vec<_>>());
        assert!(got.iter().enumerate().all(|(i, e)| e["data"]["i"] == i as u64));
        let epochs: std::collections::BTreeSet<_> =
            got.iter().map(|e| e["epoch"].as_str().unwrap().to_owned()).collect();
        assert_eq!(epochs.len(), 1, "{epochs:?}");
        epoch = epochs.into_iter().next();
    }
    let epoch = epoch.unwrap();

    // History from either node.
    for bus in [&mut pa, &mut pb] {
        let request = pb::HistoryRequest { channel: channel.clone(), limit: 100, ..Default::default() };
        let history = bus.history(request).await.unwrap().into_inner();
        assert_eq!(history.events.iter().map(|e| e.offset).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
        assert_eq!(history.position.unwrap(), pb::StreamPosition { offset: 40, epoch: epoch.clone() });
        let newest = pb::HistoryRequest { channel: channel.clone(), limit: 3, reverse: true, ..Default::default() };
        let newest = bus.history(newest).await.unwrap().into_inner();
        assert_eq!(newest.events.iter().map(|e| e.offset).collect::<Vec<_>>(), [40, 39, 38]);
        let listed = bus.channels(pb::ChannelsRequest { prefix: channel.clone() }).await.unwrap().into_inner();
        let listed: Vec<_> =
            listed.channels.iter().map(|c| (c.channel.as_str(), c.position.clone().unwrap().offset)).collect();
        assert_eq!(listed, [(channel.as_str(), 40)]);
    }

    // Recovery on the other gateway.
    let mut c3 = client_of(&g2).await;
    c3.send(json!({"type": "subscribe", "channel": channel, "since": {"offset": 25, "epoch": epoch}})).await;
    let subscribed = c3.expect("subscribed").await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    assert_eq!(offsets(&events(&mut c3, 15).await), (26..=40).collect::<Vec<_>>());

    // An idempotency key is known to every node.
    let first = publish_keyed(&mut pa, &channel, "order-7").await;
    let again = publish_keyed(&mut pb, &channel, "order-7").await;
    assert_eq!((first.offset, first.duplicate), (41, false));
    assert_eq!((again.offset, again.duplicate, again.event_id.as_str()), (41, true, first.event_id.as_str()));
    for ws in [&mut c1, &mut c2, &mut c3] {
        assert_eq!(offsets(&events(ws, 1).await), [41]);
    }

    // g1 is linked to `a`: killed, g1 fails over to `b` and its client sees no gap.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    for i in 0..5 {
        publish(&mut pb, &channel, "after", json!({ "i": i })).await;
    }
    for ws in [&mut c1, &mut c2] {
        assert_eq!(offsets(&events(ws, 5).await), (42..=46).collect::<Vec<_>>());
    }
}

/// One bus node on the shared Redis, one gateway, a client on a fresh
/// channel that has received its first three events.
struct One {
    /// The backend's URL.
    redis: String,
    channel: String,
    bus: Process,
    gateway: Process,
    ws: Ws,
    client: BusClient,
    /// The channel's epoch.
    epoch: String,
}

impl One {
    async fn with_three_events() -> One {
        One::on(Backend::Redis, redis_url()).await
    }

    async fn on(backend: Backend, redis: String) -> One {
        let channel = unique("task");
        let bus = bus_node_on(backend, &redis);
        let gateway = gateway_node(&[&bus]);
        let mut ws = client_of(&gateway).await;
        ws.subscribe(&channel).await;
        let mut client = bus_of(&bus).await;
        for i in 0..3 {
            publish(&mut client, &channel, "tick", json!(i)).await;
        }
        let epoch = events(&mut ws, 3).await[0]["epoch"].as_str().unwrap().to_owned();
        One { redis, channel, bus, gateway, ws, client, epoch }
    }
}

#[tokio::test]
async fn a_channel_lost_by_redis_closes_its_subscribers_with_4004() {
    let One { redis, channel, bus: _bus, gateway, mut ws, mut client, epoch } = One::with_three_events().await;

    // As if Redis were flushed: the channel starts again, in a new epoch.
    let deleted = Command::new("redis-cli")
        .args(["-u", &redis, "DEL", &format!("sb:{{{channel}}}:m"), &format!("sb:{{{channel}}}:s")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&deleted.stdout).trim(), "2");
    let ack = publish(&mut client, &channel, "tick", json!(3)).await;
    assert_ne!(ack.epoch, epoch);
    told_to_reload(&mut ws, &gateway, &channel, &epoch).await;
}

/// A client whose channel lost its history in `epoch` (after offset 3): it
/// is closed with `4004`, and coming back with its old position it is told
/// to reload its state. Returns that `subscribed` frame.
async fn told_to_reload(ws: &mut Ws, gateway: &Process, channel: &str, epoch: &str) -> Value {
    let (closed, _) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4004));
    let mut ws = client_of(gateway).await;
    ws.send(json!({"type": "subscribe", "channel": channel, "since": {"offset": 3, "epoch": epoch}})).await;
    let subscribed = ws.expect("subscribed").await;
    assert_eq!(subscribed["recovered"], false, "{subscribed}");
    subscribed
}

#[tokio::test]
async fn offsets_redis_forgot_are_not_given_again_in_the_same_epoch() {
    let One { redis, channel, bus: _bus, gateway: _gateway, mut ws, mut client, epoch } =
        One::with_three_events().await;

    // As if a failover lost the last two writes: Redis numbers the next event 2 again.
    let lose = "local first = redis.call('XRANGE', KEYS[2], '1-0', '1-1'); redis.call('DEL', KEYS[2]); \
                redis.call('XADD', KEYS[2], '1-1', 'e', first[1][2][2]); return redis.call('HSET', KEYS[1], 'top', 1)";
    let (meta, stream) = (format!("sb:{{{channel}}}:m"), format!("sb:{{{channel}}}:s"));
    let lost = Command::new("redis-cli").args(["-u", &redis, "EVAL", lose, "2", &meta, &stream]).output().unwrap();
    assert!(lost.status.success() && !String::from_utf8_lossy(&lost.stdout).contains("ERR"), "{lost:?}");
    let again = publish(&mut client, &channel, "tick", json!("again")).await;
    assert_eq!((again.offset, again.epoch.as_str()), (2, epoch.as_str()));
    // The node notices, starts a new epoch, and the client is told.
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4004), "{frames:?}");
    let next = publish(&mut client, &channel, "tick", json!("next")).await;
    assert_ne!(next.epoch, epoch);
}

/// A server process of a test's own, killed when dropped (also when the test fails).
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` of this test's own on `port`, keeping its data in `dir`.
fn redis_server(port: u16, dir: &std::path::Path) -> Server {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
        .args(["--appendfsync", "always", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

#[tokio::test]
async fn redis_restarts_under_subscribed_clients() {
    restarts_under_subscribed_clients(Backend::Redis, "redis", redis_server).await;
}

#[tokio::test]
async fn nats_restarts_under_subscribed_clients() {
    restarts_under_subscribed_clients(Backend::Nats, "nats", nats_server).await;
}

/// The backend's server of the test's own (`start`, on a port, keeping its
/// data in a directory) restarted under a subscribed client: with its data
/// the client goes on with no gap; empty, the client is told with `4004`.
async fn restarts_under_subscribed_clients(backend: Backend, scheme: &str, start: fn(u16, &std::path::Path) -> Server) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("{scheme}://127.0.0.1:{port}");
    let mut server = start(port, dir.path());
    let channel = unique("task");
    let bus = bus_node_on(backend, &url);
    let gateway = gateway_node(&[&bus]);
    let mut ws = client_of(&gateway).await;
    ws.subscribe(&channel).await;
    let mut client = bus_of(&bus).await;
    publish(&mut client, &channel, "tick", json!(1)).await;
    assert_eq!(offsets(&events(&mut ws, 1).await), [1]);

    // Restarted with its data: the client goes on, with no gap.
    drop(server);
    server = start(port, dir.path());
    let deadline = tokio::time::Instant::now() + WAIT;
    let ack = loop {
        let request = pb::PublishRequest {
            channel: channel.clone(),
            event: "tick".into(),
            data: b"2".to_vec().into(),
            idempotency_key: "after-restart".into(),
            ..Default::default()
        };
        match client.publish(request).await {
            Ok(ack) => break ack.into_inner(),
            Err(status) => assert!(tokio::time::Instant::now() < deadline, "publish after restart: {status}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ack.offset, 2);
    assert_eq!(offsets(&events(&mut ws, 1).await), [2]);

    // Restarted empty: the client is told it cannot go on.
    drop(server);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { std::fs::remove_dir_all(path).unwrap() } else { std::fs::remove_file(path).unwrap() }
    }
    server = start(port, dir.path());
    let (closed, _) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4004));
    drop(server);
}

// === NATS JetStream: the same failures as Redis's ===

/// The JetStream stream that holds `channel` (a name without `.` or `=`).
fn stream_of(channel: &str) -> String {
    format!("SB_{channel}")
}

async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
}

#[tokio::test]
async fn a_channel_lost_by_nats_closes_its_subscribers_with_4004() {
    let One { redis: url, channel, bus: _bus, gateway, mut ws, mut client, epoch } =
        One::on(Backend::Nats, nats_url()).await;

    // As if its stream were deleted: the channel starts again, in a new epoch.
    let js = jetstream(&url).await;
    assert!(js.delete_stream(stream_of(&channel)).await.unwrap().success);
    let ack = publish(&mut client, &channel, "tick", json!(3)).await;
    assert_eq!(ack.offset, 1);
    assert_ne!(ack.epoch, epoch);
    let subscribed = told_to_reload(&mut ws, &gateway, &channel, &epoch).await;
    assert_eq!(subscribed["position"]["epoch"].as_str(), Some(ack.epoch.as_str()), "{subscribed}");
}

#[tokio::test]
async fn offsets_nats_forgot_are_not_given_again_in_the_same_epoch() {
    let One { redis: url, channel, bus: _bus, gateway: _gateway, mut ws, mut client, epoch } =
        One::on(Backend::Nats, nats_url()).await;

    // As if NATS lost the last two writes in a crash: the same stream, in
    // the same epoch, holding only the first event.
    let js = jetstream(&url).await;
    let mut stream = js.get_stream(stream_of(&channel)).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    let first = stream.get_raw_message(1).await.unwrap();
    js.delete_stream(stream_of(&channel)).await.unwrap();
    js.create_stream(config.clone()).await.unwrap();
    js.publish(config.subjects[0].clone(), first.payload).await.unwrap().await.unwrap();

    // The node notices (from the republished first event, or from the next
    // publish, numbered 2 again), starts a new epoch, and the client is told.
    let again = publish(&mut client, &channel, "tick", json!("again")).await;
    assert!(again.offset == 2 || again.epoch != epoch, "{again:?}");
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4004), "{frames:?}");
    let next = publish(&mut client, &channel, "tick", json!("next")).await;
    assert_ne!(next.epoch, epoch);
}

/// A `nats-server` with JetStream of this test's own on `port`, keeping its data in `dir`.
pub(crate) fn nats_server(port: u16, dir: &std::path::Path) -> Server {
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server");
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}
