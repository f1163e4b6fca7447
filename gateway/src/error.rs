//! What a failed bus or bridge call tells the client, whichever way it asked
//! (a frame or the HTTP API).

use serde_json::Value;
use switchboard_proto::error::ErrorCode;

use crate::protocol;

/// An `error.code` and a message safe to show a client; the status it came
/// from is logged where it is read, when it says more than the client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub code: ErrorCode,
    pub message: String,
}

impl CallError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CallError { code, message: message.into() }
    }

    /// The `error` frame that answers the request `id`.
    pub fn frame(&self, id: Option<&Value>) -> String {
        protocol::error(self.code.as_str(), &self.message, id)
    }
}
