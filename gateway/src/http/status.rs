//! What anyone may ask a node without a key (SPEC §4): `/api/ws/info`,
//! liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use super::extract::{ApiResult, ok};
use crate::Node;

/// This module's routes.
pub(super) fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/api/ws/info", get(info))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
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
            "socketio": "/socket.io/",
            "sse": "/sse",
            "api": "/api/ws",
            "agui": "/agui/{agent}",
            "console": "/",
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
