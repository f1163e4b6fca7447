//! The Socket.IO transport of a session (SPEC §3.6): Engine.IO v4 on
//! `/socket.io/`, over a WebSocket or HTTP long-polling (which upgrades to a
//! WebSocket), carrying Socket.IO v5 packets on the namespaces `/` and `/ws`.
//!
//! The framing is written here rather than taken from a Socket.IO crate: a
//! Socket.IO connection is a `Session` like a WebSocket one, with the same
//! byte-bounded `Outbound` queue that the hub fills with the shared bytes of
//! each event, encoded once per node; the writer wraps those bytes in the
//! packet's prefix and suffix (`packet::encode`) and never re-encodes them
//! (ARCHITECTURE.md says why not socketioxide).
//!
//! One engine connection serves one namespace (one `Session`): the client
//! of SPEC §3.6 opens one; a second namespace on the same connection gets a
//! connect error. Engine.IO's heartbeat (`2`/`3`, every
//! `gateway.heartbeat_interval`) replaces our JSON `ping`.

mod engine;
mod packet;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{
    Node,
    config::origin_allowed,
    disconnect::Disconnect,
    session::{READ_BUFFER, WRITE_BUFFER},
};
use axum::{
    Router,
    extract::{FromRequestParts, Query, Request, State, WebSocketUpgrade, ws::Utf8Bytes},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use engine::{Conn, Input};
use serde::Deserialize;
use serde_json::json;

/// What a packet may carry on top of a frame of `max_message_bytes`.
const PACKET_OVERHEAD: usize = 256;

/// The engine connections of a node that are reached by their `sid`:
/// those that started by polling (their polls, posts and upgrade find them).
pub(crate) struct Engines {
    node: Arc<Node>,
    polling: Mutex<HashMap<String, Arc<Conn>>>,
}

impl Engines {
    fn find(&self, sid: &str) -> Option<Arc<Conn>> {
        self.polling.lock().unwrap().get(sid).cloned()
    }

    fn forget(&self, sid: &str) {
        self.polling.lock().unwrap().remove(sid);
    }
}

/// `/socket.io/`, to merge into the gateway's router.
pub(crate) fn router(node: Arc<Node>) -> Router<Arc<Node>> {
    let engines = Arc::new(Engines { node, polling: Mutex::new(HashMap::new()) });
    Router::new().route("/socket.io/", any(handle)).route("/socket.io", any(handle)).with_state(engines)
}

#[derive(Deserialize, Default)]
struct EioQuery {
    #[serde(rename = "EIO")]
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
    /// A JWT, for clients that cannot send `auth` (the handshake's
    /// `auth.token` is the usual way).
    token: Option<String>,
}

/// Engine.IO's error answer: `{"code", "message"}` with a 400.
fn engine_error(code: u8, message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({ "code": code, "message": message }))).into_response()
}

/// The JSON error of the HTTP API (SPEC §4).
fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=UTF-8")], body).into_response()
}

async fn handle(State(engines): State<Arc<Engines>>, Query(q): Query<EioQuery>, req: Request) -> Response {
    if q.eio.as_deref() != Some("4") {
        return engine_error(5, "Unsupported protocol version");
    }
    let node = engines.node.clone();
    let (mut parts, body) = req.into_parts();
    match (q.transport.as_deref(), q.sid.as_deref()) {
        (Some("websocket"), sid) => {
            let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
                Ok(ws) => ws,
                Err(e) => return e.into_response(),
            };
            let limit = node.config.limits.max_message_bytes + PACKET_OVERHEAD;
            let ws = ws.max_message_size(limit).max_frame_size(limit).read_buffer_size(READ_BUFFER);
            let ws = ws.write_buffer_size(WRITE_BUFFER);
            match sid {
                // An upgrade of a polling connection: its engine takes the socket.
                Some(sid) => {
                    let Some(conn) = engines.find(sid) else {
                        return engine_error(1, "Session ID unknown");
                    };
                    let Some(input) = conn.input.clone() else {
                        return engine_error(3, "Bad request");
                    };
                    ws.on_upgrade(move |socket| async move {
                        let _ = input.send(Input::Upgrade(Box::new(socket))).await;
                    })
                }
                None => {
                    if let Some(refused) = admit(&node, &parts.headers) {
                        return refused;
                    }
                    let (conn, rx) = Conn::new(&node, false);
                    let sessions = node.sessions.clone();
                    ws.on_upgrade(move |socket| {
                        sessions.track_future(engine::run(engines, conn, rx, Some(socket), q.token))
                    })
                }
            }
        }
        (Some("polling"), None) if parts.method == Method::GET => {
            if let Some(refused) = admit(&node, &parts.headers) {
                return refused;
            }
            let (conn, rx) = Conn::new(&node, true);
            let open = conn.open_packet(&node, true);
            engines.polling.lock().unwrap().insert(conn.sid.clone(), conn.clone());
            node.sessions.spawn(engine::run(engines.clone(), conn, rx, None, q.token));
            text(open)
        }
        (Some("polling"), None) => engine_error(2, "Bad handshake method"),
        (Some("polling"), Some(sid)) => {
            let Some(conn) = engines.find(sid) else {
                return engine_error(1, "Session ID unknown");
            };
            if conn.upgraded.load(std::sync::atomic::Ordering::Acquire) {
                return engine_error(3, "Bad request");
            }
            match parts.method {
                Method::GET => poll(&node, &conn).await,
                Method::POST => post(&node, &conn, body).await,
                _ => engine_error(2, "Bad request method"),
            }
        }
        _ => engine_error(0, "Transport unknown"),
    }
}

