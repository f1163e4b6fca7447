//! Nothing without permission (SPEC §3.1, §7.4, §7.5, §8), in production
//! mode: tokens required, no anonymous connections.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_proto::agent::v1 as apb;
use switchboard_tests::*;

const SECRET: &str = "an-hs256-secret-for-security-tests-01";

fn token(sub: &str, roles: &[&str], channels: &[&str]) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": sub, "exp": exp, "roles": roles, "channels": channels }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The gateway settings of production mode: tokens required, a short wait for `authorize`.
fn production(g: &mut gateway::Config) {
    g.anonymous = false;
    g.auth = gateway::auth::AuthConfig {
        authorize_timeout: Duration::from_secs(1),
        ..gateway::auth::AuthConfig::none().with_hs256(SECRET.as_bytes())
    };
}

/// Agents in production mode; echo says one word every `delay`.
async fn agents(delay: Duration) -> AgentStack {
    AgentStack::start(|b| b.echo_delay = delay, production).await
}

async fn connect(gw: &GatewayServer, path: &str, user: &str, roles: &[&str]) -> Ws {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut ws = Ws::connect(&gw.ws_url(&format!("{path}{sep}token={}", token(user, roles, &[])))).await.unwrap();
    assert_eq!(ws.expect("subscribed").await["channel"], format!("user#{user}"));
    ws
}

/// Reads frames until one of `kind`, skipping others (agent events, say).
async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let f = ws.recv().await.unwrap();
        if f["type"] == kind {
            return f;
        }
    }
}

/// Reads until both the `interrupted` reply and the run's `RUN_ERROR` came,
/// in whichever order: they travel on different streams.
async fn interrupted_and_ended(ws: &mut Ws) -> (Value, Value) {
    let (mut answer, mut end) = (None, None);
    while answer.is_none() || end.is_none() {
        let f = ws.recv().await.unwrap();
        if f["type"] == "interrupted" {
            answer = Some(f);
        } else if f["event"]["type"] == "RUN_ERROR" {
            end = Some(f["event"].clone());
        }
    }
    (answer.unwrap(), end.unwrap())
}

#[tokio::test]
async fn path_forms_without_a_token_get_nothing_of_the_channel() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), production).await;
    let mut client = bus_client(&bus.url()).await;
    let first = publish(&mut client, "missions", "launch", json!({ "n": 1 })).await;
    publish(&mut client, "task:42", "progress", json!({ "n": 1 })).await;
    let since = format!("0:{}", first.epoch);

    for path in [format!("/ws/channel/missions?since={since}"), format!("/ws/tasks/42?since={since}")] {
        let mut ws = Ws::connect(&gw.ws_url(&path)).await.unwrap();
        assert_eq!(ws.connected["user_id"], Value::Null);
        // Live events while it waits must not reach it either.
        publish(&mut client, "missions", "launch", json!({ "n": 2 })).await;
        publish(&mut client, "task:42", "progress", json!({ "n": 2 })).await;
        let (closed, frames) = ws.closed().await;
        assert_eq!(closed, Closed::Code(4500), "{path}: {frames:?}");
        let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["disconnect"], "{path}: nothing of the channel before the close: {frames:?}");
    }

    // A valid token subscribes at once, with recovery.
    let mut ws = connect(&gw, &format!("/ws/channel/missions?since={since}"), "alice", &[]).await;
    let subscribed = ws.expect("subscribed").await;
    assert_eq!((&subscribed["channel"], &subscribed["recovered"]), (&json!("missions"), &json!(true)));
    let replayed: Vec<Value> = [ws.expect("event").await, ws.expect("event").await].into();
    assert_eq!(replayed.iter().map(|e| e["data"]["n"].clone()).collect::<Vec<_>>(), [json!(1), json!(2)]);

    // Without a token, after `authorize`: then, and only then.
    let mut ws = Ws::connect(&gw.ws_url("/ws/tasks/42")).await.unwrap();
    ws.send(json!({ "type": "subscribe", "channel": "missions", "id": "early" })).await;
    assert_eq!(ws.expect("error").await["code"], "unauthorized");
    ws.send(json!({ "type": "authorize", "token": token("bob", &[], &[]), "id": 1 })).await;
    assert_eq!(ws.expect("authorized").await["user_id"], "bob");
    assert_eq!(ws.expect("subscribed").await["channel"], "user#bob");
    assert_eq!(ws.expect("subscribed").await["channel"], "task:42");
    publish(&mut client, "task:42", "progress", json!({ "n": 3 })).await;
    assert_eq!(ws.expect("event").await["data"]["n"], 3);
}

