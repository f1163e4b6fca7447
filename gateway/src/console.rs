//! The console page (SPEC §7.7), `GET /`: built from `clients/console/`
//! with the TypeScript client and committed to `gateway/assets/`, embedded
//! here so that the binary needs no Node.js. `.ci/run` rebuilds it and fails
//! when the committed files differ.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};

const HTML: &str = include_str!("../assets/console.html");
const JS: &str = include_str!("../assets/console.js");

/// `GET /`.
pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", HTML)
}

/// `GET /console.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    // `no-cache`: revalidated each time, so a new binary's page is never stale.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
