//! The browser protocol (SPEC §3): client frames parsed from JSON here,
//! server frames written as JSON in `server`. These are the gateway's own
//! types: proto structs never reach a browser.

mod server;

pub use server::{
    ConnectedHeartbeat, ConnectedLimits, EventRef, Position, Recovery, RpcError, ServerFrame, agent_event_frame, error,
    event_frame, now,
};

use serde::Serialize;
use serde_json::{Map, Value};

/// A parsed client frame: the request and the `id` to echo in the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub id: Option<Value>,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Authorize {
        token: String,
    },
    Refresh {
        token: String,
    },
    Subscribe {
        channel: String,
        since: Option<Since>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        event: String,
        data: Value,
    },
    Ping,
    Pong,
    /// Calls a method on the agent bridge.
    Rpc {
        method: String,
        params: Value,
    },
    /// Starts a run on a thread with a new user message.
    ChatMessage(ChatMessage),
    /// Starts a run with a full AG-UI `RunAgentInput`.
    RunAgent {
        agent: Option<String>,
        input: Value,
        multitask: Option<String>,
        on_disconnect: Option<String>,
    },
    /// Cancels a run, by run id or thread id.
    InterruptStream {
        run_id: Option<String>,
        thread_id: Option<String>,
    },
}

/// A `chat_message` frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatMessage {
    pub content: String,
    pub thread_id: Option<String>,
    pub agent: Option<String>,
    pub state: Option<Value>,
    pub tools: Option<Value>,
    pub context: Option<Value>,
    /// `interrupt` or `enqueue`; otherwise a busy thread answers `thread_busy`.
    pub multitask: Option<String>,
    /// `cancel` stops the run when this connection closes; the default lets it go on.
    pub on_disconnect: Option<String>,
}

/// A position a client recovers from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// Why a text frame could not be parsed; each maps to an `error.code`.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameError {
    InvalidJson(String),
    InvalidFrame { id: Option<Value>, message: String },
    UnknownType { id: Option<Value>, kind: String },
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::InvalidFrame { .. } => "invalid_frame",
            FrameError::UnknownType { .. } => "unknown_type",
        }
    }

    pub fn message(&self) -> String {
        match self {
            FrameError::InvalidJson(e) => format!("frame is not valid JSON: {e}"),
            FrameError::InvalidFrame { message, .. } => message.clone(),
            FrameError::UnknownType { kind, .. } => format!("unknown frame type {kind:?}"),
        }
    }

    pub fn id(&self) -> Option<&Value> {
        match self {
            FrameError::InvalidJson(_) => None,
            FrameError::InvalidFrame { id, .. } | FrameError::UnknownType { id, .. } => id.as_ref(),
        }
    }
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    parse_value(value)
}

/// Parses a client frame already read as JSON (a Socket.IO event's fields).
pub fn parse_value(value: Value) -> Result<ClientFrame, FrameError> {
    let Value::Object(mut obj) = value else {
        return Err(invalid(None, "frame must be a JSON object"));
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v),
        Some(_) => return Err(invalid(None, "field `id` must be a string or a number")),
    };
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        // Frames of existing clients (SPEC §3.5): `{method, params}` is an `rpc`.
        None if matches!(obj.get("method"), Some(Value::String(_))) => "rpc".to_owned(),
        None => return Err(invalid(id, "field `type` is missing")),
        Some(_) => return Err(invalid(id, "field `type` must be a string")),
    };
    let mut fields = Fields { obj, id };
    let request = match kind.as_str() {
        "authorize" => Request::Authorize { token: fields.string("token")? },
        "refresh" => Request::Refresh { token: fields.string("token")? },
        "subscribe" => Request::Subscribe { channel: fields.string("channel")?, since: fields.since()? },
        "unsubscribe" => Request::Unsubscribe { channel: fields.string("channel")? },
        "publish" => Request::Publish {
            channel: fields.string("channel")?,
            event: fields.opt_string("event")?.unwrap_or_else(|| "message".to_owned()),
            data: fields.obj.remove("data").unwrap_or(Value::Null),
        },
        // `heartbeat` is what some existing clients send for `ping`.
        "ping" | "heartbeat" => Request::Ping,
        "pong" => Request::Pong,
        "rpc" => Request::Rpc {
            method: fields.string("method")?,
            params: fields.obj.remove("params").unwrap_or(Value::Object(Map::new())),
        },
        "chat_message" => Request::ChatMessage(ChatMessage {
            content: fields.string("content")?,
            thread_id: fields.opt_string("thread_id")?,
            agent: fields.opt_string("agent")?,
            multitask: fields.opt_string("multitask")?,
            on_disconnect: fields.opt_string("on_disconnect")?,
            state: fields.obj.remove("state"),
            tools: fields.obj.remove("tools"),
            context: fields.obj.remove("context"),
        }),
        // The `module_control` method, sent as a frame of its own (SPEC §3.5).
        "module_control" => {
            let mut params = Map::new();
            for name in ["module", "enabled"] {
                if let Some(v) = fields.obj.remove(name) {
                    params.insert(name.to_owned(), v);
                }
            }
            Request::Rpc { method: kind, params: Value::Object(params) }
        }
        "run_agent" => Request::RunAgent {
            agent: fields.opt_string("agent")?,
            multitask: fields.opt_string("multitask")?,
            on_disconnect: fields.opt_string("on_disconnect")?,
            input: match fields.obj.remove("input") {
                Some(v @ Value::Object(_)) => v,
                _ => return Err(invalid(fields.id, "field `input` must be a RunAgentInput object")),
            },
        },
        "interrupt_stream" => {
            let run_id = fields.opt_string("run_id")?;
            let thread_id = fields.opt_string("thread_id")?;
            if run_id.is_none() && thread_id.is_none() {
                return Err(invalid(fields.id, "`interrupt_stream` needs `run_id` or `thread_id`"));
            }
            Request::InterruptStream { run_id, thread_id }
        }
        _ => {
            return Err(FrameError::UnknownType { id: fields.id, kind });
        }
    };
    Ok(ClientFrame { id: fields.id, request })
}

