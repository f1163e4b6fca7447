//! The router: WebSocket endpoints (SPEC §3.1) and the HTTP API (SPEC §4).

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use switchboard_proto::error::ErrorCode;

use crate::{
    Node,
    agent::ANONYMOUS,
    auth,
    bridge::RunRequest,
    bus::Published,
    config::origin_allowed,
    disconnect::Disconnect,
    error::CallError,
    hub::BROADCAST_CHANNEL,
    protocol::{self, Since},
    session::{self, Params},
};

/// The read buffer of a WebSocket, allocated for every connection up front:
/// tungstenite's default (128 KiB) would be most of an idle connection's
/// memory. Client frames are mostly small; bigger ones are read in pieces of
/// this size, up to `max_message_bytes`. Measured: 256 bytes brings an idle
/// connection to 5.8 KiB of RSS (BENCHMARKS.md).
const READ_BUFFER: usize = 256;

/// How much a connection's writer gathers before writing to the socket; the
/// buffer grows only while frames are waiting, and the writer flushes after
/// every batch it takes from the queue.
const WRITE_BUFFER: usize = 64 * 1024;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/ws", any(ws_connect))
        .route("/ws/connect", any(ws_connect))
        .route("/ws/channel/{channel}", any(ws_channel))
        .route("/ws/tasks/{task_id}", any(ws_task))
        .route("/api/ws/broadcast", post(broadcast))
        .route("/api/ws/broadcast/all", post(broadcast_all))
        .route("/api/ws/users/{user_id}/send", post(send_to_user))
        .route("/api/ws/connections/{id}/disconnect", post(disconnect))
        .route("/api/ws/stats", get(stats))
        .route("/api/v1/websocket/status", get(stats))
        .route("/api/ws/channels/{channel}", get(channel_info))
        .route("/api/ws/channels/{channel}/history", get(history))
        .route("/api/ws/info", get(info))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/agui/{agent}", post(agui))
        .merge(session::socketio::router(node.clone()))
        .layer(cors(&node.config.allowed_origins))
        .with_state(node)
}

/// CORS for the HTTP API: the configured origins, the admin headers.
fn cors(allowed: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allowed = allowed.to_vec();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.to_str().is_ok_and(|o| origin_allowed(&allowed, o))
        }))
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::HeaderName::from_static("x-api-key")])
}

/// An error answer: `{"error": {"code", "message"}}` with a status.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        // What a frame calls `invalid_frame` is a bad request body here.
        let name = if e.code == ErrorCode::InvalidFrame { "invalid_request" } else { e.code.as_str() };
        ApiError::new(e.code.http_status(), name, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(body: Value) -> ApiResult {
    Ok(axum::Json(body).into_response())
}

/// Checks `Authorization: Bearer <key>` or `X-API-Key` against the admin key,
/// in constant time. Without a configured key the API is open (dev tools only;
/// the binary always configures one).
fn admin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &node.config.admin_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(switchboard_proto::auth::bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(key.as_bytes())) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong admin key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin key required as `Authorization: Bearer <key>` or `X-API-Key`",
        )),
    }
}

/// The largest request body: axum's default limit, which `Bytes` applies
/// while reading; a larger `Content-Length` is refused before reading.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A request body, read within `limits.header_timeout` and refused with the
/// JSON error of SPEC §4 when it is over the limit (413) or does not arrive (408).
pub struct Body(Bytes);

impl axum::extract::FromRequest<Arc<Node>> for Body {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, node: &Arc<Node>) -> Result<Self, ApiError> {
        use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
        let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "limit_exceeded",
                format!("body over the limit of {MAX_BODY_BYTES} bytes"),
            ));
        }
        let wait = node.config.limits.header_timeout;
        match tokio::time::timeout(wait, Bytes::from_request(req, node)).await {
            Ok(Ok(bytes)) => Ok(Body(bytes)),
            Ok(Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(e)))) => {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded", format!("body too large: {e}")))
            }
            Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                format!("the body did not arrive within {wait:?}"),
            )),
        }
    }
}

fn json_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "body must be a JSON object")),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("body is not valid JSON: {e}"))),
    }
}

/// Returns the first of `names` present in `body` as a string.
fn string_field(body: &serde_json::Map<String, Value>, names: &[&str]) -> Result<Option<String>, ApiError> {
    for name in names {
        match body.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("field `{name}` must be a string"),
                ));
            }
        }
    }
    Ok(None)
}

fn data_field(body: &serde_json::Map<String, Value>, names: &[&str]) -> Value {
    names.iter().find_map(|n| body.get(*n).cloned()).unwrap_or(Value::Null)
}

