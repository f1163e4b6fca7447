//! Prometheus metrics of one gateway node (SPEC §11), in a registry owned by
//! the node: no process globals, so several nodes can run in one test.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub disconnects: Family<CodeLabel, Counter>,
    pub subscriptions: Gauge,
    pub channels: Gauge,
    pub messages_sent: Counter,
    pub messages_received: Counter,
    pub broadcast_duration: Histogram,
    pub publish_duration: Histogram,
    pub bus_lag: Gauge<f64, AtomicU64>,
    /// Connections that have not finished their HTTP request yet.
    pub pending_connections: Gauge,
    /// Tasks alive in this process's runtime, read when rendered: a leak
    /// shows as growth under a steady load.
    pub runtime_tasks: Gauge,
}

fn latency_buckets() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            disconnects: Family::default(),
            subscriptions: Gauge::default(),
            channels: Gauge::default(),
            messages_sent: Counter::default(),
            messages_received: Counter::default(),
            broadcast_duration: latency_buckets(),
            publish_duration: latency_buckets(),
            bus_lag: Gauge::default(),
            pending_connections: Gauge::default(),
            runtime_tasks: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("switchboard_connections", "Open WebSocket connections", m.connections.clone());
        registry.register(
            "switchboard_connections_accepted",
            "WebSocket connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register("switchboard_disconnects", "Connections closed, by close code", m.disconnects.clone());
        registry.register("switchboard_subscriptions", "Channel subscriptions on this node", m.subscriptions.clone());
        registry.register("switchboard_channels", "Channels with a bus subscription on this node", m.channels.clone());
        registry.register("switchboard_messages_sent", "Event frames queued to clients", m.messages_sent.clone());
        registry.register("switchboard_messages_received", "Frames received from clients", m.messages_received.clone());
        registry.register(
            "switchboard_broadcast_duration_seconds",
            "Time to fan a batch of events out to local listeners",
            m.broadcast_duration.clone(),
        );
        registry.register(
            "switchboard_publish_duration_seconds",
            "Time for the bus to acknowledge a publish from this node",
            m.publish_duration.clone(),
        );
        registry.register(
            "switchboard_bus_lag_seconds",
            "Age of the newest event received from the bus",
            m.bus_lag.clone(),
        );
        registry.register(
            "switchboard_pending_connections",
            "Connections still sending their HTTP request (they count against max_connections)",
            m.pending_connections.clone(),
        );
        registry.register("switchboard_runtime_tasks", "Tasks alive in the process's runtime", m.runtime_tasks.clone());
        Metrics { registry, ..m }
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        switchboard_metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
