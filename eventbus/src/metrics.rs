//! Prometheus metrics of the event bus (SPEC §11), served on
//! `eventbus.metrics_listen` when it is set.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub struct Metrics {
    registry: Registry,
    pub publish_duration: Histogram,
    pub channels: Gauge,
    pub subscriptions: Gauge,
    pub published: Counter<u64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let publish_duration =
            Histogram::new([0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]);
        let channels = Gauge::default();
        let subscriptions = Gauge::default();
        let published = Counter::default();
        registry.register(
            "switchboard_publish_duration_seconds",
            "Time from receiving a publish to its acknowledgement (stored, and synced where durable)",
            publish_duration.clone(),
        );
        registry.register("switchboard_channels", "Channels known to the bus", channels.clone());
        registry.register(
            "switchboard_subscriptions",
            "Live channel subscriptions of Subscribe streams",
            subscriptions.clone(),
        );
        registry.register("switchboard_events_published", "Events stored", published.clone());
        Metrics { registry, publish_duration, channels, subscriptions, published }
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
