//! Criterion benchmarks of the gateway's hot paths: writing an event frame,
//! decoding a client frame, and the hub's fan-out to N listeners.
//! Run with `cargo bench -p switchboard-gateway`.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::extract::ws::Utf8Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_gateway::{
    hub::{Frame, Hub},
    metrics::Metrics,
    protocol::{self, EventRef, Position},
    queue::Outbound,
};

fn payload(n: usize) -> Vec<u8> {
    format!(r#"{{"seq":1,"pad":"{}"}}"#, "x".repeat(n.saturating_sub(20))).into_bytes()
}

fn event_frame(c: &mut Criterion) {
    let data = payload(256);
    let e = EventRef {
        channel: "missions",
        event: "mission_updated",
        data: &data,
        id: "01a20670-32c2-77dd-92e4-7297a6d82ad1",
        offset: 123_456,
        epoch: "f8b89308a82c0ac3",
        timestamp_ms: 1_795_404_346_050,
    };
    c.bench_function("event_frame/256B", |b| b.iter(|| protocol::event_frame(black_box(&e))));
}

fn decode(c: &mut Criterion) {
    let subscribe =
        r#"{"type":"subscribe","channel":"task:42","since":{"offset":17,"epoch":"f8b89308a82c0ac3"},"id":7}"#;
    let publish =
        r#"{"type":"publish","channel":"chat:1","event":"said","data":{"text":"hello","n":[1,2,3]},"id":"r1"}"#;
    c.bench_function("decode/subscribe", |b| b.iter(|| protocol::parse(black_box(subscribe))));
    c.bench_function("decode/publish", |b| b.iter(|| protocol::parse(black_box(publish))));
}

/// A hub with `n` listeners on one active channel, their queues, and the
/// receiving end of the link (kept so the hub's one join is accepted).
fn hub_with(n: usize) -> (Hub, Vec<Arc<Outbound>>, tokio::sync::mpsc::Receiver<switchboard_gateway::hub::LinkCommand>) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hub = Hub::new(tx, 1000, 128, Arc::new(Metrics::new()));
    let mut queues = Vec::with_capacity(n);
    assert!(hub.relink().is_empty());
    for _ in 0..n {
        let id = uuid::Uuid::new_v4();
        let q = Arc::new(Outbound::new(usize::MAX / 2));
        hub.add_connection(id, q.clone(), None, 16);
        hub.subscribe(id, "bench", None, None).unwrap();
        queues.push(q);
    }
    hub.on_joined("bench", Position { offset: 0, epoch: "e".into() }, false);
    for q in &queues {
        q.drain();
    }
    (hub, queues, rx)
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    for n in [100usize, 1_000, 10_000] {
        let (hub, queues, _link) = hub_with(n);
        let text = Utf8Bytes::from(String::from_utf8(payload(256)).unwrap());
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut offset = 0u64;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    offset += 1;
                    let frame = Frame { offset, epoch: Arc::from("e"), text: text.clone(), timestamp_ms: 0 };
                    let started = Instant::now();
                    hub.on_events("bench", std::slice::from_ref(&frame));
                    total += started.elapsed();
                    // Draining is the writers' work, not the fan-out's.
                    for q in &queues {
                        black_box(q.drain());
                    }
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, event_frame, decode, fan_out);
criterion_main!(benches);
