//! A small streaming-replication (walsender) client over tokio.
//!
//! tokio-postgres cannot open a replication connection, so this module speaks the protocol itself
//! on top of `postgres-protocol`'s message codec:
//!
//! ```text
//! ReplicationClient::connect   startup with replication=database, auth (trust, password, md5, SCRAM)
//!   .simple_query / .identify_system / .timeline_history / .create_slot
//!   .start_replication ──▶ ReplicationStream
//!                            .next()        XLogData (one pgoutput message) or Keepalive; cancel-safe
//!                            .send_status() standby status update: how far we have flushed
//!                            .finish()      CopyDone, then a polite goodbye
//! ```
//!
//! The client never interprets pgoutput: `XLogData::data` goes to the decoder as it came. TLS
//! follows `sslmode` as [`crate::source::connect`] describes (verified certificates; `prefer` falls
//! back to plain text only when the server answers 'N'). After an i/o or protocol error the
//! connection is in an unknown state; drop it and reconnect.

mod conn;
mod error;
mod source;
mod wire;

/// The `options` of the startup packet: the URL's, then the text form of values, pinned after
/// them so that it wins over them, over the role's and the database's settings and over the
/// server's defaults (pgoutput writes values with this session's settings, and keys must not
/// depend on them). The server reads a backslash as escaping the next character, so options
/// ending in an unpaired one would glue the space before ours, and our first option, onto
/// their last value: refused, with what to do.
fn startup_options(theirs: Option<&str>) -> Result<String, ReplicationError> {
    let Some(theirs) = theirs else {
        return Ok(super::text_form_options());
    };
    let trailing = theirs.len() - theirs.trim_end_matches('\\').len();
    if trailing % 2 == 1 {
        return Err(ReplicationError::Invalid(format!(
            "postgres url: options {theirs:?} ends with an unpaired backslash, which would escape \
             what follows; double it or remove it"
        )));
    }
    Ok(format!("{theirs} {}", super::text_form_options()))
}

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{self, sasl};
use postgres_protocol::message::backend::{DataRowBody, Message, ParameterStatusBody};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, Host, SslMode, SslNegotiation, TargetSessionAttrs};

use crate::change::Lsn;
use crate::endpoint::{self, first_to_answer};
use crate::source::connect::{self, TlsError, client_config, handshake, verifies};
use crate::sql;
use conn::{Backend, Connection, Socket, log_notice, server_error, unexpected};
pub use error::ReplicationError;
pub use source::{Ancestry, CatchUp, ReplicationSource, SourceError, WalProgress, WalStream};

/// How long `finish` waits for the server to acknowledge the end of streaming.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier, as decimal text.
    pub system_id: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
    /// The database this connection is attached to (`None` for physical replication).
    pub dbname: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of WAL; with pgoutput, exactly one pgoutput message.
    XLogData {
        /// The WAL position this data starts at.
        wal_start: Lsn,
        /// The current end of WAL on the server, useful for measuring lag.
        wal_end: Lsn,
        /// The server's clock when it sent this, in microseconds since the Unix epoch.
        server_time_us: i64,
        /// The payload, undecoded.
        data: Bytes,
    },
    /// A heartbeat from the server.
    Keepalive {
        /// The current end of WAL on the server.
        wal_end: Lsn,
        /// The server's clock when it sent this, in microseconds since the Unix epoch.
        server_time_us: i64,
        /// The server will soon drop the connection unless a status update is sent now.
        reply_requested: bool,
    },
}

/// A replication connection before streaming: it runs replication commands and SQL.
pub struct ReplicationClient {
    /// The framed socket.
    conn: Connection,
    /// The server parameters reported with ParameterStatus (`server_version`, `TimeZone`, ...).
    parameters: HashMap<String, String>,
    /// The backend process ID, useful to find this connection in `pg_stat_replication`.
    process_id: i32,
}

