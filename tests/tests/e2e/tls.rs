//! TLS (SPEC §8): WSS and HTTPS on the gateway, gRPC over TLS on the bus
//! with and without client certificates, our clients with `tls.*`, the
//! SIGHUP reload, and bad files. Certificates are made here with rcgen.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use serde_json::{Value, json};
use switchboard_proto::auth::BearerKey;
use switchboard_tests::*;
use switchboard_tls::{ServerFiles, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

use crate::cli::{Process, run};

/// How long any one expected thing may take.
const WAIT: Duration = Duration::from_secs(10);

/// A test CA, and the files of the certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's PEM file.
    ca: PathBuf,
    ca_der: CertificateDer<'static>,
}

/// A certificate and key written to files, and the certificate's DER.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join(format!("{name}.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        let ca_der = CertificateDer::from(cert.der().to_vec());
        Pki { dir, issuer: Issuer::new(params, key), ca, ca_der }
    }

    /// A certificate for 127.0.0.1 and localhost (`client`: for a client instead).
    fn leaf(&self, name: &str, client: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages =
            vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

fn server_tls(section: &'static str, leaf: &Leaf, client_ca: Option<&Path>) -> ServerTls {
    let alpn = if section == "gateway" { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"h2".to_vec()] };
    let files = ServerFiles {
        section,
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
        client_ca: client_ca.map(Path::to_owned),
        alpn,
    };
    ServerTls::load(files).expect("server tls")
}

/// A memory bus serving gRPC over `tls`, on a free port; stopped with the token.
async fn tls_bus(tls: ServerTls) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = eventbus::Config { tls: Some(tls), ..eventbus::Config::memory() };
    let token = stop.clone();
    tokio::spawn(async move { eventbus::serve(config, listener, token.cancelled_owned()).await.expect("bus") });
    (addr, stop)
}

fn client(url: &str, ca: &Path, identity: Option<&Leaf>) -> BusClient {
    let files = switchboard_tls::ClientFiles {
        ca: Some(ca.to_owned()),
        cert: identity.map(|l| l.cert.clone()),
        key: identity.map(|l| l.key.clone()),
    };
    let tls = switchboard_tls::ClientTls::load(files).expect("client tls");
    switchboard_proto::client::bus(url, BearerKey::new(None).unwrap(), Some(&tls)).expect("bus client")
}

async fn try_publish(client: &mut BusClient, channel: &str) -> Result<pb::PublishResponse, tonic::Status> {
    let request = pb::PublishRequest {
        channel: channel.into(),
        event: "e".into(),
        data: json!({"n": 1}).to_string().into(),
        ..Default::default()
    };
    tokio::time::timeout(WAIT, client.publish(request)).await.expect("publish answered in time").map(|r| r.into_inner())
}

/// A TLS connection to `addr` trusting only `ca`, and the certificate the server presented.
async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let presented = tls.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec();
    Ok((tls, presented))
}

/// A WSS connection to the gateway at `addr`, after its `connected` frame.
async fn wss(addr: SocketAddr, ca: &CertificateDer<'static>) -> WebSocketStream<TlsStream<TcpStream>> {
    let (tls, _) = tls_connect(addr, ca).await.expect("tls handshake");
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://{addr}/ws/connect"), tls).await.expect("websocket upgrade");
    assert_eq!(next_frame(&mut ws).await["type"], "connected");
    ws
}

