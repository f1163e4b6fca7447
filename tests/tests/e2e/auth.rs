//! Authentication, authorization and abuse limits (SPEC §8, §9).

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "an-hs256-secret-for-tests-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("keys").join(name)).unwrap()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn user(sub: &str) -> String {
    hs256(json!({ "sub": sub, "exp": now() + 600 }))
}

/// A gateway that requires tokens: HS256, RS256 and ES256 keys, audience `switchboard`.
async fn secured(tweak: impl FnOnce(&mut gateway::Config)) -> (BusServer, GatewayServer) {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.anonymous = false;
        c.auth = gateway::auth::AuthConfig::none()
            .with_hs256(SECRET.as_bytes())
            .with_public_pem(&key_file("rsa_public.pem"))
            .unwrap()
            .with_public_pem(&key_file("ec_public.pem"))
            .unwrap();
        tweak(c);
    })
    .await;
    (bus, gw)
}

async fn refused(gw: &GatewayServer, token: &str) -> String {
    let mut ws = Ws::connect_raw(&gw.ws_url(&format!("/ws?token={token}"))).await.unwrap();
    let (closed, frames) = ws.closed().await;
    assert_eq!(closed, Closed::Code(4500), "{frames:?}");
    assert_eq!(frames[0]["code"], "unauthorized");
    assert_eq!(frames.last().unwrap()["reconnect"], false);
    frames[0]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_let_in() {
    let (_bus, gw) = secured(|_| {}).await;
    let claims = json!({ "sub": "alice", "exp": now() + 600 });
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&key_file("rsa_private.pem")).unwrap(),
    )
    .unwrap();
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&key_file("ec_private.pem")).unwrap(),
    )
    .unwrap();
    for token in [hs256(claims.clone()), rs, es] {
        let mut ws = Ws::connect(&gw.ws_url(&format!("/ws?token={token}"))).await.unwrap();
        assert_eq!(ws.connected["user_id"], "alice");
        // The personal channel is subscribed by the server.
        assert_eq!(ws.expect("subscribed").await["channel"], "user#alice");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4500() {
    let (_bus, gw) = secured(|c| c.auth.audience = Some("switchboard".into())).await;
    let good = |extra: Value| {
        let mut claims = json!({ "sub": "alice", "exp": now() + 600, "aud": "switchboard" });
        claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        claims
    };
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good(json!({})),
        &EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    assert_eq!(refused(&gw, &forged).await, "bad signature");
    assert_eq!(refused(&gw, &hs256(good(json!({ "exp": now() - 60 })))).await, "token expired");
    assert_eq!(refused(&gw, &hs256(good(json!({ "aud": "someone-else" })))).await, "wrong audience");
    assert_eq!(refused(&gw, &hs256(good(json!({ "nbf": now() + 300 })))).await, "token not yet valid");
    let mut no_sub = good(json!({}));
    no_sub.as_object_mut().unwrap().remove("sub");
    assert_eq!(refused(&gw, &hs256(no_sub)).await, "token has no `sub`");
    assert_eq!(refused(&gw, "not.a.jwt").await, "malformed token");
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    // Only an RSA public key is configured; an attacker signs HS256 with that
    // public key as the HMAC secret.
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.anonymous = false;
        c.auth = gateway::auth::AuthConfig::none().with_public_pem(&key_file("rsa_public.pem")).unwrap();
    })
    .await;
    let claims = json!({ "sub": "mallory", "exp": now() + 600 });
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&key_file("rsa_public.pem")),
    )
    .unwrap();
    assert!(refused(&gw, &token).await.contains("algorithm"));
}

