//! The Server-Sent Events transport of a session (`GET /sse`, SPEC §4):
//! a read-only connection subscribed to the channels of its URL.
//!
//! Each message's `event:` is the frame's type and its `data:` the frame's
//! JSON, as on a WebSocket; only the frames SPEC §4 lists are sent (`event`,
//! `subscribed`, `unsubscribed`, `error`, `disconnect`): not `connected`,
//! since an SSE client sends nothing that would need its connection id or
//! limits. `retry:` comes first, a comment every 15 s keeps the stream alive.
//!
//! Each message's `id:` is a `Cursor`: the position of every channel the URL
//! asked for, as of that message. The browser sends the last one back as
//! `Last-Event-ID` when it reconnects (or a client passes it as
//! `?last_event_id=`), and each channel is subscribed with `since` from it,
//! so recovery follows SPEC §6: every missed event, or `subscribed` with
//! `recovered: false`, never part of them.
//!
//! The session is the same state machine as a WebSocket's, with the same
//! byte-bounded queue: the response body drains it, and a session task
//! watches the clock (shutdown, token expiry), the queue's close, and the
//! socket: one that takes none of the queued frames for
//! `limits.write_timeout` is closed with `4002`, and when it does not take
//! the `disconnect` either within that time its TCP connection is dropped.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;
use uuid::Uuid;

use super::{Params, Session};
use crate::{
    Node, auth, config::origin_allowed, disconnect::Disconnect, protocol::Position, queue::Outbound,
    server::ConnectionControl,
};

/// How long a browser waits before reconnecting (the `retry:` field).
const RETRY_MS: u64 = 2000;

/// How often a comment is sent when nothing else is (SPEC §4).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The frame types an SSE stream carries (SPEC §4).
const SENT: [&str; 5] = ["event", "subscribed", "unsubscribed", "error", "disconnect"];