impl ReplicationClient {
    /// Connects in `replication=database` mode and authenticates, to the first host of `config`
    /// that answers, as libpq does with several hosts (`host=a,b`, `postgres://a:1,b:2/db`);
    /// with `target_session_attrs=read-write`, to the first that is not read-only (a standby).
    ///
    /// `application_name` overrides the one in `config`, so that operators can recognise the
    /// sidecar in `pg_stat_replication`. The connect timeout
    /// ([`attempt_timeout`](crate::endpoint::attempt_timeout)) bounds each host's whole
    /// connection setup, authentication included.
    pub async fn connect(
        config: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<ReplicationClient, ReplicationError> {
        ReplicationClient::connect_with_ca(config, application_name, None).await
    }

    /// Like [`ReplicationClient::connect`], also trusting the CA certificates of `ca_file` (PEM)
    /// for the server's TLS certificate, besides the system roots.
    pub async fn connect_with_ca(
        config: &tokio_postgres::Config,
        application_name: &str,
        ca_file: Option<&Path>,
    ) -> Result<ReplicationClient, ReplicationError> {
        ReplicationClient::connect_with_tls(config, application_name, ca_file, true).await
    }

    /// Like [`ReplicationClient::connect_with_ca`]; `check_host` false (`sslmode=verify-ca`, see
    /// [`crate::endpoint::parse_url`]) verifies the certificate chain but not the host name.
    pub async fn connect_with_tls(
        config: &tokio_postgres::Config,
        application_name: &str,
        ca_file: Option<&Path>,
        check_host: bool,
    ) -> Result<ReplicationClient, ReplicationError> {
        if let Some(pooler) = connect::supabase_pooler(config, true) {
            return Err(pooler.into());
        }
        let tls = (ca_file, check_host);
        // Like libpq, and like the SQL sessions: each host in turn, each within the connect
        // timeout, until one takes us.
        first_to_answer(
            config,
            |candidate| async move {
                connect(config, candidate, application_name, tls)
                    .await
                    .map_err(|err| match err {
                        ReplicationError::Server { message, .. }
                            if let Some(pooler) = connect::pooler_refusal(
                                &endpoint::single_host(config, candidate),
                                &message,
                                true,
                            ) =>
                        {
                            pooler.into()
                        }
                        // Which host refused, reset or turned the login down matters when the
                        // URL names several.
                        ReplicationError::Io(err) => ReplicationError::Io(std::io::Error::new(
                            err.kind(),
                            format!(
                                "connecting to {}: {err}",
                                endpoint::host_label(config, candidate)
                            ),
                        )),
                        ReplicationError::Server {
                            code,
                            message,
                            detail,
                        } => ReplicationError::Server {
                            code,
                            message: format!(
                                "{message} (connecting to {})",
                                endpoint::host_label(config, candidate)
                            ),
                            detail,
                        },
                        ReplicationError::Auth(why) => ReplicationError::Auth(format!(
                            "{why} (connecting to {})",
                            endpoint::host_label(config, candidate)
                        )),
                        err => err,
                    })
            },
            |host, after| {
                ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {host} timed out after {after:?}"),
                ))
            },
            |err| matches!(err, ReplicationError::Pooler(_)),
        )
        .await
    }

    /// A server parameter reported at startup or since, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The process ID of the walsender serving this connection.
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    /// Runs one simple query (a replication command, or SQL) and returns all rows as text.
    ///
    /// Rows of every statement in `sql` are returned together. A server error is returned only
    /// after the server is ready again, so the client stays usable after it. COPY is not
    /// supported and gives a protocol error.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.conn.encode(|buf| frontend::query(sql, buf))?;
        self.conn.flush().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let message = self.conn.read().await?;
            match message {
                Backend::Message(Message::DataRow(body)) => rows.push(text_row(&body)?),
                Backend::Message(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse,
                ) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    failure = Some(server_error(body.fields()));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(body)) => self.record_parameter(&body)?,
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return match failure {
                        Some(err) => Err(err),
                        None => Ok(rows),
                    };
                }
                other => return Err(unexpected(&other, "in a simple query")),
            }
        }
    }

    /// Asks the server who it is and where its WAL ends.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [row] = rows.as_slice() else {
            return Err(bad_answer("IDENTIFY_SYSTEM", "one row"));
        };
        let [Some(system_id), Some(timeline), Some(xlog_pos), dbname] = row.as_slice() else {
            return Err(bad_answer("IDENTIFY_SYSTEM", "four columns"));
        };
        Ok(SystemInfo {
            system_id: system_id.clone(),
            timeline: timeline
                .parse()
                .map_err(|_| bad_answer("IDENTIFY_SYSTEM", "a numeric timeline"))?,
            xlog_pos: parse_lsn("IDENTIFY_SYSTEM", xlog_pos)?,
            dbname: dbname.clone(),
        })
    }

    /// The history file of `timeline` (`TIMELINE_HISTORY`): one line per earlier timeline with
    /// the position where it ended. Timeline 1 has none; the server answers with an error.
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<String, ReplicationError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        let Some(Some(content)) = rows.first().and_then(|row| row.get(1)) else {
            return Err(bad_answer("TIMELINE_HISTORY", "a content column"));
        };
        Ok(content.clone())
    }

    /// Creates a logical slot for pgoutput without exporting a snapshot, and returns its
    /// consistent point: the first LSN the slot will stream.
    ///
    /// An existing slot gives a server error with code `42710`.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, ReplicationError> {
        wire::validate_slot_name(slot)?;
        let command = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            sql::quote_ident(slot)
        );
        let rows = self.simple_query(&command).await?;
        let Some(Some(consistent_point)) = rows.first().and_then(|row| row.get(1)) else {
            return Err(bad_answer("CREATE_REPLICATION_SLOT", "a consistent point"));
        };
        let lsn = parse_lsn("CREATE_REPLICATION_SLOT", consistent_point)?;
        tracing::info!(slot, consistent_point = %lsn, "created replication slot");
        Ok(lsn)
    }

    /// Starts streaming `publication` from `slot` at `start`. On PostgreSQL 14 and later with
    /// `messages 'true'`, so that logical decoding messages with invalidator's prefix, which
    /// delete nothing, are seen and counted as ignored; and, when `stream_large` is set, with
    /// protocol version 2 and `streaming 'on'`, so that a transaction larger than the server's
    /// `logical_decoding_work_mem` arrives in blocks as it is decoded instead of spilling to disk
    /// until its commit. Otherwise (and on 13) with protocol version 1.
    ///
    /// A slot that is busy elsewhere gives code `55006`, a missing one `42704`; in both cases the
    /// connection is consumed, so reconnect to try again.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        stream_large: bool,
    ) -> Result<ReplicationStream, ReplicationError> {
        wire::validate_slot_name(slot)?;
        wire::validate_publication_name(publication)?;
        // publication_names is a list of identifiers inside a string, so the name is quoted as an
        // identifier (keeping case, commas and quotes) and then as a literal.
        let since_14 = self
            .parameter("server_version")
            .is_some_and(|v| wire::major_version(v) >= 14);
        let protocol = if since_14 && stream_large {
            "proto_version '2', streaming 'on'"
        } else {
            "proto_version '1'"
        };
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({protocol}, publication_names {}{})",
            sql::quote_ident(slot),
            sql::quote_literal(&sql::quote_ident(publication)),
            if since_14 { ", messages 'true'" } else { "" },
        );
        self.conn.encode(|buf| frontend::query(&command, buf))?;
        self.conn.flush().await?;
        loop {
            match self.conn.read().await? {
                Backend::CopyBothResponse => {
                    tracing::info!(slot, %start, publication, "replication started");
                    return Ok(ReplicationStream {
                        conn: self.conn,
                        server_done: false,
                    });
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(body)) => self.record_parameter(&body)?,
                other => return Err(unexpected(&other, "in answer to START_REPLICATION")),
            }
        }
    }

    /// Remembers a server parameter.
    fn record_parameter(&mut self, body: &ParameterStatusBody) -> Result<(), ReplicationError> {
        let malformed =
            |err| ReplicationError::Protocol(format!("malformed ParameterStatus: {err}"));
        let name = body.name().map_err(malformed)?;
        let value = body.value().map_err(malformed)?;
        self.parameters.insert(name.to_owned(), value.to_owned());
        Ok(())
    }
}

