//! `GET /sse` (SPEC §4): Server-Sent Events with the permissions, recovery,
//! queue and limits of a WebSocket connection, read by a raw HTTP/1.1 client.

use std::{future::poll_fn, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::{Result, anyhow};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_tests::*;

/// One SSE message.
#[derive(Debug)]
struct Msg {
    event: String,
    data: Value,
}

/// An SSE stream, read message by message.
struct Sse {
    status: u16,
    content_type: String,
    body: Option<Incoming>,
    buf: String,
    /// The first line of the body.
    first_line: Option<String>,
    /// The `id:` of the last message read.
    last_id: Option<String>,
}

/// What a stream carries.
enum Item {
    Msg(Msg),
    Comment,
    End,
}

impl Sse {
    /// `GET path`, with `Last-Event-ID` when given; returns once the headers are in.
    async fn open(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> Sse {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header("host", addr.to_string()).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = tokio::time::timeout(WAIT, sender.send_request(req.body(String::new()).unwrap()))
            .await
            .expect("headers in time")
            .unwrap();
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Sse {
            status: resp.status().as_u16(),
            content_type,
            body: Some(resp.into_body()),
            buf: String::new(),
            first_line: None,
            last_id: None,
        }
    }

    /// The next message (comments and `retry:` skipped), or `None` when the stream ended.
    async fn next(&mut self) -> Result<Option<Msg>> {
        loop {
            match self.read(WAIT).await? {
                Item::Msg(m) => return Ok(Some(m)),
                Item::Comment => continue,
                Item::End => return Ok(None),
            }
        }
    }

    /// The next message or comment.
    async fn read(&mut self, wait: Duration) -> Result<Item> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if block.starts_with(':') {
                    return Ok(Item::Comment);
                }
                let (mut event, mut id, mut data) = (None, None, Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if line == "id:" {
                        id = Some(String::new());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if let Some(event) = event {
                    if id.is_some() {
                        self.last_id = id;
                    }
                    let data = serde_json::from_str(&data.join("\n"))?;
                    return Ok(Item::Msg(Msg { event, data }));
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(Item::End);
            };
            let frame = tokio::time::timeout(wait, poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)))
                .await
                .map_err(|_| anyhow!("nothing within {wait:?}"))?;
            match frame {
                None => {
                    self.body = None;
                }
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.push_str(std::str::from_utf8(&data)?);
                        if self.first_line.is_none() {
                            self.first_line = self.buf.lines().next().map(str::to_owned);
                        }
                    }
                }
            }
        }
    }

    /// Reads the next message and checks its type.
    async fn expect(&mut self, kind: &str) -> Value {
        match self.next().await {
            Ok(Some(m)) if m.event == kind => {
                assert_eq!(m.data["type"], kind, "`event:` is the frame's type");
                m.data
            }
            other => panic!("expected a {kind} message, got {other:?}"),
        }
    }

    /// Reads until the stream ends; returns every message.
    async fn rest(&mut self) -> Vec<Msg> {
        let mut all = Vec::new();
        while let Some(m) = self.next().await.unwrap() {
            all.push(m);
        }
        all
    }
}

/// `/sse` with each channel as a `channel=` parameter (percent-encoded).
fn path(channels: &[&str], extra: &str) -> String {
    let mut p = String::from("/sse?");
    for c in channels {
        p.push_str("channel=");
        for b in c.bytes() {
            if b.is_ascii_alphanumeric() {
                p.push(b as char);
            } else {
                p.push_str(&format!("%{b:02X}"));
            }
        }
        p.push('&');
    }
    p.push_str(extra);
    p
}

async fn stats(gw: &GatewayServer) -> Value {
    http(gw.addr, "GET", "/api/ws/stats", Some(ADMIN_KEY), None).await.unwrap().1
}

