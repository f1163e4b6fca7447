//! TLS for Switchboard's listeners and gRPC clients (SPEC §8), on rustls with
//! the ring provider only (no aws-lc, no OpenSSL).
//!
//! # Layout
//! - `ServerTls`: a listener's certificate, key and optional client CA, read
//!   from PEM files and read again by `reload` (on SIGHUP, in the binary);
//!   each handshake takes the configuration current at its start, so a
//!   reload never touches an open connection.
//! - `accept`: the next TCP connection, riding out accept errors (the
//!   gateway's accept loop and `incoming` share it).
//! - `incoming`: TLS connections over a `TcpListener`, for tonic's
//!   `serve_with_incoming_shutdown` (tonic's own `ServerTlsConfig` cannot
//!   be reloaded).
//! - `ClientTls`: what our gRPC clients use for `https://` URLs (`tls.ca`,
//!   `tls.client_cert`, `tls.client_key`), reloadable the same way: the
//!   connector of their channels.
//!
//! Every error names the setting at fault, so that the binary can exit 64
//! with it.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod client;

pub use client::{ClientFiles, ClientTls};

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, wrappers::ReceiverStream};

/// A certificate or key that cannot be used, with the setting that names it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {path}: {message}")]
pub struct TlsError {
    /// The setting, such as `gateway.tls_cert`.
    pub setting: String,
    pub path: String,
    pub message: String,
}

/// The files of a listener's TLS, and the settings they come from.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The settings' section: `gateway`, `eventbus` or `agent_bridge`.
    pub section: &'static str,
    /// PEM certificate chain, the server's own first (`<section>.tls_cert`).
    pub cert: PathBuf,
    /// PEM private key (`<section>.tls_key`).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// one of them signed (`<section>.tls_client_ca`).
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered: `h2` for gRPC, `h2` and `http/1.1` for the gateway.
    pub alpn: Vec<Vec<u8>>,
}

/// A listener's TLS configuration, swapped whole by `reload`: a cheap
/// handle, shared by the accept loop and whoever triggers the reload.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: ServerFiles,
    /// The configuration new handshakes take. A std lock: it is held only
    /// to clone or replace the `Arc`, never across an `.await`.
    current: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.inner.files).finish_non_exhaustive()
    }
}

// === impl ServerTls ===

impl ServerTls {
    /// Reads the files and builds the configuration.
    ///
    /// # Errors
    /// When a file cannot be read or holds no usable certificate or key.
    pub fn load(files: ServerFiles) -> Result<ServerTls, TlsError> {
        let config = build(&files)?;
        Ok(ServerTls { inner: Arc::new(Inner { files, current: RwLock::new(Arc::new(config)) }) })
    }

    /// Reads the files again; new handshakes use them, open connections
    /// keep theirs. On error the configuration in use is kept.
    ///
    /// # Errors
    /// As `load`.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build(&self.inner.files)?);
        *self.inner.current.write().expect("tls config lock") = config;
        Ok(())
    }

    /// The configuration in use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.current.read().expect("tls config lock").clone()
    }

    /// An acceptor with the configuration in use.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The settings' section these files come from.
    pub fn section(&self) -> &'static str {
        self.inner.files.section
    }
}

/// The next connection of `listener`. An accept error (out of file
/// descriptors, most often) is logged and retried after 50 ms, so that
/// some connections can close meanwhile; it never ends the accept loop.
pub async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(cause = %e, "accept error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves TLS connections accepted on `listener`, for tonic's
/// `serve_with_incoming_shutdown`. Handshakes run in their own tasks, each
/// bounded by `handshake_timeout`, so a slow client never holds up the
/// others; failed ones are logged and dropped. The listener is closed once
/// the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    handshake_timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    // Handshaken connections wait here for the server to take them.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = accept(&listener) => accepted,
            };
            // gRPC messages are written as they come (as `TcpIncoming::with_nodelay` does).
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A TLS connector for our own `wss://` clients (`switchboard bench`):
/// servers verified with the CA certificates of `ca` (`tls.ca`).
///
/// # Errors
/// When the file cannot be read or holds no usable certificate.
pub fn connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let roots = client::roots(Some(ca))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("tls.ca", ca, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// For clients of `connector`, so they need no TLS crate of their own.
pub use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &ServerFiles) -> Result<ServerConfig, TlsError> {
    let section = files.section;
    let cert_setting = format!("{section}.tls_cert");
    let key_setting = format!("{section}.tls_key");
    let chain = certs(&cert_setting, &files.cert)?;
    let key = private_key(&key_setting, &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&cert_setting, &files.cert, e))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let setting = format!("{section}.tls_client_ca");
            let mut roots = RootCertStore::empty();
            for cert in certs(&setting, path)? {
                roots.add(cert).map_err(|e| error(&setting, path, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| error(&setting, path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| error(&key_setting, &files.key, e))?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| error(setting, path, e))
}

/// The certificates of a PEM file; at least one.
fn certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(setting, path, format!("not a PEM certificate ({e})")))?;
    if certs.is_empty() {
        return Err(error(setting, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(setting: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| error(setting, path, format!("no PEM private key ({e})")))
}

fn error(setting: &str, path: &Path, message: impl fmt::Display) -> TlsError {
    TlsError { setting: setting.to_owned(), path: path.display().to_string(), message: message.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_their_setting() {
        let files = ServerFiles {
            section: "eventbus",
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            alpn: Vec::new(),
        };
        let e = ServerTls::load(files).unwrap_err();
        assert_eq!(e.setting, "eventbus.tls_cert");
        let e = ClientTls::load(ClientFiles { ca: Some("/nonexistent/ca.pem".into()), ..ClientFiles::default() })
            .unwrap_err();
        assert_eq!(e.setting, "tls.ca");
        let e = ClientTls::load(ClientFiles { cert: Some("/nonexistent/c.pem".into()), ..ClientFiles::default() })
            .unwrap_err();
        assert_eq!(e.setting, "tls.client_key");
    }
}