/// Opens the socket to host number `candidate`, sends the startup message, authenticates and
/// waits until the server is ready; refuses a read-only server when `target_session_attrs`
/// asks for read-write.
async fn connect(
    config: &tokio_postgres::Config,
    candidate: usize,
    application_name: &str,
    tls: (Option<&Path>, bool),
) -> Result<ReplicationClient, ReplicationError> {
    if config.get_channel_binding() == ChannelBinding::Require {
        return Err(ReplicationError::Invalid(
            "channel_binding=require is not supported; use prefer or disable".to_owned(),
        ));
    }
    let user = config.get_user().ok_or_else(|| {
        ReplicationError::Invalid("the connection settings name no user".to_owned())
    })?;
    let (socket, host) = open_socket(config, candidate).await?;
    let socket = match host {
        Some(host) => negotiate_tls(config, tls, &host, socket).await?,
        // Postgres has no TLS on Unix sockets; like libpq, sslmode does not apply there.
        None => socket,
    };
    let mut conn = Connection::new(socket);

    let mut params = vec![
        ("user", user),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
        ("application_name", application_name),
    ];
    if let Some(dbname) = config.get_dbname() {
        params.push(("database", dbname));
    }
    let options = startup_options(config.get_options())?;
    params.push(("options", &options));
    conn.encode(|buf| frontend::startup_message(params.iter().copied(), buf))?;
    conn.flush().await?;
    authenticate(&mut conn, user, config.get_password()).await?;

    let mut client = ReplicationClient {
        conn,
        parameters: HashMap::new(),
        process_id: 0,
    };
    loop {
        match client.conn.read().await? {
            Backend::Message(Message::ParameterStatus(body)) => client.record_parameter(&body)?,
            Backend::Message(Message::BackendKeyData(body)) => {
                client.process_id = body.process_id();
            }
            Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(server_error(body.fields()));
            }
            Backend::Message(Message::ReadyForQuery(_)) => break,
            other => return Err(unexpected(&other, "after authentication")),
        }
    }
    if config.get_target_session_attrs() == TargetSessionAttrs::ReadWrite {
        // What libpq asks too; a standby answers `on` (and so does a server whose
        // default_transaction_read_only is on: it could not run setup either).
        let rows = client.simple_query("SHOW transaction_read_only").await?;
        if rows
            .first()
            .and_then(|row| row.first())
            .cloned()
            .flatten()
            .as_deref()
            != Some("off")
        {
            // Best effort: the refusal is the answer, however the goodbye goes.
            let _ = client.conn.terminate().await;
            return Err(ReplicationError::ReadOnly);
        }
    }
    tracing::debug!(
        pid = client.process_id,
        server_version = client.parameter("server_version").unwrap_or("unknown"),
        "replication connection ready"
    );
    Ok(client)
}