#[tokio::test]
async fn events_arrive_after_retry_with_a_cursor_and_no_connected() {
    let stack = Stack::start().await;
    let mut sse = Sse::open(stack.gateway.addr, &path(&["news", "task:7"], ""), None).await;
    assert_eq!(sse.status, 200);
    assert!(sse.content_type.starts_with("text/event-stream"), "{}", sse.content_type);
    let mut subscribed: Vec<String> = Vec::new();
    for _ in 0..2 {
        let sub = sse.expect("subscribed").await;
        assert_eq!(sub["position"]["offset"], 0);
        subscribed.push(sub["channel"].as_str().unwrap().to_owned());
    }
    subscribed.sort();
    assert_eq!(subscribed, ["news", "task:7"], "`subscribed` for each channel, and no `connected` before");
    assert!(sse.first_line.as_deref().is_some_and(|l| l.starts_with("retry: ")), "{:?}", sse.first_line);
    assert_eq!(stats(&stack.gateway).await["total_connections"], 1, "it is one connection, counted once");

    let mut client = stack.client().await;
    publish(&mut client, "news", "headline", json!({ "text": "hello" })).await;
    let ev = sse.expect("event").await;
    assert_eq!((ev["channel"].as_str(), ev["event"].as_str()), (Some("news"), Some("headline")));
    assert_eq!((ev["data"]["text"].as_str(), ev["offset"].as_u64()), (Some("hello"), Some(1)));
    let first_id = sse.last_id.clone().unwrap();
    publish(&mut client, "task:7", "done", json!(7)).await;
    let ev = sse.expect("event").await;
    assert_eq!((ev["channel"].as_str(), ev["data"].as_u64()), (Some("task:7"), Some(7)));
    assert_ne!(sse.last_id.as_ref(), Some(&first_id), "the cursor moves with each event");

    // A producer's pretty-printed JSON arrives as the same JSON.
    let mut pretty = stack.client().await;
    pretty
        .publish(pb::PublishRequest {
            channel: "news".into(),
            event: "multi".into(),
            data: "{\n  \"a\": [1,\n 2]\r\n}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sse.expect("event").await["data"], json!({ "a": [1, 2] }));
}

/// Publishes `n` events to each channel; returns the epoch.
async fn publish_each(client: &mut BusClient, channels: &[&str], n: u64) -> String {
    let mut epoch = String::new();
    for _ in 0..n {
        for c in channels {
            epoch = publish(client, c, "tick", json!({ "channel": c })).await.epoch;
        }
    }
    epoch
}

#[tokio::test]
async fn last_event_id_recovers_every_channel_with_no_gap_and_names_round_trip() {
    let stack = Stack::start().await;
    // Names with the cursor's own separators and percent signs' neighbours.
    let channels = ["a:b,c", "d,e:f=g@h.i", "plain"];
    let mut client = stack.client().await;
    let mut sse = Sse::open(stack.gateway.addr, &path(&channels, ""), None).await;
    for _ in channels {
        sse.expect("subscribed").await;
    }
    publish_each(&mut client, &channels, 2).await;
    for _ in 0..6 {
        sse.expect("event").await;
    }
    let cursor = sse.last_id.clone().unwrap();
    drop(sse);
    // A client that leaves is forgotten (stats, hub) as soon as its socket closes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while stats(&stack.gateway).await["total_connections"] != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the closed stream is still counted");
    }

    // Missed while away: offsets 3..5 of each channel.
    publish_each(&mut client, &channels, 3).await;
    let mut back = Sse::open(stack.gateway.addr, &path(&channels, ""), Some(&cursor)).await;
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut recovered = 0;
    while seen.values().map(Vec::len).sum::<usize>() < 9 || recovered < 3 {
        let m = back.next().await.unwrap().expect("stream open");
        match m.event.as_str() {
            "subscribed" => {
                assert_eq!((m.data["recovered"].as_bool(), m.data["missed"].as_u64()), (Some(true), Some(3)), "{m:?}");
                recovered += 1;
            }
            "event" => {
                let channel = m.data["channel"].as_str().unwrap().to_owned();
                seen.entry(channel).or_default().push(m.data["offset"].as_u64().unwrap());
            }
            other => panic!("unexpected {other}: {m:?}"),
        }
    }
    for c in channels {
        assert_eq!(seen[c], [3, 4, 5], "{c}: every missed event, once, in order");
    }
    // Live events follow without a duplicate.
    publish(&mut client, "plain", "tick", json!(6)).await;
    let ev = back.expect("event").await;
    assert_eq!((ev["channel"].as_str(), ev["offset"].as_u64()), (Some("plain"), Some(6)));

    // The cursor as `?last_event_id=` does the same, when no header is sent.
    let cursor = back.last_id.clone().unwrap();
    drop(back);
    publish(&mut client, "a:b,c", "tick", json!(6)).await;
    let query: String = cursor
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let mut again = Sse::open(stack.gateway.addr, &path(&channels, &format!("last_event_id={query}")), None).await;
    let mut events = Vec::new();
    let mut subs = 0;
    while subs < 3 || events.is_empty() {
        let m = again.next().await.unwrap().unwrap();
        if m.event == "subscribed" {
            assert_eq!(m.data["recovered"], true, "{m:?}");
            subs += 1;
        } else {
            events.push((m.data["channel"].as_str().unwrap().to_owned(), m.data["offset"].as_u64().unwrap()));
        }
    }
    assert_eq!(events, [("a:b,c".to_owned(), 6)]);
}

#[tokio::test]
async fn a_wrong_epoch_gets_recovered_false_and_no_replay() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let epoch = publish_each(&mut client, &["missions"], 3).await;
    // A cursor of another epoch, in the format the gateway writes.
    let mut sse = Sse::open(stack.gateway.addr, &path(&["missions"], ""), Some("missions:1:not-the-epoch")).await;
    let sub = sse.expect("subscribed").await;
    assert_eq!((sub["recovered"].as_bool(), sub["missed"].as_u64()), (Some(false), Some(0)), "{sub}");
    assert_eq!(sub["position"], json!({ "offset": 3, "epoch": epoch }), "the current position");
    assert_eq!(sse.last_id.as_deref().map(|id| id.starts_with("missions:3:")), Some(true), "{:?}", sse.last_id);
    publish(&mut client, "missions", "tick", json!(4)).await;
    assert_eq!(sse.expect("event").await["offset"], 4, "no partial replay: the next event is live");

    let bad = Sse::open(stack.gateway.addr, &path(&["missions"], ""), Some("no cursor")).await;
    assert_eq!(bad.status, 400);
}

