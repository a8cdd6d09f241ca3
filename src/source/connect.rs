//! TLS for Postgres, and the ordinary (non-replication) connection that `setup`, `check`,
//! `status` and notify mode use.
//!
//! ```text
//! sslmode (URL)   disable     ─▶ plain
//!                 prefer      ─▶ SSLRequest; 'S' ─▶ TLS, 'N' ─▶ plain     (the default)
//!                 require     ─▶ SSLRequest; 'S' ─▶ TLS, 'N' ─▶ error
//!                 verify-full ─▶ as require
//!                 verify-ca   ─▶ as require, but the host name is not checked
//! TLS = rustls with ring; the server certificate is verified against the system roots plus
//!       `[postgres] ca_file`, for the host named in the URL (except: prefer without ca_file
//!       checks nothing, as libpq's prefer; verify-ca checks the chain only)
//! ```
//!
//! Unlike libpq, `require` verifies the certificate and the host name, exactly as
//! `verify-full` does (libpq's `require` checks nothing unless a root certificate file exists):
//! a cache invalidator that talks to the wrong server is silently wrong. `verify-ca` is for
//! servers reached by a name their certificate does not carry (an IP address, a tunnel).
//! tokio-postgres knows only disable, prefer and require, so [`parse_url`](crate::endpoint::parse_url) turns both `verify-*`
//! modes into `require` and keeps whether the host name is checked. Unix sockets never use TLS,
//! as in libpq. Channel binding is not offered (SCRAM still authenticates both sides).
//! The replication client runs the same handshake through [`handshake`].

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::config::PostgresConfig;
use crate::endpoint::{first_to_answer, host_label, load_ca_file, parse_url, single_host};
use crate::error::{Classify, Verdict};
use crate::redact::redact;

/// The ALPN protocol Postgres 17 expects with `sslnegotiation=direct`.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Why a Postgres connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse (it was validated at load, so this is rare).
    #[error("invalid postgres url {url}: {source}")]
    Url {
        /// The URL with its password hidden.
        url: String,
        /// What tokio-postgres said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// TLS could not be set up or the server's certificate was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Connecting, authenticating or the server failed.
    #[error("connecting to {host} of {url}: {source}")]
    Postgres {
        /// The URL with its password hidden.
        url: String,
        /// The host tried (the last one, when the URL names several and none took us).
        host: String,
        /// What tokio-postgres said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The host accepted no session within the connect timeout (the last one, when the URL
    /// names several and none took us).
    #[error(
        "connecting to {host} of {url}: no session within {after:?} (connect_timeout; the \
         server is down, hung or unreachable)"
    )]
    TimedOut {
        /// The URL with its password hidden.
        url: String,
        /// The host tried.
        host: String,
        /// The connect timeout.
        after: std::time::Duration,
    },
    /// A connection pooler answers instead of Postgres.
    #[error(transparent)]
    Pooler(#[from] PoolerError),
}

/// TLS and URL problems need a person, and so does a pooler; a server that does not answer may
/// come back; the server's answer is judged by its code.
impl Classify for ConnectError {
    fn verdict(&self) -> Verdict {
        match self {
            ConnectError::Url { .. } | ConnectError::Pooler(_) => Verdict::Stop,
            ConnectError::Tls(e) => e.verdict(),
            ConnectError::Postgres { source, .. } => source.verdict(),
            ConnectError::TimedOut { .. } => Verdict::Reconnect,
        }
    }
}

/// A connection pooler (PgBouncer, Supavisor) stands where Postgres should: replication
/// connections cannot go through one, and LISTEN and the notify reader's session lock do not
/// survive one in transaction mode. Permanent: only another URL helps.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} is a connection pooler, not PostgreSQL ({evidence}): {needs}; point postgres.url at \
     PostgreSQL itself (on Supabase: the direct connection, db.<project>.supabase.co port 5432, \
     not the pooler)"
)]
pub struct PoolerError {
    /// The host the URL names.
    host: String,
    /// How we know.
    evidence: String,
    /// What the connection was for, and why a pooler breaks it.
    needs: &'static str,
}

/// What each kind of connection needs that a pooler takes away.
fn needs(replication: bool) -> &'static str {
    if replication {
        "logical replication needs a direct connection"
    } else {
        "notify mode needs LISTEN and a session lock, which a pooler in transaction mode does \
         not keep"
    }
}