/// Connects to host (or `hostaddr`) number `candidate` of the configuration, on its port (one
/// port given is every host's); returns the socket and, for TCP, the name the server's
/// certificate must carry (the host, else the address).
async fn open_socket(
    config: &tokio_postgres::Config,
    candidate: usize,
) -> Result<(Box<dyn Socket>, Option<String>), ReplicationError> {
    let port = endpoint::port(config, candidate);
    let tcp = |stream: TcpStream,
               name: String|
     -> Result<(Box<dyn Socket>, Option<String>), ReplicationError> {
        // Status updates are tiny and must not wait for Nagle's algorithm.
        stream.set_nodelay(true)?;
        Ok((Box::new(stream), Some(name)))
    };
    let host = config.get_hosts().get(candidate);
    if let Some(addr) = config.get_hostaddrs().get(candidate) {
        let name = match host {
            Some(Host::Tcp(host)) => host.clone(),
            _ => addr.to_string(),
        };
        return tcp(TcpStream::connect((*addr, port)).await?, name);
    }
    match host {
        Some(Host::Tcp(host)) => tcp(
            TcpStream::connect((host.as_str(), port)).await?,
            host.clone(),
        ),
        #[cfg(unix)]
        Some(Host::Unix(dir)) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok((Box::new(tokio::net::UnixStream::connect(path).await?), None))
        }
        None => Err(ReplicationError::Invalid(
            "the connection settings name no host".to_owned(),
        )),
    }
}

