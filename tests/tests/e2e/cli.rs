//! The `switchboard` binary: configuration errors, `up`, `publish`, `tail`,
//! and durability across SIGKILL.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard_tests::*;

/// Runs the binary to completion and returns its exit code and stderr.
pub(crate) fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(switchboard_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run switchboard");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn invalid_configuration_exits_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, "[gateway]\nlisen = \"127.0.0.1:1\"\n").unwrap();
    let file = file.to_str().unwrap();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (&["up", "--gateway-listen", "nope"], &[], "gateway.listen"),
        (&["up"], &[("SWITCHBOARD_LIMITS__MAX_SUBSCRIPTIONS", "many")], "limits.max_subscriptions"),
        (&["up"], &[("SWITCHBOARD_AUTH__EXPIRY_GRACE", "forever")], "auth.expiry_grace"),
        (&["up"], &[("SWITCHBOARD_EVENTBUS__BACKEND", "floppy")], "eventbus.backend"),
        (&["up"], &[("SWITCHBOARD_EVENTBUS__FSYNC", "sometimes")], "eventbus.fsync"),
        (&["up", "--backend", "redis"], &[], "eventbus.redis_url"),
        (&["up"], &[("SWITCHBOARD_GATEWAY__EVENTBUS_URL", ",")], "eventbus_url"),
        (&["up"], &[("SWITCHBOARD_EVENTBUS__CACHE_BYTES", "64 parsecs")], "eventbus.cache_bytes"),
        // A variable of the settings' form with an unknown key names itself (SPEC §8).
        (&["up"], &[("SWITCHBOARD_GATEWAY__LISTN", "127.0.0.1:1")], "SWITCHBOARD_GATEWAY__LISTN"),
        (
            &["token", "--sub", "a", "--secret", "a-secret-of-at-least-32-characters-0"],
            &[("SWITCHBOARD_GATEWAY__LISTN", "x")],
            "SWITCHBOARD_GATEWAY__LISTN",
        ),
        (&["publish", "c", "e", "{}"], &[("SWITCHBOARD_GATEWAY__LISTN", "x")], "SWITCHBOARD_GATEWAY__LISTN"),
        (&["up"], &[("SWITCHBOARD_GATEWAYS__LISTEN", "127.0.0.1:1")], "SWITCHBOARD_GATEWAYS__LISTEN"),
        (&["up"], &[("SWITCHBOARD_RPC__GET_STATUS", "everyone")], "rpc.get_status"),
        (&["up"], &[("SWITCHBOARD_AGENTS__THREAD_MAX_MESSAGES", "0")], "agents.thread_max_messages"),
        (&["up"], &[("SWITCHBOARD_AGENT_BRIDGE__THREADS", "shared")], "agent_bridge.threads"),
        (&["up"], &[("SWITCHBOARD_GATEWAY__AGENT_BRIDGE_URL", ",")], "agent_bridge_url"),
        (&["up", "--config", file], &[], "lisen"),
        (&["gateway"], &[], "auth.admin_key"),
        (&["gateway"], &[("SWITCHBOARD_AUTH__ADMIN_KEY", "an-admin-key-0123456789")], "auth.hs256_secret"),
        (&["up"], &[("SWITCHBOARD_AUTH__HS256_SECRET", "short")], "auth.hs256_secret"),
        (&["up"], &[("SWITCHBOARD_AUTH__PUBLIC_KEY_FILES", "[\"/nonexistent.pem\"]")], "auth.public_key_files"),
    ];
    for (args, env, setting) in cases {
        let (code, stderr) = run(args, env);
        assert_eq!(code, 64, "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(setting), "{args:?} {env:?} must name {setting}: {stderr}");
    }
}

