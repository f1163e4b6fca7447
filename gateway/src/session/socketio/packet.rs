//! Socket.IO v5 packets inside Engine.IO v4 messages (SPEC §3.6): what a
//! client sends, parsed; and our server frames, written as Socket.IO events
//! or acknowledgements.
//!
//! An Engine.IO packet is one type digit and its data: `0` open, `1` close,
//! `2` ping, `3` pong, `4` message, `5` upgrade, `6` noop. A message carries
//! one Socket.IO packet: a type digit (`0` connect, `1` disconnect, `2`
//! event, `3` ack, `4` connect error, `5`/`6` binary event/ack), the
//! namespace followed by `,` unless it is `/`, an ack id, and JSON. So our
//! `event` frame `{"type":"event",...}` on `/ws` goes out as
//! `42/ws,["event",{...}]`: the writer wraps the frame's shared bytes with a
//! prefix and a suffix and never encodes the event again.

use std::collections::{HashMap, VecDeque};

use axum::extract::ws::Utf8Bytes;
use serde_json::{Map, Value};

/// The namespaces served: the root, and `/ws` (`io("ws://host/ws")`).
pub const NAMESPACES: [&str; 2] = ["/", "/ws"];

/// A Socket.IO packet from a client.
#[derive(Debug, PartialEq)]
pub enum Packet<'a> {
    Connect {
        nsp: &'a str,
        auth: Option<Value>,
    },
    Disconnect {
        nsp: &'a str,
    },
    Event {
        nsp: &'a str,
        ack: Option<u64>,
        name: String,
        arg: Value,
    },
    /// The client acknowledged an event; we never ask it to.
    Ack,
    /// Binary events and acks (attachments follow as binary messages).
    Binary,
}