/// Applies `sslmode` to a fresh TCP socket: sends an SSLRequest (unless disabled, or
/// `sslnegotiation=direct`), reads the one-byte answer and runs the TLS handshake on 'S';
/// `tls` is the CA file and whether the certificate must name the host.
async fn negotiate_tls(
    config: &tokio_postgres::Config,
    (ca_file, check_host): (Option<&Path>, bool),
    host: &str,
    mut socket: Box<dyn Socket>,
) -> Result<Box<dyn Socket>, ReplicationError> {
    let mode = config.get_ssl_mode();
    let direct = config.get_ssl_negotiation() == SslNegotiation::Direct;
    match mode {
        SslMode::Disable => return Ok(socket),
        SslMode::Prefer if direct => {
            return Err(ReplicationError::Invalid(
                "sslnegotiation=direct needs sslmode=require".to_owned(),
            ));
        }
        _ => {}
    }
    if !direct {
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        socket.write_all(&request).await?;
        socket.flush().await?;
        // Exactly one byte: anything the server sent after it would be unauthenticated plain
        // text in front of the handshake (CVE-2021-23222), so nothing more is read here.
        match socket.read_u8().await? {
            b'S' => {}
            b'N' if mode == SslMode::Prefer => return Ok(socket),
            b'N' => {
                return Err(TlsError::Refused {
                    host: host.to_owned(),
                }
                .into());
            }
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "unexpected answer {:?} to SSLRequest",
                    char::from(other)
                )));
            }
        }
    }
    let tls = client_config(ca_file, direct, verifies(mode, ca_file), check_host)?;
    let stream = handshake(tls, host, socket).await?;
    Ok(Box::new(stream))
}

/// Answers the server's authentication requests until it says `AuthenticationOk`.
async fn authenticate(
    conn: &mut Connection,
    user: &str,
    password: Option<&[u8]>,
) -> Result<(), ReplicationError> {
    let need_password = || {
        password.ok_or_else(|| {
            ReplicationError::Auth("the server asks for a password but none is configured".into())
        })
    };
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let message = match conn.read().await? {
            Backend::Message(message) => message,
            other => return Err(unexpected(&other, "during authentication")),
        };
        match message {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                let password = need_password()?;
                conn.encode(|buf| frontend::password_message(password, buf))?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = authentication::md5_hash(user.as_bytes(), need_password()?, body.salt());
                conn.encode(|buf| frontend::password_message(hash.as_bytes(), buf))?;
            }
            Message::AuthenticationSasl(body) => {
                let password = need_password()?;
                let mut offers_scram = false;
                let mut mechanisms = body.mechanisms();
                while let Some(mechanism) = mechanisms.next().map_err(|err| {
                    ReplicationError::Protocol(format!("malformed SASL mechanism list: {err}"))
                })? {
                    offers_scram |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !offers_scram {
                    return Err(ReplicationError::Auth(
                        "the server offers no SASL mechanism this client supports \
                         (SCRAM-SHA-256 without channel binding)"
                            .into(),
                    ));
                }
                // Without TLS there is no channel to bind to.
                let exchange =
                    sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
                conn.encode(|buf| {
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, exchange.message(), buf)
                })?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let exchange = scram.as_mut().ok_or_else(|| {
                    ReplicationError::Protocol("SASL continue before SASL start".into())
                })?;
                exchange.update(body.data()).map_err(|err| {
                    ReplicationError::Auth(format!("SCRAM exchange failed: {err}"))
                })?;
                conn.encode(|buf| frontend::sasl_response(exchange.message(), buf))?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut exchange = scram.take().ok_or_else(|| {
                    ReplicationError::Protocol("SASL final before SASL start".into())
                })?;
                // Checking the server's proof guards against a server that does not know the
                // password pretending to authenticate us.
                exchange.finish(body.data()).map_err(|err| {
                    ReplicationError::Auth(format!("the server's SCRAM proof is invalid: {err}"))
                })?;
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationSspi => {
                return Err(ReplicationError::Auth(
                    "the server asks for an unsupported authentication method \
                     (only trust, password, md5 and scram-sha-256 are supported)"
                        .into(),
                ));
            }
            Message::ErrorResponse(body) => return Err(server_error(body.fields())),
            Message::NoticeResponse(body) => log_notice(body.fields()),
            other => {
                return Err(unexpected(
                    &Backend::Message(other),
                    "during authentication",
                ));
            }
        }
        conn.flush().await?;
    }
}