/// `switchboard up` with every service on a free loopback port and its data in `data`.
fn up_on_loopback<'a>(data: &'a std::path::Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["up"];
    args.extend_from_slice(extra);
    args.extend(["--gateway-listen", "127.0.0.1:0", "--eventbus-listen", "127.0.0.1:0"]);
    args.extend(["--agent-bridge-listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    args
}

/// A `switchboard` process, killed when dropped.
pub(crate) struct Process {
    pub(crate) child: Child,
    /// `http://ADDR/metrics` of the bus and the bridge, when asked for.
    metrics: Vec<String>,
    pub(crate) grpc: String,
    pub(crate) ws: Option<String>,
    /// `http://ADDR` of the agent bridge, when it runs one.
    pub(crate) bridge: Option<String>,
}

impl Process {
    fn start(args: &[&str]) -> Process {
        Self::start_with(args, &[])
    }

    /// Starts `switchboard ARGS` with extra environment and waits for the
    /// addresses it prints.
    pub(crate) fn start_with(args: &[&str], env: &[(&str, &str)]) -> Process {
        Self::spawn(Command::new(switchboard_bin()), args, env)
    }

    /// Starts `switchboard ARGS` with at most `files` open files (soft and hard).
    fn start_with_open_files(args: &[&str], env: &[(&str, &str)], files: u32) -> Process {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={files}:{files}")).arg("--").arg(switchboard_bin());
        Self::spawn(command, args, env)
    }

    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn switchboard");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut grpc, mut ws, mut bridge, mut metrics) = (None, None, None, Vec::new());
        let wants_gateway = args[0] == "up" || args[0] == "gateway";
        let wants_bridge = args[0] == "agent-bridge";
        let wants_bus = !wants_bridge && args[0] != "gateway";
        while (wants_bus && grpc.is_none()) || (wants_gateway && ws.is_none()) || (wants_bridge && bridge.is_none()) {
            let line = lines.next().expect("switchboard exited before printing its addresses").unwrap();
            if let Some(rest) = line.strip_prefix("eventbus  grpc://") {
                grpc = Some(format!("http://{}", rest.split_whitespace().next().unwrap()));
            }
            if let Some(rest) = line.strip_prefix("bridge    grpc://") {
                bridge = Some(format!("http://{}", rest.split_whitespace().next().unwrap()));
            }
            if let Some(rest) = line.strip_prefix("gateway   ") {
                ws = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("metrics   ") {
                metrics.push(rest.split_whitespace().next().unwrap().to_owned());
            }
        }
        // Keep draining stdout so the process never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Process { child, grpc: grpc.unwrap_or_default(), metrics, ws, bridge }
    }

    /// The gateway's address, from the WebSocket URL it printed.
    pub(crate) fn gateway_addr(&self) -> std::net::SocketAddr {
        let ws = self.ws.as_deref().expect("a gateway");
        ws.trim_start_matches("ws://").trim_end_matches("/ws/connect").parse().unwrap()
    }

    fn terminate(&mut self) -> i32 {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("switchboard did not stop on SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn up_publish_and_tail() {
    let data = tempfile::tempdir().unwrap();
    let metrics_env = [
        ("SWITCHBOARD_EVENTBUS__METRICS_LISTEN", "127.0.0.1:0"),
        ("SWITCHBOARD_AGENT_BRIDGE__METRICS_LISTEN", "127.0.0.1:0"),
        ("SWITCHBOARD_EVENTBUS__CACHE_BYTES", "32MiB"),
        // Not of the `SWITCHBOARD_<SECTION>__<KEY>` form: a deployment's own
        // variables are not settings and must not stop the binary (SPEC §8).
        ("SWITCHBOARD_BIN", "/usr/local/bin/switchboard"),
        ("SWITCHBOARD_", "x"),
        ("SWITCHBOARD_GATEWAY__", "x"),
    ];
    let mut up = Process::start_with(&up_on_loopback(data.path(), &[]), &metrics_env);
    let ws_url = up.ws.clone().unwrap();
    let addr = up.gateway_addr();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http(addr, "GET", "/ready", None, None).await.map(|r| r.0).unwrap_or(0) != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = Ws::connect(&ws_url).await.unwrap();
    ws.subscribe("missions").await;

    let tail = Command::new(switchboard_bin())
        .args(["tail", "missions", "--url", &up.grpc])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tail = Guard(tail);
    let mut tail_err = BufReader::new(tail.0.stderr.take().unwrap()).lines();
    let joined = tail_err.next().unwrap().unwrap();
    assert!(joined.starts_with("# joined missions"), "{joined}");

    let out = Command::new(switchboard_bin())
        .args(["publish", "missions", "mission_updated", r#"{"id":7,"status":"go"}"#, "--url", &up.grpc])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let published: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(published["offset"], 1);

    let ev = ws.expect("event").await;
    assert_eq!(ev["data"], json!({ "id": 7, "status": "go" }));
    assert_eq!(ev["id"], published["event_id"]);

    let mut tail_out = BufReader::new(tail.0.stdout.take().unwrap()).lines();
    let line: serde_json::Value = serde_json::from_str(&tail_out.next().unwrap().unwrap()).unwrap();
    assert_eq!(line["event"], "mission_updated");
    assert_eq!(line["offset"], 1);

    let bad = Command::new(switchboard_bin())
        .args(["publish", "missions", "x", "{broken", "--url", &up.grpc])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("JSON"));

    // The agent bridge runs in the same process: a chat turn with the echo agent.
    ws.send(json!({ "type": "chat_message", "content": "hello world", "agent": "echo" })).await;
    ws.expect("run").await;
    let mut text = String::new();
    loop {
        let f = ws.expect("agent_event").await;
        if let Some(delta) = f["event"]["delta"].as_str() {
            text.push_str(delta);
        }
        if f["event"]["type"] == "RUN_FINISHED" {
            break;
        }
    }
    assert_eq!(text, "hello world");

    // The bus and the bridge serve their own metrics.
    assert_eq!(up.metrics.len(), 2, "{:?}", up.metrics);
    let mut all = String::new();
    for url in &up.metrics {
        let (host, path) = url.trim_start_matches("http://").split_once('/').unwrap();
        let (status, body) = http(host.parse().unwrap(), "GET", &format!("/{path}"), None, None).await.unwrap();
        assert_eq!(status, 200);
        all.push_str(body.as_str().unwrap());
    }
    for line in [
        "switchboard_events_published_total",
        "switchboard_publish_duration_seconds_count",
        "switchboard_runs_active 0",
        "switchboard_run_duration_seconds_count{agent=\"echo\",outcome=\"finished\"} 1",
        "switchboard_workers 0",
    ] {
        assert!(all.contains(line), "missing {line} in\n{all}");
    }

    // SIGTERM: clients are told, the process exits cleanly.
    let code = up.terminate();
    assert_eq!(code, 0);
    let (closed, _) = ws.closed().await;
    assert_eq!(closed, Closed::Code(1001));
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let args = ["eventbus", "--dev", "--eventbus-listen", "127.0.0.1:0", "--data-dir", dir.as_str()];
    // Every acknowledged event is checked, so none may be trimmed: on a fast
    // machine the publishers write more than the default 1,000 per channel.
    let env = [("SWITCHBOARD_NAMESPACES__CRASH__HISTORY_SIZE", "10000000")];
    let bus = Process::start_with(&args, &env);
    let url = bus.grpc.clone();

    // Eight publishers on two channels record every acknowledgement until the
    // process dies under them.
    let mut publishers = Vec::new();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for p in 0..8u64 {
        let url = url.clone();
        let count = count.clone();
        publishers.push(tokio::spawn(async move {
            let mut client = bus_client(&url).await;
            let channel = if p % 2 == 0 { "crash:a" } else { "crash:b" };
            let mut acked = Vec::new();
            for i in 0..100_000u64 {
                let req = pb::PublishRequest {
                    channel: channel.into(),
                    event: "e".into(),
                    data: json!({ "p": p, "i": i }).to_string().into(),
                    ..Default::default()
                };
                match client.publish(req).await {
                    Ok(r) => {
                        acked.push((channel, r.into_inner(), p, i));
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    // The kill comes mid-stream, once a few hundred events are acknowledged.
    while count.load(std::sync::atomic::Ordering::Relaxed) < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut bus = bus;
    bus.child.kill().unwrap(); // SIGKILL
    bus.child.wait().unwrap();
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.await.unwrap());
    }
    assert!(acked.len() > 50, "too few publishes before the kill: {}", acked.len());

    let bus = Process::start_with(&args, &env);
    let mut client = bus_client(&bus.grpc).await;
    for channel in ["crash:a", "crash:b"] {
        let mut stored = Vec::new();
        let mut since = 0;
        loop {
            let h = client
                .history(pb::HistoryRequest {
                    channel: channel.into(),
                    since: Some(pb::StreamPosition { offset: since, epoch: String::new() }),
                    limit: 10_000,
                    reverse: false,
                })
                .await
                .unwrap()
                .into_inner();
            if h.events.is_empty() {
                break;
            }
            since = h.events.last().unwrap().offset;
            stored.extend(h.events);
        }
        let offsets: Vec<u64> = stored.iter().map(|e| e.offset).collect();
        assert!(offsets.iter().enumerate().all(|(i, o)| *o == i as u64 + 1), "offsets are gap-free from 1");
        for (ch, r, p, i) in acked.iter().filter(|a| a.0 == channel) {
            let e = stored.get(r.offset as usize - 1).unwrap_or_else(|| panic!("acknowledged {ch}/{} lost", r.offset));
            assert_eq!(e.event_id, r.event_id);
            assert_eq!(e.epoch, r.epoch, "the epoch survives the crash");
            assert_eq!(e.data, json!({ "p": p, "i": i }).to_string().as_bytes());
        }
        let next = publish(&mut client, channel, "e", json!("after")).await;
        assert_eq!(next.offset, stored.len() as u64 + 1, "offsets continue after the crash");
        assert_eq!(next.epoch, acked[0].1.epoch);
    }
}

#[test]
fn unusable_data_directories_are_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    // A store that is not a redb file.
    let garbage = tmp.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join("eventbus.redb"), vec![0x5a; 64 * 1024]).unwrap();
    for dir in [&file, &garbage] {
        let (code, stderr) =
            run(&["eventbus", "--dev", "--eventbus-listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("cannot open the event bus store"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_second_process_on_the_same_data_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let _first = Process::start(&["eventbus", "--dev", "--eventbus-listen", "127.0.0.1:0", "--data-dir", dir]);
    let (code, stderr) = run(&["eventbus", "--dev", "--eventbus-listen", "127.0.0.1:0", "--data-dir", dir], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

#[tokio::test]
async fn tokens_from_switchboard_token_are_accepted_by_a_production_gateway() {
    let secret = "a-production-secret-0123456789-abcdef";
    let bus = BusServer::memory().await;
    let data = tempfile::tempdir().unwrap();
    let bus_url = bus.url();
    let gw = Process::start_with(
        &["gateway", "--gateway-listen", "127.0.0.1:0", "--data-dir", data.path().to_str().unwrap()],
        &[
            ("SWITCHBOARD_AUTH__ADMIN_KEY", "an-admin-key-0123456789"),
            ("SWITCHBOARD_AUTH__HS256_SECRET", secret),
            ("SWITCHBOARD_GATEWAY__EVENTBUS_URL", &bus_url),
        ],
    );
    let ws_url = gw.ws.clone().unwrap();

    let out = Command::new(switchboard_bin())
        .args(["token", "--sub", "grace", "--ttl", "10m", "--role", "ops", "--channel", "missions"])
        .env("SWITCHBOARD_AUTH__HS256_SECRET", secret)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // Anonymous connections are refused in production mode.
    let mut anon = loop {
        match Ws::connect(&ws_url).await {
            Ok(ws) => break ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    anon.send(json!({ "type": "subscribe", "channel": "missions" })).await;
    assert_eq!(anon.expect("error").await["code"], "unauthorized");

    let ws = Ws::connect(&format!("{ws_url}?token={token}")).await.unwrap();
    assert_eq!(ws.connected["user_id"], "grace");
}

/// With a low open-file limit, more half-sent requests than the process
/// may hold files: the connection limit is lowered to fit, the oldest
/// half-sent requests make room, and `/health` and new clients are served
/// long before the header timeout.
#[tokio::test]
async fn half_sent_requests_past_the_open_file_limit_do_not_lock_clients_out() {
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir().unwrap();
    let up = Process::start_with_open_files(
        &up_on_loopback(data.path(), &[]),
        &[("SWITCHBOARD_LIMITS__HEADER_TIMEOUT", "60s")],
        160,
    );
    let ws_url = up.ws.clone().unwrap();
    let addr = up.gateway_addr();
    let mut sockets = Vec::new();
    for _ in 0..300 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        sockets.push(tcp);
    }
    let health = tokio::time::timeout(WAIT, http(addr, "GET", "/health", None, None)).await;
    assert_eq!(health.expect("/health answers").unwrap().0, 200);
    let mut ws = tokio::time::timeout(WAIT, Ws::connect(&ws_url)).await.expect("a client connects").unwrap();
    ws.subscribe("missions").await;
}

#[tokio::test]
async fn sigterm_during_runs_ends_them_and_exits_within_the_grace_period() {
    let data = tempfile::tempdir().unwrap();
    let env = [("SWITCHBOARD_AGENTS__ECHO__DELAY_MS", "500"), ("SWITCHBOARD_GATEWAY__SHUTDOWN_GRACE", "3s")];
    let mut up = Process::start_with(&up_on_loopback(data.path(), &["--backend", "memory"]), &env);
    let ws_url = up.ws.clone().unwrap();
    let mut ws = loop {
        // The bus link comes up a moment after the gateway listens; a chat waits for nothing.
        if let Ok(ws) = Ws::connect(&ws_url).await {
            break ws;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let words = vec!["word"; 200].join(" ");
    ws.send(json!({ "type": "chat_message", "content": words, "id": "long" })).await;
    let run = ws.expect("run").await;
    for i in 0..2 {
        ws.send(json!({ "type": "chat_message", "content": "next", "thread_id": run["thread_id"], "multitask": "enqueue", "id": i }))
            .await;
    }
    loop {
        let f = ws.recv().await.unwrap();
        if f["event"]["type"] == "TEXT_MESSAGE_CONTENT" {
            break;
        }
    }

    let asked = std::time::Instant::now();
    let pid = up.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(1001));
    let kinds: Vec<String> = frames
        .iter()
        .map(|f| match f["type"].as_str().unwrap() {
            "agent_event" => f["event"]["type"].as_str().unwrap().to_owned(),
            other => other.to_owned(),
        })
        // The waiting runs' refusals (checked below) may come between the
        // active run's events, which are checked for their order here.
        .filter(|k| k != "TEXT_MESSAGE_CONTENT" && k != "error")
        .collect();
    let end = frames.iter().find(|f| f["event"]["type"] == "RUN_ERROR").expect("the run ended before the close");
    assert_eq!(end["event"]["code"], "cancelled");
    assert_eq!(kinds[kinds.len() - 3..], ["TEXT_MESSAGE_END", "RUN_ERROR", "disconnect"], "{kinds:?}");
    let refused: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").map(|f| &f["id"]).collect();
    assert_eq!(refused.len(), 2, "both waiting runs were refused: {frames:?}");
    let code = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(asked.elapsed() < Duration::from_secs(4), "still running {:?} after SIGTERM", asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
}

/// Runs `switchboard bench …` to completion and returns its JSON report.
async fn bench_report(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(switchboard_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run switchboard bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[tokio::test]
async fn bench_threads_times_each_kind_of_append_on_threads_of_the_asked_length() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let args = ["threads", "--dir", dir_arg, "--messages", "150", "--appends", "10", "--bound", "20"];
    let report = bench_report(&args).await;
    assert_eq!(report["long_thread_messages"], 160, "{report}");
    assert_eq!(report["bound_thread_messages"], 20, "{report}");
    assert_eq!(report["appends_per_kind"], 10, "{report}");
    for kind in ["new_thread", "long_thread", "at_bound"] {
        assert!(report[kind]["p50_ms"].as_f64().unwrap() > 0.0, "{kind}: {report}");
    }
    assert!(report["ratio_long_over_new_mean"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the bench removed its directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_counts_every_token_of_runs_its_workers_serve() {
    let s = AgentStack::start(|_| {}, |_| {}).await;
    let (ws, bridge) = (s.gateway.ws_url("/ws/connect"), s.bridge.url());
    let args = [
        "runs",
        "--ws",
        &ws,
        "--bridge",
        &bridge,
        "--runs",
        "6",
        "--connections",
        "2",
        "--tokens",
        "5",
        "--rate",
        "0",
        "--workers",
        "2",
        "--duration",
        "300ms",
    ];
    let report = bench_report(&args).await;
    let finished = report["runs_finished"].as_u64().unwrap();
    assert!(finished >= 6, "every slot ran at least once: {report}");
    assert_eq!(report["runs_started"], finished, "{report}");
    assert_eq!(report["tokens"], finished * 5, "{report}");
    // Four events around the tokens: RUN_STARTED, TEXT_MESSAGE_START, _END, RUN_FINISHED.
    assert_eq!(report["events"], finished * 9, "{report}");
    for zero in ["lost", "misordered", "unfinished", "runs_failed", "refused", "closed_by_server"] {
        assert_eq!(report[zero], 0, "{zero}: {report}");
    }
    assert!(report["token_latency"]["max_ms"].as_f64().unwrap() > 0.0, "{report}");
}
