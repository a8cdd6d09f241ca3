//! Framing on top of a socket: whole backend messages in, buffered frontend messages out.
//!
//! Reads go into one owned buffer and a message is parsed only once all its bytes are there, so a
//! read that is dropped half-way (a `tokio::select!` branch that lost) loses nothing: the bytes
//! wait in the buffer for the next call.

use std::io;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorFields, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ReplicationError;

/// A byte stream to the server: TCP, a Unix socket, or an in-memory pipe in tests.
pub(super) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// Tag of CopyBothResponse, which `postgres-protocol`'s parser does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// The largest message length accepted. Postgres never builds a message over 1 GiB (its
/// allocation limit), so a larger length means a corrupt or hostile stream, and believing it
/// would let the peer make us allocate up to 4 GiB.
pub(super) const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Read at least this much per syscall so that small messages are batched.
const MIN_READ: usize = 8 * 1024;

/// Reserve at most this much ahead of bytes that have actually arrived, so a large announced
/// length costs memory only as its bytes come in.
const MAX_READ_AHEAD: usize = 1 << 20;

/// One message from the server.
pub(super) enum Backend {
    /// The server entered copy-both mode: the replication stream starts.
    CopyBothResponse,
    /// Any message the `postgres-protocol` parser knows.
    Message(Message),
}

/// A socket with its read and write buffers.
pub(super) struct Connection {
    /// The transport.
    socket: Box<dyn Socket>,
    /// Bytes received but not yet parsed; only whole messages are taken out.
    read_buf: BytesMut,
    /// Encoded messages not yet written.
    write_buf: BytesMut,
}

impl Connection {
    /// Wraps a connected socket.
    pub(super) fn new(socket: Box<dyn Socket>) -> Connection {
        Connection {
            socket,
            read_buf: BytesMut::with_capacity(MIN_READ),
            write_buf: BytesMut::new(),
        }
    }

    /// Reads the next whole message.
    ///
    /// Cancel-safe: the only await point is `read_buf`, which either appends bytes to the owned
    /// buffer or does nothing, and parsing happens after it without awaiting.
    pub(super) async fn read(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(message) = self.parse_buffered()? {
                return Ok(message);
            }
            self.read_buf.reserve(self.read_ahead());
            if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    /// How many bytes to make room for before the next read.
    fn read_ahead(&self) -> usize {
        let missing = match announced_len(&self.read_buf) {
            Some(len) => (len + 1).saturating_sub(self.read_buf.len()),
            None => 0,
        };
        missing.clamp(MIN_READ, MAX_READ_AHEAD)
    }

    /// Takes one whole message out of the read buffer, if one is there.
    fn parse_buffered(&mut self) -> Result<Option<Backend>, ReplicationError> {
        let (Some(&tag), Some(len)) = (self.read_buf.first(), announced_len(&self.read_buf)) else {
            return Ok(None);
        };
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(ReplicationError::Protocol(format!(
                "message {:?} announces an invalid length of {len} bytes",
                char::from(tag)
            )));
        }
        if self.read_buf.len() <= len {
            return Ok(None);
        }
        let mut frame = self.read_buf.split_to(len + 1);
        if tag == COPY_BOTH_RESPONSE_TAG {
            // The body lists column formats, which carry nothing for replication.
            return Ok(Some(Backend::CopyBothResponse));
        }
        match Message::parse(&mut frame) {
            Ok(Some(message)) => Ok(Some(Backend::Message(message))),
            Ok(None) => Err(ReplicationError::Protocol(format!(
                "message {:?} was incomplete after framing",
                char::from(tag)
            ))),
            Err(err) => Err(ReplicationError::Protocol(format!(
                "malformed message {:?}: {err}",
                char::from(tag)
            ))),
        }
    }

