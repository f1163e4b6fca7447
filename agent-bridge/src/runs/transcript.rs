//! What a run says, kept as AG-UI messages for its thread: in order and with
//! the ids a client sees, so that a client that sends its history back adds
//! nothing twice.

use serde_json::{Value, json};

/// The messages of one run, built up event by event.
#[derive(Default)]
pub(super) struct Transcript {
    messages: Vec<Value>,
}

impl Transcript {
    /// Adds what an event of `kind` says; events that say nothing to keep are ignored.
    pub(super) fn record(&mut self, kind: &str, e: &Value) {
        let text = |name: &str| e[name].as_str().unwrap_or_default();
        match kind {
            "TEXT_MESSAGE_START" => {
                self.message(text("messageId"), "assistant");
            }
            "TEXT_MESSAGE_CONTENT" => {
                let m = self.message(text("messageId"), "assistant");
                append(&mut m["content"], text("delta"));
            }
            "TOOL_CALL_START" => {
                let parent = e["parentMessageId"].as_str().unwrap_or_else(|| text("toolCallId"));
                let m = self.message(parent, "assistant");
                let call = json!({ "id": text("toolCallId"), "type": "function", "function": { "name": text("toolCallName"), "arguments": "" } });
                match m["toolCalls"].as_array_mut() {
                    Some(calls) => calls.push(call),
                    None => m["toolCalls"] = json!([call]),
                }
            }
            "TOOL_CALL_ARGS" => {
                let id = text("toolCallId");
                let call = self
                    .messages
                    .iter_mut()
                    .filter_map(|m| m["toolCalls"].as_array_mut())
                    .flatten()
                    .find(|c| c["id"] == id);
                if let Some(call) = call {
                    append(&mut call["function"]["arguments"], text("delta"));
                }
            }
            "TOOL_CALL_RESULT" => {
                let m = self.message(text("messageId"), "tool");
                m["toolCallId"] = json!(text("toolCallId"));
                m["content"] = e["content"].clone();
            }
            _ => {}
        }
    }

    pub(super) fn into_messages(self) -> Vec<Value> {
        self.messages
    }

    /// Returns the message with `id`, adding an empty one of `role` when new.
    fn message(&mut self, id: &str, role: &str) -> &mut Value {
        let i = match self.messages.iter().position(|m| m["id"] == id) {
            Some(i) => i,
            None => {
                self.messages.push(json!({ "id": id, "role": role }));
                self.messages.len() - 1
            }
        };
        &mut self.messages[i]
    }
}

/// Appends `delta` to the text in `slot`, which is empty until it is a string.
///
/// In place, because text arrives a token at a time: building the whole
/// text again for each token would cost the square of its length.
fn append(slot: &mut Value, delta: &str) {
    match slot {
        Value::String(text) => text.push_str(delta),
        other => *other = Value::String(delta.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(events: &[Value]) -> Vec<Value> {
        let mut t = Transcript::default();
        for e in events {
            t.record(e["type"].as_str().unwrap(), e);
        }
        t.into_messages()
    }

    #[test]
    fn text_and_tool_calls_become_messages() {
        let messages = transcript(&[
            json!({ "type": "RUN_STARTED" }),
            json!({ "type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "f", "parentMessageId": "p" }),
            json!({ "type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "{\"a\":" }),
            json!({ "type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "1}" }),
            json!({ "type": "TOOL_CALL_END", "toolCallId": "c" }),
            json!({ "type": "TOOL_CALL_RESULT", "messageId": "t", "toolCallId": "c", "content": "2" }),
            json!({ "type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant" }),
            json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "hello" }),
            json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": " world" }),
            json!({ "type": "TEXT_MESSAGE_END", "messageId": "m" }),
        ]);
        let call = json!({ "id": "c", "type": "function", "function": { "name": "f", "arguments": "{\"a\":1}" } });
        assert_eq!(
            messages,
            [
                json!({ "id": "p", "role": "assistant", "toolCalls": [call] }),
                json!({ "id": "t", "role": "tool", "toolCallId": "c", "content": "2" }),
                json!({ "id": "m", "role": "assistant", "content": "hello world" }),
            ]
        );
    }

    /// Content that is not text (a tool result's, say) is replaced, not appended to.
    #[test]
    fn content_starts_over_when_it_is_not_text() {
        let messages = transcript(&[
            json!({ "type": "TOOL_CALL_RESULT", "messageId": "m", "toolCallId": "c", "content": { "n": 1 } }),
            json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x" }),
            json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m" }),
        ]);
        assert_eq!(messages[0]["content"], "x");
    }
}
