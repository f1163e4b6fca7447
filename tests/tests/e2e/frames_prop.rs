//! Property: no sequence of client frames makes a connection panic, hang, or
//! leave state behind. Each case drives a real connection with arbitrary
//! frames; it must end answering `ping` or closed with a documented code, and
//! once every case is done the node holds no connection or subscription.

use std::time::Duration;

use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use serde_json::{Value, json};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::Message;

fn channel() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("missions".to_owned()),
        Just("task:1".to_owned()),
        Just("chat:x".to_owned()),
        Just("user#someone".to_owned()),
        Just("broadcast".to_owned()),
        "[a-z:#,@=._-]{0,12}",
        ".{0,300}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn frame() -> impl Strategy<Value = Message> {
    let kind = prop_oneof![
        Just("subscribe"),
        Just("unsubscribe"),
        Just("publish"),
        Just("ping"),
        Just("pong"),
        Just("authorize"),
        Just("refresh"),
        Just("rpc"),
        Just("chat_message"),
        Just("nonsense"),
    ];
    prop_oneof![
        4 => (kind, channel(), json_value(), any::<Option<u32>>(), any::<Option<(u64, String)>>()).prop_map(
            |(kind, channel, data, id, since)| {
                let mut f = json!({ "type": kind, "channel": channel, "data": data, "token": "x.y.z" });
                if let Some(id) = id {
                    f["id"] = json!(id);
                }
                if let Some((offset, epoch)) = since {
                    f["since"] = json!({ "offset": offset, "epoch": epoch });
                }
                Message::Text(f.to_string().into())
            }
        ),
        1 => json_value().prop_map(|v| Message::Text(v.to_string().into())),
        1 => ".{0,64}".prop_map(|s| Message::Text(s.into())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Message::Binary(b.into())),
    ]
}

async fn drive(stack: &Stack, frames: Vec<Message>) -> Result<(), TestCaseError> {
    let mut ws = Ws::connect(&stack.gateway.ws_url("/ws")).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    for f in frames {
        ws.send_message(f).await;
    }
    ws.send(json!({ "type": "ping", "id": "end" })).await;
    // The closes a frame sequence may earn; any other end is a defect.
    const EARNED: [u16; 3] = [1009, 4006, 4501];
    let mut announced = None;
    loop {
        match ws.next_within(Duration::from_secs(10)).await {
            Ok(Next::Frame(v)) if v["type"] == "pong" && v["id"] == "end" => return Ok(()),
            Ok(Next::Frame(v)) if v["type"] == "disconnect" => {
                let code = v["code"].as_u64().unwrap_or(0) as u16;
                prop_assert!(EARNED.contains(&code), "unexpected disconnect {code}");
                announced = Some(code);
            }
            Ok(Next::Frame(_)) => continue,
            Ok(Next::Closed(Closed::Code(code))) => {
                // The close that ends it is the one its `disconnect` announced.
                prop_assert!(EARNED.contains(&code), "unexpected close {code}");
                prop_assert!(announced.is_none_or(|a| a == code), "disconnect {announced:?} then close {code}");
                return Ok(());
            }
            Ok(Next::Closed(Closed::Abrupt)) => {
                return Err(TestCaseError::fail("the connection broke without a close frame"));
            }
            Err(e) => return Err(TestCaseError::fail(format!("connection hung: {e}"))),
        }
    }
}

#[test]
fn arbitrary_frame_sequences_never_break_a_connection() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stack = rt.block_on(async {
        let bus = BusServer::memory().await;
        let gateway = GatewayServer::start_with(&bus.url(), open_chat).await;
        Stack { bus, gateway }
    });
    let mut runner = TestRunner::new(Config { cases: 48, failure_persistence: None, ..Config::default() });
    runner.run(&prop::collection::vec(frame(), 0..40), |frames| rt.block_on(drive(&stack, frames))).unwrap();

    // Every connection is gone, and so is all of its state.
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, metrics) = http(stack.gateway.addr, "GET", "/metrics", None, None).await.unwrap();
            let text = metrics.as_str().unwrap_or_default().to_owned();
            let clean = ["switchboard_connections 0", "switchboard_subscriptions 0", "switchboard_channels 0"]
                .iter()
                .all(|line| text.lines().any(|l| l == *line));
            if clean {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "state left behind:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
