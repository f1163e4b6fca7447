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
