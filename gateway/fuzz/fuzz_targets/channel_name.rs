//! Fuzzes the channel-name helpers every service shares:
//! `channel::{validate, namespace, allowed_users}`.
//!
//! Invariants:
//! - none of them panics, on any string;
//! - `validate` accepts exactly the names of 1..=255 bytes drawn from
//!   `A-Z a-z 0-9 _ - . : # , @ =`, and its errors say why truthfully;
//! - `namespace` is a prefix of the name, cut at the first `:` or `#`;
//! - `allowed_users` are the non-empty, comma-free pieces after the last `#`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::channel::{ChannelNameError, MAX_CHANNEL_LEN, allowed_users, namespace, validate};

/// The documented alphabet, spelled out independently of the implementation.
fn allowed(c: char) -> bool {
    matches!(c, 'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' | '.' | ':' | '#' | ',' | '@' | '=')
}

fuzz_target!(|name: &str| {
    match validate(name) {
        Ok(()) => {
            assert!((1..=MAX_CHANNEL_LEN).contains(&name.len()), "{name:?}");
            assert!(name.chars().all(allowed), "{name:?}");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            match e {
                ChannelNameError::Empty => assert!(name.is_empty()),
                ChannelNameError::TooLong => assert!(name.len() > MAX_CHANNEL_LEN),
                ChannelNameError::BadCharacter(c) => {
                    assert!(!allowed(c) && name.contains(c), "{c:?} in {name:?}")
                }
            }
            // Refused only for a reason: a short, well-formed name is accepted.
            assert!(
                name.is_empty() || name.len() > MAX_CHANNEL_LEN || !name.chars().all(allowed),
                "{name:?} refused with {e:?}"
            );
        }
    }

    // The namespace is the name up to its first `:` or `#`.
    let ns = namespace(name);
    assert!(name.starts_with(ns), "{ns:?} is not a prefix of {name:?}");
    assert!(!ns.contains([':', '#']), "{ns:?} of {name:?}");
    if ns.len() < name.len() {
        assert!(name[ns.len()..].starts_with([':', '#']), "{ns:?} of {name:?}");
    }

    // Users are listed only after a `#`; each is a non-empty piece without
    // `,` or `#`, and in order they spell the list after the last `#` minus
    // its commas.
    match allowed_users(name) {
        None => assert!(!name.contains('#'), "{name:?}"),
        Some(users) => {
            let users: Vec<&str> = users.collect();
            let list = &name[name.rfind('#').expect("users without `#`") + 1..];
            for u in &users {
                assert!(!u.is_empty() && !u.contains([',', '#']), "{u:?} of {name:?}");
            }
            assert_eq!(users.concat(), list.replace(',', ""), "{name:?}");
        }
    }
});
