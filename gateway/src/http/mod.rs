//! The gateway's HTTP surface: one router over the WebSocket endpoints
//! (SPEC §3.1, `ws`), the admin API (`admin`), AG-UI over HTTP (`agui`) and
//! what needs no key (`status`), with CORS for the configured origins.

mod admin;
mod agui;
mod extract;
mod status;
mod ws;

use std::sync::Arc;

use axum::{Router, http::header, routing::get};

use crate::{Node, config::origin_allowed, console, session};

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .merge(ws::routes())
        .merge(admin::routes())
        .merge(status::routes())
        .merge(agui::routes())
        // The sessions of other transports (Server-Sent Events, Socket.IO), and the console page.
        .route("/sse", get(session::sse::connect))
        .merge(session::socketio::router(node.clone()))
        .route("/", get(console::page))
        .route("/console.js", get(console::script))
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
