//! TLS for our gRPC clients (`tls.ca`, `tls.client_cert`, `tls.client_key`),
//! read again by `ClientTls::reload` like a listener's: each new connection
//! takes the configuration current when it starts, open ones keep theirs.
//! tonic's own `ClientTlsConfig` is fixed once a channel is built, so a
//! `ClientTls` is the channel's connector instead: it dials TCP and runs the
//! handshake itself, for channels whose URL it was given as `http://`
//! (`switchboard_proto::client` does this for `https://` URLs).

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{TlsError, certs, error, private_key, provider};

/// The files of our clients' TLS; none set: the public web roots, no client certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    /// CA certificates servers are verified with (`tls.ca`).
    pub ca: Option<PathBuf>,
    /// The certificate presented to servers that ask for one (`tls.client_cert`), with its key.
    pub cert: Option<PathBuf>,
    /// `tls.client_key`.
    pub key: Option<PathBuf>,
}

/// The clients' TLS configuration, swapped whole by `reload`: a cheap
/// handle, and the connector of every `https://` channel built with it.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: ClientFiles,
    /// A std lock: held only to clone or replace the `Arc`.
    current: RwLock<Arc<ClientConfig>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("files", &self.inner.files).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the files and builds the configuration.
    ///
    /// # Errors
    /// When a file cannot be read or holds nothing usable, or only one of
    /// `tls.client_cert` and `tls.client_key` is set.
    pub fn load(files: ClientFiles) -> Result<ClientTls, TlsError> {
        let config = build(&files)?;
        Ok(ClientTls { inner: Arc::new(Inner { files, current: RwLock::new(Arc::new(config)) }) })
    }

    /// Reads the files again; new connections use them. On error the
    /// configuration in use is kept.
    ///
    /// # Errors
    /// As `load`.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build(&self.inner.files)?);
        *self.inner.current.write().expect("tls config lock") = config;
        Ok(())
    }

    fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.inner.current.read().expect("tls config lock").clone())
    }
}

/// Dials `uri`'s host and port (443 without one) and runs the handshake,
/// verifying the server as that host name.
impl tower_service::Service<Uri> for ClientTls {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.connector();
        Box::pin(async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| invalid(format!("no host in {uri}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let tcp = TcpStream::connect((host.as_str(), uri.port_u16().unwrap_or(443))).await?;
            // gRPC messages are written as they come.
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host).map_err(|e| invalid(e.to_string()))?;
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}

/// The CA certificates servers are verified with: `tls.ca`'s, or the public web roots.
pub(crate) fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certs("tls.ca", path)? {
                roots.add(cert).map_err(|e| error("tls.ca", path, e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

fn build(files: &ClientFiles) -> Result<ClientConfig, TlsError> {
    let roots = roots(files.ca.as_deref())?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { setting: "tls".into(), path: String::new(), message: e.to_string() })?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = certs("tls.client_cert", cert)?;
            let key_der = private_key("tls.client_key", key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| error("tls.client_key", key, e))?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), None) => return Err(error("tls.client_key", cert, "required with tls.client_cert")),
        (None, Some(key)) => return Err(error("tls.client_cert", key, "required with tls.client_key")),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
