//! Errors of the event bus, and their one mapping to gRPC statuses.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid channel: {0}")]
    InvalidChannel(#[from] switchboard_proto::channel::ChannelNameError),
    #[error("data is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("event is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("the event bus is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open data directory {path}: {cause}")]
    Open { path: String, cause: String },
    #[error("cannot reach the shared backend at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("data directory {path} is in use by another process")]
    Locked { path: String },
    #[error("{0}")]
    Io(String),
}

impl BusError {
    /// Returns the gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            BusError::InvalidChannel(_)
            | BusError::InvalidJson(_)
            | BusError::TooLarge { .. }
            | BusError::InvalidArgument(_) => Code::InvalidArgument,
            BusError::Store(_) => Code::Internal,
            BusError::ShuttingDown => Code::Unavailable,
        }
    }

    /// The snake-case code name carried in `PublishResponse.error`.
    pub fn code_name(&self) -> &'static str {
        match self.code() {
            Code::InvalidArgument => "invalid_argument",
            Code::Unavailable => "unavailable",
            _ => "internal",
        }
    }
}

impl From<BusError> for Status {
    fn from(err: BusError) -> Status {
        if let BusError::Store(cause) = &err {
            tracing::error!(%cause, "storage error");
        }
        Status::new(err.code(), err.to_string())
    }
}