/// Supabase's pooler (Supavisor), known by its host name, before any connection is tried: it
/// cannot carry replication, and on port 6543 it pools transactions.
pub fn supabase_pooler(config: &tokio_postgres::Config, replication: bool) -> Option<PoolerError> {
    let host = first_host(config);
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.ends_with(".pooler.supabase.com") && (replication || port == 6543)).then(|| PoolerError {
        host,
        evidence: format!("Supabase's pooler, port {port}"),
        needs: needs(replication),
    })
}

/// A pooler known by how it refused the connection: Postgres accepts every startup parameter
/// we send, PgBouncer refuses those it does not know (`unsupported startup parameter: ...`).
pub fn pooler_refusal(
    config: &tokio_postgres::Config,
    message: &str,
    replication: bool,
) -> Option<PoolerError> {
    message
        .starts_with("unsupported startup parameter")
        .then(|| PoolerError {
            host: first_host(config),
            evidence: format!("it refused the connection: {message}"),
            needs: needs(replication),
        })
}

/// A TLS failure; it names the server but never a password.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("postgres.ca_file: {0}")]
    CaFile(String),
    /// The host cannot be used as a TLS server name.
    #[error("cannot use {host:?} as a TLS server name")]
    ServerName {
        /// The host from the URL.
        host: String,
    },
    /// `sslmode=require`, but the server answered the SSLRequest with 'N'.
    #[error("the postgres server at {host} does not accept TLS, and sslmode=require")]
    Refused {
        /// The host from the URL.
        host: String,
    },
    /// The handshake failed on the TLS level, for example an untrusted certificate.
    #[error("TLS with the postgres server at {host} failed: {reason}{}", hint(.reason))]
    Handshake {
        /// The host from the URL.
        host: String,
        /// What rustls said.
        reason: String,
    },
    /// The socket failed during the handshake.
    #[error("i/o error during the TLS handshake with {host}: {source}")]
    Io {
        /// The host from the URL.
        host: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// Only a broken socket is worth retrying; a refused certificate or a server without TLS gives
/// the same answer next time.
impl Classify for TlsError {
    fn verdict(&self) -> Verdict {
        match self {
            TlsError::Io { .. } => Verdict::Reconnect,
            _ => Verdict::Stop,
        }
    }
}

/// Points a certificate failure at the fix.
fn hint(reason: &str) -> &'static str {
    if reason.contains("certificate") {
        " (give the server's CA certificate with [postgres] ca_file or \
         INVALIDATOR_POSTGRES_CA_FILE, or use a host name the certificate names)"
    } else {
        ""
    }
}

/// The system's trusted roots, loaded once per process; unreadable ones are logged and skipped.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for err in &found.errors {
            tracing::debug!(error = %err, "skipping unreadable system certificates");
        }
        found.certs
    })
}

/// Checks the server's certificate chain against the roots, not its names: `sslmode=verify-ca`.
#[derive(Debug)]
struct ChainOnly {
    /// The trusted roots.
    roots: Arc<rustls::RootCertStore>,
    /// The signature algorithms.
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether the server's certificate is checked: always, except with `sslmode=prefer` and no
/// `ca_file`, which behaves like libpq's `prefer` (encrypt when offered, do not authenticate),
/// so that a local server with a self-signed certificate (Debian's default) works untouched.
pub(crate) fn verifies(mode: SslMode, ca_file: Option<&Path>) -> bool {
    !(mode == SslMode::Prefer && ca_file.is_none())
}

/// Accepts any certificate, for `sslmode=prefer` without a CA; the handshake signatures are
/// still checked, so the session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls configuration: ring, TLS 1.2 and 1.3, the system roots plus `ca_file` (or no
/// certificate check when `verify` is false; the chain but not the host name when `check_host`
/// is false), and the `postgresql` ALPN protocol when the server is spoken to directly in TLS.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    direct: bool,
    verify: bool,
    check_host: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::CaFile(format!("cannot set up TLS: {e}")))?;
    if !verify {
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth();
        if direct {
            config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        }
        return Ok(Arc::new(config));
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = ca_file {
        let certs = load_ca_file(path).map_err(TlsError::CaFile)?;
        let (_, ignored) = roots.add_parsable_certificates(certs);
        if ignored > 0 {
            tracing::warn!(ignored, file = %path.display(), "ignoring unusable CA certificates");
        }
    }
    let mut config = if check_host {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: Arc::new(roots),
                provider,
            }))
            .with_no_client_auth()
    };
    if direct {
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    }
    Ok(Arc::new(config))
}

