//! `switchboard bench runs`: concurrent agent runs started with
//! `chat_message` over WebSocket connections, served by workers the bench
//! attaches over `AgentWorker.Attach` (or by the built-in `echo`); runs/s,
//! AG-UI events/s delivered, time to first token, token latency (the
//! worker's emit time rides in each delta) and lost or misordered events.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_proto::agent::v1 as apb;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{check_loopback, connect_one, histogram, latency, now_us, print};

#[derive(Args)]
pub struct RunsArgs {
    /// The gateways' WebSocket endpoints, comma-separated: connection i uses the (i mod n)-th.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/connect", value_delimiter = ',')]
    ws: Vec<String>,
    /// The agent bridge, where the bench's workers attach.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    bridge: String,
    #[arg(long, env = "SWITCHBOARD_AUTH__ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Concurrent runs: each of these slots starts its next run on its thread when the last one ends.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// WebSocket connections the slots are spread over.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Text deltas (tokens) per run.
    #[arg(long, default_value_t = 40)]
    tokens: usize,
    /// Tokens per second of each run (0: as fast as the worker's stream takes them).
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// `worker`: the bench attaches its own workers (token latency is measured);
    /// `echo`: the built-in agent, at the server's `agents.echo.delay_ms`.
    #[arg(long, value_enum, default_value_t = Agent::Worker)]
    agent: Agent,
    /// Worker streams the bench attaches; runs go to the least loaded.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How long slots keep starting runs; runs in flight then finish.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Agent {
    Worker,
    Echo,
}

/// The agent name bench workers register.
const WORKER_AGENT: &str = "bench";

/// What every connection counts, summed at the end.
#[derive(Default)]
struct Counts {
    runs_started: AtomicU64,
    runs_finished: AtomicU64,
    runs_failed: AtomicU64,
    /// `error` answers to `chat_message` (busy, at capacity, rate limited).
    refused: AtomicU64,
    events: AtomicU64,
    tokens: AtomicU64,
    /// Tokens a finished run should have had but did not deliver.
    lost: AtomicU64,
    /// Events whose `seq` or token index did not follow the one before.
    misordered: AtomicU64,
    /// Runs still open when the bench gave up waiting.
    unfinished: AtomicU64,
    /// Connections the server closed.
    closed: AtomicU64,
    /// Microseconds since the start when the last event arrived.
    last_event_us: AtomicU64,
}

/// The fields of a server frame the bench reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    run_id: Option<&'a str>,
    #[serde(default, borrow)]
    thread_id: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    event: Option<Event<'a>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
}

/// One slot of a connection: its thread and the run it has in flight.
struct Slot {
    thread: Option<String>,
    run: Option<String>,
    sent: Instant,
    next_seq: u64,
    next_token: usize,
    first_token: bool,
    done: bool,
}

pub async fn runs(args: RunsArgs, tls: Option<switchboard_tls::ClientTls>) -> Result<(), String> {
    for ws in &args.ws {
        check_loopback(ws)?;
    }
    let agent = match args.agent {
        Agent::Worker => {
            check_loopback(&args.bridge)?;
            WORKER_AGENT
        }
        Agent::Echo => "echo",
    };
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    if args.agent == Agent::Worker {
        let per_worker = args.runs.div_ceil(args.workers.max(1)) as u32 + 16;
        for w in 0..args.workers.max(1) {
            workers.push(attach(&args, tls.as_ref(), w, per_worker, stop_workers.clone()).await?);
        }
    }
    let connections = args.connections.clamp(1, args.runs.max(1));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let url = args.ws[c % args.ws.len()].clone();
        let ws = connect_one(&url, None, None).await.map_err(|e| format!("{url}: {e}"))?;
        let slots = (c..args.runs).step_by(connections).count();
        let counts = counts.clone();
        let (tokens, worker_mode) = (args.tokens, args.agent == Agent::Worker);
        tasks.push(tokio::spawn(connection(ws, slots, agent, tokens, worker_mode, deadline, started, counts)));
    }
    let (mut ttft, mut token_latency) = (histogram(), histogram());
    for t in tasks {
        if let Ok((f, l)) = t.await {
            let _ = ttft.add(f);
            let _ = token_latency.add(l);
        }
    }
    stop_workers.cancel();
    for w in workers {
        let _ = w.await;
    }
    let c = &counts;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let window_s = (load(&c.last_event_us) as f64 / 1e6).max(1e-3);
    let report = json!({
        "bench": "runs",
        "agent": agent,
        "concurrent_runs": args.runs,
        "connections": connections,
        "tokens_per_run": args.tokens,
        "rate_per_run": if args.agent == Agent::Worker { json!(args.rate) } else { Value::Null },
        "seconds": window_s,
        "runs_started": load(&c.runs_started),
        "runs_finished": load(&c.runs_finished),
        "runs_failed": load(&c.runs_failed),
        "refused": load(&c.refused),
        "runs_per_s": (load(&c.runs_finished) as f64 / window_s).round(),
        "events": load(&c.events),
        "events_per_s": (load(&c.events) as f64 / window_s).round(),
        "tokens": load(&c.tokens),
        "tokens_per_s": (load(&c.tokens) as f64 / window_s).round(),
        "lost": load(&c.lost),
        "misordered": load(&c.misordered),
        "unfinished": load(&c.unfinished),
        "closed_by_server": load(&c.closed),
        "time_to_first_token": latency(&ttft),
        "token_latency": if token_latency.is_empty() { Value::Null } else { latency(&token_latency) },
    });
    print(&report, args.json);
    Ok(())
}

