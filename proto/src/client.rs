//! The bus and bridge clients, built in one place so that the gateway, the
//! bridge and the command-line tools connect and authenticate the same way.

use std::time::Duration;

use switchboard_tls::ClientTls;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    agent::v1::{agent_bridge_client::AgentBridgeClient, agent_worker_client::AgentWorkerClient},
    auth::BearerKey,
    eventbus::v1::event_bus_client::EventBusClient,
};

pub type BusClient = EventBusClient<InterceptedService<Channel, BearerKey>>;

pub type BridgeClient = AgentBridgeClient<InterceptedService<Channel, BearerKey>>;

pub type WorkerClient = AgentWorkerClient<InterceptedService<Channel, BearerKey>>;

/// The largest bus answer a client reads: a history page of `recovery_max`
/// events can be far over tonic's default of 4 MiB.
const MAX_BUS_ANSWER: usize = 64 * 1024 * 1024;

/// Builds a bus client that connects on first use, so that a service can
/// start before the bus does. An `https://` URL is reached over TLS with
/// `tls` (`tls.ca`, `tls.client_cert`, `tls.client_key`: a `ClientTls`, read
/// again on SIGHUP, whose connector dials every connection of the channel),
/// or tonic's own TLS with the public roots without it.
///
/// # Errors
/// When the URL is malformed.
pub fn bus(url: &str, key: BearerKey, tls: Option<&ClientTls>) -> Result<BusClient, tonic::transport::Error> {
    Ok(EventBusClient::with_interceptor(channel(url, tls)?, key).max_decoding_message_size(MAX_BUS_ANSWER))
}

/// Builds an agent bridge client that connects on first use; `tls` as for `bus`.
///
/// # Errors
/// When the URL is malformed.
pub fn bridge(url: &str, key: BearerKey, tls: Option<&ClientTls>) -> Result<BridgeClient, tonic::transport::Error> {
    Ok(AgentBridgeClient::with_interceptor(channel(url, tls)?, key))
}

/// Builds an `AgentWorker` client, for a worker that attaches to a bridge
/// (`switchboard bench runs`); `tls` as for `bus`.
///
/// # Errors
/// When the URL is malformed.
pub fn worker(url: &str, key: BearerKey, tls: Option<&ClientTls>) -> Result<WorkerClient, tonic::transport::Error> {
    Ok(AgentWorkerClient::with_interceptor(channel(url, tls)?, key))
}

fn channel(url: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    // A short connect timeout: a caller waiting on a dead node should hear
    // `unavailable` (and a gateway move to the next bus node) soon.
    let endpoint = |url: &str| {
        Endpoint::from_shared(url.to_owned()).map(|e| e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true))
    };
    match (url.strip_prefix("https://"), tls) {
        // The connector runs the handshake; tonic, seeing `http`, adds none.
        (Some(rest), Some(tls)) => Ok(endpoint(&format!("http://{rest}"))?.connect_with_connector_lazy(tls.clone())),
        (Some(_), None) => Ok(endpoint(url)?.tls_config(ClientTlsConfig::new().with_webpki_roots())?.connect_lazy()),
        (None, _) => Ok(endpoint(url)?.connect_lazy()),
    }
}