/// The next JSON frame, within `WAIT`.
async fn next_frame(ws: &mut WebSocketStream<TlsStream<TcpStream>>) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// The next frame of type `kind`, skipping others (heartbeats).
async fn expect(ws: &mut WebSocketStream<TlsStream<TcpStream>>, kind: &str) -> Value {
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

#[tokio::test]
async fn wss_client_gets_events_published_over_grpc_tls() {
    let pki = Pki::new("ca");
    let (bus_addr, _bus) = tls_bus(server_tls("eventbus", &pki.leaf("bus", false), None)).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    let config = gateway::Config {
        eventbus_urls: vec![format!("https://{bus_addr}")],
        tls: Some(server_tls("gateway", &pki.leaf("gateway", false), None)),
        client_tls: Some(
            switchboard_tls::ClientTls::load(switchboard_tls::ClientFiles {
                ca: Some(pki.ca.clone()),
                ..Default::default()
            })
            .unwrap(),
        ),
        ..gateway::Config::default()
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { gateway::serve(config, listener, token.cancelled_owned()).await.expect("gateway") });

    let mut ws = wss(gateway_addr, &pki.ca_der).await;
    ws.send(Message::text(json!({"type": "subscribe", "channel": "missions", "id": 1}).to_string())).await.unwrap();
    // The gateway's link to the bus is over TLS: `subscribed` means it is up.
    assert_eq!(expect(&mut ws, "subscribed").await["channel"], "missions");
    let mut publisher = client(&format!("https://{bus_addr}"), &pki.ca, None);
    let published = try_publish(&mut publisher, "missions").await.expect("publish over TLS");
    let event = expect(&mut ws, "event").await;
    assert_eq!(event["channel"], "missions");
    assert_eq!(event["offset"], published.offset);
    assert_eq!(event["data"], json!({"n": 1}));

    // HTTPS on the same listener.
    let (tls, _) = tls_connect(gateway_addr, &pki.ca_der).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get("/health").header("host", "127.0.0.1").body(String::new()).unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    stop.cancel();
}

#[tokio::test]
async fn plain_text_clients_to_tls_ports_are_refused() {
    let pki = Pki::new("ca");
    let (bus_addr, _bus) = tls_bus(server_tls("eventbus", &pki.leaf("bus", false), None)).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    let config = gateway::Config {
        eventbus_urls: vec![format!("https://{bus_addr}")],
        tls: Some(server_tls("gateway", &pki.leaf("gateway", false), None)),
        ..gateway::Config::default()
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { gateway::serve(config, listener, token.cancelled_owned()).await.expect("gateway") });

    let plain = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(format!("ws://{gateway_addr}/ws/connect")))
        .await
        .expect("refused in time");
    assert!(plain.is_err(), "a plain WebSocket upgrade was served on the TLS port");
    // A plain-text gRPC client to the TLS bus gets no answer either.
    let key = BearerKey::new(None).unwrap();
    let mut plain_grpc = switchboard_proto::client::bus(&format!("http://{bus_addr}"), key, None).unwrap();
    assert!(try_publish(&mut plain_grpc, "missions").await.is_err());
    // And a client that trusts another CA refuses the bus.
    let other = Pki::new("other");
    let mut wrong_ca = client(&format!("https://{bus_addr}"), &other.ca, None);
    assert!(try_publish(&mut wrong_ca, "missions").await.is_err());
    stop.cancel();
}

#[tokio::test]
async fn mtls_bus_refuses_a_client_without_a_certificate_and_accepts_one_with() {
    let pki = Pki::new("ca");
    let (bus_addr, _bus) = tls_bus(server_tls("eventbus", &pki.leaf("bus", false), Some(&pki.ca))).await;
    let url = format!("https://{bus_addr}");

    let mut anonymous = client(&url, &pki.ca, None);
    assert!(try_publish(&mut anonymous, "missions").await.is_err(), "a client without a certificate was served");
    let other = Pki::new("other");
    let mut foreign = client(&url, &pki.ca, Some(&other.leaf("stranger", true)));
    assert!(try_publish(&mut foreign, "missions").await.is_err(), "a certificate of another CA was accepted");
    let mut known = client(&url, &pki.ca, Some(&pki.leaf("producer", true)));
    let published = try_publish(&mut known, "missions").await.expect("a client with a certificate is served");
    assert_eq!(published.offset, 1);
}

