//! Robustness under abuse (SPEC §9, §11): connections that never finish
//! their request, clients that stop reading, floods of waiting runs,
//! pipelined replies, broken frames, and subscribes before the bus is up.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

/// Waits until `GET /api/ws/stats` reports `connections`, or panics after `within`.
async fn until_connections(gw: &GatewayServer, connections: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, stats) = http(gw.addr, "GET", "/api/ws/stats", Some(ADMIN_KEY), None).await.unwrap();
        if stats["total_connections"] == connections {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {stats} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a whole `GET /health` on a kept-alive connection; whether it was answered 200.
async fn answered(tcp: &mut tokio::net::TcpStream) -> bool {
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200")
}

/// A socket that sends half a request and then waits.
async fn slowloris(gw: &GatewayServer) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    tcp
}

/// Reads until the server closes the socket; fails after `within`.
async fn until_eof(tcp: &mut tokio::net::TcpStream, within: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.expect("the server closes the socket in time");
}

#[tokio::test]
async fn requests_that_never_complete_are_closed_and_counted() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.header_timeout = Duration::from_secs(1)).await;
    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(slowloris(&gw).await);
    }
    let opened = tokio::time::Instant::now();
    // Meanwhile the gateway serves everyone else.
    let (status, _) = http(gw.addr, "GET", "/health", None, None).await.unwrap();
    assert_eq!(status, 200);
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    ws.subscribe("missions").await;
    for tcp in &mut sockets {
        until_eof(tcp, Duration::from_secs(5)).await;
    }
    assert!(opened.elapsed() < Duration::from_secs(5), "closed after {:?}", opened.elapsed());

    // A body that does not arrive is answered within the same bound, in JSON;
    // one announced over the limit is refused at once.
    for (head, body, status) in [("Content-Length: 100", "{\"chan", 408), ("Content-Length: 10000000000", "{", 413)] {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let request = format!(
            "POST /api/ws/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\n{head}\r\n\r\n{body}"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let mut buf = vec![0u8; 4096];
        while !answer.ends_with('}') {
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the answer was complete: {answer}");
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        assert!(answer.contains("application/json") && answer.contains("\"error\""), "{answer}");
    }
}

#[tokio::test]
async fn connections_waiting_for_their_request_count_against_the_limit() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.limits.max_connections = 5;
        c.limits.header_timeout = Duration::from_secs(30);
    })
    .await;
    // A connection that has sent a whole request is not evicted (an HTTP/2
    // connection carries its sessions for its whole life; here, keep-alive).
    let mut kept = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert!(answered(&mut kept).await);
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(slowloris(&gw).await);
    }
    // At the limit, the oldest half-sent request makes room for a new one,
    // long before its header timeout.
    let (status, _) = http(gw.addr, "GET", "/health", None, None).await.unwrap();
    assert_eq!(status, 200);
    until_eof(&mut sockets[0], Duration::from_secs(5)).await;
    assert!(answered(&mut kept).await, "the connection that had sent a request was kept");
    drop(kept);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
        ws.subscribe("missions").await;
        clients.push(ws);
    }
    for tcp in &mut sockets[1..] {
        until_eof(tcp, Duration::from_secs(5)).await;
    }
    // Sessions are never evicted: with five open, a sixth connection is refused.
    let (status, body) = http(gw.addr, "GET", "/health", None, None).await.unwrap();
    assert_eq!((status, &body["error"]["code"]), (503, &json!("limit_exceeded")), "{body}");
}