const SECRET: &str = "an-hs256-secret-for-sse-tests-0123456";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({ "sub": sub, "exp": exp });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn secured(tweak: impl FnOnce(&mut gateway::Config)) -> (BusServer, GatewayServer) {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.anonymous = false;
        c.auth = gateway::auth::AuthConfig::none().with_hs256(SECRET.as_bytes());
        c.namespaces.insert(
            "staff".into(),
            gateway::Namespace { subscribe: gateway::Access::Roles(vec!["staff".into()]), ..Default::default() },
        );
        tweak(c);
    })
    .await;
    (bus, gw)
}

#[tokio::test]
async fn permissions_are_those_of_a_websocket_subscription() {
    let (bus, gw) = secured(|_| {}).await;
    assert_eq!(Sse::open(gw.addr, &path(&["news"], ""), None).await.status, 401, "no token");
    assert_eq!(Sse::open(gw.addr, &path(&["news"], "token=forged"), None).await.status, 401, "a bad token");

    let alice = token("alice");
    let channels = ["thread:t1#bob", "staff:pay", "thread:t2#alice", "news"];
    let mut sse = Sse::open(gw.addr, &path(&channels, &format!("token={alice}")), None).await;
    assert_eq!(sse.status, 200);
    let (mut denied, mut subscribed) = (0, Vec::new());
    while denied < 2 || subscribed.len() < 3 {
        let m = sse.next().await.unwrap().unwrap();
        match m.event.as_str() {
            "error" => {
                assert_eq!(m.data["code"], "permission_denied", "{m:?}");
                denied += 1;
            }
            "subscribed" => subscribed.push(m.data["channel"].as_str().unwrap().to_owned()),
            other => panic!("unexpected {other}"),
        }
    }
    subscribed.sort();
    assert_eq!(subscribed, ["news", "thread:t2#alice", "user#alice"], "her own channels, her personal one");
    let mut client = bus_client(&bus.url()).await;
    for c in ["thread:t1#bob", "staff:pay", "thread:t2#alice"] {
        publish(&mut client, c, "secret", json!({ "for": c })).await;
    }
    let ev = sse.expect("event").await;
    assert_eq!(ev["channel"], "thread:t2#alice", "nothing of the channels she may not read: {ev}");
    assert!(
        sse.last_id.as_deref().is_some_and(|id| !id.contains("bob") && !id.contains("staff")),
        "nor their positions: {:?}",
        sse.last_id
    );
}