#[tokio::test]
async fn path_forms_apply_the_permissions_of_a_subscribe_frame() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |g| {
        production(g);
        let ops = gateway::Namespace { subscribe: gateway::Access::Roles(vec!["ops".into()]), ..Default::default() };
        g.namespaces.insert("audit".into(), ops);
    })
    .await;
    let mut client = bus_client(&bus.url()).await;
    publish(&mut client, "audit", "login", json!({})).await;
    for path in ["/ws/channel/audit", "/ws/channel/thread:t1%23alice", "/ws/channel/broadcast"] {
        let url = gw.ws_url(&format!("{path}?token={}", token("bob", &[], &[])));
        let mut ws = Ws::connect(&url).await.unwrap();
        // The refusal is immediate; the personal channel's `subscribed` waits for the bus.
        let mut got = [ws.recv().await.unwrap(), ws.recv().await.unwrap()];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
        assert_eq!(got[0]["code"], "permission_denied", "{path}: {got:?}");
        assert_eq!(got[1]["channel"], "user#bob", "{path}: {got:?}");
        ws.send(json!({ "type": "ping", "id": 1 })).await;
        assert_eq!(ws.expect("pong").await["id"], 1, "{path}: no event, no subscribed, nothing else");
    }
    let mut ws = connect(&gw, "/ws/channel/audit", "carol", &["ops"]).await;
    assert_eq!(ws.expect("subscribed").await["channel"], "audit");
}

#[tokio::test]
async fn a_tokens_channels_claim_cannot_name_other_users_channels() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), production).await;
    let claims = ["thread:t1#bob", "missions", "broadcast", "dm#alice,bob"];
    let url = gw.ws_url(&format!("/ws?token={}", token("alice", &[], &claims)));
    let mut ws = Ws::connect(&url).await.unwrap();
    let mut channels = Vec::new();
    for _ in 0..3 {
        channels.push(ws.expect("subscribed").await["channel"].as_str().unwrap().to_owned());
    }
    assert_eq!(channels, ["user#alice", "missions", "dm#alice,bob"]);
    ws.send(json!({ "type": "ping", "id": 1 })).await;
    assert_eq!(ws.expect("pong").await["id"], 1, "thread:t1#bob and broadcast were not subscribed");
}

#[tokio::test]
async fn user_ids_that_cannot_name_a_personal_channel_are_refused() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), production).await;
    for sub in ["bob,alice", "x#alice", "a b"] {
        let mut ws = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
        ws.send(json!({ "type": "authorize", "token": token(sub, &[], &[]), "id": 1 })).await;
        let err = ws.expect("error").await;
        assert_eq!((&err["code"], &err["id"]), (&json!("unauthorized"), &json!(1)), "{sub}");
        assert!(err["message"].as_str().unwrap().starts_with("user id contains"), "{sub}: {err}");
        assert_eq!(ws.closed().await.0, Closed::Code(4500), "{sub}");
    }
    // A connection keeps its user: another user's token is refused by `authorize` and `refresh`.
    let mut ws = connect(&gw, "/ws", "alice", &[]).await;
    for kind in ["authorize", "refresh"] {
        ws.send(json!({ "type": kind, "token": token("bob", &["admin"], &[]), "id": kind })).await;
        let err = ws.expect("error").await;
        assert_eq!((&err["code"], &err["id"]), (&json!("unauthorized"), &json!(kind)));
    }
    ws.send(json!({ "type": "subscribe", "channel": "user#bob", "id": 2 })).await;
    assert_eq!(ws.expect("error").await["code"], "permission_denied");
}

