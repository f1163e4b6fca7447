//! Criterion benchmarks of the event bus storage: appending (the writer's
//! commit) and reading history, for the memory and embedded backends.
//! Run with `cargo bench -p switchboard-eventbus`.

use std::{hint::black_box, sync::Arc};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_eventbus::{
    Event, Fsync,
    store::{Batch, ChannelMeta, Store, embedded::EmbeddedStore, memory::MemoryStore},
};

fn event(offset: u64) -> Event {
    Event {
        id: format!("id-{offset}"),
        channel: Arc::from("bench"),
        name: "bench".into(),
        data: format!(r#"{{"seq":{offset},"pad":"{}"}}"#, "x".repeat(1000)).into(),
        offset,
        epoch: Arc::from("e"),
        timestamp_ms: 1_795_404_346_050,
        meta: Vec::new(),
    }
}

fn batch(first: u64, n: u64) -> Batch {
    let events: Vec<Event> = (first..first + n).map(event).collect();
    let top = first + n - 1;
    Batch {
        metas: vec![ChannelMeta { channel: Arc::from("bench"), top, first: top.saturating_sub(10_000).max(1) }],
        events,
        idempotency: Vec::new(),
    }
}

fn stores() -> Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(dir.path(), Fsync::Never, 64 << 20).unwrap();
    vec![("memory", Box::new(MemoryStore::new()), None), ("embedded", Box::new(embedded), Some(dir))]
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    for (name, store, _dir) in stores() {
        for n in [1u64, 64] {
            let mut next = 1;
            group.throughput(Throughput::Elements(n));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter(|| {
                    store.commit(&batch(next, n)).unwrap();
                    next += n;
                })
            });
        }
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_100");
    for (name, store, _dir) in stores() {
        store.commit(&batch(1, 10_000)).unwrap();
        group.throughput(Throughput::Elements(100));
        group.bench_function(name, |b| b.iter(|| black_box(store.read("bench", 5_000, 100).unwrap())));
    }
    group.finish();
}

criterion_group!(benches, append, read);
criterion_main!(benches);
