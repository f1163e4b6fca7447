//! Server frames (SPEC §3.2), each built here: `ServerFrame` for those the
//! gateway composes, serialized with the `id` of the request it answers and
//! a `timestamp`; `event` and `agent_event` frames are written by hand
//! instead, once per event, splicing in the payload as the bus or the
//! bridge sent it, without parsing or re-encoding it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Seconds since the Unix epoch with millisecond precision.
pub fn now() -> f64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    ms as f64 / 1000.0
}

/// Where a channel stands: its last offset, in its epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// Every server frame but `event` and `agent_event` (below), tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Connected {
        connection_id: Uuid,
        user_id: Option<&'a str>,
        node: &'a str,
        heartbeat: ConnectedHeartbeat,
        limits: ConnectedLimits,
    },
    Authorized {
        user_id: Option<&'a str>,
        expires_at: Option<u64>,
    },
    Subscribed {
        channel: &'a str,
        position: &'a Position,
        /// Only when the subscribe asked to recover.
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        recovery: Option<Recovery>,
    },
    Unsubscribed {
        channel: &'a str,
        reason: &'a str,
    },
    Published {
        channel: &'a str,
        offset: u64,
        event_id: &'a str,
    },
    Ping {},
    Pong {},
    /// `result`, or `error`.
    RpcResponse {
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<RpcError<'a>>,
    },
    Run {
        thread_id: &'a str,
        run_id: &'a str,
        channel: &'a str,
        position: Option<&'a Position>,
    },
    Interrupted {
        run_id: &'a str,
        thread_id: &'a str,
        cancelled: bool,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
    Disconnect {
        code: u16,
        reason: &'a str,
        reconnect: bool,
    },
}

#[derive(Debug, Serialize)]
pub struct ConnectedHeartbeat {
    /// Seconds.
    pub interval: f64,
    pub timeout: f64,
}

#[derive(Debug, Serialize)]
pub struct ConnectedLimits {
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
}

/// A `subscribed` frame's answer to `since`.
#[derive(Debug, Serialize)]
pub struct Recovery {
    pub recovered: bool,
    /// How many events the replay holds.
    pub missed: u64,
}

/// The `error` of an `rpc_response`.
#[derive(Debug, Serialize)]
pub struct RpcError<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

impl ServerFrame<'_> {
    /// The frame as JSON, with the `id` of the request it answers (when that
    /// had one) and a `timestamp`.
    pub fn to_json(&self, id: Option<&Value>) -> String {
        #[derive(Serialize)]
        struct Envelope<'f, 'a> {
            #[serde(flatten)]
            frame: &'f ServerFrame<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'f Value>,
            timestamp: f64,
        }
        serde_json::to_string(&Envelope { frame: self, id, timestamp: now() })
            .expect("a frame holds only strings, numbers and JSON values")
    }
}

/// An `error` frame answering `id`.
pub fn error(code: &str, message: &str, id: Option<&Value>) -> String {
    ServerFrame::Error { code, message }.to_json(id)
}

/// A channel event, as the bus delivered it.
pub struct EventRef<'a> {
    pub channel: &'a str,
    pub event: &'a str,
    /// UTF-8 JSON, checked by the bus; spliced in as it is.
    pub data: &'a [u8],
    pub id: &'a str,
    pub offset: u64,
    pub epoch: &'a str,
    pub timestamp_ms: i64,
}

