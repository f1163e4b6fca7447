//! `POST /agui/{agent}` (SPEC §4): the AG-UI HTTP protocol over the agent bridge.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use serde_json::Value;

use super::extract::{ApiError, ApiResult, Body};
use crate::{Node, agent::ANONYMOUS, auth, bridge::RunRequest, error::CallError};

/// This module's routes.
pub(super) fn routes() -> Router<Arc<Node>> {
    Router::new().route("/agui/{agent}", post(agui))
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
