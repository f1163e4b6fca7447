//! Prometheus metrics of the agent bridge (SPEC §11): active runs, run
//! durations by agent and outcome, attached workers. Served on
//! `agent_bridge.metrics_listen` when it is set.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub agent: String,
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub runs_active: Gauge,
    pub run_duration: Family<RunLabels, Histogram>,
    pub workers: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let runs_active = Gauge::default();
        let run_duration = Family::<RunLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
        });
        let workers = Gauge::default();
        registry.register("switchboard_runs_active", "Runs in progress", runs_active.clone());
        registry.register(
            "switchboard_run_duration_seconds",
            "Run durations by agent and outcome",
            run_duration.clone(),
        );
        registry.register("switchboard_workers", "Attached agent workers", workers.clone());
        Metrics { registry, runs_active, run_duration, workers }
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