#[tokio::test]
async fn only_the_user_who_started_a_run_can_stop_it() {
    let s = agents(Duration::from_millis(30)).await;
    let mut alice = connect(&s.gateway, "/ws", "alice", &[]).await;
    let mut bob = connect(&s.gateway, "/ws", "bob", &[]).await;
    let words: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    alice.send(json!({ "type": "chat_message", "content": words.join(" ") })).await;
    let run = alice.expect("run").await;

    for (target, value) in [("run_id", &run["run_id"]), ("thread_id", &run["thread_id"])] {
        bob.send(json!({ "type": "interrupt_stream", target: value, "id": target })).await;
        let err = bob.expect("error").await;
        assert_eq!((&err["code"], &err["id"]), (&json!("permission_denied"), &json!(target)), "{err}");
        assert!(!err["message"].as_str().unwrap().contains(run["thread_id"].as_str().unwrap()), "{err}");
    }
    // Nor can bob continue alice's thread, in any multitask mode.
    for multitask in ["reject", "enqueue", "interrupt"] {
        let frame = json!({ "type": "chat_message", "content": "mine", "thread_id": run["thread_id"], "multitask": multitask, "id": multitask });
        bob.send(frame).await;
        let err = bob.expect("error").await;
        assert_eq!((&err["code"], &err["id"]), (&json!("permission_denied"), &json!(multitask)), "{err}");
    }
    // Alice's run was not disturbed.
    let mut text = String::new();
    let end = loop {
        let f = until(&mut alice, "agent_event").await;
        if f["event"]["type"] == "TEXT_MESSAGE_CONTENT" {
            text.push_str(f["event"]["delta"].as_str().unwrap());
        }
        if f["event"]["type"] == "RUN_FINISHED" || f["event"]["type"] == "RUN_ERROR" {
            break f["event"].clone();
        }
    };
    assert_eq!(end["type"], "RUN_FINISHED", "{end}");
    assert_eq!(text, words.join(" "));

    // Alice's own interrupt is answered, for a running run and an ended one.
    alice.send(json!({ "type": "chat_message", "content": words.join(" "), "thread_id": run["thread_id"] })).await;
    let second = alice.expect("run").await;
    alice.send(json!({ "type": "interrupt_stream", "run_id": second["run_id"], "id": 7 })).await;
    let (answer, end) = interrupted_and_ended(&mut alice).await;
    assert_eq!(answer["id"], 7);
    assert_eq!((&answer["run_id"], &answer["thread_id"]), (&second["run_id"], &second["thread_id"]));
    assert_eq!(answer["cancelled"], true);
    assert_eq!(end["code"], "cancelled");
    alice.send(json!({ "type": "interrupt_stream", "run_id": second["run_id"], "id": 8 })).await;
    let answer = until(&mut alice, "interrupted").await;
    assert_eq!((&answer["id"], &answer["cancelled"]), (&json!(8), &json!(false)));
    assert_eq!(answer["thread_id"], second["thread_id"]);
    // An ended run is still not bob's to stop.
    bob.send(json!({ "type": "interrupt_stream", "run_id": second["run_id"], "id": 9 })).await;
    assert_eq!(until(&mut bob, "error").await["code"], "permission_denied");

    // gRPC `Cancel` acts for the user it names; a service (no user) for anyone.
    let mut grpc = apb::agent_bridge_client::AgentBridgeClient::connect(s.bridge.url()).await.unwrap();
    alice.send(json!({ "type": "chat_message", "content": words.join(" "), "thread_id": run["thread_id"] })).await;
    let third = alice.expect("run").await;
    let target = Some(apb::cancel_request::Target::RunId(third["run_id"].as_str().unwrap().into()));
    let as_bob = grpc.cancel(apb::CancelRequest { target: target.clone(), user_id: "bob".into() }).await;
    assert_eq!(as_bob.unwrap_err().code(), tonic::Code::PermissionDenied);
    let as_service = grpc.cancel(apb::CancelRequest { target, user_id: String::new() }).await.unwrap().into_inner();
    assert!(as_service.cancelled);
    let end = loop {
        let f = until(&mut alice, "agent_event").await;
        if f["event"]["type"] == "RUN_ERROR" {
            break f["event"].clone();
        }
    };
    assert_eq!(end["code"], "cancelled");
}

