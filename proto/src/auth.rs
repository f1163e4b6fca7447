//! The API key of the gRPC services (SPEC §8): `authorization: Bearer <key>`
//! in the call's metadata, added by clients and checked by servers.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

/// The credentials of an `Authorization: Bearer <credentials>` value; the
/// scheme is case-insensitive (RFC 7235).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim_start())
}

/// Server side: refuses calls without the key, when one is configured; the
/// key is compared in constant time.
#[derive(Clone)]
pub struct KeyCheck(Option<Arc<[u8]>>);

impl KeyCheck {
    pub fn new(key: Option<&str>) -> Self {
        KeyCheck(key.map(|k| Arc::from(k.as_bytes())))
    }
}

impl Interceptor for KeyCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(key) = &self.0 else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(bearer).unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(key)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong api key"))
        }
    }
}

/// Client side: adds the key to every call, when one is configured.
#[derive(Clone, Default)]
pub struct BearerKey(Option<MetadataValue<Ascii>>);

impl BearerKey {
    /// # Errors
    /// When the key cannot be a header value.
    pub fn new(key: Option<&str>) -> Result<Self, String> {
        match key {
            Some(k) => format!("Bearer {k}")
                .parse()
                .map(|v| BearerKey(Some(v)))
                .map_err(|_| "the api key is not a valid header value".to_owned()),
            None => Ok(BearerKey(None)),
        }
    }
}

impl Interceptor for BearerKey {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
#[test]
fn bearer_schemes_are_case_insensitive() {
    assert_eq!(bearer("Bearer k"), Some("k"));
    assert_eq!(bearer("bearer k"), Some("k"));
    assert_eq!(bearer("BEARER  k"), Some("k"));
    assert_eq!(bearer("Basic k"), None);
    assert_eq!(bearer("Bearer"), None);
}
