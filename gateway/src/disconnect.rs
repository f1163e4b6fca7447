//! Close codes (SPEC §3.4). 4000–4499: the client should reconnect, with
//! backoff and its `since` positions; 4500–4999: it should not without a change.

use crate::protocol::ServerFrame;

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    pub reason: &'static str,
}

impl Disconnect {
    /// The client sent its close: its close frame is answered, nothing else is sent.
    pub const CLIENT_CLOSED: Disconnect = Disconnect { code: 1000, reason: "closed by the client" };
    pub const SHUTDOWN: Disconnect = Disconnect { code: 1001, reason: "going away" };
    pub const PROTOCOL_VIOLATION: Disconnect = Disconnect { code: 1002, reason: "protocol error" };
    pub const INVALID_UTF8: Disconnect = Disconnect { code: 1007, reason: "invalid UTF-8 in a text frame" };
    pub const MESSAGE_TOO_BIG: Disconnect = Disconnect { code: 1009, reason: "message too big" };
    pub const SERVER_ERROR: Disconnect = Disconnect { code: 4001, reason: "server error" };
    pub const SLOW: Disconnect = Disconnect { code: 4002, reason: "slow consumer" };
    pub const NO_PONG: Disconnect = Disconnect { code: 4003, reason: "no pong" };
    pub const INSUFFICIENT_STATE: Disconnect = Disconnect { code: 4004, reason: "insufficient state" };
    pub const TOKEN_EXPIRED: Disconnect = Disconnect { code: 4005, reason: "token expired" };
    pub const TOO_MANY_REQUESTS: Disconnect = Disconnect { code: 4006, reason: "too many requests" };
    pub const UNAUTHORIZED: Disconnect = Disconnect { code: 4500, reason: "unauthorized" };
    pub const PROTOCOL_ERRORS: Disconnect = Disconnect { code: 4501, reason: "too many protocol errors" };
    pub const USER_LIMIT: Disconnect = Disconnect { code: 4502, reason: "connection limit for this user" };
    pub const FORBIDDEN: Disconnect = Disconnect { code: 4503, reason: "forbidden" };

    /// The `disconnect` frame that precedes the close.
    pub fn frame(&self) -> String {
        ServerFrame::Disconnect { code: self.code, reason: self.reason, reconnect: self.reconnect() }.to_json(None)
    }

    /// Whether the client should reconnect.
    pub fn reconnect(&self) -> bool {
        self.code == 1001 || (4000..4500).contains(&self.code)
    }

    /// Whether frames still queued are sent before closing. A slow consumer's
    /// queue is dropped: it is what could not be delivered; nothing may
    /// follow a client's close.
    pub fn flushes(&self) -> bool {
        *self != Disconnect::SLOW && *self != Disconnect::CLIENT_CLOSED
    }
}
