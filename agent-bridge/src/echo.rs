//! The built-in `echo` agent (SPEC §7.3): streams the user's last message
//! back word by word, one word every `delay`, as one text message; when the
//! text contains the word `time` it first calls the tool `get_time`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::workers::AgentMsg;

/// Returns the text of the last user message of a `RunAgentInput`.
pub fn last_user_text(input: &Value) -> String {
    input["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Runs the echo agent, sending AG-UI events to `tx` until done or until the
/// receiver is dropped (which is how a cancelled run stops it).
pub async fn run(input: Value, thread_id: String, run_id: String, delay: Duration, tx: mpsc::Sender<AgentMsg>) {
    let text = last_user_text(&input);
    let send = |e: Value| {
        let tx = tx.clone();
        async move { tx.send(AgentMsg::Event(e)).await.is_ok() }
    };
    if !send(json!({ "type": "RUN_STARTED", "threadId": thread_id, "runId": run_id })).await {
        return;
    }
    if text.split(|c: char| !c.is_alphanumeric()).any(|w| w.eq_ignore_ascii_case("time")) {
        let call = format!("{run_id}-get_time");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        for e in [
            json!({ "type": "TOOL_CALL_START", "toolCallId": call, "toolCallName": "get_time", "parentMessageId": format!("{run_id}-call") }),
            json!({ "type": "TOOL_CALL_ARGS", "toolCallId": call, "delta": "{}" }),
            json!({ "type": "TOOL_CALL_END", "toolCallId": call }),
            json!({
                "type": "TOOL_CALL_RESULT",
                "messageId": format!("{run_id}-tool"),
                "toolCallId": call,
                "role": "tool",
                "content": json!({ "unix": now }).to_string(),
            }),
        ] {
            if !send(e).await {
                return;
            }
        }
    }
    let message = format!("{run_id}-reply");
    if !send(json!({ "type": "TEXT_MESSAGE_START", "messageId": message, "role": "assistant" })).await {
        return;
    }
    for (i, word) in text.split_whitespace().enumerate() {
        tokio::time::sleep(delay).await;
        let delta = if i == 0 { word.to_owned() } else { format!(" {word}") };
        if !send(json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": message, "delta": delta })).await {
            return;
        }
    }
    if send(json!({ "type": "TEXT_MESSAGE_END", "messageId": message })).await {
        send(json!({ "type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id })).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_word_by_word_with_a_tool_call_for_time() {
        let (tx, mut rx) = mpsc::channel(64);
        let input = json!({ "messages": [{ "role": "user", "content": "what time is it" }] });
        run(input, "t".into(), "r".into(), Duration::ZERO, tx).await;
        let mut types = Vec::new();
        let mut text = String::new();
        while let Some(AgentMsg::Event(e)) = rx.recv().await {
            if e["type"] == "TEXT_MESSAGE_CONTENT" {
                text.push_str(e["delta"].as_str().unwrap());
            }
            types.push(e["type"].as_str().unwrap().to_owned());
        }
        assert_eq!(types[0], "RUN_STARTED");
        assert_eq!(&types[1..5], ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"]);
        assert_eq!(text, "what time is it");
        assert_eq!(types.last().unwrap(), "RUN_FINISHED");
    }
}
