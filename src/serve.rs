//! Runs the services of a `Plan`: binds their listeners, serves them, and
//! stops them in order (SPEC §11) within the grace period.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Role, plan::Plan};

impl Plan {
    pub(crate) async fn run(mut self) -> ExitCode {
        let stop = CancellationToken::new();
        let bus_stop = CancellationToken::new();
        let bus_overdue = CancellationToken::new();
        tokio::spawn(signal(stop.clone()));
        let certificates = Certificates {
            servers: [&self.gateway.tls, &self.eventbus.tls, &self.bridge.tls].into_iter().flatten().cloned().collect(),
            // The gateway's and the bridge's are one `ClientTls`, the `[tls]` section's.
            client: self.gateway.client_tls.clone().or_else(|| self.bridge.client_tls.clone()),
        };
        if !certificates.servers.is_empty() || certificates.client.is_some() {
            // Listening before anything is bound: from the first printed
            // address on, a SIGHUP reloads and never ends the process.
            #[cfg(unix)]
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hangup) => {
                    tokio::spawn(reload_on_hangup(hangup, certificates, stop.clone()));
                }
                Err(e) => tracing::warn!(cause = %e, "cannot listen for SIGHUP: certificates will not be reloaded"),
            }
        }
        let runs_bus = matches!(self.role, Role::Up | Role::Eventbus);
        let runs_gateway = matches!(self.role, Role::Up | Role::Gateway);
        let runs_bridge = matches!(self.role, Role::Up | Role::AgentBridge);
        let mut bus_listener = None;
        let mut gateway_listener = None;
        let mut bridge_listener = None;
        if runs_bus {
            match bind(self.eventbus_listen, "eventbus.listen").await {
                Ok(l) => bus_listener = Some(l),
                Err(code) => return code,
            }
        }
        if runs_gateway {
            match bind(self.gateway_listen, "gateway.listen").await {
                Ok(l) => gateway_listener = Some(l),
                Err(code) => return code,
            }
        }
        if runs_bridge {
            match bind(self.bridge_listen, "agent_bridge.listen").await {
                Ok(l) => bridge_listener = Some(l),
                Err(code) => return code,
            }
        }
        let mut bus_task = None;
        if let Some(listener) = bus_listener {
            let bus_addr = listener.local_addr().ok();
            let scheme = if self.eventbus.tls.is_some() { "https" } else { "http" };
            if let (true, Some(a)) = (self.local_bus, bus_addr) {
                self.gateway.eventbus_urls = vec![format!("{scheme}://{a}")];
            }
            if let (true, Some(a)) = (self.local_bridge_bus, bus_addr) {
                self.bridge.eventbus_url = Some(format!("{scheme}://{a}"));
            }
            let (bus, handle) = match switchboard_eventbus::open(self.eventbus.clone()).await {
                Ok(opened) => opened,
                Err(e) => {
                    eprintln!("error: cannot open the event bus store: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "eventbus  grpc://{}  (backend {}, epoch {})",
                bus_addr.map(|a| a.to_string()).unwrap_or_default(),
                bus.backend(),
                bus.epoch().unwrap_or("per channel")
            );
            if let Some(addr) = self.bus_metrics_listen {
                match bind(addr, "eventbus.metrics_listen").await {
                    Ok(l) => {
                        println!(
                            "metrics   http://{}/metrics  (eventbus)",
                            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                        );
                        tokio::spawn(switchboard_eventbus::serve_metrics(
                            bus.clone(),
                            l,
                            stop.clone().cancelled_owned(),
                        ));
                    }
                    Err(code) => return code,
                }
            }
            // This process's gateway and bridge call the bus in place.
            if self.local_bus {
                self.gateway.local_bus = Some(switchboard_eventbus::in_process(bus.clone(), bus_stop.clone()));
            }
            if self.local_bridge_bus {
                self.bridge.local_bus = Some(switchboard_eventbus::in_process(bus.clone(), bus_stop.clone()));
            }
            // The bus stops last: runs publish their last events to it.
            let token = bus_stop.clone();
            let serve = async move {
                let r = switchboard_eventbus::serve_bus(bus, listener, token.cancelled_owned()).await;
                handle.stop().await;
                r.map_err(|e| e.to_string())
            };
            bus_task = Some(if runs_gateway { own_thread(serve, bus_overdue.clone()) } else { tokio::spawn(serve) });
        }
        let mut bridge_task = None;
        if let Some(listener) = bridge_listener {
            let bridge_addr = listener.local_addr().ok();
            if let (true, Some(a)) = (self.local_bridge, bridge_addr) {
                let scheme = if self.bridge.tls.is_some() { "https" } else { "http" };
                self.gateway.agent_bridge_urls = vec![format!("{scheme}://{a}")];
            }
            let bridge = match switchboard_agent_bridge::open(self.bridge.clone()) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot open the agent bridge: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let agents: Vec<String> = bridge.agents().into_iter().map(|a| a.0).collect();
            println!(
                "bridge    grpc://{}  (agents: {})",
                bridge_addr.map(|a| a.to_string()).unwrap_or_default(),
                agents.join(", ")
            );
            if let Some(addr) = self.bridge_metrics_listen {
                match bind(addr, "agent_bridge.metrics_listen").await {
                    Ok(l) => {
                        println!(
                            "metrics   http://{}/metrics  (agent bridge)",
                            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                        );
                        tokio::spawn(switchboard_agent_bridge::serve_metrics(
                            bridge.clone(),
                            l,
                            stop.clone().cancelled_owned(),
                        ));
                    }
                    Err(code) => return code,
                }
            }
            let token = stop.clone();
            let key = self.bridge.api_key.clone();
            bridge_task = Some(tokio::spawn(async move {
                switchboard_agent_bridge::serve_bridge(bridge, key, listener, token.cancelled_owned())
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        let mut gateway_task = None;
        if let Some(listener) = gateway_listener {
            if let Ok(a) = listener.local_addr() {
                let (ws, http) = if self.gateway.tls.is_some() { ("wss", "https") } else { ("ws", "http") };
                println!("gateway   {ws}://{a}/ws/connect");
                println!("          {http}://{a}/api/ws/info");
                println!("console   {http}://{a}/");
            }
            let token = stop.clone();
            let config = self.gateway.clone();
            gateway_task = Some(tokio::spawn(async move {
                switchboard_gateway::serve(config, listener, token.cancelled_owned()).await.map_err(|e| e.to_string())
            }));
        }
        if let (true, Some(key)) = (self.admin_key_generated, &self.gateway.admin_key) {
            println!("admin key {key}  (generated; set auth.admin_key to keep one)");
        }
        if let (true, Some(token)) = (runs_gateway, &self.dev_token) {
            println!("token     {token}  (user \"dev\", 24 h; signed with a generated auth.hs256_secret)");
        }
        println!("mode      {}", if self.dev { "dev: anonymous connections allowed" } else { "production" });
        // Shutdown, in order (SPEC §11): the gateway and the bridge stop runs
        // and deliver their ends, the gateway's sessions say goodbye, and the
        // bus, which they publish to, stops last. Each service bounds its own
        // shutdown by the grace period; past it (and a second for the bus)
        // what still runs is dropped, so the process always exits in time.
        let grace = self.gateway.shutdown_grace;
        let overdue = CancellationToken::new();
        let (stopped, late, bus_late) = (stop.clone(), overdue.clone(), bus_overdue.clone());
        tokio::spawn(async move {
            stopped.cancelled().await;
            tokio::time::sleep(grace + Duration::from_millis(500)).await;
            late.cancel();
            tokio::time::sleep(Duration::from_millis(400)).await;
            bus_late.cancel();
        });
        let mut ok = true;
        for task in [gateway_task, bridge_task].into_iter().flatten() {
            ok &= finish(task, &stop, &overdue).await;
        }
        // The others are done (they end only once stopped, or by failing,
        // which stops everything), or there were none: the bus stops with
        // the signal.
        let stopping = stop.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            bus_stop.cancel();
        });
        if let Some(task) = bus_task {
            ok &= finish(task, &stop, &bus_overdue).await;
        }
        if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }
}

/// Runs a service on a runtime and thread of its own, so that its tasks are
/// scheduled beside the other services' rather than queued behind them: in
/// `up` the bus's hops of each event (its gRPC tasks, the `Subscribe` stream)
/// no longer wait for the gateway's fan-out of the event before. Dropped,
/// with its tasks, once `overdue` is cancelled.
fn own_thread(
    service: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
    overdue: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            tokio::select! {
                r = service => r,
                _ = overdue.cancelled() => Ok(()),
            }
        })
    })
}

