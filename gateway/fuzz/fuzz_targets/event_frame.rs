//! Fuzzes the hand-written `event` frame writer, `protocol::event_frame`, which
//! escapes the strings itself and splices the JSON payload in unchanged.
//!
//! Invariants, for any channel, event, id, epoch, offset and timestamp:
//! - when `data` is JSON (as the bus guarantees), the frame is JSON and every
//!   field reads back as given, `data` included;
//! - when `data` is not UTF-8 or is blank, the frame is JSON with `data: null`;
//! - it never panics (also on payloads that break the bus's guarantee).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchboard_gateway::protocol::{EventRef, event_frame};

fuzz_target!(|input: (&str, &str, &str, &str, u64, i64, &[u8])| {
    let (channel, event, id, epoch, offset, timestamp_ms, data) = input;
    let frame = event_frame(&EventRef {
        channel,
        event,
        data,
        id,
        offset,
        epoch,
        timestamp_ms,
    });

    // What `data` should read back as; `None` if the payload is not JSON,
    // which the bus never lets through, so only "no panic" is checked then.
    let expected_data = match std::str::from_utf8(data) {
        Err(_) => Value::Null,
        Ok(d) if d.trim().is_empty() => Value::Null,
        Ok(d) => match serde_json::from_str::<Value>(d) {
            Ok(v) => v,
            Err(_) => return,
        },
    };

    let v = parse_unbounded(&frame)
        .unwrap_or_else(|e| panic!("event frame is not JSON ({e}): {frame:?}"));
    let obj = v.as_object().expect("frame is not an object");
    assert_eq!(obj.len(), 8, "unexpected fields in {frame:?}");
    assert_eq!(v["type"], "event");
    assert_eq!(v["channel"], channel);
    assert_eq!(v["event"], event);
    assert_eq!(v["data"], expected_data, "{frame:?}");
    assert_eq!(v["id"], id);
    assert_eq!(v["offset"].as_u64(), Some(offset));
    assert_eq!(v["epoch"], epoch);
    // Seconds with milliseconds, negatives clamped to zero.
    let ms = timestamp_ms.max(0);
    let seconds: f64 = format!("{}.{:03}", ms / 1000, ms % 1000).parse().unwrap();
    assert_eq!(v["timestamp"].as_f64(), Some(seconds), "{frame:?}");
});

/// Parses without serde_json's nesting limit. The frame nests `data` one level
/// deeper than the payload, which the bus checked with that same limit, so a
/// payload nested as deep as the limit allows gives a valid frame that the
/// default parser refuses: a limit of the reader, not invalid JSON. Depth
/// stays bounded (the payload's, + 1), so the stack is safe.
fn parse_unbounded(text: &str) -> serde_json::Result<Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}