#[tokio::test]
async fn authorize_frame_within_the_timeout() {
    let (_bus, gw) = secured(|c| c.auth.authorize_timeout = Duration::from_millis(1500)).await;
    let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    // Opened after `ws`: once it is closed for not authorizing, `ws`'s
    // authorize deadline has passed too.
    let mut silent = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    assert_eq!(ws.connected["user_id"], Value::Null);
    ws.send(json!({ "type": "subscribe", "channel": "missions", "id": 1 })).await;
    let err = ws.expect("error").await;
    assert_eq!((err["code"].as_str(), &err["id"]), (Some("unauthorized"), &json!(1)));
    ws.send(json!({ "type": "authorize", "token": user("bob"), "id": 2 })).await;
    let ok = ws.expect("authorized").await;
    assert_eq!((ok["user_id"].as_str(), &ok["id"]), (Some("bob"), &json!(2)));
    assert_eq!(ws.expect("subscribed").await["channel"], "user#bob");
    ws.subscribe("missions").await;
    let (closed, _) = silent.closed().await;
    assert_eq!(closed, Closed::Code(4500), "no authorize within the timeout");
    // Past the authorize timeout `ws` stays open: it did authorize.
    ws.send(json!({ "type": "ping", "id": 3 })).await;
    assert_eq!(ws.expect("pong").await["id"], 3);

    let mut wrong = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    wrong.send(json!({ "type": "authorize", "token": "garbage" })).await;
    let (closed, _) = wrong.closed().await;
    assert_eq!(closed, Closed::Code(4500));
}

#[tokio::test]
async fn expiry_is_enforced_unless_refreshed() {
    let (_bus, gw) = secured(|c| c.auth.expiry_grace = Duration::from_millis(300)).await;
    let short = hs256(json!({ "sub": "carol", "exp": now() + 2 }));
    let mut refreshed = Ws::connect(&gw.ws_url(&format!("/ws?token={short}"))).await.unwrap();
    // Both expire at the same instant (`exp` is absolute): once `lapsing` is
    // closed, `refreshed` is past the expiry its refresh replaced.
    let mut lapsing = Ws::connect(&gw.ws_url(&format!("/ws?token={short}"))).await.unwrap();
    refreshed.expect("subscribed").await;
    refreshed.send(json!({ "type": "refresh", "token": user("carol"), "id": "r" })).await;
    let ok = refreshed.expect("authorized").await;
    assert_eq!(ok["id"], "r");
    assert!(ok["expires_at"].as_u64().unwrap() > now() + 60);
    refreshed.send(json!({ "type": "refresh", "token": user("dave") })).await;
    assert_eq!(refreshed.expect("error").await["code"], "unauthorized", "a refresh cannot change the user");

    let (closed, frames) = lapsing.closed().await;
    assert_eq!(closed, Closed::Code(4005));
    assert_eq!(frames.last().unwrap()["reconnect"], true);
    refreshed.send(json!({ "type": "ping", "id": 1 })).await;
    assert_eq!(refreshed.expect("pong").await["id"], 1);
}