#[test]
fn switchboard_publish_over_https_with_tls_ca() {
    let pki = Pki::new("ca");
    let bus = pki.leaf("bus", false);
    let (cert, key, ca) = (bus.cert.to_str().unwrap(), bus.key.to_str().unwrap(), pki.ca.to_str().unwrap());
    let server_env = [("SWITCHBOARD_EVENTBUS__TLS_CERT", cert), ("SWITCHBOARD_EVENTBUS__TLS_KEY", key)];
    let process = Process::start_with(
        &["eventbus", "--dev", "--backend", "memory", "--eventbus-listen", "127.0.0.1:0"],
        &server_env,
    );
    let url = process.grpc.replace("http://", "https://");
    let publish = |env: &[(&str, &str)]| {
        let out = Command::new(switchboard_bin())
            .args(["publish", "--url", &url, "missions", "go", r#"{"id": 7}"#])
            .envs(env.iter().copied())
            .output()
            .expect("run switchboard publish");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, stdout) = publish(&[("SWITCHBOARD_TLS__CA", ca)]);
    assert_eq!(code, Some(0), "publish with tls.ca failed: {stdout}");
    assert!(stdout.contains("offset"), "{stdout}");
    // Without `tls.ca` the bus's certificate is not trusted.
    let (code, _) = publish(&[]);
    assert_ne!(code, Some(0));
    drop(process);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_while_an_open_websocket_stays_open() {
    let pki = Pki::new("ca");
    let first = pki.leaf("first", false);
    let (cert, key) = (first.cert.to_str().unwrap().to_owned(), first.key.to_str().unwrap().to_owned());
    let data = tempfile::tempdir().unwrap();
    let process = Process::start_with(
        &[
            "up",
            "--gateway-listen",
            "127.0.0.1:0",
            "--eventbus-listen",
            "127.0.0.1:0",
            "--agent-bridge-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[("SWITCHBOARD_GATEWAY__TLS_CERT", &cert), ("SWITCHBOARD_GATEWAY__TLS_KEY", &key)],
    );
    let ws_url = process.ws.clone().expect("the gateway's address");
    let addr: SocketAddr =
        ws_url.strip_prefix("wss://").expect("a wss:// address").trim_end_matches("/ws/connect").parse().unwrap();

    let mut open = wss(addr, &pki.ca_der).await;
    let (_, presented) = tls_connect(addr, &pki.ca_der).await.unwrap();
    assert_eq!(presented, first.der);

    // Replace the files (same paths) with a new certificate and key, then SIGHUP.
    let second = pki.leaf("second", false);
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    let pid = process.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, presented) = tls_connect(addr, &pki.ca_der).await.expect("the gateway still accepts TLS");
        if presented == second.der {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new connections still get the old certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new WSS connection works with it, and the open one was not dropped.
    let mut fresh = wss(addr, &pki.ca_der).await;
    fresh.send(Message::text(json!({"type": "ping", "id": 1}).to_string())).await.unwrap();
    assert_eq!(expect(&mut fresh, "pong").await["id"], 1);
    open.send(Message::text(json!({"type": "ping", "id": 2}).to_string())).await.unwrap();
    assert_eq!(expect(&mut open, "pong").await["id"], 2);
    drop(process);
}

/// Arguments, environment, and the setting the error must name.
type Case<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn missing_or_bad_certificate_files_exit_64_naming_the_setting() {
    let pki = Pki::new("ca");
    let good = pki.leaf("gateway", false);
    let (cert, key) = (good.cert.to_str().unwrap(), good.key.to_str().unwrap());
    let garbage = pki.file("garbage.pem", "not a pem file\n");
    let garbage = garbage.to_str().unwrap();
    let gateway = ["gateway", "--dev", "--gateway-listen", "127.0.0.1:0"];
    let cases: [Case<'_>; 6] = [
        (
            &gateway,
            vec![("SWITCHBOARD_GATEWAY__TLS_CERT", "/nonexistent/cert.pem"), ("SWITCHBOARD_GATEWAY__TLS_KEY", key)],
            "gateway.tls_cert",
        ),
        (
            &gateway,
            vec![("SWITCHBOARD_GATEWAY__TLS_CERT", cert), ("SWITCHBOARD_GATEWAY__TLS_KEY", garbage)],
            "gateway.tls_key",
        ),
        (&gateway, vec![("SWITCHBOARD_GATEWAY__TLS_CERT", cert)], "gateway.tls_key"),
        (
            &["eventbus", "--dev", "--backend", "memory", "--eventbus-listen", "127.0.0.1:0"],
            vec![
                ("SWITCHBOARD_EVENTBUS__TLS_CERT", cert),
                ("SWITCHBOARD_EVENTBUS__TLS_KEY", key),
                ("SWITCHBOARD_EVENTBUS__TLS_CLIENT_CA", garbage),
            ],
            "eventbus.tls_client_ca",
        ),
        (
            &["agent-bridge", "--dev", "--agent-bridge-listen", "127.0.0.1:0"],
            vec![("SWITCHBOARD_AGENT_BRIDGE__TLS_CERT", garbage), ("SWITCHBOARD_AGENT_BRIDGE__TLS_KEY", key)],
            "agent_bridge.tls_cert",
        ),
        (
            &["publish", "--url", "https://127.0.0.1:1", "missions", "go", "{}"],
            vec![("SWITCHBOARD_TLS__CA", "/nonexistent/ca.pem")],
            "tls.ca",
        ),
    ];
    for (args, env, setting) in cases {
        let (code, stderr) = run(args, &env);
        assert_eq!(code, 64, "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(setting), "{args:?}: {stderr} does not name {setting}");
    }
}

/// A TLS gateway on a plain memory bus, with `limits` tweaked.
async fn tls_gateway(pki: &Pki, bus: &BusServer, tweak: impl FnOnce(&mut gateway::Limits)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = gateway::Config {
        eventbus_urls: vec![bus.url()],
        tls: Some(server_tls("gateway", &pki.leaf("gateway", false), None)),
        ..gateway::Config::default()
    };
    tweak(&mut config.limits);
    tokio::spawn(async move { gateway::serve(config, listener, std::future::pending()).await.expect("gateway") });
    addr
}

/// Whether the server closed `tcp` within `WAIT` (end of stream or reset).
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(WAIT, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_stalled_tls_handshake_times_out_and_is_evicted_to_make_room() {
    let pki = Pki::new("ca");
    let bus = BusServer::memory().await;
    // The header deadline bounds the handshake too.
    let addr = tls_gateway(&pki, &bus, |l| l.header_timeout = Duration::from_millis(300)).await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_server(&mut stalled).await, "a connection that never starts its handshake stays open");

    // At the connection limit, one still handshaking is closed to make room.
    let addr = tls_gateway(&pki, &bus, |l| {
        l.max_connections = 1;
        l.header_timeout = Duration::from_secs(60);
    })
    .await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let mut ws = wss(addr, &pki.ca_der).await;
    assert!(closed_by_server(&mut stalled).await, "the stalled handshake was not evicted");
    ws.send(Message::text(json!({"type": "ping", "id": 1}).to_string())).await.unwrap();
    assert_eq!(expect(&mut ws, "pong").await["id"], 1);
}

/// Our gRPC clients' certificates are read again on SIGHUP too: a gateway
/// whose client certificate the mTLS bus refuses links once the files hold
/// one it accepts and the process got SIGHUP, without a restart.
#[tokio::test]
async fn sighup_reloads_the_client_certificate_the_gateway_presents_to_the_bus() {
    let pki = Pki::new("ca");
    let rogue = Pki::new("rogue");
    let (bus_addr, _bus) = tls_bus(server_tls("eventbus", &pki.leaf("bus", false), Some(&pki.ca))).await;
    let presented = rogue.leaf("gateway-client", true);
    let (ca, cert, key) = (pki.ca.to_str().unwrap(), presented.cert.to_str().unwrap(), presented.key.to_str().unwrap());
    let url = format!("https://{bus_addr}");
    let process = Process::start_with(
        &["gateway", "--gateway-listen", "127.0.0.1:0"],
        &[
            ("SWITCHBOARD_GATEWAY__EVENTBUS_URL", &url),
            ("SWITCHBOARD_TLS__CA", ca),
            ("SWITCHBOARD_TLS__CLIENT_CERT", cert),
            ("SWITCHBOARD_TLS__CLIENT_KEY", key),
            ("SWITCHBOARD_AUTH__ADMIN_KEY", ADMIN_KEY),
            ("SWITCHBOARD_AUTH__HS256_SECRET", "a-secret-of-at-least-32-characters-0"),
        ],
    );
    let addr = process.gateway_addr();
    let ready = || async move { http(addr, "GET", "/ready", None, None).await.unwrap() };
    // Refused by the bus: a certificate of a CA it does not trust.
    let (status, body) = ready().await;
    assert_eq!((status, &body["bus_linked"]), (503, &json!(false)), "{body}");

    let good = pki.leaf("gateway-client-2", true);
    std::fs::copy(&good.cert, &presented.cert).unwrap();
    std::fs::copy(&good.key, &presented.key).unwrap();
    let pid = process.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = ready().await;
        if status == 200 {
            assert_eq!(body["bus_linked"], true);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway never linked with the new certificate: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(process);
}
