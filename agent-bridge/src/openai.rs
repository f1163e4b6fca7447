//! The built-in `openai` agent (SPEC §7.3): an adapter for any
//! OpenAI-compatible streaming chat-completions server (OpenAI, Ollama, vLLM,
//! llama.cpp). Text deltas become `TEXT_MESSAGE_CONTENT`; tool calls streamed
//! in fragments become `TOOL_CALL_START`/`ARGS`/`END`, grouped by `index`; an
//! error answer or an error in the stream becomes `RUN_ERROR`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::workers::AgentMsg;

/// Where the adapter sends requests.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Such as `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub model: String,
    /// The API key, read from the environment variable the configuration names.
    pub api_key: Option<String>,
    /// Bound of the wait for the answer's headers.
    pub timeout: Duration,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for chat completions, built once per bridge.
#[derive(Clone)]
pub struct OpenAi {
    config: Arc<OpenAiConfig>,
    client: HttpsClient,
}

impl OpenAi {
    /// # Errors
    /// When the TLS roots cannot be loaded.
    pub fn new(config: OpenAiConfig) -> Result<Self, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| e.to_string())?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(OpenAi { config: Arc::new(config), client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// Runs one turn, sending AG-UI events to `tx` until done or cancelled.
    pub async fn run(self, input: Value, thread_id: String, run_id: String, tx: mpsc::Sender<AgentMsg>) {
        let mut out = Out { tx, ok: true };
        out.send(json!({ "type": "RUN_STARTED", "threadId": thread_id, "runId": run_id })).await;
        let mut turn = Turn::new(&run_id);
        let result = self.stream(&input, &mut turn, &mut out).await;
        // Whatever happened, what was opened is closed before the run ends.
        turn.finish(&mut out).await;
        match result {
            Ok(()) => out.send(json!({ "type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id })).await,
            Err(message) => out.send(json!({ "type": "RUN_ERROR", "message": message, "code": "agent_error" })).await,
        }
    }

    async fn stream(&self, input: &Value, turn: &mut Turn, out: &mut Out) -> Result<(), String> {
        let url = format!("{}/chat/completions", self.config.base_url.trim_end_matches('/'));
        let body = json!({
            "model": self.config.model,
            "stream": true,
            "messages": chat_messages(input),
            "tools": chat_tools(input),
        });
        let mut builder =
            hyper::Request::post(&url).header("content-type", "application/json").header("accept", "text/event-stream");
        if let Some(key) = &self.config.api_key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        let request = builder.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(self.config.timeout, self.client.request(request))
            .await
            .map_err(|_| format!("no answer from {url} within {:?}", self.config.timeout))?
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let detail = serde_json::from_slice::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&text).chars().take(200).collect());
            return Err(format!("the model server answered {status}: {detail}"));
        }
        let mut buffer = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the stream broke: {e}"))?;
            let Some(chunk) = frame.data_ref() else { continue };
            buffer.extend_from_slice(chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    return Ok(());
                }
                let chunk: Value = serde_json::from_str(data).map_err(|e| format!("a chunk is not JSON: {e}"))?;
                if let Some(message) = chunk["error"]["message"].as_str() {
                    return Err(format!("the model server failed: {message}"));
                }
                turn.chunk(&chunk, out).await;
                if !out.ok {
                    return Ok(());
                }
            }
        }
        Err("the stream ended before [DONE]".into())
    }
}

/// Sends events until the run stops listening.
struct Out {
    tx: mpsc::Sender<AgentMsg>,
    ok: bool,
}

impl Out {
    async fn send(&mut self, e: Value) {
        if self.ok && self.tx.send(AgentMsg::Event(e)).await.is_err() {
            self.ok = false;
        }
    }
}

/// The state of one streamed answer: the text message and the tool calls open so far.
struct Turn {
    message_id: String,
    text_open: bool,
    /// Tool calls by their `index`: id, and whether it is started.
    calls: BTreeMap<u64, String>,
}

impl Turn {
    fn new(run_id: &str) -> Self {
        Turn { message_id: format!("{run_id}-reply"), text_open: false, calls: BTreeMap::new() }
    }

    async fn chunk(&mut self, chunk: &Value, out: &mut Out) {
        let delta = &chunk["choices"][0]["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !self.text_open {
                self.text_open = true;
                out.send(json!({ "type": "TEXT_MESSAGE_START", "messageId": self.message_id, "role": "assistant" }))
                    .await;
            }
            out.send(json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": self.message_id, "delta": text })).await;
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            if !self.calls.contains_key(&index) {
                let id = call["id"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{}-call-{index}", self.message_id));
                let name = call["function"]["name"].as_str().unwrap_or_default();
                out.send(json!({
                    "type": "TOOL_CALL_START",
                    "toolCallId": id,
                    "toolCallName": name,
                    "parentMessageId": self.message_id,
                }))
                .await;
                self.calls.insert(index, id);
            }
            if let Some(args) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                let id = &self.calls[&index];
                out.send(json!({ "type": "TOOL_CALL_ARGS", "toolCallId": id, "delta": args })).await;
            }
        }
    }

    async fn finish(&mut self, out: &mut Out) {
        for (_, id) in std::mem::take(&mut self.calls) {
            out.send(json!({ "type": "TOOL_CALL_END", "toolCallId": id })).await;
        }
        if self.text_open {
            self.text_open = false;
            out.send(json!({ "type": "TEXT_MESSAGE_END", "messageId": self.message_id })).await;
        }
    }
}

/// Converts AG-UI messages to chat-completion messages.
fn chat_messages(input: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for m in input["messages"].as_array().into_iter().flatten() {
        let role = m["role"].as_str().unwrap_or("user");
        match role {
            "tool" => out.push(json!({ "role": "tool", "tool_call_id": m["toolCallId"], "content": m["content"] })),
            "assistant" => {
                let mut msg =
                    json!({ "role": "assistant", "content": m.get("content").cloned().unwrap_or(Value::Null) });
                if let Some(calls) = m["toolCalls"].as_array() {
                    msg["tool_calls"] = json!(calls);
                }
                out.push(msg);
            }
            _ => out.push(json!({ "role": role, "content": m["content"] })),
        }
    }
    out
}

/// Converts AG-UI tools to chat-completion function tools.
fn chat_tools(input: &Value) -> Value {
    let tools: Vec<Value> = input["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            json!({ "type": "function", "function": {
                "name": t["name"], "description": t["description"], "parameters": t["parameters"],
            }})
        })
        .collect();
    if tools.is_empty() { Value::Null } else { Value::Array(tools) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_tools_convert_to_chat_completions() {
        let input = json!({
            "messages": [
                { "id": "1", "role": "user", "content": "hi" },
                { "id": "2", "role": "assistant", "toolCalls": [{ "id": "c", "type": "function", "function": { "name": "f", "arguments": "{}" } }] },
                { "id": "3", "role": "tool", "toolCallId": "c", "content": "42" },
            ],
            "tools": [{ "name": "f", "description": "d", "parameters": { "type": "object" } }],
        });
        let m = chat_messages(&input);
        assert_eq!(m[0], json!({ "role": "user", "content": "hi" }));
        assert_eq!(m[1]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(m[2], json!({ "role": "tool", "tool_call_id": "c", "content": "42" }));
        assert_eq!(chat_tools(&input)[0]["function"]["name"], "f");
        assert_eq!(chat_tools(&json!({})), Value::Null);
    }
}
