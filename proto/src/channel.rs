//! Channel names, the one piece of the wire contract every service checks the
//! same way (SPEC §6).

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelNameError {
    Empty,
    TooLong,
    BadCharacter(char),
}

impl std::fmt::Display for ChannelNameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelNameError::Empty => write!(f, "channel name is empty"),
            ChannelNameError::TooLong => {
                write!(f, "channel name is longer than {MAX_CHANNEL_LEN} characters")
            }
            ChannelNameError::BadCharacter(c) => {
                write!(f, "channel name contains {c:?}; allowed are A-Z a-z 0-9 _ - . : # , @ =")
            }
        }
    }
}

impl std::error::Error for ChannelNameError {}

/// Checks a channel name: 1–255 characters from `A–Z a–z 0–9 _ - . : # , @ =`.
pub fn validate(name: &str) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelNameError::TooLong);
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.:#,@=".contains(*c))) {
        Some(c) => Err(ChannelNameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// Returns the namespace of a channel: the part before the first `:`, or
/// before the first `#` for names like `user#alice`, or the whole name.
pub fn namespace(name: &str) -> &str {
    let end = name.find([':', '#']).unwrap_or(name.len());
    &name[..end]
}

/// Returns the users allowed on a user-limited channel (the comma-separated
/// list after the last `#`), or `None` when the channel is not user-limited.
pub fn allowed_users(name: &str) -> Option<impl Iterator<Item = &str>> {
    name.rfind('#').map(|i| name[i + 1..].split(',').filter(|u| !u.is_empty()))
}

/// Checks that a user id can name its personal channel `user#<id>` and be
/// the one user of a user-limited channel: channel characters other than
/// `#` and `,` (which would make `user#a,b` readable by `b`), short enough.
///
/// # Errors
/// A message safe to show the client.
pub fn validate_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("user id is empty".to_owned());
    }
    if let Some(c) = id.chars().find(|c| matches!(c, '#' | ',')) {
        return Err(format!("user id contains {c:?}, which a personal channel name cannot"));
    }
    validate(&format!("user#{id}")).map_err(|e| match e {
        ChannelNameError::Empty => unreachable!("`user#` is never empty"),
        ChannelNameError::TooLong => format!("user id is longer than {} characters", MAX_CHANNEL_LEN - 5),
        ChannelNameError::BadCharacter(c) => {
            format!("user id contains {c:?}; allowed are A-Z a-z 0-9 _ - . : @ =")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["missions", "task:42", "thread:7f3c#alice", "a.b-c_d:e#f,g@h=i", "x"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(validate(""), Err(ChannelNameError::Empty));
        assert_eq!(validate(&"a".repeat(256)), Err(ChannelNameError::TooLong));
        assert_eq!(validate("a b"), Err(ChannelNameError::BadCharacter(' ')));
        assert_eq!(validate("a/b"), Err(ChannelNameError::BadCharacter('/')));
        assert_eq!(validate("é"), Err(ChannelNameError::BadCharacter('é')));
    }

    #[test]
    fn user_ids_must_form_a_personal_channel() {
        for ok in ["alice", "a.b@example.com", "auth0:123", "x=y"] {
            assert_eq!(validate_user_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "bob,alice", "x#alice", "a b", "é", &"a".repeat(251)] {
            assert!(validate_user_id(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_user_id(&"a".repeat(250)), Ok(()));
    }

    #[test]
    fn finds_namespaces_and_users() {
        assert_eq!(namespace("task:42"), "task");
        assert_eq!(namespace("missions"), "missions");
        assert_eq!(namespace("user#alice"), "user");
        assert_eq!(namespace("thread:1#bob"), "thread");
        let users: Vec<_> = allowed_users("thread:1#bob,carol").unwrap().collect();
        assert_eq!(users, ["bob", "carol"]);
        assert!(allowed_users("missions").is_none());
    }
}
