//! The bounded outbound queue of one connection.
//!
//! Frames are pushed by the hub's fan-out (never awaiting) and drained by the
//! connection's writer task. The queue is bounded in bytes: a push that would
//! cross the bound closes the connection with `4002` instead, so a slow reader
//! never slows a broadcast and never grows memory.

use std::{collections::VecDeque, sync::Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::disconnect::Disconnect;

pub struct Outbound {
    /// A std lock: pushes and drains are short and never `.await` inside.
    state: Mutex<State>,
    /// Wakes the writer task after a push or a close.
    notify: Notify,
    /// Cancelled when the connection starts closing, for whoever must let it
    /// go at once (the session leaves the hub then).
    closed: CancellationToken,
    max_bytes: usize,
}

struct State {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: Option<Disconnect>,
}

/// What the writer takes in one go.
pub struct Drained {
    pub frames: Vec<Utf8Bytes>,
    pub close: Option<Disconnect>,
}

impl Outbound {
    pub fn new(max_bytes: usize) -> Self {
        Outbound {
            state: Mutex::new(State { frames: VecDeque::new(), bytes: 0, closed: None }),
            notify: Notify::new(),
            closed: CancellationToken::new(),
            max_bytes,
        }
    }

    /// Queues a frame; returns false when the connection is closing (or now
    /// closes because the frame would overflow the queue).
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.closed.is_some() {
            return false;
        }
        if st.bytes + frame.len() > self.max_bytes {
            st.closed = Some(Disconnect::SLOW);
            st.frames.clear();
            st.bytes = 0;
            drop(st);
            self.closed.cancel();
            self.notify.notify_one();
            return false;
        }
        st.bytes += frame.len();
        st.frames.push_back(frame);
        drop(st);
        self.notify.notify_one();
        true
    }

    /// Asks the writer to close the connection; the first reason wins.
    pub fn close(&self, reason: Disconnect) {
        let mut st = self.state.lock().unwrap();
        if st.closed.is_none() {
            st.closed = Some(reason);
            if !reason.flushes() {
                st.frames.clear();
                st.bytes = 0;
            }
        }
        drop(st);
        self.closed.cancel();
        self.notify.notify_one();
    }

    /// Completes once the connection is closing.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn closing(&self) -> Option<Disconnect> {
        self.state.lock().unwrap().closed
    }

    /// Takes every queued frame and the close request, if any.
    pub fn drain(&self) -> Drained {
        let mut st = self.state.lock().unwrap();
        st.bytes = 0;
        Drained { frames: st.frames.drain(..).collect(), close: st.closed }
    }

    /// Waits until something was pushed or a close was asked for.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    pub fn queued_bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_with_slow_consumer_and_drops_the_backlog() {
        let q = Outbound::new(10);
        assert!(q.push(Utf8Bytes::from("12345")));
        assert!(q.push(Utf8Bytes::from("12345")));
        assert!(!q.push(Utf8Bytes::from("1")));
        assert_eq!(q.closing(), Some(Disconnect::SLOW));
        let d = q.drain();
        assert!(d.frames.is_empty());
        assert_eq!(d.close, Some(Disconnect::SLOW));
        assert!(!q.push(Utf8Bytes::from("1")));
    }

    #[test]
    fn a_shutdown_close_keeps_queued_frames_and_bytes_are_released_on_drain() {
        let q = Outbound::new(10);
        assert!(q.push(Utf8Bytes::from("12345")));
        q.close(Disconnect::SHUTDOWN);
        q.close(Disconnect::SLOW);
        let d = q.drain();
        assert_eq!(d.frames.len(), 1);
        assert_eq!(d.close, Some(Disconnect::SHUTDOWN));
        assert_eq!(q.queued_bytes(), 0);
    }
}