/// Decodes one text-format DataRow.
fn text_row(body: &DataRowBody) -> Result<Vec<Option<String>>, ReplicationError> {
    let malformed = |what: String| ReplicationError::Protocol(format!("malformed DataRow: {what}"));
    let mut values = Vec::new();
    let mut ranges = body.ranges();
    while let Some(range) = ranges.next().map_err(|err| malformed(err.to_string()))? {
        let value = match range {
            None => None,
            Some(range) => {
                let bytes = body
                    .buffer()
                    .get(range)
                    .ok_or_else(|| malformed("value out of bounds".into()))?;
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| malformed("value is not UTF-8".into()))?;
                Some(text)
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// Parses an LSN the server returned in text form.
fn parse_lsn(command: &str, text: &str) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|_| bad_answer(command, "an LSN in X/Y form"))
}

/// The error for a command whose result set does not have the documented shape.
fn bad_answer(command: &str, expected: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("{command} returned a result without {expected}"))
}

/// A replication connection in streaming (copy-both) mode.
pub struct ReplicationStream {
    /// The framed socket.
    conn: Connection,
    /// The server has sent CopyDone: no more stream messages will come.
    server_done: bool,
}

impl ReplicationStream {
    /// Waits for the next stream message; `None` once the server has ended the stream cleanly.
    ///
    /// Cancel-safe: dropping the future (a `tokio::select!` branch that lost) loses no bytes;
    /// the next call resumes with the same message.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        while !self.server_done {
            match self.conn.read().await? {
                Backend::Message(Message::CopyData(body)) => {
                    return wire::decode_copy_data(body.into_bytes()).map(Some);
                }
                Backend::Message(Message::CopyDone) => self.server_done = true,
                // A walsender stopping with its server (smart or fast shutdown) sends
                // CommandComplete without CopyDone once we have confirmed all it sent, then exits.
                Backend::Message(Message::CommandComplete(_)) => self.server_done = true,
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                // A parameter change (e.g. by a reload) means nothing to the stream.
                Backend::Message(Message::ParameterStatus(_)) => {}
                other => return Err(unexpected(&other, "while streaming")),
            }
        }
        Ok(None)
    }

    /// Tells the server how far WAL has been received (`write`), made durable (`flush`; the
    /// server may recycle WAL and advances the slot up to here) and applied (`apply`).
    ///
    /// `reply_requested` asks the server to answer at once with a keepalive, which checks that
    /// the connection is alive. If this future is dropped before it completes, the rest of the
    /// update is sent ahead of the next one.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let update =
            wire::encode_status_update(write, flush, apply, wire::now_pg_us(), reply_requested);
        self.conn.encode(|buf| {
            frontend::CopyData::new(&update[..])?.write(buf);
            Ok(())
        })?;
        self.conn.flush().await?;
        tracing::trace!(%write, %flush, %apply, reply_requested, "sent standby status update");
        Ok(())
    }

    /// Ends streaming politely: sends CopyDone, drains what the server still sends until it is
    /// ready for a command, then says goodbye and closes the socket.
    ///
    /// Best effort, for shutdown: it gives up after a few seconds and only logs a failure, since
    /// the slot keeps its confirmed position however the connection ends.
    pub async fn finish(mut self) {
        match tokio::time::timeout(FINISH_TIMEOUT, self.close()).await {
            Ok(Ok(())) => tracing::debug!("replication stream closed"),
            Ok(Err(err)) => tracing::info!(error = %err, "replication stream closed uncleanly"),
            Err(_) => tracing::info!("the server did not acknowledge the end of streaming in time"),
        }
    }

    /// The steps of `finish`, without its time limit.
    async fn close(&mut self) -> Result<(), ReplicationError> {
        self.conn.encode(|buf| {
            frontend::copy_done(buf);
            Ok(())
        })?;
        self.conn.flush().await?;
        loop {
            match self.conn.read().await? {
                Backend::Message(Message::ReadyForQuery(_)) => break,
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()));
                }
                // WAL already in flight, the server's CopyDone and CommandComplete.
                _ => {}
            }
        }
        self.conn.terminate().await
    }
}