    /// Appends one frontend message to the write buffer; on failure the buffer is unchanged.
    pub(super) fn encode(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> io::Result<()>,
    ) -> Result<(), ReplicationError> {
        let start = self.write_buf.len();
        encode(&mut self.write_buf).map_err(|err| {
            self.write_buf.truncate(start);
            // The only encoding failures are caller strings holding NUL or being over 2 GiB.
            ReplicationError::Invalid(format!("cannot encode message: {err}"))
        })
    }

    /// Writes every buffered message and flushes the socket.
    ///
    /// If this future is dropped, the unwritten rest stays buffered and goes out, in order,
    /// before anything encoded later.
    pub(super) async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.socket.write_all_buf(&mut self.write_buf).await?;
        self.socket.flush().await?;
        Ok(())
    }

    /// Says goodbye (Terminate) and shuts down the writing half, so the server sees a clean end
    /// of the session.
    pub(super) async fn terminate(&mut self) -> Result<(), ReplicationError> {
        self.encode(|buf| {
            postgres_protocol::message::frontend::terminate(buf);
            Ok(())
        })?;
        self.flush().await?;
        self.socket.shutdown().await?;
        Ok(())
    }
}

/// The length field of the buffered message header, if the header is complete.
fn announced_len(buf: &[u8]) -> Option<usize> {
    let bytes: [u8; 4] = buf.get(1..5)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(bytes)).ok()
}

/// The fields of an ErrorResponse or NoticeResponse that we keep.
pub(super) struct Report {
    /// The non-localized severity, e.g. `ERROR`, `FATAL`, `WARNING`.
    pub(super) severity: String,
    /// The SQLSTATE code.
    pub(super) code: String,
    /// The primary message.
    pub(super) message: String,
    /// The optional detail.
    pub(super) detail: Option<String>,
}

impl Report {
    /// Reads the fields of an ErrorResponse or NoticeResponse body.
    pub(super) fn parse(mut fields: ErrorFields<'_>) -> Result<Report, ReplicationError> {
        let mut report = Report {
            severity: String::new(),
            // Every Postgres since 7.4 sends a code; the generic one keeps a strange server usable.
            code: "XX000".to_owned(),
            message: String::new(),
            detail: None,
        };
        while let Some(field) = fields.next().map_err(|err| {
            ReplicationError::Protocol(format!("malformed error or notice fields: {err}"))
        })? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => report.severity = value,
                b'S' if report.severity.is_empty() => report.severity = value,
                b'C' => report.code = value,
                b'M' => report.message = value,
                b'D' => report.detail = Some(value),
                _ => {}
            }
        }
        Ok(report)
    }

    /// Turns an ErrorResponse into the error the caller sees.
    pub(super) fn into_error(self) -> ReplicationError {
        ReplicationError::Server {
            code: self.code,
            message: self.message,
            detail: self.detail,
        }
    }
}

/// Converts an ErrorResponse body into an error; a malformed body becomes a protocol error.
pub(super) fn server_error(fields: ErrorFields<'_>) -> ReplicationError {
    match Report::parse(fields) {
        Ok(report) => report.into_error(),
        Err(err) => err,
    }
}

/// Logs a NoticeResponse; warnings are logged as warnings, everything else as information.
pub(super) fn log_notice(fields: ErrorFields<'_>) {
    match Report::parse(fields) {
        Ok(notice) if notice.severity == "WARNING" => {
            tracing::warn!(code = %notice.code, message = %notice.message, "postgres warning");
        }
        Ok(notice) => {
            tracing::info!(
                severity = %notice.severity,
                code = %notice.code,
                message = %notice.message,
                "postgres notice"
            );
        }
        Err(err) => tracing::warn!(error = %err, "ignoring a malformed notice"),
    }
}

/// The error for a message that is valid but not expected at this point of the conversation.
pub(super) fn unexpected(message: &Backend, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected {} {during}", message_name(message)))
}