/// Waits for a service to end; one that fails stops the others, and one
/// still running once `overdue` is cancelled is dropped. Returns false on failure.
async fn finish(
    task: tokio::task::JoinHandle<Result<(), String>>,
    stop: &CancellationToken,
    overdue: &CancellationToken,
) -> bool {
    let abort = task.abort_handle();
    let result = tokio::select! {
        r = task => r,
        _ = overdue.cancelled() => {
            abort.abort();
            eprintln!("warning: a service did not stop within the grace period");
            return true;
        }
    };
    match result {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            stop.cancel();
            false
        }
        Err(e) => {
            eprintln!("error: service task failed: {e}");
            stop.cancel();
            false
        }
    }
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("error: cannot listen on {addr} ({key}): {e}");
        ExitCode::FAILURE
    })
}

/// The certificates a SIGHUP reads again: the listeners', and those our
/// gRPC clients verify servers with and present (`[tls]`).
struct Certificates {
    servers: Vec<switchboard_tls::ServerTls>,
    client: Option<switchboard_tls::ClientTls>,
}

/// Reads the certificates again on each SIGHUP (SPEC §8): new connections
/// get the new ones, open connections keep theirs. A file that cannot be
/// used is reported, and the certificate in use is kept.
#[cfg(unix)]
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    certificates: Certificates,
    stop: CancellationToken,
) {
    let report = |section: &str, result: Result<(), switchboard_tls::TlsError>| match result {
        Ok(()) => tracing::info!(section, "certificates reloaded"),
        Err(e) => tracing::error!(cause = %e, "certificates not reloaded; the previous ones stay in use"),
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = hangup.recv() => {}
        }
        for tls in &certificates.servers {
            report(tls.section(), tls.reload());
        }
        if let Some(tls) = &certificates.client {
            report("tls", tls.reload());
        }
    }
}

async fn signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    stop.cancel();
}
