//! `switchboard bench`: load generators shipped with the product, as
//! `nats bench` and `redis-benchmark` are. Loopback targets only, bounded in
//! time; results as a table and as JSON.
//!
//! - `bench publish`: concurrent gRPC publishers, events/s and ack latency.
//! - `bench fanout`: WebSocket subscribers and a paced gRPC publisher;
//!   deliveries/s, publish-to-receipt latency, loss, server RSS.
//! - `bench runs` (`bench/runs.rs`): concurrent agent runs over WebSocket,
//!   served by workers it attaches; runs/s, events/s, token latency, loss.
//! - `bench threads` (`bench/threads.rs`): appends to a long thread against
//!   appends to new ones, on the bridge's thread store.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use switchboard_tls::ClientTls;

use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use switchboard_proto::eventbus::v1 as pb;
use tokio_tungstenite::tungstenite::Message;

mod runs;
mod threads;

#[derive(Subcommand)]
pub enum Bench {
    /// Publish throughput: concurrent publishers over gRPC.
    Publish(PublishArgs),
    /// Fan-out: WebSocket subscribers receiving from a gRPC publisher.
    Fanout(FanoutArgs),
    /// Agent runs: concurrent runs over WebSocket, served by attached workers.
    Runs(runs::RunsArgs),
    /// Thread store: appends to a long thread against appends to new ones.
    Threads(threads::ThreadsArgs),
}

