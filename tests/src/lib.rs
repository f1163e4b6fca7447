//! Fixtures for Switchboard's end-to-end tests: the real services, started
//! in-process on port 0, and clients that speak their real protocols.
//!
//! - `BusServer::memory()` / `BusServer::embedded(dir)`: an event bus;
//!   `restart()` brings it back on the same address.
//! - `GatewayServer::start(bus_url)` / `::with(config)`: a gateway.
//! - `Ws`: a WebSocket client with JSON helpers and timeouts.
//! - `bus_client(url)`: the generated gRPC client.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};
use tokio_util::sync::CancellationToken;

pub use switchboard_agent_bridge as agent_bridge;
pub use switchboard_eventbus as eventbus;
pub use switchboard_gateway as gateway;
pub use switchboard_proto::eventbus::v1 as pb;

/// How long a test waits for something that should happen quickly.
pub const WAIT: Duration = Duration::from_secs(10);

pub use switchboard_proto::client::BusClient;

/// An event bus served in-process.
pub struct BusServer {
    pub addr: SocketAddr,
    pub config: eventbus::Config,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl BusServer {
    pub async fn memory() -> Self {
        Self::start(eventbus::Config::memory()).await
    }

    pub async fn embedded(dir: PathBuf) -> Self {
        Self::start(eventbus::Config { data_dir: dir, ..eventbus::Config::default() }).await
    }

    pub async fn start(config: eventbus::Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(config, listener).await
    }

    async fn serve(config: eventbus::Config, listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let cfg = config.clone();
        let task = tokio::spawn(async move {
            eventbus::serve(cfg, listener, token.cancelled_owned()).await.expect("event bus failed");
        });
        BusServer { addr, config, stop, task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the bus and waits until it has released its store.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("bus did not stop").unwrap();
        }
    }

    /// Stops the bus and starts it again on the same address and configuration.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = bind_again(self.addr).await;
        *self = Self::serve(self.config.clone(), listener).await;
    }
}

impl Drop for BusServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn bind_again(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}

/// A gateway served in-process.
pub struct GatewayServer {
    pub addr: SocketAddr,
    pub config: gateway::Config,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The admin key tests configure.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

impl GatewayServer {
    /// A gateway on `bus_url` with test defaults, after `tweak`.
    pub async fn start_with(bus_url: &str, tweak: impl FnOnce(&mut gateway::Config)) -> Self {
        let mut config = gateway::Config {
            eventbus_urls: vec![bus_url.to_owned()],
            admin_key: Some(ADMIN_KEY.to_owned()),
            ..gateway::Config::default()
        };
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let cfg = config.clone();
        let task = tokio::spawn(async move {
            gateway::serve(cfg, listener, token.cancelled_owned()).await.expect("gateway failed");
        });
        let gw = GatewayServer { addr, config, stop, task: Some(task) };
        gw.wait_ready().await;
        gw
    }

    pub async fn start(bus_url: &str) -> Self {
        Self::start_with(bus_url, |_| {}).await
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `/ready` says the bus link is up.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Ok((200, _)) = http(self.addr, "GET", "/ready", None, None).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gateway never became ready");
    }

    /// Begins shutdown; `join` waits for it.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A bus and a gateway on it.
pub struct Stack {
    pub bus: BusServer,
    pub gateway: GatewayServer,
}

impl Stack {
    pub async fn start() -> Self {
        let bus = BusServer::memory().await;
        let gateway = GatewayServer::start(&bus.url()).await;
        Stack { bus, gateway }
    }

    pub async fn ws(&self) -> Ws {
        Ws::connect(&self.gateway.ws_url("/ws/connect")).await.unwrap()
    }

    pub async fn client(&self) -> BusClient {
        bus_client(&self.bus.url()).await
    }
}

pub async fn bus_client(url: &str) -> BusClient {
    bus_client_with_key(url, None).await
}

/// A bus client that sends `key` as its bearer token, when given.
pub async fn bus_client_with_key(url: &str, key: Option<&str>) -> BusClient {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("bus url")
        .connect()
        .await
        .expect("connect to bus");
    let key = switchboard_proto::auth::BearerKey::new(key).expect("bearer key");
    switchboard_proto::client::bus_over(switchboard_proto::client::over_channel(channel), key)
}

/// The `type` of each AG-UI event, in order.
pub fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Publishes through gRPC and returns the response.
pub async fn publish(client: &mut BusClient, channel: &str, event: &str, data: Value) -> pb::PublishResponse {
    client
        .publish(pb::PublishRequest {
            channel: channel.into(),
            event: event.into(),
            data: data.to_string().into(),
            ..Default::default()
        })
        .await
        .expect("publish")
        .into_inner()
}

/// A WebSocket client speaking the JSON protocol.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    /// The `connected` frame.
    pub connected: Value,
}

/// A gateway configuration tweak: the `chat` namespace open to anonymous
/// subscribers and publishers.
pub fn open_chat(c: &mut gateway::Config) {
    c.namespaces.insert(
        "chat".into(),
        gateway::Namespace {
            subscribe: gateway::Access::Anonymous,
            publish: gateway::Access::Anonymous,
            ..Default::default()
        },
    );
}

/// What `Ws::next_within` read.
#[derive(Debug)]
pub enum Next {
    Frame(Value),
    Closed(Closed),
}

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    /// The TCP connection ended without a close frame.
    Abrupt,
}

