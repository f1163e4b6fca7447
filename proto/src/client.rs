//! The bus and bridge clients, built in one place so that the gateway, the
//! bridge and the command-line tools connect and authenticate the same way.

use std::time::Duration;

use switchboard_tls::ClientTls;
use tonic::{
    body::Body,
    codegen::StdError,
    service::interceptor::InterceptedService,
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use tower::{ServiceExt, util::BoxCloneSyncService};

use crate::{
    agent::v1::{agent_bridge_client::AgentBridgeClient, agent_worker_client::AgentWorkerClient},
    auth::BearerKey,
    eventbus::v1::event_bus_client::EventBusClient,
};

/// What a bus client sends its calls over: a channel to a bus node, or the
/// bus's own service called in this process (`switchboard up`), where an
/// event crosses no socket, HTTP/2 connection or connection task.
pub type BusTransport = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tonic::transport::Error>;

pub type BusClient = EventBusClient<InterceptedService<BusTransport, BearerKey>>;

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
    Ok(bus_over(over_channel(channel(url, tls)?), key))
}

/// The transport of a service called in this process, such as the bus's
/// own (with its key check), for a client beside it: calls run its handlers
/// on the caller's task, and streams pass messages without a socket.
pub fn in_process<S, B>(service: S) -> BusTransport
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>,
    S: Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    let service = service.map_response(|r| r.map(Body::new)).map_err(|never| match never {});
    BoxCloneSyncService::new(service)
}

/// The transport of a channel to a bus node.
pub fn over_channel(channel: Channel) -> BusTransport {
    BoxCloneSyncService::new(channel)
}

/// A bus client over `transport`, such as the bus's in-process service.
pub fn bus_over(transport: BusTransport, key: BearerKey) -> BusClient {
    EventBusClient::with_interceptor(transport, key).max_decoding_message_size(MAX_BUS_ANSWER)
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
