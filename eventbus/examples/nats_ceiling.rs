//! What JetStream itself does for the `nats` backend's publishes, as a
//! baseline for `switchboard bench publish` (BENCHMARKS.md): publishers
//! pipelining 1 KiB messages into one file stream configured like a
//! channel's (history bound, duplicate window, republish), nothing else.
//!
//! Then what a channel's first publish or join costs: creating 500 such
//! streams one after the other.
//!
//! `cargo run --release -p switchboard-eventbus --example nats_ceiling -- [URL] [PUBLISHERS] [SECONDS]`

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, stream};
use futures::{StreamExt, stream::FuturesOrdered};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let publishers: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(5), |a| a.parse())?;
    let js = jetstream::new(async_nats::connect(&url).await?);
    let _ = js.delete_stream("SBCEILING").await;
    let config = |name: &str| stream::Config {
        name: name.to_uppercase(),
        subjects: vec![format!("{name}.in")],
        max_messages: 1000,
        duplicate_window: Duration::from_secs(300),
        republish: Some(stream::Republish {
            source: format!("{name}.in"),
            destination: format!("{name}.live"),
            headers_only: false,
        }),
        ..Default::default()
    };
    js.create_stream(config("sbceiling")).await?;
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (js, payload, acked) = (js.clone(), payload.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            while Instant::now() < deadline {
                in_flight.push_back(js.publish("sbceiling.in", payload.clone()).await.expect("sent").into_future());
                // 16 each: 256 publishers stay under the client's 5,000
                // acks in flight, past which a send waits for an ack that
                // only a poll of this very queue would take.
                if in_flight.len() >= 16 && in_flight.next().await.is_some_and(|ack| ack.is_ok()) {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(ack) = in_flight.next().await {
                if ack.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await?;
    }
    let n = acked.load(Ordering::Relaxed);
    println!(
        "{n} acked in {:.2} s: {:.0} messages/s",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    js.delete_stream("SBCEILING").await?;

    let started = Instant::now();
    for i in 0..500 {
        js.create_stream(config(&format!("sbceiling{i}"))).await?;
    }
    let per_stream = started.elapsed() / 500;
    println!("creating a stream: {:.2} ms each (500, one after the other)", per_stream.as_secs_f64() * 1e3);
    for i in 0..500 {
        js.delete_stream(format!("SBCEILING{i}")).await?;
    }
    Ok(())
}