/// Runs the TLS handshake over `stream`, verifying the certificate for `host`.
pub(crate) async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    stream: S,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
        host: host.to_owned(),
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|err| tls_failure(host, err))
}

/// Tells a TLS refusal (rustls's error inside the i/o error) from a broken socket.
fn tls_failure(host: &str, err: io::Error) -> TlsError {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => TlsError::Handshake {
            host: host.to_owned(),
            reason: tls.to_string(),
        },
        None => TlsError::Io {
            host: host.to_owned(),
            source: err,
        },
    }
}

/// Connects an ordinary session as `postgres` says (URL, sslmode, CA) and spawns its driver, which
/// logs how the connection ended.
pub async fn connect(postgres: &PostgresConfig) -> Result<tokio_postgres::Client, ConnectError> {
    let (client, connection) = open(postgres).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// An ordinary session and the connection that drives it.
type Session = (
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, RustlsStream<tokio_postgres::Socket>>,
);

/// Like [`connect`], but hands back the connection for the caller to drive, for callers that
/// want its notifications (`Connection::poll_message`).
///
/// The hosts of a multi-host URL are tried one at a time, each within the connect timeout, as
/// the replication connection tries them ([`first_to_answer`]): tokio-postgres's own loop bounds
/// only each TCP connect, so a host that accepts and never answers would hold it for good.
pub async fn open(postgres: &PostgresConfig) -> Result<Session, ConnectError> {
    let url = || redact(&postgres.url);
    let (config, check_host) =
        parse_url(&postgres.url).map_err(|source| ConnectError::Url { url: url(), source })?;
    let tls = MakeRustls::with_host_check(&config, postgres.ca_file.as_deref(), check_host)?;
    first_to_answer(
        &config,
        |candidate| open_host(single_host(&config, candidate), tls.clone(), url()),
        |host, after| ConnectError::TimedOut {
            url: url(),
            host,
            after,
        },
        |err| matches!(err, ConnectError::Pooler(_)),
    )
    .await
}

/// Opens a session with the one host of `config`; `url` (its password hidden) is for messages.
async fn open_host(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    url: String,
) -> Result<Session, ConnectError> {
    config.connect(tls).await.map_err(|source| {
        if let Some(pooler) = source
            .as_db_error()
            .and_then(|db| pooler_refusal(&config, db.message(), false))
        {
            return pooler.into();
        }
        // Our own TLS error is inside tokio-postgres's; surface it so it is classified right.
        let cause = source.source();
        match cause.and_then(|e| e.downcast_ref::<TlsError>()) {
            Some(tls) => ConnectError::Tls(tls_error_copy(tls)),
            // tokio-postgres's own TLS refusals, e.g. "server does not support TLS" under
            // sslmode=require: as permanent as ours.
            None if source.to_string() == TOKIO_POSTGRES_TLS_FAILURE => {
                ConnectError::Tls(TlsError::Handshake {
                    host: first_host(&config),
                    reason: cause.map_or_else(String::new, ToString::to_string),
                })
            }
            None => ConnectError::Postgres {
                url,
                host: host_label(&config, 0),
                source,
            },
        }
    })
}

/// How tokio-postgres displays an error of its TLS kind.
const TOKIO_POSTGRES_TLS_FAILURE: &str = "error performing TLS handshake";

/// The first host of `config` (or its address), for error messages.
fn first_host(config: &tokio_postgres::Config) -> String {
    match (config.get_hosts().first(), config.get_hostaddrs().first()) {
        (Some(tokio_postgres::config::Host::Tcp(host)), _) => host.clone(),
        (_, Some(addr)) => addr.to_string(),
        _ => "the configured socket".to_owned(),
    }
}

/// Rebuilds a [`TlsError`] seen by reference (i/o errors are not `Clone`).
fn tls_error_copy(err: &TlsError) -> TlsError {
    match err {
        TlsError::CaFile(m) => TlsError::CaFile(m.clone()),
        TlsError::ServerName { host } => TlsError::ServerName { host: host.clone() },
        TlsError::Refused { host } => TlsError::Refused { host: host.clone() },
        TlsError::Handshake { host, reason } => TlsError::Handshake {
            host: host.clone(),
            reason: reason.clone(),
        },
        TlsError::Io { host, source } => TlsError::Io {
            host: host.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
    }
}

/// tokio-postgres's TLS hook over tokio-rustls. tokio-postgres itself sends the SSLRequest and
/// honours `sslmode`; this only runs the handshake.
#[derive(Clone)]
pub struct MakeRustls {
    /// The shared rustls configuration; `None` with `sslmode=disable`, which never asks for it.
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustls").finish_non_exhaustive()
    }
}

impl MakeRustls {
    /// Prepares TLS for `config`; reads the CA file unless TLS is disabled.
    pub fn new(
        config: &tokio_postgres::Config,
        ca_file: Option<&Path>,
    ) -> Result<MakeRustls, TlsError> {
        MakeRustls::with_host_check(config, ca_file, true)
    }

    /// Like [`MakeRustls::new`]; `check_host` false (`sslmode=verify-ca`, see [`parse_url`])
    /// verifies the chain but not the host name.
    pub fn with_host_check(
        config: &tokio_postgres::Config,
        ca_file: Option<&Path>,
        check_host: bool,
    ) -> Result<MakeRustls, TlsError> {
        let config = match config.get_ssl_mode() {
            SslMode::Disable => None,
            mode => Some(client_config(
                ca_file,
                config.get_ssl_negotiation() == SslNegotiation::Direct,
                verifies(mode, ca_file),
                check_host,
            )?),
        };
        Ok(MakeRustls { config })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        let config = match &self.config {
            Some(config) => Arc::clone(config),
            // Only reachable if tokio-postgres asks for TLS with sslmode=disable.
            None => client_config(None, false, true, true)?,
        };
        Ok(RustlsConnect {
            config,
            host: domain.to_owned(),
        })
    }
}

/// One pending handshake with one host.
pub struct RustlsConnect {
    /// The rustls configuration.
    config: Arc<ClientConfig>,
    /// The host the certificate must name.
    host: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = handshake(self.config, &self.host, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS session with the server, as tokio-postgres wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point needs the certificate's hash algorithm; not offered yet, so
        // channel_binding=require fails and prefer (the default) authenticates without it.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supabases_pooler_is_known_by_name_for_replication_and_for_transaction_mode() {
        let url = |port: u16| {
            parse_url(&format!(
                "postgres://postgres.ref@aws-0-eu-central-1.pooler.supabase.com:{port}/postgres"
            ))
            .unwrap()
            .0
        };
        assert!(supabase_pooler(&url(5432), true).is_some());
        assert!(supabase_pooler(&url(6543), true).is_some());
        assert!(supabase_pooler(&url(6543), false).is_some());
        // Session mode keeps LISTEN and session locks.
        assert!(supabase_pooler(&url(5432), false).is_none());
        let direct = parse_url("postgres://postgres@db.ref.supabase.co:5432/postgres").unwrap();
        assert!(supabase_pooler(&direct.0, true).is_none());
    }

    #[test]
    fn a_refused_startup_parameter_is_a_pooler_and_other_errors_are_not() {
        let config = parse_url("postgres://u@10.0.0.5:6432/db").unwrap().0;
        let pooler =
            pooler_refusal(&config, "unsupported startup parameter: replication", true).unwrap();
        assert!(
            pooler
                .to_string()
                .starts_with("10.0.0.5 is a connection pooler")
        );
        assert!(pooler_refusal(&config, "password authentication failed", true).is_none());
    }

    #[test]
    fn certificate_failures_are_permanent_and_point_at_ca_file() {
        let err = tls_failure(
            "db.example.com",
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
        );
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(text.contains("db.example.com"), "{text}");
        assert!(text.contains("ca_file"), "{text}");
        let err = tls_failure("h", io::ErrorKind::ConnectionReset.into());
        assert!(err.is_transient());
    }

    #[test]
    fn sslmode_disable_reads_no_ca_file() {
        let config: tokio_postgres::Config = "host=h user=u sslmode=disable".parse().unwrap();
        assert!(MakeRustls::new(&config, Some(Path::new("/nonexistent"))).is_ok());
        let config: tokio_postgres::Config = "host=h user=u sslmode=require".parse().unwrap();
        assert!(MakeRustls::new(&config, Some(Path::new("/nonexistent"))).is_err());
    }
}