#[tokio::test]
async fn connection_limits_count_sse_streams() {
    let (_bus, gw) = secured(|c| {
        c.limits.max_connections = 4;
        c.limits.max_connections_per_user = 2;
    })
    .await;
    let carol = token("carol");
    let _ws = Ws::connect(&gw.ws_url(&format!("/ws?token={carol}"))).await.unwrap();
    let mut first = Sse::open(gw.addr, &path(&["news"], &format!("token={carol}")), None).await;
    first.expect("subscribed").await;
    let over = Sse::open(gw.addr, &path(&["news"], &format!("token={carol}")), None).await;
    assert_eq!(over.status, 429, "the user's third connection");
    drop(over);
    // Its HTTP connection counts until the gateway has seen it close (till
    // then the node is full, and even `/metrics` is answered 503).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the refused stream's connection never closed");
        if let (200, metrics) = http(gw.addr, "GET", "/metrics", None, None).await.unwrap() {
            let metrics = metrics.as_str().unwrap_or_default().to_owned();
            let line = metrics.lines().find(|l| l.starts_with("switchboard_pending_connections ")).expect(&metrics);
            if line.ends_with(" 1") {
                break;
            }
        }
    }
    let mut dave = Sse::open(gw.addr, &path(&["news"], &format!("token={}", token("dave"))), None).await;
    dave.expect("subscribed").await;
    assert_eq!(stats(&gw).await["total_connections"], 3);
    let mut erin = Sse::open(gw.addr, &path(&["news"], &format!("token={}", token("erin"))), None).await;
    erin.expect("subscribed").await;
    // The node is full: SSE streams count like WebSockets.
    let err = Ws::connect(&gw.ws_url(&format!("/ws?token={}", token("frank")))).await.err().expect("refused");
    assert!(format!("{err:#}").contains("503"), "{err:#}");
    let full = Sse::open(gw.addr, &path(&["news"], &format!("token={}", token("frank"))), None).await;
    assert_eq!(full.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_with_4002() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.outbound_queue_bytes = 256 * 1024).await;
    let mut fast = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    fast.subscribe("firehose").await;
    let mut slow = Sse::open(gw.addr, &path(&["firehose"], ""), None).await;
    slow.expect("subscribed").await;
    assert_eq!(stats(&gw).await["total_connections"], 2);

    // Rounds of 2 KiB events that the fast reader drains, while the slow
    // one reads nothing, until the gateway lets the slow one go.
    let pad = "x".repeat(2048);
    let mut client = bus_client(&bus.url()).await;
    let mut published = 0u64;
    let mut cut = false;
    for _ in 0..100 {
        let requests: Vec<pb::PublishRequest> = (1..=100)
            .map(|i| pb::PublishRequest {
                channel: "firehose".into(),
                event: "e".into(),
                data: json!({ "i": published + i, "pad": pad }).to_string().into(),
                ..Default::default()
            })
            .collect();
        let mut responses = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
        while responses.message().await.unwrap().is_some() {}
        for i in 1..=100 {
            assert_eq!(fast.expect("event").await["offset"], published + i, "the fast reader is not slowed");
        }
        published += 100;
        if stats(&gw).await["total_connections"] == 1 {
            cut = true;
            break;
        }
    }
    assert!(cut, "the slow reader was never cut off ({published} events)");

    let rest = slow.rest().await;
    let offsets: Vec<u64> =
        rest.iter().filter(|m| m.event == "event").map(|m| m.data["offset"].as_u64().unwrap()).collect();
    assert!((offsets.len() as u64) < published, "it did not get everything");
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "what it got has no gap");
    let last = rest.last().expect("messages");
    assert_eq!((last.event.as_str(), &last.data["code"]), ("disconnect", &json!(4002)), "{last:?}");
    assert_eq!(last.data["reconnect"], true);
}

