//! `switchboard bench threads`: appends to a long thread against appends
//! that start new threads, and appends to a thread at its bound, on the
//! agent bridge's thread store in a directory of its own.

use std::path::PathBuf;

use clap::Args;
use switchboard_agent_bridge::threads::Threads;

use super::{histogram, latency, print};
use serde_json::{Value, json};

#[derive(Args)]
pub struct ThreadsArgs {
    /// Where the bench makes its own directory, removed afterwards (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Messages in the long thread before its appends are timed.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Timed appends of each kind.
    #[arg(long, default_value_t = 1000)]
    appends: usize,
    /// Concurrent appenders, each with threads of its own (their appends share commits).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Bytes of content per message.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// The bound of the third kind: appends to a thread holding this many, each dropping its oldest.
    #[arg(long, default_value_t = switchboard_agent_bridge::threads::DEFAULT_MAX_MESSAGES)]
    bound: usize,
    #[arg(long)]
    json: bool,
}

fn message(i: usize, pad: &str) -> Value {
    json!({ "id": format!("m{i}"), "role": "user", "content": pad })
}

/// Fills `thread` with `n` messages, 100 per append.
async fn fill(store: &Threads, thread: &str, n: usize, pad: &str) -> Result<(), String> {
    let mut i = 0;
    while i < n {
        let batch: Vec<Value> = (i..(i + 100).min(n)).map(|k| message(k, pad)).collect();
        i += batch.len();
        store.append(thread, "bench", batch).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub async fn threads(args: ThreadsArgs) -> Result<(), String> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let nanos = super::now_us();
    let dir = base.join(format!("switchboard-bench-threads-{}-{nanos}", std::process::id()));
    let result = measure(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    print(&report, args.json);
    Ok(())
}

async fn measure(args: &ThreadsArgs, dir: &std::path::Path) -> Result<Value, String> {
    let pad = "x".repeat(args.size);
    let concurrency = args.concurrency.max(1);
    // Nothing is trimmed from the long threads while they are timed.
    let long_store = Threads::open(&dir.join("long"), args.messages + args.appends + 1).map_err(|e| e.to_string())?;
    let bound_store = Threads::open(&dir.join("bound"), args.bound).map_err(|e| e.to_string())?;
    let fill_started = std::time::Instant::now();
    for c in 0..concurrency {
        fill(&long_store, &format!("long-{c}"), args.messages, &pad).await?;
        fill(&bound_store, &format!("full-{c}"), args.bound, &pad).await?;
    }
    let fill_s = fill_started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (long_store, bound_store, pad) = (long_store.clone(), bound_store.clone(), pad.clone());
        let appends = args.appends;
        let first = args.messages.max(args.bound);
        tasks.push(tokio::spawn(async move {
            let (mut new, mut long, mut full) = (histogram(), histogram(), histogram());
            // Interleaved, so that the disk's drift during the run is shared by the three kinds.
            for i in 0..appends {
                let m = || vec![message(first + i, &pad)];
                let t = std::time::Instant::now();
                long_store.append(&format!("new-{c}-{i}"), "bench", m()).await.map_err(|e| e.to_string())?;
                let _ = new.record(t.elapsed().as_micros().max(1) as u64);
                let t = std::time::Instant::now();
                long_store.append(&format!("long-{c}"), "bench", m()).await.map_err(|e| e.to_string())?;
                let _ = long.record(t.elapsed().as_micros().max(1) as u64);
                let t = std::time::Instant::now();
                bound_store.append(&format!("full-{c}"), "bench", m()).await.map_err(|e| e.to_string())?;
                let _ = full.record(t.elapsed().as_micros().max(1) as u64);
            }
            Ok::<_, String>((new, long, full))
        }));
    }
    let (mut new, mut long, mut full) = (histogram(), histogram(), histogram());
    for t in tasks {
        let (n, l, f) = t.await.map_err(|e| e.to_string())??;
        new.add(n).map_err(|e| e.to_string())?;
        long.add(l).map_err(|e| e.to_string())?;
        full.add(f).map_err(|e| e.to_string())?;
    }
    let timed_s = started.elapsed().as_secs_f64();
    let long_len = long_store.messages("long-0").await.map_err(|e| e.to_string())?.len();
    let full_len = bound_store.messages("full-0").await.map_err(|e| e.to_string())?.len();
    let read_started = std::time::Instant::now();
    let reads = 20;
    for _ in 0..reads {
        bound_store.messages("full-0").await.map_err(|e| e.to_string())?;
    }
    let read_ms = read_started.elapsed().as_secs_f64() * 1000.0 / reads as f64;
    let per_s = |h: &hdrhistogram::Histogram<u64>| (concurrency as f64 * 1e6 / h.mean()).round();
    Ok(json!({
        "bench": "threads",
        "concurrency": concurrency,
        "message_bytes": args.size,
        "appends_per_kind": args.appends * concurrency,
        "fill_seconds": fill_s,
        "timed_seconds": timed_s,
        "long_thread_messages": long_len,
        "bound": args.bound,
        "bound_thread_messages": full_len,
        "new_thread": latency(&new),
        "long_thread": latency(&long),
        "at_bound": latency(&full),
        "new_thread_appends_per_s": per_s(&new),
        "long_thread_appends_per_s": per_s(&long),
        "at_bound_appends_per_s": per_s(&full),
        "ratio_long_over_new_p50": long.value_at_quantile(0.5) as f64 / new.value_at_quantile(0.5) as f64,
        "ratio_long_over_new_mean": long.mean() / new.mean(),
        "read_at_bound_ms": read_ms,
    }))
}