impl Ws {
    /// Connects and reads the `connected` frame.
    pub async fn connect(url: &str) -> Result<Ws> {
        let (stream, _) = connect_async(url).await.with_context(|| format!("connect {url}"))?;
        let mut ws = Ws { stream, connected: Value::Null };
        let first = ws.recv().await?;
        if first["type"] != "connected" {
            bail!("first frame is not `connected`: {first}");
        }
        ws.connected = first;
        Ok(ws)
    }

    /// Connects without waiting for any frame.
    pub async fn connect_raw(url: &str) -> Result<Ws> {
        let (stream, _) = connect_async(url).await?;
        Ok(Ws { stream, connected: Value::Null })
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream.send(Message::Text(frame.to_string().into())).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.to_owned().into())).await.expect("send");
    }

    pub async fn send_message(&mut self, msg: Message) {
        self.stream.send(msg).await.expect("send");
    }

    /// Reads the next JSON frame, skipping heartbeats.
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Result<Value> {
        match self.next_within(wait).await? {
            Next::Frame(v) => Ok(v),
            Next::Closed(c) => bail!("closed: {c:?}"),
        }
    }

    /// The next frame other than `ping`, or the close that ends the connection.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Next> {
        loop {
            let msg = tokio::time::timeout(wait, self.stream.next())
                .await
                .map_err(|_| anyhow!("no frame within {wait:?}"))?;
            match msg {
                None | Some(Err(_)) => return Ok(Next::Closed(Closed::Abrupt)),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["type"] != "ping" {
                        return Ok(Next::Frame(v));
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    return Ok(Next::Closed(c.map_or(Closed::Code(1005), |c| Closed::Code(u16::from(c.code)))));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads frames until one of `kind`, returning it; fails on anything else.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let v = self.recv().await.unwrap_or_else(|e| panic!("waiting for {kind}: {e}"));
        assert_eq!(v["type"], kind, "expected a {kind} frame, got {v}");
        v
    }

    /// Subscribes and returns the `subscribed` frame.
    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.send(serde_json::json!({ "type": "subscribe", "channel": channel })).await;
        let v = self.expect("subscribed").await;
        assert_eq!(v["channel"], channel);
        v
    }

    /// Reads until the server closes; returns the close code and the frames read before it.
    pub async fn closed(&mut self) -> (Closed, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.stream.next()).await {
                Err(_) => panic!("connection not closed in time; read {} frames", frames.len()),
                Ok(None) | Ok(Some(Err(_))) => return (Closed::Abrupt, frames),
                Ok(Some(Ok(Message::Close(c)))) => {
                    return (c.map(|c| Closed::Code(u16::from(c.code))).unwrap_or(Closed::Code(1005)), frames);
                }
                Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// Returns the numeric code of a tungstenite close code.
pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

/// A minimal HTTP/1.1 client for the gateway's API: method, path, optional
/// bearer key and JSON body; returns the status and the parsed JSON body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        req.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("bad response"))?;
    let status: u16 = head.split_whitespace().nth(1).ok_or_else(|| anyhow!("no status"))?.parse()?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_owned() };
    let json =
        if body.trim().is_empty() { Value::Null } else { serde_json::from_str(&body).unwrap_or(Value::String(body)) };
    Ok((status, json))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Path of the `switchboard` binary, built once per test run.
pub fn switchboard_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "switchboard", "--bin", "switchboard"])
                .current_dir(&root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build of the switchboard binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
            target.join("debug").join("switchboard")
        })
        .clone()
}

/// An agent bridge served in-process.
pub struct BridgeServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl BridgeServer {
    pub async fn start(config: agent_bridge::Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            agent_bridge::serve(config, listener, token.cancelled_owned()).await.expect("agent bridge failed");
        });
        BridgeServer { addr, stop, task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the bridge and waits until it has released its store.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("bridge did not stop").unwrap();
        }
    }
}

impl Drop for BridgeServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A bus, an agent bridge on it (threads in a temporary directory) and a
/// gateway on both, each configured further by its `tweak`.
pub struct AgentStack {
    pub bus: BusServer,
    pub bridge: BridgeServer,
    pub gateway: GatewayServer,
    /// The bridge's data directory.
    pub data: tempfile::TempDir,
}

impl AgentStack {
    pub async fn start(
        bridge: impl FnOnce(&mut agent_bridge::Config),
        gateway: impl FnOnce(&mut gateway::Config),
    ) -> AgentStack {
        let data = tempfile::tempdir().unwrap();
        let bus = BusServer::memory().await;
        let mut config = agent_bridge::Config {
            data_dir: data.path().to_owned(),
            eventbus_url: Some(bus.url()),
            ..agent_bridge::Config::default()
        };
        bridge(&mut config);
        let bridge = BridgeServer::start(config).await;
        let gateway = GatewayServer::start_with(&bus.url(), |c| {
            c.agent_bridge_urls = vec![bridge.url()];
            gateway(c);
        })
        .await;
        AgentStack { bus, bridge, gateway, data }
    }
}
