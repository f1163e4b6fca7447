//! Fuzzes the client frame decoder, `protocol::parse`, and the `since` query
//! parser, `protocol::parse_since`.
//!
//! Invariants:
//! - neither function panics;
//! - every error has a documented code (`invalid_json` exactly when the text
//!   is not JSON) and a non-empty message, and carries an `id` only when the
//!   input had that usable one;
//! - a decoded frame keeps the input's `id`, and re-encoding it gives a text
//!   that decodes to the same frame;
//! - `parse_since` splits at the first `:` and its canonical form round-trips.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use switchboard_gateway::protocol::{ClientFrame, Request, parse, parse_since};

fuzz_target!(|data: &[u8]| {
    // Frames arrive as WebSocket text messages, which are always UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_frame(text);
    check_since(text);
});

fn check_frame(text: &str) {
    let json = serde_json::from_str::<Value>(text).ok();
    // The `id` the decoder should see: a string or a number, else none.
    let input_id = json.as_ref().and_then(|v| v.get("id").cloned()).filter(|id| id.is_string() || id.is_number());

    match parse(text) {
        Ok(frame) => {
            assert_eq!(frame.id, input_id, "id not kept for {text:?}");
            let encoded = encode(&frame).to_string();
            assert_eq!(
                parse(&encoded).as_ref(),
                Ok(&frame),
                "{text:?} decoded, was re-encoded as {encoded:?}, and decoded differently"
            );
        }
        Err(e) => {
            let code = e.code();
            assert!(
                matches!(code, "invalid_json" | "invalid_frame" | "unknown_type"),
                "undocumented code {code:?} for {text:?}"
            );
            assert!(!e.message().is_empty(), "empty message for {text:?}");
            // `invalid_json` exactly when the text is not JSON.
            assert_eq!(code == "invalid_json", json.is_none(), "{code} for {text:?}");
            // An error names an id only if the input had that id.
            if let Some(id) = e.id() {
                assert_eq!(Some(id), input_id.as_ref(), "wrong id in error for {text:?}");
            }
        }
    }
}

/// Writes a decoded frame back as the JSON a client would send.
fn encode(frame: &ClientFrame) -> Value {
    let mut obj = Map::new();
    let kind = match &frame.request {
        Request::Authorize { token } => {
            obj.insert("token".into(), json!(token));
            "authorize"
        }
        Request::Refresh { token } => {
            obj.insert("token".into(), json!(token));
            "refresh"
        }
        Request::Subscribe { channel, since } => {
            obj.insert("channel".into(), json!(channel));
            if let Some(s) = since {
                obj.insert("since".into(), json!({ "offset": s.offset, "epoch": s.epoch }));
            }
            "subscribe"
        }
        Request::Unsubscribe { channel } => {
            obj.insert("channel".into(), json!(channel));
            "unsubscribe"
        }
        Request::Publish { channel, event, data } => {
            obj.insert("channel".into(), json!(channel));
            obj.insert("event".into(), json!(event));
            obj.insert("data".into(), data.clone());
            "publish"
        }
        Request::Ping => "ping",
        Request::Pong => "pong",
        Request::Rpc { method, params } => {
            obj.insert("method".into(), json!(method));
            obj.insert("params".into(), params.clone());
            "rpc"
        }
        Request::ChatMessage(m) => {
            obj.insert("content".into(), json!(m.content));
            let optional = [
                ("thread_id", m.thread_id.as_ref().map(|s| json!(s))),
                ("agent", m.agent.as_ref().map(|s| json!(s))),
                ("multitask", m.multitask.as_ref().map(|s| json!(s))),
                ("on_disconnect", m.on_disconnect.as_ref().map(|s| json!(s))),
                // `Some(null)` stays distinct from absent.
                ("state", m.state.clone()),
                ("tools", m.tools.clone()),
                ("context", m.context.clone()),
            ];
            for (name, value) in optional {
                if let Some(v) = value {
                    obj.insert(name.into(), v);
                }
            }
            "chat_message"
        }
        Request::RunAgent { agent, input, multitask, on_disconnect } => {
            obj.insert("agent".into(), json!(agent));
            obj.insert("input".into(), input.clone());
            obj.insert("multitask".into(), json!(multitask));
            obj.insert("on_disconnect".into(), json!(on_disconnect));
            "run_agent"
        }
        Request::InterruptStream { run_id, thread_id } => {
            obj.insert("run_id".into(), json!(run_id));
            obj.insert("thread_id".into(), json!(thread_id));
            "interrupt_stream"
        }
    };
    obj.insert("type".into(), json!(kind));
    if let Some(id) = &frame.id {
        obj.insert("id".into(), id.clone());
    }
    Value::Object(obj)
}

fn check_since(text: &str) {
    let Some(since) = parse_since(text) else {
        return;
    };
    // It split at the first `:`: the offset is the number before it and the
    // epoch is everything after it.
    let (offset, epoch) = text.split_once(':').expect("parsed without a `:`");
    assert_eq!(offset.parse::<u64>(), Ok(since.offset), "offset of {text:?}");
    assert_eq!(epoch, since.epoch, "epoch of {text:?}");
    // The canonical `OFFSET:EPOCH` form reads back the same.
    let canonical = format!("{}:{}", since.offset, since.epoch);
    assert_eq!(parse_since(&canonical), Some(since), "{canonical:?}");
}