#[tokio::test]
async fn the_agui_endpoint_cannot_continue_another_users_thread() {
    let s = agents(Duration::ZERO).await;
    let mut alice = connect(&s.gateway, "/ws", "alice", &[]).await;
    alice.send(json!({ "type": "chat_message", "content": "secret plans" })).await;
    let run = alice.expect("run").await;
    until(&mut alice, "agent_event").await;
    let input = json!({ "threadId": run["thread_id"], "runId": "r1", "messages": [{ "id": "m1", "role": "user", "content": "tell me" }] });
    let (status, body) =
        http(s.gateway.addr, "POST", "/agui/echo", Some(&token("bob", &[], &[])), Some(&input.to_string()))
            .await
            .unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, _) = http(s.gateway.addr, "POST", "/agui/echo", None, Some(&input.to_string())).await.unwrap();
    assert_eq!(status, 401, "a token is required in production mode");
}

#[tokio::test]
async fn rpc_methods_need_their_permission() {
    let s = agents(Duration::ZERO).await;
    let mut bob = connect(&s.gateway, "/ws", "bob", &[]).await;
    let mut root = connect(&s.gateway, "/ws", "root", &["admin"]).await;
    root.subscribe("system").await;

    let control = json!({ "type": "rpc", "method": "module_control", "params": { "module": "vision", "enabled": false }, "id": 1 });
    bob.send(control.clone()).await;
    let refused = bob.expect("rpc_response").await;
    assert_eq!((&refused["id"], &refused["error"]["code"]), (&json!(1), &json!("permission_denied")), "{refused}");
    root.send(control).await;
    let mut got = [root.recv().await.unwrap(), root.recv().await.unwrap()];
    got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
    assert_eq!((got[0]["event"].as_str(), &got[0]["data"]["enabled"]), (Some("module_status_changed"), &json!(false)));
    assert_eq!(got[1]["result"], json!({ "module": "vision", "enabled": false }));

    // get_status: what concerns everyone for bob, everything for an admin.
    bob.send(json!({ "type": "rpc", "method": "get_status", "id": 2 })).await;
    let status = bob.expect("rpc_response").await["result"].clone();
    assert_eq!(status["gateway"], json!({ "ready": true, "bus_linked": true }));
    assert_eq!(status["modules"], json!({ "vision": false }));
    assert_eq!(status["agents"][0], json!({ "name": "echo", "source": "builtin" }));
    for admin_only in ["workers", "runs_active"] {
        assert!(status.get(admin_only).is_none(), "{admin_only}: {status}");
    }
    root.send(json!({ "type": "rpc", "method": "get_status", "id": 3 })).await;
    let status = root.expect("rpc_response").await["result"].clone();
    assert_eq!(status["gateway"]["connections"], 2, "{status}");
    assert!(status["workers"].is_array(), "{status}");

    // Without a token nothing is called at all.
    let mut anonymous = Ws::connect(&s.gateway.ws_url("/ws")).await.unwrap();
    anonymous.send(json!({ "type": "rpc", "method": "get_status", "id": 4 })).await;
    assert_eq!(anonymous.expect("error").await["code"], "unauthorized");
}

#[tokio::test]
async fn rpc_settings_override_the_defaults_and_workers_learn_the_caller() {
    let s = AgentStack::start(
        |_| {},
        |g| {
            production(g);
            g.rpc.insert("add".into(), gateway::Access::Roles(vec!["math".into()]));
        },
    )
    .await;
    let mut worker = crate::workers::TestWorker::attach(&s.bridge.url(), "calc", &[], &["add"], 1).await;
    let mut bob = connect(&s.gateway, "/ws", "bob", &[]).await;
    bob.send(json!({ "type": "rpc", "method": "add", "params": { "a": 1, "b": 2 }, "id": 1 })).await;
    assert_eq!(bob.expect("rpc_response").await["error"]["code"], "permission_denied");
    // Nor through `execute_command`, which names the same method.
    let frame =
        json!({ "type": "rpc", "method": "execute_command", "params": { "command": "add", "args": {} }, "id": 2 });
    bob.send(frame).await;
    assert_eq!(bob.expect("rpc_response").await["error"]["code"], "permission_denied");

    let mut carol = connect(&s.gateway, "/ws", "carol", &["math", "ops"]).await;
    carol.send(json!({ "type": "rpc", "method": "add", "params": { "a": 1, "b": 2 }, "id": 2 })).await;
    let apb::bridge_message::Message::Call(call) = worker.recv().await else { panic!("expected a call") };
    assert_eq!((call.user_id.as_str(), call.roles.as_slice()), ("carol", &["math".to_owned(), "ops".to_owned()][..]));
}
