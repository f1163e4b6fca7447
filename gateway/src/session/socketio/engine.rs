//! One Engine.IO connection: its task, which owns the `Session` and reads
//! the client's packets (posted, or from its WebSocket), sends the
//! heartbeat and performs the upgrade from polling; and the WebSocket
//! writer that drains the outbound queue.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::{Engines, packet};
use crate::{
    Node, auth,
    disconnect::Disconnect,
    queue::Outbound,
    session::{
        Params, Session,
        ws::{WriterEnd, read_error, within},
    },
};

/// The event that carries the `disconnect` frame (see `Conn::farewell`).
pub(crate) const FAREWELL: &str = "disconnect_reason";

/// The client left by a Socket.IO or Engine.IO packet (`41`, `1`), its
/// WebSocket still open: closed with 1000, nothing more said.
pub(crate) const CLIENT_LEFT: Disconnect = Disconnect { code: 1000, reason: "disconnected by the client" };

/// How long a closing connection may take to hand its last packets over.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// What reaches the engine task from HTTP requests.
pub(crate) enum Input {
    /// The body of a POST: packets separated by `\x1e`.
    Payload(String),
    /// A WebSocket that wants to take over from polling.
    Upgrade(Box<WebSocket>),
}

/// The part of an engine connection its polls, posts and writer share.
pub(crate) struct Conn {
    /// Engine.IO's session id: it names the connection in polls and posts.
    pub(crate) sid: String,
    pub(crate) queue: Arc<Outbound>,
    /// To the engine task: polling connections only (a WebSocket from
    /// the start needs none, and an idle connection keeps its memory).
    pub(crate) input: Option<mpsc::Sender<Input>>,
    /// One poll at a time.
    pub(crate) poll: tokio::sync::Mutex<()>,
    /// Set once a WebSocket took over: polls and posts are refused.
    pub(crate) upgraded: AtomicBool,
    /// Cancelled once a poll took the close, or the engine ended.
    pub(crate) done: CancellationToken,
    /// When a poll last took the queue (polling's `write_timeout`).
    last_drain: Mutex<Instant>,
    /// A std lock, taken by the writer for each batch.
    state: Mutex<State>,
}

struct State {
    /// The namespace of the session, once it is open.
    nsp: Option<String>,
    requests: packet::Requests,
}