/// `GET /sse?channel=a&channel=b[&token=…][&last_event_id=…]`.
///
/// Refusals known before the stream starts are HTTP answers, which an
/// `EventSource` does not retry: 400 (a bad cursor), 401 (a bad or missing
/// token), 403 (origin), 429 (the user's connection limit), 503 (the node's
/// connection limit, or shutdown). A channel that may not be read gets an
/// `error` message, as a `subscribe` frame would, and the stream goes on.
pub(crate) async fn connect(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
    control: Option<Extension<ConnectionControl>>,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| !origin_allowed(&node.config.allowed_origins, o)) {
        return refusal(StatusCode::FORBIDDEN, "permission_denied", "origin not allowed");
    }
    if !node.ready() && node.shutdown.is_cancelled() {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "shutting down");
    }
    if node.hub.connection_count() >= node.config.limits.max_connections {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "limit_exceeded", "this node is at its connection limit");
    }
    let mut channels = Vec::new();
    let (mut token, mut last_event_id) = (None, None);
    for (key, value) in query {
        match key.as_str() {
            "channel" => channels.push(value),
            "token" => token = Some(value),
            "last_event_id" => last_event_id = Some(value),
            _ => {}
        }
    }
    // The header is what a browser sends on its own reconnects; the query
    // parameter stays what the page first put in the URL.
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(last_event_id);
    let cursor = match last_event_id.as_deref().map(Cursor::parse).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(()) => return refusal(StatusCode::BAD_REQUEST, "invalid_request", "`Last-Event-ID` is not a cursor"),
    };
    let credentials = match token.as_deref() {
        Some(t) => match auth::verify(&node.config.auth, t) {
            Ok(c) => Some(c),
            Err(e) => return refusal(StatusCode::UNAUTHORIZED, "unauthorized", &e.0),
        },
        None if node.config.anonymous => None,
        None => return refusal(StatusCode::UNAUTHORIZED, "unauthorized", "a token is required as `?token=`"),
    };

    let id = Uuid::new_v4();
    let span = tracing::info_span!(
        "connection", connection_id = %id, user_id = ?credentials.as_ref().map(|c| c.user_id.clone()), transport = "sse"
    );
    let queue = Arc::new(Outbound::new(node.config.limits.outbound_queue_bytes));
    let params = Params { credentials, ..Params::default() };
    let mut session = span.in_scope(|| Session::open(node.clone(), id, queue.clone(), params));
    if queue.closing() == Some(Disconnect::USER_LIMIT) {
        session.end();
        return refusal(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", Disconnect::USER_LIMIT.reason);
    }
    if let Some(Extension(control)) = &control {
        control.is_session();
    }
    // The cursor holds the channels of the URL, each from the position the
    // client had (a channel it did not have starts where it stands now).
    let mut positions = BTreeMap::new();
    for channel in channels {
        if positions.contains_key(&channel) {
            continue;
        }
        let since = cursor.0.get(&channel).cloned();
        positions.insert(channel.clone(), since.clone());
        let since = since.map(|p| crate::protocol::Since { offset: p.offset, epoch: p.epoch });
        span.in_scope(|| session.subscribe(channel, since, None));
    }

    let gone = CancellationToken::new();
    let polls = Arc::new(AtomicU64::new(0));
    let body = Writer {
        queue: queue.clone(),
        cursor: positions,
        started: false,
        done: false,
        polls: polls.clone(),
        _gone: gone.clone().drop_guard(),
    };
    let write_timeout = node.config.limits.write_timeout;
    let sessions = node.sessions.clone();
    let task = async move {
        // Hyper asks the body for more only once the socket took what it
        // had: frames queued while the body was not asked for more during a
        // whole `write_timeout` mean a socket that takes nothing (SPEC §9).
        // Checked at each tick against the one before: something was queued
        // then, and hyper has not asked for more since.
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + write_timeout, write_timeout);
        let (mut seen, mut queued) = (polls.load(Ordering::Relaxed), false);
        while queue.closing().is_none() {
            tokio::select! {
                reason = session.clock().fired() => queue.close(reason),
                _ = queue.closed() => {}
                _ = gone.cancelled() => break,
                _ = check.tick() => {
                    let now = polls.load(Ordering::Relaxed);
                    if queued && now == seen {
                        queue.close(Disconnect::SLOW);
                    }
                    (seen, queued) = (now, queue.queued_bytes() > 0);
                }
            }
        }
        // Whatever closes it, it gets no more events and leaves the stats now.
        node.hub.remove_connection(id);
        if !gone.is_cancelled() && tokio::time::timeout(write_timeout, gone.cancelled()).await.is_err() {
            // The socket took nothing: drop the connection (SPEC §9).
            if let Some(Extension(control)) = &control {
                control.abort();
            }
        }
        let code = session.end();
        tracing::debug!(code, "connection closed");
    };
    sessions.spawn(task.instrument(span));

    let stream =
        futures::stream::unfold(
            body,
            |mut w| async move { w.next().await.map(|chunk| (Ok::<_, Infallible>(chunk), w)) },
        );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

/// The response body: drains the queue into SSE messages.
struct Writer {
    queue: Arc<Outbound>,
    /// Every channel of the URL, with the position of the last of its
    /// events sent (`None` until its `subscribed` or first event).
    cursor: BTreeMap<String, Option<Position>>,
    started: bool,
    done: bool,
    /// How many times hyper asked for more, which it does once the socket
    /// took the last chunk; the session task watches it.
    polls: Arc<AtomicU64>,
    /// Tells the session task the body is gone (sent all, or dropped by hyper).
    _gone: DropGuard,
}

/// What the writer reads of a frame to keep the cursor.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    channel: Option<String>,
    offset: Option<u64>,
    epoch: Option<String>,
    position: Option<Pos>,
    recovered: Option<bool>,
}

/// A `position` as the frame has it.
#[derive(Deserialize)]
struct Pos {
    offset: u64,
    epoch: String,
}

