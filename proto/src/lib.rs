//! Generated gRPC types and services of Switchboard.
//!
//! Only this crate runs code generation. The types stop at each service's
//! edge: domain code converts them with `From`/`TryFrom`. Alongside them,
//! what both ends of a call must agree on: API keys, channel names, error
//! codes; and `client`, where every bus and bridge client is built.

#![forbid(unsafe_code)]

pub mod auth;
pub mod channel;
pub mod client;
pub mod error;

/// `switchboard.eventbus.v1`: the event bus.
pub mod eventbus {
    #[allow(clippy::all)]
    pub mod v1 {
        tonic::include_proto!("switchboard.eventbus.v1");
    }
}

/// `switchboard.agent.v1`: the agent bridge and its workers.
pub mod agent {
    #[allow(clippy::all)]
    pub mod v1 {
        tonic::include_proto!("switchboard.agent.v1");
    }
}

/// The encoded descriptor set of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchboard_descriptor");