#[derive(Args)]
pub struct PublishArgs {
    /// The event bus.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    #[arg(long, env = "SWITCHBOARD_AUTH__ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Concurrent publishers, each waiting for its acknowledgement.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Channels the publishers spread over: publisher p sends its k-th event
    /// to channel (p + k × publishers) mod channels.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Each publisher pipelines over one `PublishStream` (up to 64 in flight)
    /// instead of waiting for each `Publish`.
    #[arg(long)]
    stream: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FanoutArgs {
    /// The gateways' WebSocket endpoints, comma-separated: client i connects to the (i mod n)-th.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/connect", value_delimiter = ',')]
    ws: Vec<String>,
    /// The event bus, for publishing.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    #[arg(long, env = "SWITCHBOARD_AUTH__ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// WebSocket clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Channels; client i subscribes to channel i % channels.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Messages per second published to each channel (0: as fast as acknowledged).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Source addresses 127.0.0.1 … 127.0.0.N, a new one every 20,000 clients.
    #[arg(long, default_value_t = 0)]
    source_addrs: u8,
    /// The server's process id, to report its RSS per connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Publish nothing: hold the connections for `--duration` (heartbeats
    /// keep running) and report how many the server closed.
    #[arg(long)]
    idle: bool,
    /// Channel names are `PREFIX:N`; give each of several bench processes its own.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// The CA (PEM) that signs the gateway's certificate, for `wss://` endpoints.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Runs a benchmark; `tls` is for an `https://` bus or bridge URL (`tls.*`).
pub async fn run(bench: Bench, tls: Option<ClientTls>) -> Result<(), String> {
    match bench {
        Bench::Publish(args) => publish(args, tls).await,
        Bench::Fanout(args) => fanout(args, tls).await,
        Bench::Runs(args) => runs::runs(args, tls).await,
        Bench::Threads(args) => threads::threads(args).await,
    }
}

fn check_loopback(url: &str) -> Result<(), String> {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("");
    let ok = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if ok { Ok(()) } else { Err(format!("{url}: switchboard bench only targets loopback addresses")) }
}

fn payload(size: usize) -> String {
    "x".repeat(size)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn latency(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

fn print(report: &Value, json_out: bool) {
    if json_out {
        println!("{report}");
        return;
    }
    let Value::Object(map) = report else { return };
    for (k, v) in map {
        match v {
            Value::Object(inner) => {
                for (ik, iv) in inner {
                    println!("{:<28} {}", format!("{k}.{ik}"), iv);
                }
            }
            other => println!("{k:<28} {other}"),
        }
    }
}

async fn publish(args: PublishArgs, tls: Option<ClientTls>) -> Result<(), String> {
    check_loopback(&args.url)?;
    let client = crate::tools::bus_client(&args.url, args.key.as_deref(), tls.as_ref())?;
    let data = json!({ "pad": payload(args.size.saturating_sub(12)) }).to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..args.publishers {
        let mut client = client.clone();
        let data = data.clone();
        let stop = stop.clone();
        let count = count.clone();
        let (publishers, channels) = (args.publishers, args.channels.max(1));
        let channel = move |k: usize| format!("bench:{}", (p + k * publishers) % channels);
        let stream = args.stream;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors = 0u64;
            if stream {
                // Send times ride along in a queue as deep as the pipeline.
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(64);
                let (times_tx, mut times_rx) = tokio::sync::mpsc::channel::<Instant>(128);
                let feeder_stop = stop.clone();
                let feeder = tokio::spawn(async move {
                    for k in 0.. {
                        if feeder_stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let req = pb::PublishRequest {
                            channel: channel(k),
                            event: "bench".into(),
                            data: data.clone().into(),
                            ..Default::default()
                        };
                        if times_tx.send(Instant::now()).await.is_err() || tx.send(req).await.is_err() {
                            break;
                        }
                    }
                });
                if let Ok(resp) = client.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                    let mut responses = resp.into_inner();
                    while let Ok(Some(r)) = responses.message().await {
                        if let Some(t) = times_rx.recv().await {
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        if r.error.is_some() {
                            errors += 1;
                        } else {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                feeder.abort();
                return (h, errors);
            }
            for k in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let req = pb::PublishRequest {
                    channel: channel(k),
                    event: "bench".into(),
                    data: data.clone().into(),
                    ..Default::default()
                };
                match client.publish(req).await {
                    Ok(_) => {
                        let _ = h.record(t.elapsed().as_micros() as u64);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    let mut errors = 0;
    for t in tasks {
        let (th, e) = t.await.map_err(|e| e.to_string())?;
        h.add(th).map_err(|e| e.to_string())?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    let report = json!({
        "bench": "publish",
        "mode": if args.stream { "stream" } else { "unary" },
        "publishers": args.publishers,
        "payload_bytes": args.size,
        "channels": args.channels,
        "seconds": elapsed,
        "events": n,
        "events_per_s": (n as f64 / elapsed).round(),
        "errors": errors,
        "ack_latency": latency(&h),
    });
    print(&report, args.json);
    Ok(())
}

/// RSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A bench client's socket: TCP, or TLS over it for `wss://`.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type BenchSocket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

async fn connect_one(
    url: &str,
    source: Option<IpAddr>,
    tls: Option<&switchboard_tls::TlsConnector>,
) -> Result<BenchSocket, String> {
    let host = url.trim_start_matches("ws://").trim_start_matches("wss://").split('/').next().unwrap_or("");
    let addr: SocketAddr = host.parse().map_err(|_| format!("{url}: use ws://IP:PORT/… or wss://IP:PORT/…"))?;
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
    }
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).ok();
    // Small buffers: one bench process holds up to ~19,000 of these.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let stream: Box<dyn Io> = match (url.starts_with("wss://"), tls) {
        (false, _) => Box::new(stream),
        (true, Some(tls)) => {
            let name = switchboard_tls::ServerName::from(addr.ip());
            Box::new(tls.connect(name, stream).await.map_err(|e| e.to_string())?)
        }
        (true, None) => return Err(format!("{url}: wss:// needs --ca")),
    };
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn fanout(args: FanoutArgs, tls: Option<ClientTls>) -> Result<(), String> {
    for ws in &args.ws {
        check_loopback(ws)?;
    }
    check_loopback(&args.url)?;
    let channels = args.channels.max(1);
    let wss = match &args.ca {
        Some(ca) => Some(switchboard_tls::connector(ca).map_err(|e| e.to_string())?),
        None => None,
    };
    let rss_before = args.server_pid.and_then(rss_kib);
    let received = Arc::new(AtomicU64::new(0));
    let started_connect = Instant::now();
    let mut connect_errors = 0u64;
    // Each client gets its reader as soon as it is connected, so that early
    // clients answer heartbeats while later ones connect.
    let mut readers = Vec::with_capacity(args.clients);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.clients.max(1));
    let done = tokio_util::sync::CancellationToken::new();
    // Connections the server closed before the end.
    let closed = Arc::new(AtomicU64::new(0));
    for i in 0..args.clients {
        let source =
            (args.source_addrs > 0).then(|| IpAddr::from([127, 0, 0, 1 + ((i / 20_000) as u8 % args.source_addrs)]));
        let mut ws = match connect_one(&args.ws[i % args.ws.len()], source, wss.as_ref()).await {
            Ok(ws) => ws,
            Err(_) => {
                connect_errors += 1;
                continue;
            }
        };
        let channel = format!("{}:{}", args.prefix, i % channels);
        let sub = json!({ "type": "subscribe", "channel": channel }).to_string();
        if ws.send(Message::Text(sub.into())).await.is_err() {
            connect_errors += 1;
            continue;
        }
        let received = received.clone();
        let done = done.clone();
        let closed = closed.clone();
        let ready = ready_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let msg = tokio::select! {
                    _ = done.cancelled() => break,
                    msg = ws.next() => match msg {
                        Some(Ok(msg)) => msg,
                        _ => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    },
                };
                let Message::Text(t) = msg else { continue };
                let text = t.as_str();
                if text.contains(r#""type":"event""#) {
                    if let Some(sent) = text
                        .split(r#""t":"#)
                        .nth(1)
                        .and_then(|r| r.split([',', '}']).next())
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        let _ = h.record(now_us().saturating_sub(sent).max(1));
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                } else if text.contains(r#""type":"subscribed""#) {
                    let _ = ready.send(()).await;
                } else if text.contains(r#""type":"ping""#) {
                    let _ = ws.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
                }
            }
            h
        }));
    }
    let connect_s = started_connect.elapsed().as_secs_f64();
    drop(ready_tx);
    let subscribed = readers.len();
    for _ in 0..subscribed {
        if tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await.ok().flatten().is_none() {
            break;
        }
    }
    let rss_connected = args.server_pid.and_then(rss_kib);

    let client = crate::tools::bus_client(&args.url, args.key.as_deref(), tls.as_ref())?;
    let pad = payload(args.size.saturating_sub(40));
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut publishers = Vec::new();
    for c in (0..channels).filter(|_| !args.idle) {
        let mut client = client.clone();
        let pad = pad.clone();
        let published = published.clone();
        let duration = args.duration;
        let rate = args.rate;
        let prefix = args.prefix.clone();
        publishers.push(tokio::spawn(async move {
            let channel = format!("{prefix}:{c}");
            let mut tick = (rate > 0).then(|| tokio::time::interval(Duration::from_micros(1_000_000 / rate)));
            while started.elapsed() < duration {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let data = format!(r#"{{"t":{},"pad":"{pad}"}}"#, now_us());
                let req = pb::PublishRequest {
                    channel: channel.clone(),
                    event: "bench".into(),
                    data: data.into(),
                    ..Default::default()
                };
                if client.publish(req).await.is_ok() {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for p in publishers {
        let _ = p.await;
    }
    if args.idle {
        tokio::time::sleep(args.duration).await;
    }
    let publish_s = started.elapsed().as_secs_f64();
    // Let in-flight deliveries land.
    let expected_per_channel = published.load(Ordering::Relaxed) / channels as u64;
    let expected = expected_per_channel * subscribed as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_end = args.server_pid.and_then(rss_kib);
    done.cancel();
    let mut h = histogram();
    for r in readers {
        if let Ok(rh) = r.await {
            let _ = h.add(rh);
        }
    }
    let got = received.load(Ordering::Relaxed);
    let per_conn = |rss: Option<u64>| match (rss, rss_before) {
        (Some(r), Some(b)) if subscribed > 0 => {
            json!(((r.saturating_sub(b)) as f64 * 1024.0 / subscribed as f64).round())
        }
        _ => Value::Null,
    };
    let report = json!({
        "bench": "fanout",
        "clients": subscribed,
        "connect_errors": connect_errors,
        "connect_seconds": connect_s,
        "channels": channels,
        "rate_per_channel": args.rate,
        "payload_bytes": args.size,
        "published": published.load(Ordering::Relaxed),
        "deliveries": got,
        "deliveries_per_s": (got as f64 / publish_s).round(),
        "loss": expected.saturating_sub(got),
        "closed_by_server": closed.load(Ordering::Relaxed),
        "latency": latency(&h),
        "server_rss_kib": rss_end,
        "rss_bytes_per_connection_idle": per_conn(rss_connected),
        "rss_bytes_per_connection_loaded": per_conn(rss_end),
    });
    print(&report, args.json);
    Ok(())
}