/// Writes an `event` frame once, splicing the JSON payload without re-encoding it.
pub fn event_frame(e: &EventRef<'_>) -> String {
    let data = std::str::from_utf8(e.data).ok().filter(|d| !d.trim().is_empty()).unwrap_or("null");
    let mut out = String::with_capacity(128 + data.len() + e.channel.len() + e.event.len());
    out.push_str(r#"{"type":"event","channel":"#);
    push_json_str(&mut out, e.channel);
    out.push_str(r#","event":"#);
    push_json_str(&mut out, e.event);
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push_str(r#","id":"#);
    push_json_str(&mut out, e.id);
    out.push_str(r#","offset":"#);
    out.push_str(&e.offset.to_string());
    out.push_str(r#","epoch":"#);
    push_json_str(&mut out, e.epoch);
    out.push_str(r#","timestamp":"#);
    let ts = e.timestamp_ms.max(0);
    out.push_str(&format!("{}.{:03}", ts / 1000, ts % 1000));
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json's string escaping cannot fail on a `String` writer.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// Writes an `agent_event` frame, splicing the AG-UI event as the bridge sent
/// it (`null` if that is not JSON).
pub fn agent_event_frame(thread_id: &str, run_id: &str, seq: u64, event: &str) -> String {
    let event = if serde_json::from_str::<serde::de::IgnoredAny>(event).is_ok() { event } else { "null" };
    let mut out = String::with_capacity(96 + event.len() + thread_id.len() + run_id.len());
    out.push_str(r#"{"type":"agent_event","thread_id":"#);
    push_json_str(&mut out, thread_id);
    out.push_str(r#","run_id":"#);
    push_json_str(&mut out, run_id);
    out.push_str(r#","seq":"#);
    out.push_str(&seq.to_string());
    out.push_str(r#","event":"#);
    out.push_str(event);
    out.push_str(r#","timestamp":"#);
    out.push_str(&now().to_string());
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn event_frames_are_valid_json_with_the_payload_spliced() {
        let s = event_frame(&EventRef {
            channel: "task:\"1\"",
            event: "done",
            data: br#"{"a":[1,2]}"#,
            id: "u",
            offset: 42,
            epoch: "ep",
            timestamp_ms: 1_700_000_000_123,
        });
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["channel"], "task:\"1\"");
        assert_eq!(v["data"], json!({"a":[1,2]}));
        assert_eq!(v["offset"], 42);
        assert_eq!(v["timestamp"], json!(1_700_000_000.123));
    }

    #[test]
    fn composed_frames_carry_their_type_the_id_they_answer_and_a_timestamp() {
        let position = Position { offset: 3, epoch: "ep".into() };
        let frame = ServerFrame::Subscribed { channel: "a", position: &position, recovery: None };
        let v: Value = serde_json::from_str(&frame.to_json(Some(&json!("s1")))).unwrap();
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["id"], "s1");
        assert_eq!(v["position"], json!({ "offset": 3, "epoch": "ep" }));
        assert!(v.get("recovered").is_none(), "no `recovered` unless asked: {v}");
        assert!(v["timestamp"].as_f64().unwrap() > 1.7e9);

        let recovery = Some(Recovery { recovered: false, missed: 0 });
        let v: Value = serde_json::from_str(
            &ServerFrame::Subscribed { channel: "a", position: &position, recovery }.to_json(None),
        )
        .unwrap();
        assert_eq!((v["recovered"].clone(), v["missed"].clone()), (json!(false), json!(0)));
        assert!(v.get("id").is_none());

        let v: Value = serde_json::from_str(&ServerFrame::Pong {}.to_json(Some(&json!(7)))).unwrap();
        assert_eq!(v, json!({ "type": "pong", "id": 7, "timestamp": v["timestamp"] }));
        let rpc = ServerFrame::RpcResponse { result: None, error: Some(RpcError { code: "x", message: "m" }) };
        let v: Value = serde_json::from_str(&rpc.to_json(None)).unwrap();
        assert_eq!(v["error"], json!({ "code": "x", "message": "m" }));
        assert!(v.get("result").is_none());
    }

    #[test]
    fn agent_event_frames_splice_the_event_and_escape_the_ids() {
        let v: Value =
            serde_json::from_str(&agent_event_frame("t\"1", "r", 4, r#"{"type":"TEXT_MESSAGE_CONTENT"}"#)).unwrap();
        assert_eq!(v["type"], "agent_event");
        assert_eq!(v["thread_id"], "t\"1");
        assert_eq!(v["seq"], 4);
        assert_eq!(v["event"]["type"], "TEXT_MESSAGE_CONTENT");
        let v: Value = serde_json::from_str(&agent_event_frame("t", "r", 1, "not json")).unwrap();
        assert_eq!(v["event"], Value::Null);
    }
}