/// Reads an event body: its name from `type` (or `event`, default `message`)
/// and its data from the first of `data_names` present.
fn event_body(body: &serde_json::Map<String, Value>, data_names: &[&str]) -> Result<(String, Value), ApiError> {
    let event = string_field(body, &["type", "event"])?.unwrap_or_else(|| "message".to_owned());
    Ok((event, data_field(body, data_names)))
}

fn check_channel(channel: &str) -> Result<(), ApiError> {
    switchboard_proto::channel::validate(channel)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()))
}

async fn publish(node: &Node, channel: &str, event: String, data: &Value) -> Result<Published, ApiError> {
    let started = std::time::Instant::now();
    let result = node.bus.current().publish(channel, event, data).await;
    node.metrics.publish_duration.observe(started.elapsed().as_secs_f64());
    Ok(result?)
}

// === WebSocket endpoints ===

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
    let bye = protocol::frame(
        "disconnect",
        None,
        json!({ "code": reason.code, "reason": reason.reason, "reconnect": reason.reconnect() }),
    );
    for frame in [error, bye] {
        let _ = socket.send(Message::Text(frame.into())).await;
    }
    let close = CloseFrame { code: reason.code, reason: reason.reason.into() };
    let _ = socket.send(Message::Close(Some(close))).await;
    // The closing handshake: wait briefly for the client's close.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), socket.recv()).await;
}

// === HTTP API ===

async fn broadcast(State(node): State<Arc<Node>>, headers: HeaderMap, Body(body): Body) -> ApiResult {
    admin(&node, &headers)?;
    let body = json_body(&body)?;
    let channel = string_field(&body, &["channel"])?
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "field `channel` is missing"))?;
    check_channel(&channel)?;
    let (event, data) = event_body(&body, &["message", "data"])?;
    let published = publish(&node, &channel, event, &data).await?;
    let (listeners, _) = node.hub.channel(&channel);
    ok(json!({
        "status": "broadcasted",
        "channel": channel,
        "subscribers": listeners.len(),
        "offset": published.offset,
        "event_id": published.event_id,
    }))
}

async fn broadcast_all(State(node): State<Arc<Node>>, headers: HeaderMap, Body(body): Body) -> ApiResult {
    admin(&node, &headers)?;
    let body = json_body(&body)?;
    let (event, data) = event_body(&body, &["data", "message"])?;
    let published = publish(&node, BROADCAST_CHANNEL, event, &data).await?;
    ok(json!({
        "status": "broadcasted",
        "channel": BROADCAST_CHANNEL,
        "connections": node.hub.connection_count(),
        "offset": published.offset,
        "event_id": published.event_id,
    }))
}

async fn send_to_user(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    Body(body): Body,
) -> ApiResult {
    admin(&node, &headers)?;
    let body = json_body(&body)?;
    let channel = format!("user#{user_id}");
    check_channel(&channel)?;
    let (event, data) = event_body(&body, &["data", "message"])?;
    let published = publish(&node, &channel, event, &data).await?;
    ok(json!({
        "status": "sent",
        "user_id": user_id,
        "channel": channel,
        "offset": published.offset,
        "event_id": published.event_id,
    }))
}

async fn disconnect(State(node): State<Arc<Node>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&node, &headers)?;
    let queue = uuid::Uuid::parse_str(&id).ok().and_then(|id| node.hub.connection_queue(id));
    let Some(queue) = queue else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no connection {id}")));
    };
    queue.close(Disconnect::FORBIDDEN);
    ok(json!({ "status": "disconnected", "connection_id": id }))
}

async fn stats(State(node): State<Arc<Node>>, headers: HeaderMap) -> ApiResult {
    admin(&node, &headers)?;
    let (connections, users, channels) = node.hub.stats();
    let total_channels = channels.len();
    let channels: serde_json::Map<String, Value> = channels.into_iter().map(|(k, n)| (k, json!(n))).collect();
    ok(json!({
        "total_connections": connections,
        "total_users": users,
        "total_channels": total_channels,
        "channels": channels,
        "node": node.config.node,
        "bus_linked": node.hub.link_is_up(),
    }))
}

async fn channel_info(State(node): State<Arc<Node>>, headers: HeaderMap, Path(channel): Path<String>) -> ApiResult {
    admin(&node, &headers)?;
    check_channel(&channel)?;
    let (listeners, position) = node.hub.channel(&channel);
    let position = match position {
        Some(p) => json!(p),
        // Not subscribed on this node: ask the bus where the channel stands.
        None => json!(node.bus.current().position(&channel).await?),
    };
    let mut info = json!({
        "channel": channel,
        "subscribers": listeners.len(),
        "connection_ids": listeners,
        "position": position,
    });
    if node.config.namespace(&channel).presence {
        // Every node's connections, as the bus keeps them.
        info["presence"] = json!(node.bus.current().presence(&channel).await?);
    }
    ok(info)
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<u32>,
}

