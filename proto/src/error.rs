//! The `error.code` values of SPEC §3.4, in one list for the gateway and the
//! agent bridge: the bridge sends a code in a status's metadata and the
//! gateway reads it back, so no message is parsed against a copy of the list.

use http::StatusCode;
use tonic::{Code, Status, metadata::MetadataValue};

/// The status metadata entry that carries an `ErrorCode`.
pub const ERROR_CODE_METADATA: &str = "switchboard-error-code";

/// An `error.code` a client is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    InvalidFrame,
    UnknownType,
    BinaryNotSupported,
    InvalidChannel,
    Unauthorized,
    PermissionDenied,
    AlreadySubscribed,
    NotSubscribed,
    LimitExceeded,
    RateLimited,
    UnrecoverablePosition,
    UnknownMethod,
    UnknownAgent,
    ThreadBusy,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// Every code, for reading one back from its name.
    const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidFrame,
        ErrorCode::UnknownType,
        ErrorCode::BinaryNotSupported,
        ErrorCode::InvalidChannel,
        ErrorCode::Unauthorized,
        ErrorCode::PermissionDenied,
        ErrorCode::AlreadySubscribed,
        ErrorCode::NotSubscribed,
        ErrorCode::LimitExceeded,
        ErrorCode::RateLimited,
        ErrorCode::UnrecoverablePosition,
        ErrorCode::UnknownMethod,
        ErrorCode::UnknownAgent,
        ErrorCode::ThreadBusy,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The name clients see in `error.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnrecoverablePosition => "unrecoverable_position",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::UnknownAgent => "unknown_agent",
            ErrorCode::ThreadBusy => "thread_busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Reads a code back from its name; `None` for a name outside SPEC §3.4
    /// (an agent worker may answer with codes of its own).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|code| code.as_str() == name)
    }

    /// The gRPC code of a status with this code, for gRPC callers that do
    /// not read the metadata.
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidFrame
            | ErrorCode::UnknownType
            | ErrorCode::BinaryNotSupported
            | ErrorCode::InvalidChannel => Code::InvalidArgument,
            ErrorCode::Unauthorized => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::AlreadySubscribed => Code::AlreadyExists,
            ErrorCode::NotSubscribed | ErrorCode::ThreadBusy => Code::FailedPrecondition,
            ErrorCode::LimitExceeded | ErrorCode::RateLimited => Code::ResourceExhausted,
            ErrorCode::UnrecoverablePosition => Code::OutOfRange,
            ErrorCode::UnknownMethod => Code::Unimplemented,
            ErrorCode::UnknownAgent => Code::NotFound,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The status of an HTTP answer with this code.
    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidFrame
            | ErrorCode::UnknownType
            | ErrorCode::BinaryNotSupported
            | ErrorCode::InvalidChannel
            | ErrorCode::UnrecoverablePosition => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::AlreadySubscribed | ErrorCode::NotSubscribed | ErrorCode::ThreadBusy => StatusCode::CONFLICT,
            ErrorCode::LimitExceeded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UnknownMethod | ErrorCode::UnknownAgent => StatusCode::NOT_FOUND,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Returns a status that carries this code in its metadata, so that the
    /// message stays the client's to read.
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut status = Status::new(self.grpc_code(), message);
        status.metadata_mut().insert(ERROR_CODE_METADATA, MetadataValue::from_static(self.as_str()));
        status
    }

    /// Reads the code a status carries; `None` for a status without one (a
    /// transport failure, or a service that does not send codes).
    pub fn of_status(status: &Status) -> Option<ErrorCode> {
        status.metadata().get(ERROR_CODE_METADATA)?.to_str().ok().and_then(ErrorCode::from_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_name_and_from_a_status() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
            let status = code.status("message");
            assert_eq!((ErrorCode::of_status(&status), status.message()), (Some(code), "message"));
        }
        assert_eq!(ErrorCode::from_name("agent_lost"), None);
        assert_eq!(ErrorCode::of_status(&Status::unavailable("thread_busy: message")), None);
    }
}
