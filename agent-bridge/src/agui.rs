//! AG-UI events: building them, and checking a run's stream against AG-UI's
//! ordering rules (SPEC §7.1), with the repair that ends a broken run.

use std::collections::BTreeSet;

use serde_json::{Value, json};

/// Why a run ended without `RUN_FINISHED`; the `code` of its `RUN_ERROR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Cancelled,
    AgentError,
    Timeout,
    AgentLost,
}

impl Failure {
    pub fn code(self) -> &'static str {
        match self {
            Failure::Cancelled => "cancelled",
            Failure::AgentError => "agent_error",
            Failure::Timeout => "timeout",
            Failure::AgentLost => "agent_lost",
        }
    }
}

/// The state of one run's stream: what is open, whether it ended.
#[derive(Debug, Default)]
pub struct Guard {
    started: bool,
    ended: bool,
    messages: BTreeSet<String>,
    tool_calls: BTreeSet<String>,
}

fn field<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event.get(name).and_then(Value::as_str)
}

impl Guard {
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Checks the next event an agent emits and records its effect.
    ///
    /// # Errors
    /// A message naming the broken rule; the event must not be forwarded.
    pub fn check(&mut self, event: &Value) -> Result<(), String> {
        let kind = field(event, "type").ok_or("event has no `type`")?;
        if self.ended {
            return Err(format!("{kind} after the run ended"));
        }
        if !self.started && kind != "RUN_STARTED" {
            return Err(format!("{kind} before RUN_STARTED"));
        }
        let id = |name: &str| field(event, name).map(str::to_owned).ok_or(format!("{kind} without `{name}`"));
        // Each rule: whether the event fits, and what it says when it does not.
        let (fits, broken) = match kind {
            "RUN_STARTED" => (!std::mem::replace(&mut self.started, true), "RUN_STARTED twice"),
            "TEXT_MESSAGE_START" => (self.messages.insert(id("messageId")?), "TEXT_MESSAGE_START of an open message"),
            "TEXT_MESSAGE_CONTENT" => {
                (self.messages.contains(&id("messageId")?), "TEXT_MESSAGE_CONTENT for a message that is not open")
            }
            "TEXT_MESSAGE_END" => {
                (self.messages.remove(&id("messageId")?), "TEXT_MESSAGE_END for a message that is not open")
            }
            "TOOL_CALL_START" => (self.tool_calls.insert(id("toolCallId")?), "TOOL_CALL_START of an open tool call"),
            "TOOL_CALL_ARGS" => {
                (self.tool_calls.contains(&id("toolCallId")?), "TOOL_CALL_ARGS for a tool call that is not open")
            }
            "TOOL_CALL_END" => {
                (self.tool_calls.remove(&id("toolCallId")?), "TOOL_CALL_END for a tool call that is not open")
            }
            "RUN_FINISHED" => {
                self.ended = true;
                (
                    self.messages.is_empty() && self.tool_calls.is_empty(),
                    "RUN_FINISHED with open messages or tool calls",
                )
            }
            "RUN_ERROR" => {
                self.ended = true;
                (true, "")
            }
            _ => (true, ""),
        };
        if !fits {
            // A finish that did not fit did not end the run: it is repaired.
            if kind == "RUN_FINISHED" {
                self.ended = false;
            }
            return Err(broken.into());
        }
        Ok(())
    }

    /// Ends a broken run: `END` events for everything open, then `RUN_ERROR`.
    pub fn repair(&mut self, failure: Failure, message: &str, thread_id: &str, run_id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if !self.started {
            out.push(json!({ "type": "RUN_STARTED", "threadId": thread_id, "runId": run_id }));
            self.started = true;
        }
        for id in std::mem::take(&mut self.tool_calls) {
            out.push(json!({ "type": "TOOL_CALL_END", "toolCallId": id }));
        }
        for id in std::mem::take(&mut self.messages) {
            out.push(json!({ "type": "TEXT_MESSAGE_END", "messageId": id }));
        }
        out.push(json!({ "type": "RUN_ERROR", "message": message, "code": failure.code() }));
        self.ended = true;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_well_formed_run_and_refuses_disorder() {
        let mut g = Guard::default();
        assert!(g.check(&json!({ "type": "TEXT_MESSAGE_START", "messageId": "m" })).is_err());
        g.check(&json!({ "type": "RUN_STARTED", "threadId": "t", "runId": "r" })).unwrap();
        assert!(g.check(&json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x" })).is_err());
        g.check(&json!({ "type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant" })).unwrap();
        g.check(&json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x" })).unwrap();
        assert!(g.check(&json!({ "type": "RUN_FINISHED" })).is_err(), "a message is open");
        g.check(&json!({ "type": "TEXT_MESSAGE_END", "messageId": "m" })).unwrap();
        g.check(&json!({ "type": "RUN_FINISHED", "threadId": "t", "runId": "r" })).unwrap();
        assert!(g.check(&json!({ "type": "CUSTOM" })).is_err(), "nothing after the end");
    }

    #[test]
    fn repair_closes_what_is_open_then_errors() {
        let mut g = Guard::default();
        g.check(&json!({ "type": "RUN_STARTED" })).unwrap();
        g.check(&json!({ "type": "TEXT_MESSAGE_START", "messageId": "m" })).unwrap();
        g.check(&json!({ "type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "f" })).unwrap();
        let out = g.repair(Failure::Cancelled, "stopped", "t", "r");
        let types: Vec<_> = out.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["TOOL_CALL_END", "TEXT_MESSAGE_END", "RUN_ERROR"]);
        assert_eq!(out[2]["code"], "cancelled");
        assert!(g.ended());
        assert!(g.repair(Failure::Cancelled, "again", "t", "r").is_empty(), "repairing twice is harmless");
    }
}