#[tokio::test]
async fn shutdown_says_disconnect_1001_and_ends_the_stream() {
    let stack = Stack::start().await;
    let mut sse = Sse::open(stack.gateway.addr, &path(&["news"], ""), None).await;
    sse.expect("subscribed").await;
    stack.gateway.shutdown();
    let rest = sse.rest().await;
    let last = rest.last().expect("a disconnect");
    assert_eq!(
        (last.event.as_str(), &last.data["code"], &last.data["reconnect"]),
        ("disconnect", &json!(1001), &json!(true))
    );
}

#[tokio::test]
async fn an_idle_stream_gets_a_comment_every_15_seconds() {
    let stack = Stack::start().await;
    let mut sse = Sse::open(stack.gateway.addr, &path(&["quiet"], ""), None).await;
    sse.expect("subscribed").await;
    let started = tokio::time::Instant::now();
    assert!(matches!(sse.read(Duration::from_secs(20)).await.unwrap(), Item::Comment), "a keep-alive comment");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(14), "after 15 s of silence, not before ({waited:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_takes_nothing_is_cut_off_after_the_write_timeout() {
    let bus = BusServer::memory().await;
    // A queue that never overflows here: only the write timeout can cut it off.
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.limits.outbound_queue_bytes = 256 * 1024 * 1024;
        c.limits.write_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let mut slow = Sse::open(gw.addr, &path(&["stuck"], ""), None).await;
    slow.expect("subscribed").await;

    // 32 MB, far more than the socket buffers between the gateway and a
    // reader that reads nothing, far less than its queue.
    let pad = "x".repeat(16 * 1024);
    let mut client = bus_client(&bus.url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut published = 0u64;
    while stats(&gw).await["total_connections"] != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never cut off ({published} events published)");
        if published < 2000 {
            let requests: Vec<pb::PublishRequest> = (1..=100)
                .map(|i| pb::PublishRequest {
                    channel: "stuck".into(),
                    event: "e".into(),
                    data: json!({ "i": published + i, "pad": pad }).to_string().into(),
                    ..Default::default()
                })
                .collect();
            let mut responses = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
            while responses.message().await.unwrap().is_some() {}
            published += 100;
        }
    }
    // Closed as a slow consumer (counted once the session has ended).
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no 4002 counted");
        let (_, metrics) = http(gw.addr, "GET", "/metrics", None, None).await.unwrap();
        if metrics.as_str().unwrap().lines().any(|l| l == "switchboard_disconnects_total{code=\"4002\"} 1") {
            break;
        }
    }
    // What it did get has no gap (its TCP connection may be gone before the `disconnect`).
    let mut offsets = Vec::new();
    while let Ok(Item::Msg(m)) = slow.read(WAIT).await {
        if m.event == "event" {
            offsets.push(m.data["offset"].as_u64().unwrap());
        }
    }
    assert!((offsets.len() as u64) < published);
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "no gap");
}
