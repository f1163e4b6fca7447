//! Fuzzes the hand-written `event` frame writer, `protocol::event_frame`, which
//! escapes the strings itself and splices the JSON payload in unchanged.
//!
//! Invariants, for any channel, event, id, epoch, offset and timestamp:
//! - when `data` is JSON (as the bus guarantees), the frame is JSON and every
//!   field reads back as given, `data` included;
//! - when `data` is not UTF-8 or is blank, the frame is JSON with `data: null`;
//! - it never panics (also on payloads that break the bus's guarantee).

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};
use switchboard_gateway::protocol::{EventRef, event_frame};

fuzz_target!(|input: (&str, &str, &str, &str, u64, i64, Payload)| {
    let (channel, event, id, epoch, offset, timestamp_ms, Payload(data)) = input;
    let data = data.as_slice();
    let frame = event_frame(&EventRef { channel, event, data, id, offset, epoch, timestamp_ms });

    // What `data` should read back as. A payload that is not JSON breaks the
    // bus's guarantee, so then only "no panic" is checked.
    let expected_data = match std::str::from_utf8(data) {
        Err(_) => Value::Null,
        Ok(d) if d.trim().is_empty() => Value::Null,
        Ok(d) => match serde_json::from_str::<Value>(d) {
            Ok(v) => v,
            Err(_) => return,
        },
    };

    let v = parse_unbounded(&frame).unwrap_or_else(|e| panic!("event frame is not JSON ({e}): {frame:?}"));
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
/// deeper than the payload, so a payload nested 127 deep (the most serde_json
/// reads by default) gives a valid frame the default parser refuses: a limit
/// of the reader, not invalid JSON. Depth stays bounded (the payload parsed
/// with the default limit above, so at most 127 + 1): the stack is safe.
fn parse_unbounded(text: &str) -> serde_json::Result<Value> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// An event payload: usually a generated JSON value written compactly or
/// pretty, with JSON whitespace around it (the case the bus lets through);
/// otherwise raw bytes, which may be blank, not UTF-8 or not JSON.
struct Payload(Vec<u8>);

impl<'a> Arbitrary<'a> for Payload {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.ratio(1, 4)? {
            return Ok(Payload(u.arbitrary::<&[u8]>()?.to_vec()));
        }
        let value = json(u, 8)?;
        let text = if u.arbitrary()? { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) }
            .expect("a Value always serializes");
        let pad = |u: &mut Unstructured<'a>| -> arbitrary::Result<&'static str> {
            Ok(*u.choose(&["", " ", "\n", "\t\r\n "])?)
        };
        let (before, after) = (pad(u)?, pad(u)?);
        Ok(Payload(format!("{before}{text}{after}").into_bytes()))
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// An arbitrary JSON value nested at most `depth` deep.
fn json(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Value> {
    let kinds = if depth == 0 { 5 } else { 7 };
    Ok(match u.choose_index(kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::String(u.arbitrary()?),
        5 => {
            let mut items = Vec::new();
            while u.arbitrary()? {
                items.push(json(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let mut map = Map::new();
            while u.arbitrary()? {
                map.insert(u.arbitrary()?, json(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}
