//! The merge that ends a recovery (SPEC §6): what history returned for a
//! listener's `since`, and the live events buffered while it was read, into
//! the one contiguous run of frames the listener is sent, or nothing at all
//! (never a partial replay).

use axum::extract::ws::Utf8Bytes;

use super::Recovered;
use crate::protocol::{Position, Since};

/// What a recovering listener is sent.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Merged {
    /// Every event after `since` is in `frames` (`recovered: true`).
    pub complete: bool,
    /// The events to send after `subscribed`, in offset order, each once.
    pub frames: Vec<Utf8Bytes>,
    /// The offset the listener stands at once they are sent.
    pub last: u64,
}

/// Merges history (`fetched`, read after the subscribe) with the events
/// `buffer`ed meanwhile, for a listener that asked for everything after
/// `since` while the channel stands at `current`.
///
/// Complete only when history holds exactly the events after `since`, all in
/// `since`'s epoch, which is the channel's, and no more than `max` of them;
/// buffered events at or below the last one fetched are duplicates. Anything
/// else starts the listener from now.
pub(super) fn merge(
    since: &Since,
    current: &Position,
    fetched: Recovered,
    buffer: Vec<(u64, Utf8Bytes)>,
    max: u64,
) -> Merged {
    let gap = fetched.position.offset.saturating_sub(since.offset);
    let complete = *fetched.position.epoch == *since.epoch
        && fetched.position.epoch == current.epoch
        && since.offset <= fetched.position.offset
        && gap <= max
        && fetched.frames.len() as u64 == gap
        && fetched.frames.first().is_none_or(|f| f.offset == since.offset + 1);
    if !complete {
        return Merged { complete, frames: Vec::new(), last: current.offset };
    }
    let mut frames = Vec::with_capacity(fetched.frames.len() + buffer.len());
    let mut last = since.offset;
    for f in fetched.frames {
        last = f.offset;
        frames.push(f.text);
    }
    for (offset, text) in buffer {
        if offset > last {
            last = offset;
            frames.push(text);
        }
    }
    Merged { complete, frames, last: last.max(current.offset) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::Frame;

    fn frame(offset: u64, epoch: &str) -> Frame {
        Frame { offset, epoch: Arc::from(epoch), text: Utf8Bytes::from(format!("e{offset}")), timestamp_ms: 0 }
    }

    fn at(offset: u64, epoch: &str) -> Position {
        Position { offset, epoch: epoch.into() }
    }

    fn since(offset: u64, epoch: &str) -> Since {
        Since { offset, epoch: epoch.to_owned() }
    }

    fn fetched(offsets: std::ops::RangeInclusive<u64>, position: Position) -> Recovered {
        Recovered { frames: offsets.map(|o| frame(o, &position.epoch)).collect(), position }
    }

    fn buffered(offsets: std::ops::RangeInclusive<u64>) -> Vec<(u64, Utf8Bytes)> {
        offsets.map(|o| (o, Utf8Bytes::from(format!("e{o}")))).collect()
    }

    fn texts(m: &Merged) -> Vec<&str> {
        m.frames.iter().map(|t| t.as_str()).collect()
    }

    #[test]
    fn history_then_the_buffer_past_it_each_event_once() {
        // History read up to 5 while 4..=7 came live: 4 and 5 are duplicates.
        let m = merge(&since(2, "a"), &at(7, "a"), fetched(3..=5, at(5, "a")), buffered(4..=7), 1000);
        assert!(m.complete);
        assert_eq!(texts(&m), ["e3", "e4", "e5", "e6", "e7"]);
        assert_eq!(m.last, 7);
    }

    #[test]
    fn nothing_missed_is_complete_and_empty() {
        let m = merge(
            &since(5, "a"),
            &at(5, "a"),
            Recovered { frames: Vec::new(), position: at(5, "a") },
            Vec::new(),
            1000,
        );
        assert_eq!(m, Merged { complete: true, frames: Vec::new(), last: 5 });
    }

    #[test]
    fn anything_short_of_every_event_after_since_is_no_replay_at_all() {
        let cases = [
            ("another epoch", since(2, "old"), fetched(3..=5, at(5, "a"))),
            ("trimmed: history starts later", since(2, "a"), fetched(4..=5, at(5, "a"))),
            (
                "a hole in history",
                since(2, "a"),
                Recovered { frames: vec![frame(3, "a"), frame(5, "a")], position: at(5, "a") },
            ),
            ("more missed than the limit", since(0, "a"), fetched(1..=5, at(5, "a"))),
            ("since ahead of the channel", since(9, "a"), Recovered { frames: Vec::new(), position: at(5, "a") }),
        ];
        for (why, since, fetched) in cases {
            let m = merge(&since, &at(6, "a"), fetched, buffered(6..=6), 4);
            assert_eq!(m, Merged { complete: false, frames: Vec::new(), last: 6 }, "{why}");
        }
    }

    #[test]
    fn history_of_an_epoch_the_channel_has_left_is_no_replay() {
        let m = merge(&since(2, "a"), &at(1, "b"), fetched(3..=5, at(5, "a")), Vec::new(), 1000);
        assert_eq!(m, Merged { complete: false, frames: Vec::new(), last: 1 });
    }
}