/// Attaches one worker: it serves each run it is given with `tokens` text
/// deltas at `rate` per second, each delta `"<index>:<emit time in µs> "`.
async fn attach(
    args: &RunsArgs,
    tls: Option<&switchboard_tls::ClientTls>,
    index: usize,
    max_runs: u32,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let key = switchboard_proto::auth::BearerKey::new(args.key.as_deref()).map_err(|e| format!("--key: {e}"))?;
    let mut client = switchboard_proto::client::worker(&args.bridge, key, tls).map_err(|e| format!("--bridge: {e}"))?;
    let (tx, rx) = mpsc::channel::<apb::WorkerMessage>(4096);
    let hello = apb::Hello {
        worker_name: format!("bench-{index}"),
        agents: vec![WORKER_AGENT.into()],
        methods: vec![],
        max_concurrent_runs: max_runs,
    };
    tx.send(apb::WorkerMessage { message: Some(apb::worker_message::Message::Hello(hello)) })
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("attach to --bridge {}: {e}", args.bridge))?
        .into_inner();
    match stream.message().await {
        Ok(Some(apb::BridgeMessage { message: Some(apb::bridge_message::Message::Welcome(_)) })) => {}
        other => return Err(format!("attach: expected welcome, got {other:?}")),
    }
    let (tokens, rate) = (args.tokens, args.rate);
    Ok(tokio::spawn(async move {
        let mut runs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                msg = stream.message() => match msg {
                    Ok(Some(m)) => m,
                    _ => break,
                },
            };
            match msg.message {
                Some(apb::bridge_message::Message::StartRun(start)) => {
                    runs.retain(|_, t| !t.is_finished());
                    let run = tokio::spawn(serve_run(start.run_id.clone(), start.thread_id, tokens, rate, tx.clone()));
                    runs.insert(start.run_id, run);
                }
                Some(apb::bridge_message::Message::CancelRun(cancel)) => {
                    if let Some(run) = runs.remove(&cancel.run_id) {
                        run.abort();
                    }
                }
                _ => {}
            }
        }
        for run in runs.into_values() {
            run.abort();
        }
    }))
}