async fn history(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    admin(&node, &headers)?;
    check_channel(&channel)?;
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(s) => {
            let offset = s.split(':').next().and_then(|o| o.parse::<u64>().ok()).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "`since` must be OFFSET or OFFSET:EPOCH")
            })?;
            Some(Since { offset, epoch: String::new() })
        }
    };
    let history = node.bus.current().history(&channel, since.as_ref(), q.limit.unwrap_or(100)).await?;
    let events: Vec<Value> = history
        .events()
        .map(|e| {
            json!({
                "channel": e.channel,
                "event": e.event,
                "data": serde_json::from_slice::<Value>(e.data).unwrap_or(Value::Null),
                "id": e.id,
                "offset": e.offset,
                "epoch": e.epoch,
                "timestamp": e.timestamp_ms as f64 / 1000.0,
            })
        })
        .collect();
    ok(json!({ "events": events, "position": history.position() }))
}

async fn info(State(node): State<Arc<Node>>) -> ApiResult {
    let limits = &node.config.limits;
    ok(json!({
        "name": "switchboard",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": "v1",
        "node": node.config.node,
        "endpoints": {
            "websocket": ["/ws", "/ws/connect", "/ws/channel/{channel}", "/ws/tasks/{task_id}"],
            "api": "/api/ws",
            "health": "/health",
            "ready": "/ready",
            "metrics": "/metrics",
        },
        "limits": {
            "max_message_bytes": limits.max_message_bytes,
            "max_subscriptions": limits.max_subscriptions,
            "max_connections": limits.max_connections,
            "max_connections_per_user": limits.max_connections_per_user,
            "rate_per_second": limits.rate_per_second,
            "rate_burst": limits.rate_burst,
            "outbound_queue_bytes": limits.outbound_queue_bytes,
            "recovery_max": limits.recovery_max,
        },
        "heartbeat": {
            "interval": node.config.heartbeat_interval.as_secs_f64(),
            "timeout": node.config.heartbeat_timeout.as_secs_f64(),
        },
        "bus_linked": node.hub.link_is_up(),
    }))
}

/// `POST /agui/{agent}`: the AG-UI HTTP protocol. The body is a
/// `RunAgentInput`; the answer streams the run's AG-UI events as Server-Sent
/// Events, so a stock `@ag-ui/client` `HttpAgent` works unchanged. Closing the
/// request cancels the run. Without `auth.anonymous`, a bearer token is required.
async fn agui(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    Body(body): Body,
) -> ApiResult {
    use axum::response::sse::{Event, KeepAlive, Sse};

    let Some(bridge) = node.bridge.clone() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "no agent bridge is configured"));
    };
    let token =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(switchboard_proto::auth::bearer);
    let user = match token.map(|t| auth::verify(&node.config.auth, t)) {
        Some(Ok(credentials)) => credentials.user_id,
        Some(Err(e)) => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.0)),
        None if node.config.anonymous => ANONYMOUS.to_owned(),
        None => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer token is required")),
    };
    let input = match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "body must be a RunAgentInput object")),
    };
    let request = RunRequest {
        agent,
        thread_id: input["threadId"].as_str().unwrap_or_default().to_owned(),
        input: body,
        user_id: user,
        multitask: String::new(),
    };
    let run = match bridge.run(request).await {
        Ok(run) => run,
        Err(CallError { code, message }) => {
            let message = format!("{}: {message}", code.as_str());
            return Err(ApiError { status: code.http_status(), code: "agent_error", message });
        }
    };
    let stream = futures::stream::unfold(run, |mut run| async move {
        match run.next().await {
            Ok(Some(e)) => Some((Ok::<_, std::convert::Infallible>(Event::default().data(e.json)), run)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(message = %e.message, "agent stream ended with an error");
                None
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn health() -> ApiResult {
    ok(json!({ "status": "ok" }))
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    let ready = node.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready, "bus_linked": node.hub.link_is_up() }))).into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.pending_connections.set(node.pending.count() as i64);
    node.metrics.runtime_tasks.set(tokio::runtime::Handle::current().metrics().num_alive_tasks() as i64);
    ([(header::CONTENT_TYPE, switchboard_metrics::CONTENT_TYPE)], node.metrics.render()).into_response()
}