/// A WebSocket client with a 4 KiB receive buffer that reads nothing after subscribing.
async fn stuck_client(gw: &GatewayServer, channel: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(gw.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(gw.ws_url("/ws"), tcp).await.unwrap();
    let connected = ws.next().await.unwrap().unwrap();
    assert!(connected.to_text().unwrap().contains("connected"));
    ws.send(Message::Text(json!({ "type": "subscribe", "channel": channel }).to_string().into())).await.unwrap();
    let subscribed = ws.next().await.unwrap().unwrap();
    assert!(subscribed.to_text().unwrap().contains("subscribed"), "{subscribed:?}");
    ws.into_inner()
}

/// Publishes `n` events of 2 KiB to `channel`, pipelined.
async fn flood(bus: &BusServer, channel: &str, n: u64) {
    let pad = "x".repeat(2048);
    let requests: Vec<pb::PublishRequest> = (1..=n)
        .map(|i| pb::PublishRequest {
            channel: channel.into(),
            event: "e".into(),
            data: json!({ "i": i, "pad": pad }).to_string().into(),
            ..Default::default()
        })
        .collect();
    let mut client = bus_client(&bus.url()).await;
    let mut responses = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
    while let Some(r) = responses.message().await.unwrap() {
        assert!(r.error.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go() {
    // Overflow: forgotten at once, long before the write deadline.
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.write_timeout = Duration::from_secs(60)).await;
    let _stuck = stuck_client(&gw, "firehose").await;
    until_connections(&gw, 1, WAIT).await;
    flood(&bus, "firehose", 4000).await;
    until_connections(&gw, 0, Duration::from_secs(5)).await;

    // No overflow (a queue bigger than the flood), but the socket takes
    // nothing: dropped after the write deadline, TCP connection included.
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.limits.write_timeout = Duration::from_secs(1);
        c.limits.outbound_queue_bytes = 256 * 1024 * 1024;
    })
    .await;
    let mut stuck = stuck_client(&gw, "firehose2").await;
    flood(&bus, "firehose2", 8000).await;
    until_connections(&gw, 0, Duration::from_secs(10)).await;
    until_eof(&mut stuck, Duration::from_secs(10)).await;
}

/// Frames until one of `kind` with this `id`.
async fn reply(ws: &mut Ws, id: &Value) -> Value {
    loop {
        let f = ws.recv().await.unwrap();
        if &f["id"] == id {
            return f;
        }
    }
}

#[tokio::test]
async fn waiting_runs_are_bounded_and_stopped_with_their_thread() {
    let s = AgentStack::start(
        |b| {
            b.echo_delay = Duration::from_millis(100);
            b.max_enqueued = 3;
        },
        |_| {},
    )
    .await;
    let mut ws = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    let words = vec!["w"; 100].join(" ");
    ws.send(json!({ "type": "chat_message", "content": words, "id": "first" })).await;
    let run = ws.expect("run").await;
    let thread = run["thread_id"].clone();
    for i in 0..4 {
        ws.send(
            json!({ "type": "chat_message", "content": "later", "thread_id": thread, "multitask": "enqueue", "id": i }),
        )
        .await;
    }
    // One of the four waiting runs is one too many. Which one depends on the
    // order the bridge admits them in: the gateway starts each frame's run
    // on its own task, so under load a later frame may be admitted first.
    let refused = loop {
        let f = ws.recv().await.unwrap();
        assert_ne!(f["type"], "run", "a waiting run started while the first streams: {f}");
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(refused["code"], "thread_busy", "{refused}");
    let refused_id = refused["id"].as_i64().unwrap();

    ws.send(json!({ "type": "interrupt_stream", "thread_id": thread, "id": "stop" })).await;
    let mut ended = None;
    let mut waiting_refused = Vec::new();
    let mut interrupted = None;
    while ended.is_none() || waiting_refused.len() < 3 || interrupted.is_none() {
        let f = ws.recv().await.unwrap();
        match f["type"].as_str() {
            Some("agent_event") if f["event"]["type"] == "RUN_ERROR" => ended = Some(f["event"]["code"].clone()),
            Some("interrupted") => interrupted = Some(f),
            Some("error") => waiting_refused.push(f),
            Some("run") => panic!("a waiting run started after the interrupt: {f}"),
            _ => {}
        }
    }
    assert_eq!(ended, Some(json!("cancelled")));
    assert_eq!(interrupted.unwrap()["cancelled"], true);
    let mut ids: Vec<i64> = waiting_refused.iter().map(|f| f["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..4).filter(|i| *i != refused_id).collect::<Vec<_>>(), "{waiting_refused:?}");
    assert!(waiting_refused.iter().all(|f| f["code"] == "thread_busy"), "{waiting_refused:?}");
    // The thread is free again.
    ws.send(json!({ "type": "chat_message", "content": "again", "thread_id": thread, "id": "again" })).await;
    assert_eq!(reply(&mut ws, &json!("again")).await["type"], "run");
}

#[tokio::test]
async fn every_frame_with_an_id_gets_one_reply_in_order() {
    let bus = BusServer::memory().await;
    // Pipelined faster than the rate limit allows: raise it.
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.rate_burst = 2000).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    // Fresh channels, then the same channel over and over, and a mix with
    // a subscribe after an unsubscribe still waiting for its subscribe.
    let mut frames = Vec::new();
    for i in 0..250 {
        let channel = format!("fresh:{i}");
        frames.push(json!({ "type": "subscribe", "channel": channel, "id": format!("s{i}") }));
        frames.push(json!({ "type": "unsubscribe", "channel": channel, "id": format!("u{i}") }));
    }
    for i in 250..500 {
        frames.push(json!({ "type": "subscribe", "channel": "same", "id": format!("s{i}") }));
        frames.push(json!({ "type": "unsubscribe", "channel": "same", "id": format!("u{i}") }));
    }
    frames.push(json!({ "type": "subscribe", "channel": "last", "id": "s500" }));
    frames.push(json!({ "type": "unsubscribe", "channel": "last", "id": "u500" }));
    frames
        .push(json!({ "type": "subscribe", "channel": "last", "since": { "offset": 0, "epoch": "x" }, "id": "s501" }));
    for frame in &frames {
        ws.send(frame.clone()).await;
    }
    let mut replies = Vec::new();
    while replies.len() < frames.len() {
        let f = ws.recv().await.unwrap();
        assert_ne!(f["type"], "error", "{f}");
        replies.push(f);
    }
    let ids: Vec<&Value> = replies.iter().map(|f| &f["id"]).collect();
    let sent: Vec<&Value> = frames.iter().map(|f| &f["id"]).collect();
    assert_eq!(ids, sent);
    for (frame, reply) in frames.iter().zip(&replies) {
        let expected = if frame["type"] == "subscribe" { "subscribed" } else { "unsubscribed" };
        assert_eq!((reply["type"].as_str(), &reply["channel"]), (Some(expected), &frame["channel"]), "{reply}");
    }
    // The last subscribe stands, and asked for recovery.
    assert_eq!(replies.last().unwrap()["recovered"], false);
    let mut client = bus_client(&bus.url()).await;
    publish(&mut client, "last", "e", json!({})).await;
    assert_eq!(ws.expect("event").await["channel"], "last");
}

#[tokio::test]
async fn broken_frames_are_closed_with_a_close_frame() {
    let stack = Stack::start().await;
    let bad_utf8 = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    let mut reserved = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    reserved.header_mut().rsv1 = true;
    for (frame, code) in [(bad_utf8, 1007), (reserved, 1002)] {
        let mut ws = stack.ws().await;
        ws.send_message(Message::Frame(frame)).await;
        let (closed, frames) = ws.closed().await;
        assert_eq!(closed, Closed::Code(code), "{frames:?}");
        assert_eq!(frames.last().unwrap()["code"], code);
    }
}

/// A client's close frame is answered with one (the client would see 1006
/// otherwise), with its code, and nothing after it.
#[tokio::test]
async fn a_clients_close_is_answered() {
    let stack = Stack::start().await;
    let mut ws = stack.ws().await;
    ws.subscribe("missions").await;
    let close = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.send_message(Message::Close(Some(close))).await;
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(1000), "{frames:?}");
    assert!(frames.is_empty(), "{frames:?}");
}

#[tokio::test]
async fn a_subscribe_before_the_bus_is_up_waits_for_it() {
    // The gateway starts first; its bus comes up a moment later.
    let spot = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bus_addr = spot.local_addr().unwrap();
    drop(spot);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = gateway::Config { eventbus_urls: vec![format!("http://{bus_addr}")], ..gateway::Config::default() };
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(gateway::serve(config, listener, stop.clone().cancelled_owned()));
    let mut ws = Ws::connect(&format!("ws://{addr}/ws")).await.unwrap();
    ws.send(json!({ "type": "subscribe", "channel": "missions", "id": 1 })).await;
    let listener = tokio::net::TcpListener::bind(bus_addr).await.unwrap();
    tokio::spawn(eventbus::serve(eventbus::Config::memory(), listener, std::future::pending()));
    let subscribed = ws.expect("subscribed").await;
    assert_eq!(subscribed["id"], 1);
    stop.cancel();
}