/// Why a message is not a Socket.IO packet.
#[derive(Debug, PartialEq)]
pub struct Malformed(pub &'static str);

/// Parses the Socket.IO packet of an Engine.IO message (the text after `4`).
pub fn parse(s: &str) -> Result<Packet<'_>, Malformed> {
    let mut rest = s;
    let kind = rest.as_bytes().first().copied().ok_or(Malformed("empty packet"))?;
    rest = &rest[1..];
    if matches!(kind, b'5' | b'6') {
        return Ok(Packet::Binary);
    }
    let nsp = if rest.starts_with('/') {
        match rest.find(',') {
            Some(i) => {
                let nsp = &rest[..i];
                rest = &rest[i + 1..];
                nsp
            }
            // `40/ws` with nothing after it.
            None => std::mem::take(&mut rest),
        }
    } else {
        "/"
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = match digits {
        0 => None,
        n if n <= 15 => rest[..n].parse().ok(),
        _ => return Err(Malformed("ack id too long")),
    };
    rest = &rest[digits..];
    let json = || -> Result<Value, Malformed> { serde_json::from_str(rest).map_err(|_| Malformed("invalid JSON")) };
    match kind {
        b'0' => {
            let auth = if rest.is_empty() { None } else { Some(json()?) };
            if auth.as_ref().is_some_and(|a| !a.is_object()) {
                return Err(Malformed("the connect payload must be an object"));
            }
            Ok(Packet::Connect { nsp, auth })
        }
        b'1' => Ok(Packet::Disconnect { nsp }),
        b'2' => {
            let Value::Array(mut items) = json()? else {
                return Err(Malformed("an event must be a JSON array"));
            };
            if items.is_empty() {
                return Err(Malformed("an event needs a name"));
            }
            let Value::String(name) = items.remove(0) else {
                return Err(Malformed("an event's name must be a string"));
            };
            // One argument: the frame's fields; more are ignored.
            let arg = items.into_iter().next().unwrap_or(Value::Null);
            Ok(Packet::Event { nsp, ack, name, arg })
        }
        b'3' => Ok(Packet::Ack),
        _ => Err(Malformed("unknown packet type")),
    }
}

/// Turns an event's argument into the fields of a client frame: an object as
/// it is, nothing as no fields, and a string as the channel of `subscribe`
/// and `unsubscribe` (`emit("subscribe", "missions")`). Anything else stays
/// as it is, and the frame parser refuses it.
pub fn frame_fields(name: &str, arg: Value) -> Value {
    match arg {
        Value::Null => Value::Object(Map::new()),
        Value::String(channel) if name == "subscribe" || name == "unsubscribe" => {
            let mut m = Map::new();
            m.insert("channel".into(), Value::String(channel));
            Value::Object(m)
        }
        other => other,
    }
}

/// The requests of one connection still owed a reply. Every client event
/// is given our own numeric `id` (the client's `id`, if it sent one, is kept
/// here), so that its reply can be found: given to the ack callback, with
/// the client's `id`, and an `rpc_response` typed by the method it answers.
#[derive(Debug, Default)]
pub struct Requests {
    next: u64,
    pending: HashMap<u64, Pending>,
    /// Requests answered lately, whose later frames (the error ending a run
    /// after its `run` reply) still carry the client's `id`; bounded.
    answered: VecDeque<(u64, Option<Value>)>,
}

#[derive(Debug)]
struct Pending {
    client_id: Option<Value>,
    ack: Option<u64>,
    /// The request is an `rpc` of `get_status`.
    status: bool,
}

/// At most this many requests wait for a reply: the rate limit keeps a
/// client far below it; past it the oldest is forgotten.
const MAX_PENDING: usize = 1024;
const MAX_ANSWERED: usize = 64;

impl Requests {
    /// Registers a request; returns the `id` its frame carries.
    pub fn open(&mut self, client_id: Option<Value>, ack: Option<u64>, status: bool) -> u64 {
        if self.pending.len() >= MAX_PENDING
            && let Some(&oldest) = self.pending.keys().min()
        {
            self.pending.remove(&oldest);
        }
        self.next += 1;
        self.pending.insert(self.next, Pending { client_id, ack, status });
        self.next
    }

    /// The request a reply answers: its client `id`, its ack id (given out
    /// once) and whether it was `get_status`.
    fn answer(&mut self, id: u64) -> Option<(Option<Value>, Option<u64>, bool)> {
        if let Some(p) = self.pending.remove(&id) {
            if self.answered.len() >= MAX_ANSWERED {
                self.answered.pop_front();
            }
            self.answered.push_back((id, p.client_id.clone()));
            return Some((p.client_id, p.ack, p.status));
        }
        let (_, client_id) = self.answered.iter().find(|(k, _)| *k == id)?;
        Some((client_id.clone(), None, false))
    }
}

/// The head of every `event` frame the hub fans out (`protocol::event_frame`).
const EVENT_HEAD: &str = r#"{"type":"event","#;

/// Writes one queued item as the Engine.IO packet that goes out. Items that
/// are not JSON frames (they do not start with `{`) are Engine.IO packets
/// already (`2`, `40{"sid":..}`) and go out as they are.
///
/// An `event` frame keeps its bytes: `42` + namespace + `["event",{` + the
/// frame after its `"type":"event",` + `]`. Other frames are replies and
/// notices, rare beside events: they are parsed, lose their `type`, get the
/// client's `id` back, and go to the ack when the request had one.
pub fn encode(frame: &Utf8Bytes, nsp: &str, requests: &mut Requests) -> Utf8Bytes {
    if let Some(rest) = frame.as_str().strip_prefix(EVENT_HEAD) {
        let mut out = String::with_capacity(frame.len() + nsp.len() + 12);
        out.push_str("42");
        push_nsp(&mut out, nsp);
        out.push_str(r#"["event",{"#);
        out.push_str(rest);
        out.push(']');
        return Utf8Bytes::from(out);
    }
    if !frame.as_str().starts_with('{') {
        return frame.clone();
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(frame.as_str()) else {
        // Every frame we write is an object.
        return frame.clone();
    };
    let name = match obj.remove("type") {
        Some(Value::String(s)) => s,
        _ => "message".to_owned(),
    };
    let mut ack = None;
    let mut status = false;
    // `event` frames carry the event's own id, not a request's.
    if name != "event"
        && let Some(id) = obj.get("id").and_then(Value::as_u64)
        && let Some((client_id, a, s)) = requests.answer(id)
    {
        (ack, status) = (a, s);
        match client_id {
            Some(v) => obj.insert("id".into(), v),
            None => obj.remove("id"),
        };
    }
    if name == "rpc_response" {
        // What Socket.IO frontends read (SPEC §3.6).
        let (kind, data) = match obj.get("error") {
            Some(e) => ("error", e.clone()),
            None if status => ("status_update", obj.get("result").cloned().unwrap_or(Value::Null)),
            None => ("command_response", obj.get("result").cloned().unwrap_or(Value::Null)),
        };
        obj.insert("type".into(), Value::String(kind.to_owned()));
        obj.insert("data".into(), data);
    }
    let body = Value::Object(obj).to_string();
    let mut out = String::with_capacity(body.len() + name.len() + nsp.len() + 24);
    match ack {
        Some(ack) => {
            out.push_str("43");
            push_nsp(&mut out, nsp);
            out.push_str(&ack.to_string());
            out.push('[');
            out.push_str(&body);
            out.push(']');
        }
        None => {
            out.push_str("42");
            push_nsp(&mut out, nsp);
            out.push('[');
            out.push_str(&Value::String(name).to_string());
            out.push(',');
            out.push_str(&body);
            out.push(']');
        }
    }
    Utf8Bytes::from(out)
}

/// `42` + this, for packets of `nsp`.
fn push_nsp(out: &mut String, nsp: &str) {
    if nsp != "/" {
        out.push_str(nsp);
        out.push(',');
    }
}

/// A Socket.IO packet of `nsp` (`kind` `0` connect, `1` disconnect, `4`
/// connect error) with its JSON, inside an Engine.IO message.
pub fn control(kind: char, nsp: &str, json: Option<&Value>) -> Utf8Bytes {
    let mut out = String::from("4");
    out.push(kind);
    push_nsp(&mut out, nsp);
    if let Some(j) = json {
        out.push_str(&j.to_string());
    }
    Utf8Bytes::from(out)
}

/// An event of `nsp` we emit that is no frame of the queue (the farewell).
pub fn event(nsp: &str, name: &str, arg: &Value) -> Utf8Bytes {
    let mut out = String::from("42");
    push_nsp(&mut out, nsp);
    out.push_str(&format!("[{},{}]", Value::String(name.to_owned()), arg));
    Utf8Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_what_clients_send() {
        assert_eq!(parse("0").unwrap(), Packet::Connect { nsp: "/", auth: None });
        assert_eq!(parse("0/ws,").unwrap(), Packet::Connect { nsp: "/ws", auth: None });
        assert_eq!(parse("0/ws").unwrap(), Packet::Connect { nsp: "/ws", auth: None });
        assert_eq!(
            parse(r#"0/ws,{"token":"t"}"#).unwrap(),
            Packet::Connect { nsp: "/ws", auth: Some(json!({"token": "t"})) }
        );
        assert_eq!(
            parse(r#"2/ws,12["rpc",{"method":"get_status"}]"#).unwrap(),
            Packet::Event { nsp: "/ws", ack: Some(12), name: "rpc".into(), arg: json!({"method": "get_status"}) }
        );
        assert_eq!(
            parse(r#"2["subscribe","bench"]"#).unwrap(),
            Packet::Event { nsp: "/", ack: None, name: "subscribe".into(), arg: json!("bench") }
        );
        assert_eq!(
            parse(r#"2["ping"]"#).unwrap(),
            Packet::Event { nsp: "/", ack: None, name: "ping".into(), arg: Value::Null }
        );
        assert_eq!(parse("1/ws,").unwrap(), Packet::Disconnect { nsp: "/ws" });
        assert_eq!(parse(r#"51-["x",{"_placeholder":true,"num":0}]"#).unwrap(), Packet::Binary);
    }

    #[test]
    fn refuses_what_is_not_a_packet() {
        for bad in ["", "9", "2", "2{", r#"2{"a":1}"#, "2[]", "2[1]", "0[1]", "21234567890123456[\"a\"]"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_event_frame_is_wrapped_not_reencoded() {
        let frame = Utf8Bytes::from(r#"{"type":"event","channel":"a","data":{"k":1},"offset":3}"#);
        let mut r = Requests::default();
        let out = encode(&frame, "/ws", &mut r);
        assert_eq!(out.as_str(), r#"42/ws,["event",{"channel":"a","data":{"k":1},"offset":3}]"#);
        let out = encode(&frame, "/", &mut r);
        assert_eq!(out.as_str(), r#"42["event",{"channel":"a","data":{"k":1},"offset":3}]"#);
        assert_eq!(encode(&Utf8Bytes::from_static("2"), "/", &mut r).as_str(), "2");
    }

    #[test]
    fn replies_go_to_acks_with_the_clients_id_and_rpc_responses_are_typed() {
        let mut r = Requests::default();
        let status = r.open(None, Some(7), true);
        let frame = format!(r#"{{"type":"rpc_response","id":{status},"result":{{"ok":true}}}}"#);
        let out = encode(&Utf8Bytes::from(frame), "/ws", &mut r);
        let body: Value = serde_json::from_str(out.as_str().strip_prefix("43/ws,7").unwrap()).unwrap();
        assert_eq!(body, json!([{"result": {"ok": true}, "type": "status_update", "data": {"ok": true}}]));

        let cmd = r.open(Some(json!("c1")), None, false);
        let frame = format!(r#"{{"type":"rpc_response","id":{cmd},"error":{{"code":"x","message":"m"}}}}"#);
        let out = encode(&Utf8Bytes::from(frame), "/", &mut r);
        let body: Value = serde_json::from_str(out.as_str().strip_prefix("42").unwrap()).unwrap();
        assert_eq!(body[0], "rpc_response");
        assert_eq!(body[1]["type"], "error");
        assert_eq!(body[1]["data"], json!({"code": "x", "message": "m"}));
        assert_eq!(body[1]["id"], "c1");

        let other = r.open(None, None, false);
        let frame = format!(r#"{{"type":"rpc_response","id":{other},"result":5}}"#);
        let body: Value = serde_json::from_str(&encode(&Utf8Bytes::from(frame), "/", &mut r).as_str()[2..]).unwrap();
        assert_eq!(
            (&body[1]["type"], &body[1]["data"], body[1].get("id")),
            (&json!("command_response"), &json!(5), None)
        );

        // A second frame for an answered request is emitted, not acked.
        let sub = r.open(Some(json!(9)), Some(1), false);
        let first = encode(&Utf8Bytes::from(format!(r#"{{"type":"run","id":{sub}}}"#)), "/", &mut r);
        assert!(first.as_str().starts_with("431["), "{}", first.as_str());
        let later = encode(&Utf8Bytes::from(format!(r#"{{"type":"error","id":{sub}}}"#)), "/", &mut r);
        let body: Value = serde_json::from_str(&later.as_str()[2..]).unwrap();
        assert_eq!(body, json!(["error", {"id": 9}]));
    }

    #[test]
    fn control_packets() {
        assert_eq!(control('0', "/", Some(&json!({"sid": "s"}))).as_str(), r#"40{"sid":"s"}"#);
        assert_eq!(control('0', "/ws", Some(&json!({"sid": "s"}))).as_str(), r#"40/ws,{"sid":"s"}"#);
        assert_eq!(control('1', "/ws", None).as_str(), "41/ws,");
        assert_eq!(control('1', "/", None).as_str(), "41");
        assert_eq!(event("/ws", "disconnect", &json!({"code": 1})).as_str(), r#"42/ws,["disconnect",{"code":1}]"#);
    }
}
