//! The bus and bridge clients, built in one place so that the gateway, the
//! bridge and the command-line tools connect and authenticate the same way.

use std::time::Duration;

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    agent::v1::agent_bridge_client::AgentBridgeClient, auth::BearerKey, eventbus::v1::event_bus_client::EventBusClient,
};

pub type BusClient = EventBusClient<InterceptedService<Channel, BearerKey>>;

pub type BridgeClient = AgentBridgeClient<InterceptedService<Channel, BearerKey>>;

/// The largest bus answer a client reads: a history page of `recovery_max`
/// events can be far over tonic's default of 4 MiB.
const MAX_BUS_ANSWER: usize = 64 * 1024 * 1024;

/// Builds a bus client that connects on first use, so that a service can
/// start before the bus does.
///
/// # Errors
/// When the URL is malformed.
pub fn bus(url: &str, key: BearerKey) -> Result<BusClient, tonic::transport::Error> {
    Ok(EventBusClient::with_interceptor(channel(url)?, key).max_decoding_message_size(MAX_BUS_ANSWER))
}

/// Builds an agent bridge client that connects on first use.
///
/// # Errors
/// When the URL is malformed.
pub fn bridge(url: &str, key: BearerKey) -> Result<BridgeClient, tonic::transport::Error> {
    Ok(AgentBridgeClient::with_interceptor(channel(url)?, key))
}

fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    // A short connect timeout: a caller waiting on a dead node should hear
    // `unavailable` (and a gateway move to the next bus node) soon.
    Ok(Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy())
}
