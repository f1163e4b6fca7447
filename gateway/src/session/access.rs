//! Who may do what on a channel (SPEC §6): a namespace's rule against a
//! connection's credentials, the user-limited `#` rule, the reserved
//! broadcast channel.

use crate::{agent::ANONYMOUS, auth::Credentials, config::Access, hub::BROADCAST_CHANNEL};

/// Whether credentials (or none) satisfy a rule.
pub(crate) fn allowed(credentials: Option<&Credentials>, access: &Access) -> bool {
    match access {
        Access::None => false,
        Access::Anonymous => true,
        Access::Authenticated => credentials.is_some(),
        Access::Roles(roles) => credentials.is_some_and(|c| c.roles.iter().any(|r| roles.contains(r))),
    }
}

/// Whether a connection with `credentials` may use `channel` under
/// `access`, or the error code and message saying why not.
pub(crate) fn may(
    credentials: Option<&Credentials>,
    channel: &str,
    access: &Access,
) -> Result<(), (&'static str, String)> {
    switchboard_proto::channel::validate(channel).map_err(|e| ("invalid_channel", e.to_string()))?;
    // Without a token the connection is the user `anonymous`, whose runs'
    // thread channels it may watch like any user its own.
    let user = credentials.map_or(ANONYMOUS, |c| c.user_id.as_str());
    if channel == BROADCAST_CHANNEL || !readable_by(channel, Some(user)) || !allowed(credentials, access) {
        return Err(("permission_denied", format!("not allowed on channel {channel:?}")));
    }
    Ok(())
}

/// The user-limited `#` rule (SPEC §6): whether `user` is among the users a
/// channel name lists, or the channel lists none.
pub(crate) fn readable_by(channel: &str, user: Option<&str>) -> bool {
    switchboard_proto::channel::allowed_users(channel).is_none_or(|mut users| users.any(|u| Some(u) == user))
}
