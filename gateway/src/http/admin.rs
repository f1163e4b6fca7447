//! The admin half of the HTTP API (SPEC §4): publishing through the bus,
//! closing a connection, stats, a channel's subscribers, position and
//! history. Every handler takes the `AdminKey` first.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{AdminKey, ApiError, ApiResult, Body, ok};
use crate::{Node, bus::Published, disconnect::Disconnect, hub::BROADCAST_CHANNEL, protocol::Since};

/// This module's routes.
pub(super) fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/api/ws/broadcast", post(broadcast))
        .route("/api/ws/broadcast/all", post(broadcast_all))
        .route("/api/ws/users/{user_id}/send", post(send_to_user))
        .route("/api/ws/connections/{id}/disconnect", post(disconnect))
        .route("/api/ws/stats", get(stats))
        .route("/api/v1/websocket/status", get(stats))
        .route("/api/ws/channels/{channel}", get(channel_info))
        .route("/api/ws/channels/{channel}/history", get(history))
}

async fn broadcast(_: AdminKey, State(node): State<Arc<Node>>, Body(body): Body) -> ApiResult {
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

async fn broadcast_all(_: AdminKey, State(node): State<Arc<Node>>, Body(body): Body) -> ApiResult {
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
    _: AdminKey,
    State(node): State<Arc<Node>>,
    Path(user_id): Path<String>,
    Body(body): Body,
) -> ApiResult {
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

async fn disconnect(_: AdminKey, State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    let queue = uuid::Uuid::parse_str(&id).ok().and_then(|id| node.hub.connection_queue(id));
    let Some(queue) = queue else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no connection {id}")));
    };
    queue.close(Disconnect::FORBIDDEN);
    ok(json!({ "status": "disconnected", "connection_id": id }))
}

async fn stats(_: AdminKey, State(node): State<Arc<Node>>) -> ApiResult {
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

async fn channel_info(_: AdminKey, State(node): State<Arc<Node>>, Path(channel): Path<String>) -> ApiResult {
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
    _: AdminKey,
    State(node): State<Arc<Node>>,
    Path(channel): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
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