#[tokio::test]
async fn permissions_follow_users_roles_and_namespaces() {
    let (bus, gw) = secured(|c| {
        c.namespaces.insert(
            "ops".into(),
            gateway::Namespace {
                subscribe: gateway::Access::Roles(vec!["ops".into()]),
                publish: gateway::Access::Roles(vec!["ops".into()]),
                ..Default::default()
            },
        );
    })
    .await;
    let mut alice = Ws::connect(&gw.ws_url(&format!("/ws?token={}", user("alice")))).await.unwrap();
    alice.expect("subscribed").await;
    for channel in ["user#bob", "thread:1#bob", "ops:deploys"] {
        alice.send(json!({ "type": "subscribe", "channel": channel })).await;
        assert_eq!(alice.expect("error").await["code"], "permission_denied", "{channel}");
    }
    alice.send(json!({ "type": "publish", "channel": "ops:deploys", "event": "forged", "data": {} })).await;
    assert_eq!(alice.expect("error").await["code"], "permission_denied");
    alice.subscribe("thread:1#alice,bob").await;

    let op = hs256(json!({ "sub": "olga", "exp": now() + 600, "roles": ["ops"], "channels": ["missions"] }));
    let mut olga = Ws::connect(&gw.ws_url(&format!("/ws?token={op}"))).await.unwrap();
    let mut subscribed = vec![
        olga.expect("subscribed").await["channel"].as_str().unwrap().to_owned(),
        olga.expect("subscribed").await["channel"].as_str().unwrap().to_owned(),
    ];
    subscribed.sort();
    assert_eq!(subscribed, ["missions", "user#olga"], "the channels claim is subscribed on connect");
    olga.subscribe("ops:deploys").await;
    olga.send(json!({ "type": "publish", "channel": "ops:deploys", "event": "deployed", "data": { "v": 2 }, "id": 1 }))
        .await;
    let mut got = [olga.recv().await.unwrap(), olga.recv().await.unwrap()];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!((got[0]["type"].as_str(), got[1]["type"].as_str()), (Some("event"), Some("published")));

    // The personal channel delivers what the API sends to that user.
    let (status, _) =
        http(gw.addr, "POST", "/api/ws/users/alice/send", Some(ADMIN_KEY), Some(r#"{"type":"note","data":{"n":1}}"#))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let ev = alice.expect("event").await;
    assert_eq!((ev["channel"].as_str(), ev["event"].as_str()), (Some("user#alice"), Some("note")));
    drop(bus);
}

#[tokio::test]
async fn connections_per_user_are_limited_with_4502() {
    let (_bus, gw) = secured(|c| c.limits.max_connections_per_user = 2).await;
    let url = gw.ws_url(&format!("/ws?token={}", user("erin")));
    let _a = Ws::connect(&url).await.unwrap();
    let _b = Ws::connect(&url).await.unwrap();
    let mut c = Ws::connect_raw(&url).await.unwrap();
    let (closed, _) = c.closed().await;
    assert_eq!(closed, Closed::Code(4502));
    // Another user is not affected.
    Ws::connect(&gw.ws_url(&format!("/ws?token={}", user("frank")))).await.unwrap();
}

#[tokio::test]
async fn origins_and_cors() {
    let bus = BusServer::memory().await;
    let gw =
        GatewayServer::start_with(&bus.url(), |c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let mut request = gw.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://evil.example.com".parse().unwrap());
    let Err(err) = tokio_tungstenite::connect_async(request).await else {
        panic!("a foreign origin must be refused");
    };
    assert!(err.to_string().contains("403"), "{err}");
    let mut request = gw.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://app.example.com".parse().unwrap());
    tokio_tungstenite::connect_async(request).await.expect("the allowed origin is let in");

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /api/ws/stats HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: GET\r\n\
             Access-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n"
        )
    };
    for (origin, allowed) in [("https://app.example.com", true), ("https://evil.example.com", false)] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(preflight(origin).as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let has = out.to_ascii_lowercase().contains(&format!("access-control-allow-origin: {origin}"));
        assert_eq!(has, allowed, "{out}");
    }
}

/// Serves `body` as JSON to every request on a loopback port; returns its URL.
async fn serve_json(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn keys_from_a_jwks_url_verify_tokens_by_kid() {
    let url = serve_json(String::from_utf8(key_file("jwks.json")).unwrap()).await;
    let bus = BusServer::memory().await;
    let jwks = gateway::jwks::Jwks::new(&url, Duration::from_secs(300), Duration::from_secs(2)).unwrap();
    assert_eq!(jwks.refresh().await.unwrap(), 2);
    let gw = GatewayServer::start_with(&bus.url(), |c| {
        c.anonymous = false;
        c.auth = gateway::auth::AuthConfig { jwks: Some(jwks), ..gateway::auth::AuthConfig::none() };
    })
    .await;
    let claims = json!({ "sub": "kim", "exp": now() + 600 });
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    };
    let rsa = EncodingKey::from_rsa_pem(&key_file("rsa_private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&key_file("ec_private.pem")).unwrap();
    for token in [sign(Algorithm::RS256, "test-rsa", &rsa), sign(Algorithm::ES256, "test-ec", &ec)] {
        let ws = Ws::connect(&gw.ws_url(&format!("/ws?token={token}"))).await.unwrap();
        assert_eq!(ws.connected["user_id"], "kim");
    }
    // A kid the set does not have, a key used with another algorithm, and an
    // HS256 token signed with a public key are all refused.
    refused(&gw, &sign(Algorithm::RS256, "rotated-away", &rsa)).await;
    refused(&gw, &sign(Algorithm::ES256, "test-rsa", &ec)).await;
    let confused = sign(Algorithm::HS256, "test-rsa", &EncodingKey::from_secret(&key_file("rsa_public.pem")));
    refused(&gw, &confused).await;
}

#[tokio::test]
async fn an_unreachable_jwks_url_fails_within_its_timeout() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let jwks = gateway::jwks::Jwks::new(&url, Duration::from_secs(300), Duration::from_millis(300)).unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(jwks.refresh().await.unwrap_err(), "timed out");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(gateway::jwks::Jwks::new("ftp://x/keys", Duration::from_secs(1), Duration::from_secs(1)).is_err());
}