impl Conn {
    pub(crate) fn new(node: &Node, polling: bool) -> (Arc<Conn>, Option<mpsc::Receiver<Input>>) {
        let (input, rx) = if polling {
            let (tx, rx) = mpsc::channel(16);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let conn = Conn {
            sid: Uuid::new_v4().simple().to_string(),
            queue: Arc::new(Outbound::new(node.config.limits.outbound_queue_bytes)),
            input,
            poll: tokio::sync::Mutex::new(()),
            upgraded: AtomicBool::new(false),
            done: CancellationToken::new(),
            last_drain: Mutex::new(Instant::now()),
            state: Mutex::new(State { nsp: None, requests: packet::Requests::default() }),
        };
        (Arc::new(conn), rx)
    }

    /// Engine.IO's open packet.
    pub(crate) fn open_packet(&self, node: &Node, polling: bool) -> String {
        let upgrades: &[&str] = if polling { &["websocket"] } else { &[] };
        let open = json!({
            "sid": self.sid,
            "upgrades": upgrades,
            "pingInterval": node.config.heartbeat_interval.as_millis() as u64,
            "pingTimeout": node.config.heartbeat_timeout.as_millis() as u64,
            "maxPayload": node.config.limits.max_message_bytes,
        });
        format!("0{open}")
    }

    /// The packets that carry these queued items (`packet::encode`).
    pub(crate) fn encode(&self, frames: Vec<Utf8Bytes>) -> Vec<Utf8Bytes> {
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let nsp = st.nsp.as_deref().unwrap_or("/");
        frames.iter().map(|f| packet::encode(f, nsp, &mut st.requests)).collect()
    }

    /// What a closing session says last: our `disconnect` frame as the event
    /// `disconnect_reason` (Socket.IO clients refuse an event named
    /// `disconnect`, a reserved name: their parser drops the connection), and
    /// when the client should not reconnect, Socket.IO's disconnect packet
    /// (after which a client does not reconnect by itself; after a transport
    /// close it does). Nothing when the client itself left (code 1000).
    pub(crate) fn farewell(&self, d: Disconnect) -> Vec<Utf8Bytes> {
        let st = self.state.lock().unwrap();
        let Some(nsp) = st.nsp.as_deref().filter(|_| d.code != 1000) else {
            return Vec::new();
        };
        let arg = json!({ "code": d.code, "reason": d.reason, "reconnect": d.reconnect() });
        let mut out = vec![packet::event(nsp, FAREWELL, &arg)];
        if !d.reconnect() {
            out.push(packet::control('1', nsp, None));
        }
        out
    }

    /// A poll took the queue.
    pub(crate) fn drained(&self) {
        *self.last_drain.lock().unwrap() = Instant::now();
    }
}

/// Runs an engine connection until it closes: `socket` when it opened as a
/// WebSocket, none when it polls.
pub(crate) async fn run(
    engines: Arc<Engines>,
    conn: Arc<Conn>,
    rx: Option<mpsc::Receiver<Input>>,
    socket: Option<WebSocket>,
    token: Option<String>,
) {
    let id = Uuid::new_v4();
    let span = tracing::info_span!("connection", connection_id = %id, transport = "socket.io");
    let node = engines.node.clone();
    let mut engine = Engine { node, conn, id, session: None, query_token: token };
    engine.run(rx, socket).instrument(span).await;
    engines.forget(&engine.conn.sid);
}

struct Engine {
    node: Arc<Node>,
    conn: Arc<Conn>,
    /// The session's connection id (Socket.IO's `sid` of the namespace).
    id: Uuid,
    session: Option<Session>,
    query_token: Option<String>,
}

impl Engine {
    async fn run(&mut self, mut rx: Option<mpsc::Receiver<Input>>, socket: Option<WebSocket>) {
        let node = self.node.clone();
        let queue = self.conn.queue.clone();
        let interval = node.config.heartbeat_interval;
        let window = interval + node.config.heartbeat_timeout;
        let write_timeout = node.config.limits.write_timeout;
        // A connection has this long to open its namespace.
        let connect_by = Instant::now() + node.config.auth.authorize_timeout;

        let mut stream: Option<SplitStream<WebSocket>> = None;
        // The upgrading WebSocket, between its probe and its `5`.
        let mut probe: Option<SplitSink<WebSocket, Message>> = None;
        let mut writer: Option<JoinHandle<WriterEnd>> = None;
        if let Some(socket) = socket {
            queue.push(Utf8Bytes::from(self.conn.open_packet(&node, false)));
            let (sink, st) = socket.split();
            stream = Some(st);
            writer = Some(tokio::spawn(write_loop(sink, self.conn.clone(), write_timeout)));
        }
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut last_seen = Instant::now();
        let mut close_by: Option<Instant> = None;
        loop {
            let open = queue.closing().is_none();
            if !open && close_by.is_none() {
                close_by = Some(Instant::now() + CLOSE_FLUSH);
            }
            let clock = self.session.as_ref().map(Session::clock);
            let connecting = self.session.is_none().then_some(connect_by);
            let polling = writer.is_none();
            tokio::select! {
                reason = fired(clock, &node.shutdown, connecting), if open => queue.close(reason),
                // A closing connection leaves the hub now, not once its
                // client has taken the rest.
                _ = queue.closed(), if open => {
                    if self.session.is_some() {
                        node.hub.remove_connection(self.id);
                    }
                }
                _ = ping.tick(), if open => {
                    queue.push(Utf8Bytes::from_static("2"));
                    // A poller that takes nothing queued for `write_timeout`
                    // is a socket that accepts nothing (SPEC §9); one with a
                    // poll waiting is about to take it.
                    let idle = self.conn.last_drain.lock().unwrap().elapsed();
                    let waiting = self.conn.poll.try_lock().is_err();
                    if polling && probe.is_none() && !waiting && queue.queued_bytes() > 2 && idle > write_timeout {
                        queue.close(Disconnect::SLOW);
                    }
                }
                _ = tokio::time::sleep_until(last_seen + window), if open => queue.close(Disconnect::NO_PONG),
                input = recv(&mut rx), if rx.is_some() => match input {
                    Some(Input::Payload(payload)) => {
                        last_seen = Instant::now();
                        for packet in payload.split('\u{1e}') {
                            self.on_packet(packet);
                        }
                    }
                    Some(Input::Upgrade(socket)) => {
                        if stream.is_none() && open {
                            let (sink, st) = (*socket).split();
                            stream = Some(st);
                            probe = Some(sink);
                        }
                    }
                    None => break,
                },
                msg = next(&mut stream), if stream.is_some() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        last_seen = Instant::now();
                        match (probe.is_some(), t.as_str()) {
                            (true, "2probe") => {
                                let sink = probe.as_mut().expect("probing");
                                let answered = within(write_timeout, sink.send(Message::Text("3probe".into()))).await;
                                if answered {
                                    // The waiting poll returns, so the client can upgrade.
                                    queue.push(Utf8Bytes::from_static("6"));
                                } else {
                                    (stream, probe) = (None, None);
                                }
                            }
                            (true, "5") => {
                                self.conn.upgraded.store(true, Ordering::Release);
                                let sink = probe.take().expect("probing");
                                writer = Some(tokio::spawn(write_loop(sink, self.conn.clone(), write_timeout)));
                            }
                            (true, _) => {}
                            (false, t) => self.on_packet(t),
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        last_seen = Instant::now();
                        if let Some(s) = self.session.as_mut() {
                            s.on_binary();
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_seen = Instant::now(),
                    end => {
                        let reason = match end {
                            Some(Err(e)) => read_error(e),
                            _ => None,
                        };
                        if probe.is_some() {
                            // The upgrade failed: the connection goes on polling.
                            (stream, probe) = (None, None);
                        } else {
                            stream = None;
                            queue.close(reason.unwrap_or(Disconnect::CLIENT_CLOSED));
                        }
                    }
                },
                _ = join(&mut writer), if writer.is_some() => break,
                _ = self.conn.done.cancelled(), if polling => break,
                _ = sleep_until(close_by), if polling && close_by.is_some() => break,
            }
        }
        if let Some(session) = &self.session {
            session.end();
        } else {
            // Never counted: nothing to forget but the close.
            queue.close(Disconnect::CLIENT_CLOSED);
        }
        self.conn.done.cancel();
        if let Some(mut stream) = stream {
            // The closing handshake: read until the client's close, so that
            // it reads everything we sent before the socket goes away.
            let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }

    /// Handles one Engine.IO packet of the client.
    fn on_packet(&mut self, text: &str) {
        let queue = &self.conn.queue;
        if queue.closing().is_some() {
            return;
        }
        if text.len() > self.node.config.limits.max_message_bytes + 16 {
            queue.close(Disconnect::MESSAGE_TOO_BIG);
            return;
        }
        match text.as_bytes().first() {
            Some(b'4') => self.on_message(&text[1..]),
            // Pong, noop, and upgrade outside a probe.
            Some(b'3' | b'6' | b'5') => {}
            // Clients of Engine.IO 3 ping; answering is harmless.
            Some(b'2') => {
                queue.push(Utf8Bytes::from_static("3"));
            }
            Some(b'1') => queue.close(CLIENT_LEFT),
            // Base64 binary on polling.
            Some(b'b') => {
                if let Some(s) = self.session.as_mut() {
                    s.on_binary();
                }
            }
            _ => queue.close(Disconnect::PROTOCOL_VIOLATION),
        }
    }

    /// Handles a Socket.IO packet.
    fn on_message(&mut self, text: &str) {
        let connected = self.conn.state.lock().unwrap().nsp.clone();
        match packet::parse(text) {
            Err(packet::Malformed(why)) => match self.session.as_mut() {
                Some(s) => s.on_malformed(&format!("not a Socket.IO packet: {why}")),
                None => self.conn.queue.close(Disconnect::PROTOCOL_VIOLATION),
            },
            Ok(packet::Packet::Connect { nsp, auth }) => self.connect(nsp, auth),
            Ok(packet::Packet::Disconnect { nsp }) => {
                if connected.as_deref() == Some(nsp) {
                    self.conn.queue.close(CLIENT_LEFT);
                }
            }
            Ok(packet::Packet::Event { nsp, ack, name, arg }) => {
                // Events of a namespace not connected are dropped, as
                // Socket.IO servers do.
                if connected.as_deref() == Some(nsp)
                    && let Some(session) = self.session.as_mut()
                {
                    let mut fields = packet::frame_fields(&name, arg);
                    if let Value::Object(obj) = &mut fields {
                        let client_id = obj.remove("id");
                        let status = name == "rpc" && obj.get("method").and_then(Value::as_str) == Some("get_status");
                        let id = self.conn.state.lock().unwrap().requests.open(client_id, ack, status);
                        obj.insert("type".into(), Value::String(name));
                        obj.insert("id".into(), Value::from(id));
                    }
                    session.on_value(fields);
                }
            }
            Ok(packet::Packet::Ack) => {}
            Ok(packet::Packet::Binary) => {
                if let Some(s) = self.session.as_mut() {
                    s.on_binary();
                }
            }
        }
    }

    /// A namespace connect: the handshake's `auth.token` (or `?token=`)
    /// authenticates as a `?token=` does on `/ws`; without one, a node
    /// that refuses anonymous connections waits for `authorize`.
    fn connect(&mut self, nsp: &str, auth: Option<Value>) {
        let refuse = |message: &str, code: &str| {
            let error = json!({ "message": message, "data": { "code": code } });
            self.conn.queue.push(packet::control('4', nsp, Some(&error)));
        };
        if !packet::NAMESPACES.contains(&nsp) {
            refuse("Invalid namespace", "invalid_namespace");
            return;
        }
        if self.session.is_some() {
            refuse("one namespace per connection", "limit_exceeded");
            return;
        }
        let token = auth.as_ref().and_then(|a| a.get("token")).and_then(Value::as_str).map(str::to_owned);
        let mut params = Params::default();
        match token.or_else(|| self.query_token.clone()) {
            Some(token) => match auth::verify(&self.node.config.auth, &token) {
                Ok(credentials) => params.credentials = Some(credentials),
                Err(e) => {
                    refuse(&e.0, "unauthorized");
                    return;
                }
            },
            None => params.must_authorize = !self.node.config.anonymous,
        }
        self.conn.state.lock().unwrap().nsp = Some(nsp.to_owned());
        self.conn.queue.push(packet::control('0', nsp, Some(&json!({ "sid": self.id }))));
        let user = params.credentials.as_ref().map(|c| c.user_id.clone());
        tracing::debug!(user_id = ?user, nsp, "socket.io namespace connected");
        self.session = Some(Session::open(self.node.clone(), self.id, self.conn.queue.clone(), params));
    }
}

/// The close that comes first: the session's clock, or before a session,
/// shutdown and the namespace connect's deadline.
async fn fired(
    clock: Option<crate::session::Clock<'_>>,
    shutdown: &CancellationToken,
    connect_by: Option<Instant>,
) -> Disconnect {
    match clock {
        Some(clock) => clock.fired().await,
        None => tokio::select! {
            _ = shutdown.cancelled() => Disconnect::SHUTDOWN,
            _ = sleep_until(connect_by) => Disconnect::UNAUTHORIZED,
        },
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next(stream: &mut Option<SplitStream<WebSocket>>) -> Option<Result<Message, axum::Error>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Input>>) -> Option<Input> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn join(writer: &mut Option<JoinHandle<WriterEnd>>) -> WriterEnd {
    match writer {
        Some(w) => w.await.unwrap_or(WriterEnd::Broken),
        None => std::future::pending().await,
    }
}

/// Drains the queue into the WebSocket, each item as its packet, and ends
/// with the farewell and the close frame. Every write has `write_timeout`.
async fn write_loop(mut sink: SplitSink<WebSocket, Message>, conn: Arc<Conn>, write_timeout: Duration) -> WriterEnd {
    loop {
        let drained = conn.queue.drain();
        if drained.frames.is_empty() && drained.close.is_none() {
            conn.queue.notified().await;
            continue;
        }
        for packet in conn.encode(drained.frames) {
            if !within(write_timeout, sink.feed(Message::Text(packet))).await {
                return WriterEnd::Broken;
            }
        }
        match drained.close {
            Some(Disconnect::CLIENT_CLOSED) => {
                return if within(write_timeout, sink.close()).await { WriterEnd::Closed } else { WriterEnd::Broken };
            }
            Some(d) => {
                for packet in conn.farewell(d) {
                    if !within(write_timeout, sink.feed(Message::Text(packet))).await {
                        return WriterEnd::Broken;
                    }
                }
                let close = CloseFrame { code: d.code, reason: Utf8Bytes::from(d.reason) };
                let sent = within(write_timeout, sink.send(Message::Close(Some(close)))).await;
                return if sent { WriterEnd::Closed } else { WriterEnd::Broken };
            }
            None => {
                if !within(write_timeout, sink.flush()).await {
                    return WriterEnd::Broken;
                }
            }
        }
    }
}