/// A readable name for a backend message, for error messages.
fn message_name(message: &Backend) -> &'static str {
    let message = match message {
        Backend::CopyBothResponse => return "CopyBothResponse",
        Backend::Message(message) => message,
    };
    match message {
        Message::AuthenticationOk
        | Message::AuthenticationCleartextPassword
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_)
        | Message::AuthenticationGss
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationScmCredential
        | Message::AuthenticationSspi => "authentication request",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "unknown message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};

    fn pipe() -> (Connection, DuplexStream) {
        let (ours, theirs) = duplex(64 * 1024);
        (Connection::new(Box::new(ours)), theirs)
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn copy_both_response_is_recognised_before_the_parser_sees_it() {
        let (mut conn, mut server) = pipe();
        server.write_all(&frame(b'W', &[0, 0, 0])).await.unwrap();
        server.write_all(&frame(b'c', &[])).await.unwrap();
        assert!(matches!(
            conn.read().await.unwrap(),
            Backend::CopyBothResponse
        ));
        assert!(matches!(
            conn.read().await.unwrap(),
            Backend::Message(Message::CopyDone)
        ));
    }

    #[tokio::test]
    async fn lengths_over_one_gib_are_rejected_without_allocating() {
        let (mut conn, mut server) = pipe();
        let mut header = vec![b'd'];
        header.extend_from_slice(&(u32::try_from(MAX_MESSAGE_LEN).unwrap() + 1).to_be_bytes());
        server.write_all(&header).await.unwrap();
        let Err(err) = conn.read().await else {
            panic!("a 1 GiB + 1 message was accepted");
        };
        assert!(err.to_string().contains("invalid length"), "{err}");
        assert!(conn.read_buf.capacity() < MAX_READ_AHEAD * 2);
    }

    #[tokio::test]
    async fn lengths_below_four_are_rejected() {
        let (mut conn, mut server) = pipe();
        server.write_all(&[b'Z', 0, 0, 0, 3]).await.unwrap();
        assert!(matches!(
            conn.read().await,
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn unknown_and_malformed_messages_are_protocol_errors() {
        let (mut conn, mut server) = pipe();
        server.write_all(&frame(b'?', &[])).await.unwrap();
        assert!(matches!(
            conn.read().await,
            Err(ReplicationError::Protocol(_))
        ));
        let (mut conn, mut server) = pipe();
        // ReadyForQuery needs one status byte.
        server.write_all(&frame(b'Z', &[])).await.unwrap();
        assert!(matches!(
            conn.read().await,
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn end_of_stream_is_closed() {
        let (mut conn, server) = pipe();
        drop(server);
        assert!(matches!(conn.read().await, Err(ReplicationError::Closed)));
    }

    #[tokio::test]
    async fn error_fields_keep_code_message_and_detail() {
        let (mut conn, mut server) = pipe();
        let body = b"SFATAL\0VFATAL\0C55006\0Mslot busy\0Dactive for PID 7\0\0";
        server.write_all(&frame(b'E', body)).await.unwrap();
        let Backend::Message(Message::ErrorResponse(body)) = conn.read().await.unwrap() else {
            panic!("not an ErrorResponse");
        };
        let err = server_error(body.fields());
        assert_eq!(err.code(), Some("55006"));
        assert!(matches!(
            err,
            ReplicationError::Server { message, detail: Some(detail), .. }
                if message == "slot busy" && detail == "active for PID 7"
        ));
    }

    #[test]
    fn failed_encoding_leaves_the_write_buffer_unchanged() {
        let (mut conn, _server) = pipe();
        conn.encode(|buf| postgres_protocol::message::frontend::query("SELECT 1", buf))
            .unwrap();
        let before = conn.write_buf.clone();
        let err = conn
            .encode(|buf| postgres_protocol::message::frontend::query("a\0b", buf))
            .unwrap_err();
        assert!(matches!(err, ReplicationError::Invalid(_)));
        assert_eq!(conn.write_buf, before);
    }
}