impl Writer {
    /// The next chunk of the body; `None` once the `disconnect` was sent.
    async fn next(&mut self) -> Option<Bytes> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(Bytes::from(format!("retry: {RETRY_MS}\n\n")));
        }
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            let drained = self.queue.drain();
            let mut out = String::new();
            for frame in &drained.frames {
                self.message(&mut out, frame);
            }
            if let Some(d) = drained.close {
                self.message(&mut out, &d.frame());
                self.done = true;
            }
            if !out.is_empty() {
                return Some(Bytes::from(out));
            }
            tokio::select! {
                _ = self.queue.notified() => {}
                _ = keep_alive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }

    /// Writes one frame as an SSE message, after updating the cursor.
    fn message(&mut self, out: &mut String, frame: &str) {
        let Ok(head) = serde_json::from_str::<Head>(frame) else {
            return;
        };
        if !SENT.contains(&head.kind.as_str()) {
            return;
        }
        if let Some(slot) = head.channel.as_ref().and_then(|c| self.cursor.get_mut(c)) {
            match head.kind.as_str() {
                "event" => {
                    // Presence `join`/`leave` have offset 0: no position.
                    if let (Some(offset @ 1..), Some(epoch)) = (head.offset, head.epoch) {
                        *slot = Some(Position { offset, epoch });
                    }
                }
                // A recovering subscribe's missed events follow: the cursor
                // stays where the client was until they are sent.
                "subscribed" if head.recovered != Some(true) || slot.is_none() => {
                    *slot = head.position.map(|p| Position { offset: p.offset, epoch: p.epoch });
                }
                _ => {}
            }
        }
        let _ = writeln!(out, "event: {}", head.kind);
        let _ = writeln!(out, "id: {}", Cursor::encode(&self.cursor));
        // A producer's pretty-printed JSON has line breaks (only outside
        // strings): each line is a `data:` line, which the client joins.
        for line in frame.split(['\n', '\r']).filter(|l| !l.is_empty()) {
            let _ = writeln!(out, "data: {line}");
        }
        out.push('\n');
    }
}

/// The position of each channel of an SSE connection, as the `id:` of its
/// messages: `channel:offset:epoch` entries joined by `,`, the channel and
/// the epoch percent-encoded (everything but `A–Z a–z 0–9 - _`), so that
/// any name round-trips, `:` and `,` included. A channel without a position
/// yet is left out.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cursor(BTreeMap<String, Position>);

impl Cursor {
    fn encode(positions: &BTreeMap<String, Option<Position>>) -> String {
        let mut out = String::new();
        for (channel, p) in positions {
            let Some(p) = p else { continue };
            if !out.is_empty() {
                out.push(',');
            }
            percent_encode(&mut out, channel);
            let _ = write!(out, ":{}:", p.offset);
            percent_encode(&mut out, &p.epoch);
        }
        out
    }

    fn parse(s: &str) -> Result<Cursor, ()> {
        let mut positions = BTreeMap::new();
        for entry in s.split(',').filter(|e| !e.is_empty()) {
            let mut parts = entry.split(':');
            let (Some(channel), Some(offset), Some(epoch), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(());
            };
            let offset = offset.parse().map_err(|_| ())?;
            positions.insert(percent_decode(channel)?, Position { offset, epoch: percent_decode(epoch)? });
        }
        Ok(Cursor(positions))
    }
}

fn percent_encode(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or(())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_channel_name() {
        let mut positions = BTreeMap::new();
        for (i, name) in ["a", "task:1,2", "thread:x#alice,bob", "odd=@.-_:#,", "%41", "é"].into_iter().enumerate() {
            positions.insert(name.to_owned(), Some(Position { offset: i as u64 + 1, epoch: format!("ep:{i},%") }));
        }
        positions.insert("waiting".to_owned(), None);
        let encoded = Cursor::encode(&positions);
        assert!(encoded.bytes().all(|b| b.is_ascii_graphic()), "{encoded}");
        let parsed = Cursor::parse(&encoded).unwrap();
        let expected: BTreeMap<_, _> = positions.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
        assert_eq!(parsed.0, expected);
        assert_eq!(Cursor::parse("").unwrap(), Cursor::default());
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in ["a", "a:1", "a:x:e", "a:1:e:f", "a%4:1:e", "a%zz:1:e", "%FF:1:e"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }
}
