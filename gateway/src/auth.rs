//! Token authentication (SPEC §8): JWTs signed with HS256 (a shared secret),
//! RS256 or ES256 (public keys from PEM files).
//!
//! The algorithm of a token must be one configured *and* match the kind of
//! key it is checked with, so a token signed with HS256 using an RSA public
//! key as the secret is refused (algorithm confusion).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

/// How tokens are checked.
#[derive(Clone)]
pub struct AuthConfig {
    /// Keys with the one algorithm each may verify.
    pub keys: Vec<(Algorithm, DecodingKey)>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// How long after `exp` a connection may stay without `refresh`.
    pub expiry_grace: Duration,
    /// How long a connection without a token may wait before `authorize`.
    pub authorize_timeout: Duration,
    /// Keys from a JWKS URL, looked up by the token's `kid`.
    pub jwks: Option<std::sync::Arc<crate::jwks::Jwks>>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithms", &self.keys.iter().map(|(a, _)| *a).collect::<Vec<_>>())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("expiry_grace", &self.expiry_grace)
            .field("authorize_timeout", &self.authorize_timeout)
            .field("jwks", &self.jwks)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self::none()
    }
}

impl AuthConfig {
    /// A configuration with no keys: every token is refused.
    pub fn none() -> Self {
        AuthConfig {
            keys: Vec::new(),
            audience: None,
            issuer: None,
            expiry_grace: Duration::from_secs(25),
            authorize_timeout: Duration::from_secs(10),
            jwks: None,
        }
    }

    /// Whether any token could be accepted.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty() || self.jwks.is_some()
    }

    /// Adds an HS256 secret.
    pub fn with_hs256(mut self, secret: &[u8]) -> Self {
        self.keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)));
        self
    }

    /// Adds a public key from PEM: RS256 for RSA keys, ES256 for P-256 keys.
    ///
    /// # Errors
    /// When the PEM is neither.
    pub fn with_public_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            self.keys.push((Algorithm::RS256, key));
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            self.keys.push((Algorithm::ES256, key));
        } else {
            return Err("not an RSA or EC public key in PEM".into());
        }
        Ok(self)
    }
}

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user_id: String,
    pub roles: Vec<String>,
    /// Channels to subscribe on connect.
    pub channels: Vec<String>,
    /// Unix seconds.
    pub expires_at: Option<u64>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    channels: Vec<String>,
}

/// Why a token was refused; the message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Checks a token and returns its credentials.
///
/// # Errors
/// A bad signature, an unknown or mismatched algorithm, an expired or not yet
/// valid token, a wrong audience or issuer, or no `sub`.
pub fn verify(config: &AuthConfig, token: &str) -> Result<Credentials, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError("malformed token".into()))?;
    let mut last = AuthError(format!("algorithm {:?} is not accepted", header.alg));
    let from_jwks = match (&config.jwks, &header.kid) {
        (Some(jwks), Some(kid)) => jwks.key(kid, header.alg).map(|key| (header.alg, key)),
        _ => None,
    };
    let keys = from_jwks.iter().chain(config.keys.iter().filter(|(alg, _)| *alg == header.alg));
    for (alg, key) in keys {
        let mut validation = Validation::new(*alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => {
                let claims = data.claims;
                let user_id =
                    claims.sub.filter(|s| !s.is_empty()).ok_or_else(|| AuthError("token has no `sub`".into()))?;
                switchboard_proto::channel::validate_user_id(&user_id).map_err(AuthError)?;
                return Ok(Credentials {
                    user_id,
                    roles: claims.roles,
                    channels: claims.channels,
                    expires_at: claims.exp,
                });
            }
            Err(e) => {
                last = AuthError(
                    match e.kind() {
                        ErrorKind::ExpiredSignature => "token expired",
                        ErrorKind::ImmatureSignature => "token not yet valid",
                        ErrorKind::InvalidAudience => "wrong audience",
                        ErrorKind::InvalidIssuer => "wrong issuer",
                        ErrorKind::InvalidSignature => "bad signature",
                        ErrorKind::InvalidAlgorithm => "algorithm not accepted",
                        ErrorKind::MissingRequiredClaim(c) if c == "sub" => "token has no `sub`",
                        ErrorKind::MissingRequiredClaim(_) => "token has no `exp`",
                        _ => "invalid token",
                    }
                    .into(),
                );
            }
        }
    }
    Err(last)
}

/// Signs an HS256 token, for `switchboard token` and the token printed in dev mode.
///
/// # Errors
/// When the claims cannot be serialized.
pub fn mint_hs256(secret: &[u8], claims: &serde_json::Value) -> Result<String, String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn hs256_round_trip_and_refusals() {
        let config = AuthConfig::none().with_hs256(b"secret");
        let token = mint_hs256(b"secret", &json!({ "sub": "alice", "exp": now() + 60, "roles": ["ops"] })).unwrap();
        let creds = verify(&config, &token).unwrap();
        assert_eq!(creds.user_id, "alice");
        assert_eq!(creds.roles, ["ops"]);

        let wrong = mint_hs256(b"other", &json!({ "sub": "alice", "exp": now() + 60 })).unwrap();
        assert_eq!(verify(&config, &wrong).unwrap_err().0, "bad signature");
        let expired = mint_hs256(b"secret", &json!({ "sub": "alice", "exp": now() - 10 })).unwrap();
        assert_eq!(verify(&config, &expired).unwrap_err().0, "token expired");
        let no_sub = mint_hs256(b"secret", &json!({ "exp": now() + 60 })).unwrap();
        assert_eq!(verify(&config, &no_sub).unwrap_err().0, "token has no `sub`");
        let early = mint_hs256(b"secret", &json!({ "sub": "a", "exp": now() + 60, "nbf": now() + 30 })).unwrap();
        assert_eq!(verify(&config, &early).unwrap_err().0, "token not yet valid");
        assert_eq!(verify(&config, "garbage").unwrap_err().0, "malformed token");
        let bad_user = mint_hs256(b"secret", &json!({ "sub": "bob,alice", "exp": now() + 60 })).unwrap();
        assert_eq!(
            verify(&config, &bad_user).unwrap_err().0,
            "user id contains ',', which a personal channel name cannot"
        );
        assert!(verify(&AuthConfig::none(), &token).is_err(), "no keys, no entry");
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let config = AuthConfig {
            audience: Some("sb".into()),
            issuer: Some("idp".into()),
            ..AuthConfig::none().with_hs256(b"s")
        };
        let ok = mint_hs256(b"s", &json!({ "sub": "a", "exp": now() + 60, "aud": "sb", "iss": "idp" })).unwrap();
        assert!(verify(&config, &ok).is_ok());
        let aud = mint_hs256(b"s", &json!({ "sub": "a", "exp": now() + 60, "aud": "other", "iss": "idp" })).unwrap();
        assert_eq!(verify(&config, &aud).unwrap_err().0, "wrong audience");
        let iss = mint_hs256(b"s", &json!({ "sub": "a", "exp": now() + 60, "aud": "sb", "iss": "x" })).unwrap();
        assert_eq!(verify(&config, &iss).unwrap_err().0, "wrong issuer");
    }
}
