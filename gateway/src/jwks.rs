//! Keys from a JWKS URL: fetched at start, refreshed on an interval, and
//! soon after a token names a key id the cache does not know. Every fetch
//! has a timeout; a failed refresh keeps the keys already known.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest JWKS document accepted.
const MAX_BODY: usize = 1024 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub struct Jwks {
    url: hyper::Uri,
    client: HttpsClient,
    /// Key id → the one algorithm it verifies, and the key.
    keys: RwLock<HashMap<String, (Algorithm, DecodingKey)>>,
    /// Bounds each fetch.
    timeout: Duration,
    /// Time between refreshes.
    interval: Duration,
    /// Asks the refresher for an early fetch (an unknown key id was seen).
    wake: Notify,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Jwks {
    /// # Errors
    /// When the URL is not an `http` or `https` URL.
    pub fn new(url: &str, interval: Duration, timeout: Duration) -> Result<Arc<Jwks>, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("auth.jwks_url: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err("auth.jwks_url: must be an http or https URL".into());
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("auth.jwks_url: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Arc::new(Jwks { url: uri, client, keys: RwLock::default(), timeout, interval, wake: Notify::new() }))
    }

    /// Returns the key for `kid` if it verifies `alg`. An unknown kid asks for an early refresh.
    pub fn key(&self, kid: &str, alg: Algorithm) -> Option<DecodingKey> {
        let keys = self.keys.read().unwrap();
        match keys.get(kid) {
            Some((key_alg, key)) if *key_alg == alg => Some(key.clone()),
            Some(_) => None,
            None => {
                self.wake.notify_one();
                None
            }
        }
    }

    /// Fetches the key set once and replaces the cache.
    ///
    /// # Errors
    /// A network error, a timeout, a non-200 answer or a document that is not a JWK set.
    pub async fn refresh(&self) -> Result<usize, String> {
        let fetch = async {
            let resp = self.client.get(self.url.clone()).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("answered {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_BODY).collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(body.to_bytes())
        };
        let body = tokio::time::timeout(self.timeout, fetch).await.map_err(|_| "timed out".to_owned())??;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                // Symmetric keys and other algorithms are never taken from a URL.
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), (alg, key));
            }
        }
        let n = keys.len();
        *self.keys.write().unwrap() = keys;
        Ok(n)
    }

    /// Refreshes every `interval` (every 5 s while no key is known), and
    /// early when woken, at most every 10 s.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let last = tokio::time::Instant::now();
            match self.refresh().await {
                Ok(n) => tracing::debug!(keys = n, "jwks refreshed"),
                Err(e) => tracing::warn!(cause = %e, url = %self.url, "jwks refresh failed"),
            }
            let wait = if self.keys.read().unwrap().is_empty() { Duration::from_secs(5) } else { self.interval };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep_until(last + Duration::from_secs(10)) => {}
                    }
                }
            }
        }
    }
}