fn invalid(id: Option<Value>, message: impl Into<String>) -> FrameError {
    FrameError::InvalidFrame { id, message: message.into() }
}

struct Fields {
    obj: Map<String, Value>,
    id: Option<Value>,
}

impl Fields {
    fn string(&mut self, name: &str) -> Result<String, FrameError> {
        match self.opt_string(name)? {
            Some(s) => Ok(s),
            None => Err(invalid(self.id.clone(), format!("field `{name}` is missing"))),
        }
    }

    fn opt_string(&mut self, name: &str) -> Result<Option<String>, FrameError> {
        match self.obj.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(self.id.clone(), format!("field `{name}` must be a string"))),
        }
    }

    fn since(&mut self) -> Result<Option<Since>, FrameError> {
        let bad =
            |id: &Option<Value>| invalid(id.clone(), "field `since` must be {\"offset\": number, \"epoch\": string}");
        match self.obj.remove("since") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(pos)) => {
                let offset = pos.get("offset").and_then(Value::as_u64).ok_or_else(|| bad(&self.id))?;
                let epoch = pos.get("epoch").and_then(Value::as_str).ok_or_else(|| bad(&self.id))?;
                Ok(Some(Since { offset, epoch: epoch.to_owned() }))
            }
            Some(_) => Err(bad(&self.id)),
        }
    }
}

/// Parses `OFFSET:EPOCH`, the `since` query parameter.
pub fn parse_since(s: &str) -> Option<Since> {
    let (offset, epoch) = s.split_once(':')?;
    Some(Since { offset: offset.parse().ok()?, epoch: epoch.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_of_existing_clients_are_aliases() {
        let f = parse(r#"{"method":"get_status","params":{"a":1},"id":3}"#).unwrap();
        assert_eq!(
            (f.id, f.request),
            (Some(json!(3)), Request::Rpc { method: "get_status".into(), params: json!({"a":1}) })
        );
        let f = parse(r#"{"type":"module_control","module":"vision","enabled":false,"other":1}"#).unwrap();
        let params = json!({ "module": "vision", "enabled": false });
        assert_eq!(f.request, Request::Rpc { method: "module_control".into(), params });
        assert_eq!(parse(r#"{"type":"heartbeat","ts":1}"#).unwrap().request, Request::Ping);
        assert_eq!(parse(r#"{"method":7}"#).unwrap_err().code(), "invalid_frame");
    }

    #[test]
    fn parses_every_channel_frame() {
        let f = parse(r#"{"type":"subscribe","channel":"missions","id":7}"#).unwrap();
        assert_eq!(f.id, Some(json!(7)));
        assert_eq!(f.request, Request::Subscribe { channel: "missions".into(), since: None });
        let f = parse(r#"{"type":"subscribe","channel":"a","since":{"offset":3,"epoch":"e"}}"#).unwrap();
        assert_eq!(
            f.request,
            Request::Subscribe { channel: "a".into(), since: Some(Since { offset: 3, epoch: "e".into() }) }
        );
        let f = parse(r#"{"type":"publish","channel":"a","event":"x","data":{"k":1},"id":"r1"}"#).unwrap();
        assert_eq!(f.id, Some(json!("r1")));
        assert_eq!(f.request, Request::Publish { channel: "a".into(), event: "x".into(), data: json!({"k":1}) });
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap().request, Request::Ping);
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(parse("{").unwrap_err().code(), "invalid_json");
        assert_eq!(parse("[1]").unwrap_err().code(), "invalid_frame");
        let e = parse(r#"{"channel":"a"}"#).unwrap_err();
        assert!(e.message().contains("`type`"), "{}", e.message());
        let e = parse(r#"{"type":"subscribe","channel":5,"id":1}"#).unwrap_err();
        assert_eq!(e.code(), "invalid_frame");
        assert!(e.message().contains("`channel`"));
        assert_eq!(e.id(), Some(&json!(1)));
        let e = parse(r#"{"type":"dance"}"#).unwrap_err();
        assert_eq!(e.code(), "unknown_type");
        assert_eq!(parse(r#"{"type":"subscribe","channel":"a","since":5}"#).unwrap_err().code(), "invalid_frame");
        assert_eq!(parse(r#"{"type":"ping","id":[1]}"#).unwrap_err().code(), "invalid_frame");
    }

    #[test]
    fn parses_since_query() {
        assert_eq!(parse_since("12:abc"), Some(Since { offset: 12, epoch: "abc".into() }));
        assert_eq!(parse_since("x:abc"), None);
        assert_eq!(parse_since("12"), None);
    }
}