async fn serve_run(run_id: String, thread_id: String, tokens: usize, rate: u64, tx: mpsc::Sender<apb::WorkerMessage>) {
    let send = |event: Value| {
        let m = apb::WorkerMessage {
            message: Some(apb::worker_message::Message::Event(apb::WorkerEvent {
                run_id: run_id.clone(),
                json: event.to_string().into(),
            })),
        };
        let tx = tx.clone();
        async move { tx.send(m).await.is_ok() }
    };
    let message = format!("{run_id}-m");
    if !send(json!({ "type": "RUN_STARTED", "threadId": thread_id, "runId": run_id })).await
        || !send(json!({ "type": "TEXT_MESSAGE_START", "messageId": message, "role": "assistant" })).await
    {
        return;
    }
    let mut tick = (rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    for k in 0..tokens {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let delta = format!("{k}:{} ", now_us());
        if !send(json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": message, "delta": delta })).await {
            return;
        }
    }
    let _ = send(json!({ "type": "TEXT_MESSAGE_END", "messageId": message })).await;
    let _ = send(json!({ "type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id })).await;
}

/// Drives the slots of one connection until the deadline, then waits for
/// their runs to end; returns its time-to-first-token and token-latency
/// histograms.
#[allow(clippy::too_many_arguments)]
async fn connection(
    ws: super::BenchSocket,
    slots: usize,
    agent: &'static str,
    tokens: usize,
    worker_mode: bool,
    deadline: Instant,
    started: Instant,
    counts: Arc<Counts>,
) -> (Histogram<u64>, Histogram<u64>) {
    let (mut sink, mut stream) = ws.split();
    let (mut ttft, mut token_latency) = (histogram(), histogram());
    let content =
        if worker_mode { "go".to_owned() } else { (0..tokens).map(|k| format!("w{k}")).collect::<Vec<_>>().join(" ") };
    let chat = |slot: usize, thread: &Option<String>| {
        let mut frame = json!({ "type": "chat_message", "content": content, "agent": agent, "id": slot });
        if let Some(t) = thread {
            frame["thread_id"] = json!(t);
        }
        Message::Text(frame.to_string().into())
    };
    let mut state: Vec<Slot> = (0..slots)
        .map(|_| Slot {
            thread: None,
            run: None,
            sent: Instant::now(),
            next_seq: 1,
            next_token: 0,
            first_token: false,
            done: false,
        })
        .collect();
    let mut by_run: HashMap<String, usize> = HashMap::new();
    // Retries of refused starts, after a short pause.
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<usize>();
    for (i, slot) in state.iter_mut().enumerate() {
        slot.sent = Instant::now();
        if sink.send(chat(i, &slot.thread)).await.is_err() {
            counts.closed.fetch_add(1, Ordering::Relaxed);
            return (ttft, token_latency);
        }
    }
    let mut open = slots;
    // After the deadline, runs in flight get this long to end.
    let give_up = deadline + Duration::from_secs(30);
    while open > 0 {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(give_up.into()) => break,
            Some(i) = retry_rx.recv() => {
                if Instant::now() >= deadline {
                    state[i].done = true;
                    open -= 1;
                } else {
                    state[i].sent = Instant::now();
                    let _ = sink.send(chat(i, &state[i].thread)).await;
                }
                continue;
            }
            msg = stream.next() => match msg {
                Some(Ok(m)) => m,
                _ => {
                    counts.closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        };
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else { continue };
        match frame.kind {
            "run" => {
                let (Some(i), Some(run)) = (frame.id.map(|i| i as usize), frame.run_id) else { continue };
                let Some(slot) = state.get_mut(i) else { continue };
                counts.runs_started.fetch_add(1, Ordering::Relaxed);
                slot.thread = frame.thread_id.map(str::to_owned);
                slot.run = Some(run.to_owned());
                slot.next_seq = 1;
                slot.next_token = 0;
                slot.first_token = false;
                by_run.insert(run.to_owned(), i);
            }
            "error" => {
                let Some(i) = frame.id.map(|i| i as usize).filter(|i| *i < state.len()) else { continue };
                counts.refused.fetch_add(1, Ordering::Relaxed);
                let retry = retry_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = retry.send(i);
                });
            }
            "agent_event" => {
                let now = now_us();
                let (Some(run), Some(event)) = (frame.run_id, frame.event) else { continue };
                let Some(&i) = by_run.get(run) else { continue };
                let slot = &mut state[i];
                counts.events.fetch_add(1, Ordering::Relaxed);
                counts.last_event_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if frame.seq != Some(slot.next_seq) {
                    counts.misordered.fetch_add(1, Ordering::Relaxed);
                }
                slot.next_seq = frame.seq.unwrap_or(slot.next_seq) + 1;
                match event.kind {
                    "TEXT_MESSAGE_CONTENT" => {
                        let delta = event.delta.unwrap_or_default();
                        let word = delta.trim();
                        let (index, stamp) = if worker_mode {
                            let mut parts = word.split(':');
                            (
                                parts.next().and_then(|k| k.parse::<usize>().ok()),
                                parts.next().and_then(|t| t.parse::<u64>().ok()),
                            )
                        } else {
                            (word.strip_prefix('w').and_then(|k| k.parse::<usize>().ok()), None)
                        };
                        if index != Some(slot.next_token) {
                            counts.misordered.fetch_add(1, Ordering::Relaxed);
                        }
                        slot.next_token = index.unwrap_or(slot.next_token) + 1;
                        counts.tokens.fetch_add(1, Ordering::Relaxed);
                        if !slot.first_token {
                            slot.first_token = true;
                            let _ = ttft.record(slot.sent.elapsed().as_micros().max(1) as u64);
                        }
                        if let Some(stamp) = stamp {
                            let _ = token_latency.record(now.saturating_sub(stamp).max(1));
                        }
                    }
                    "RUN_FINISHED" | "RUN_ERROR" => {
                        if event.kind == "RUN_FINISHED" {
                            counts.runs_finished.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counts.runs_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        counts.lost.fetch_add(tokens.saturating_sub(slot.next_token) as u64, Ordering::Relaxed);
                        by_run.remove(run);
                        slot.run = None;
                        if Instant::now() >= deadline {
                            slot.done = true;
                            open -= 1;
                        } else {
                            slot.sent = Instant::now();
                            if sink.send(chat(i, &slot.thread)).await.is_err() {
                                counts.closed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
            "ping" => {
                let _ = sink.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
            }
            _ => {}
        }
    }
    let unfinished = state.iter().filter(|s| !s.done).count() as u64;
    counts.unfinished.fetch_add(unfinished, Ordering::Relaxed);
    let _ = sink.close().await;
    (ttft, token_latency)
}
