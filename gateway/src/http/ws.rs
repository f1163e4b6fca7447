//! The WebSocket endpoints (SPEC §3.1): what is checked before the upgrade
//! (origin, shutdown, the node's connection limit, `since`, a `?token=`),
//! then the session.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, Query, State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use serde::Deserialize;

use super::extract::ApiError;
use crate::{
    Node, auth,
    config::origin_allowed,
    disconnect::Disconnect,
    protocol::{self, Since},
    session::{self, Params, READ_BUFFER, WRITE_BUFFER},
};

/// This module's routes.
pub(super) fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/ws", any(ws_connect))
        .route("/ws/connect", any(ws_connect))
        .route("/ws/channel/{channel}", any(ws_channel))
        .route("/ws/tasks/{task_id}", any(ws_task))
}

#[derive(Deserialize, Default)]
struct WsQuery {
    token: Option<String>,
    since: Option<String>,
}

async fn ws_connect(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(node, headers, q, ws, None)
}

async fn ws_channel(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(node, headers, q, ws, Some(channel))
}

async fn ws_task(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(node, headers, q, ws, Some(format!("task:{task_id}")))
}

fn upgrade(node: Arc<Node>, headers: HeaderMap, q: WsQuery, ws: WebSocketUpgrade, channel: Option<String>) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| !origin_allowed(&node.config.allowed_origins, o)) {
        return ApiError::new(StatusCode::FORBIDDEN, "permission_denied", "origin not allowed").into_response();
    }
    if !node.ready() && node.shutdown.is_cancelled() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "shutting down").into_response();
    }
    // Pending connections make room when needed (see `server`); sessions do not.
    if node.hub.connection_count() >= node.config.limits.max_connections {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_exceeded",
            "this node is at its connection limit",
        )
        .into_response();
    }
    let since: Option<Since> = match q.since.as_deref() {
        None | Some("") => None,
        Some(s) => match protocol::parse_since(s) {
            Some(since) => Some(since),
            None => {
                return ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "`since` must be OFFSET:EPOCH")
                    .into_response();
            }
        },
    };
    let mut params = Params { channel, since, ..Params::default() };
    match q.token.as_deref() {
        Some(token) => match auth::verify(&node.config.auth, token) {
            Ok(credentials) => params.credentials = Some(credentials),
            // Refused after the upgrade, so that a browser sees why.
            Err(e) => {
                return ws.on_upgrade(move |socket| refuse(socket, Disconnect::UNAUTHORIZED, e.0));
            }
        },
        None => params.must_authorize = !node.config.anonymous,
    }
    let limit = node.config.limits.max_message_bytes;
    let sessions = node.sessions.clone();
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| sessions.track_future(session::run(node, socket, params)))
}

async fn refuse(mut socket: axum::extract::ws::WebSocket, reason: Disconnect, message: String) {
    use axum::extract::ws::{CloseFrame, Message};
    let error = protocol::error("unauthorized", &message, None);
    for frame in [error, reason.frame()] {
        let _ = socket.send(Message::Text(frame.into())).await;
    }
    let close = CloseFrame { code: reason.code, reason: reason.reason.into() };
    let _ = socket.send(Message::Close(Some(close))).await;
    // The closing handshake: wait briefly for the client's close.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), socket.recv()).await;
}
