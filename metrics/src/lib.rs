//! Prometheus metrics, the same way in every service: each keeps its own
//! `Registry`; this renders it and serves it on `GET /metrics`.
//!
//! A crate of its own so that the proto crate, which every gRPC client
//! depends on, does not depend on axum.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::future::Future;

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;

/// The media type of what `render` returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders a registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` with what `render` returns at each request, until `shutdown`.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body) }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
