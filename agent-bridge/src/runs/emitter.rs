//! How a run's events leave the bridge: numbered, serialized once, and sent
//! to the thread channel and to the caller of `Run`.

use serde::Serialize;
use serde_json::{Value, value::RawValue};
use tokio::sync::mpsc;

use super::{RunEvent, bus::ThreadStream, driver::Run, transcript::Transcript};

/// An AG-UI event with its JSON, written once when the event enters the
/// bridge: the size bound, the thread channel and the caller all use it.
pub(super) struct Event {
    /// What the run's checks and its transcript read.
    pub(super) value: Value,
    /// The event's `type`.
    kind: String,
    json: Box<RawValue>,
}

impl Event {
    pub(super) fn new(value: Value) -> Self {
        let json = serde_json::value::to_raw_value(&value).expect("a JSON value always serializes");
        let kind = value["type"].as_str().unwrap_or_default().to_owned();
        Event { value, kind, json }
    }

    /// Bytes of JSON, as SPEC §7.4 bounds them.
    pub(super) fn size(&self) -> usize {
        self.json.get().len()
    }
}

/// An event as the thread channel keeps it. The fields are in the order
/// `serde_json`'s sorted maps gave them before the event was spliced in.
#[derive(Serialize)]
struct ThreadEvent<'a> {
    event: &'a RawValue,
    run_id: &'a str,
    seq: u64,
}

/// Numbers a run's events and sends them to the caller and the thread channel.
pub(super) struct Emitter<'a> {
    run: &'a Run,
    seq: u64,
    tx: &'a mpsc::Sender<RunEvent>,
    /// The run's ordered stream to the thread channel, when there is a bus; taken to flush it.
    stream: Option<ThreadStream>,
    /// Set once the caller of `Run` stops listening: events still go to the thread channel.
    pub(super) caller_gone: bool,
    transcript: Transcript,
}

impl<'a> Emitter<'a> {
    pub(super) fn new(run: &'a Run, tx: &'a mpsc::Sender<RunEvent>, stream: Option<ThreadStream>) -> Self {
        Emitter { run, seq: 0, tx, stream, caller_gone: false, transcript: Transcript::default() }
    }

    pub(super) async fn emit(&mut self, event: Event) {
        let (event, seq) = self.number(event);
        self.publish(&event, seq).await;
        self.deliver(event, seq).await;
    }

    /// Gives the event the next `seq` and records what it says.
    pub(super) fn number(&mut self, event: Event) -> (Event, u64) {
        self.seq += 1;
        self.transcript.record(&event.kind, &event.value);
        (event, self.seq)
    }

    /// Queues the event for the thread channel.
    pub(super) async fn publish(&self, event: &Event, seq: u64) {
        if let Some(stream) = &self.stream {
            let data = ThreadEvent { event: &event.json, run_id: &self.run.run_id, seq };
            let data = serde_json::to_vec(&data).expect("strings and numbers always serialize");
            stream.send(&event.kind, data.into()).await;
        }
    }

    /// Sends the event to the caller of `Run`, while it listens.
    pub(super) async fn deliver(&mut self, event: Event, seq: u64) {
        if self.caller_gone {
            return;
        }
        let e = RunEvent {
            run_id: self.run.run_id.clone(),
            thread_id: self.run.thread_id.clone(),
            seq,
            kind: event.kind,
            json: Box::<str>::from(event.json).into(),
        };
        if self.tx.send(e).await.is_err() {
            self.caller_gone = true;
        }
    }

    /// Waits until the bus has answered for every event published so far.
    pub(super) async fn flush(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.close().await;
        }
    }

    /// Returns what the run said, as messages for its thread.
    pub(super) fn take_messages(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.transcript).into_messages()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The thread channel's payload is the one `json!` built before the
    /// event was serialized once: subscribers see the same bytes.
    #[test]
    fn the_thread_payload_is_unchanged() {
        let value = json!({ "type": "TEXT_MESSAGE_CONTENT", "messageId": "m\"1", "delta": "é\n" });
        let event = Event::new(value.clone());
        let spliced = serde_json::to_vec(&ThreadEvent { event: &event.json, run_id: "r\\1", seq: 7 }).unwrap();
        let built = json!({ "run_id": "r\\1", "seq": 7, "event": value }).to_string();
        assert_eq!(String::from_utf8(spliced).unwrap(), built);
        assert_eq!(event.size(), value.to_string().len());
    }
}
