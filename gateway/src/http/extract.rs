//! What the HTTP API's handlers take and give: the admin key, a bounded
//! request body, and the JSON error answer of SPEC §4.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::FromRequestParts,
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use switchboard_proto::error::ErrorCode;

use crate::{Node, error::CallError};

/// An error answer: `{"error": {"code", "message"}}` with a status.
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
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

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn ok(body: Value) -> ApiResult {
    Ok(axum::Json(body).into_response())
}

/// The admin key (SPEC §4), as `Authorization: Bearer <key>` or
/// `X-API-Key`, checked in constant time: an admin handler takes it as its
/// first argument, so that nothing else of the request is read without it.
/// Without a configured key the API is open (dev tools only; the binary
/// always configures one).
pub struct AdminKey;

impl FromRequestParts<Arc<Node>> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let Some(key) = &node.config.admin_key else {
            return Ok(AdminKey);
        };
        let headers = &parts.headers;
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(switchboard_proto::auth::bearer)
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        match given {
            Some(g) if bool::from(g.as_bytes().ct_eq(key.as_bytes())) => Ok(AdminKey),
            Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong admin key")),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin key required as `Authorization: Bearer <key>` or `X-API-Key`",
            )),
        }
    }
}

/// The largest request body: axum's default limit, which `Bytes` applies
/// while reading; a larger `Content-Length` is refused before reading.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A request body, read within `limits.header_timeout` and refused with the
/// JSON error of SPEC §4 when it is over the limit (413) or does not arrive (408).
pub struct Body(pub Bytes);

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