/// The checks before a connection opens, as for `/ws`: its origin, the
/// node shutting down, the node's connection limit. Returns the refusal.
fn admit(node: &Node, headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| !origin_allowed(&node.config.allowed_origins, o)) {
        return Some(api_error(StatusCode::FORBIDDEN, "permission_denied", "origin not allowed"));
    }
    if !node.ready() && node.shutdown.is_cancelled() {
        return Some(api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "shutting down"));
    }
    if node.hub.connection_count() >= node.config.limits.max_connections {
        return Some(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_exceeded",
            "this node is at its connection limit",
        ));
    }
    None
}

/// A long poll: what is queued, as one payload (packets separated by
/// `\x1e`), once there is something; the close ends the connection.
async fn poll(node: &Node, conn: &Arc<Conn>) -> Response {
    let Ok(_one) = conn.poll.try_lock() else {
        // Two polls at once: a broken client.
        conn.queue.close(Disconnect::PROTOCOL_VIOLATION);
        return engine_error(3, "Bad request");
    };
    let wait = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    loop {
        let drained = conn.queue.drain();
        if !drained.frames.is_empty() || drained.close.is_some() {
            let mut packets = conn.encode(drained.frames);
            if let Some(d) = drained.close {
                packets.extend(conn.farewell(d));
                packets.push(Utf8Bytes::from_static("1"));
                conn.done.cancel();
            }
            conn.drained();
            return text(join(&packets));
        }
        tokio::select! {
            _ = conn.queue.notified() => {}
            _ = conn.done.cancelled() => return text("1".to_owned()),
            // The engine pings well before this.
            _ = tokio::time::sleep(wait) => return text("6".to_owned()),
        }
    }
}

fn join(packets: &[Utf8Bytes]) -> String {
    let mut out = String::with_capacity(packets.iter().map(|p| p.len() + 1).sum());
    for (i, p) in packets.iter().enumerate() {
        if i > 0 {
            out.push('\u{1e}');
        }
        out.push_str(p.as_str());
    }
    out
}

/// The packets a client posts, handed to its engine.
async fn post(node: &Node, conn: &Arc<Conn>, body: axum::body::Body) -> Response {
    // A payload may batch packets up to `maxPayload` (`max_message_bytes`).
    let limit = node.config.limits.max_message_bytes + PACKET_OVERHEAD;
    let read = tokio::time::timeout(node.config.limits.header_timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            conn.queue.close(Disconnect::MESSAGE_TOO_BIG);
            return api_error(StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded", "payload over maxPayload");
        }
        Err(_) => return api_error(StatusCode::REQUEST_TIMEOUT, "invalid_request", "the body did not arrive in time"),
    };
    let Ok(payload) = String::from_utf8(bytes.to_vec()) else {
        conn.queue.close(Disconnect::INVALID_UTF8);
        return engine_error(3, "Bad request");
    };
    let Some(input) = &conn.input else {
        return engine_error(3, "Bad request");
    };
    if input.send(Input::Payload(payload)).await.is_err() {
        return engine_error(1, "Session ID unknown");
    }
    text("ok".to_owned())
}
