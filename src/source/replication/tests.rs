//! Tests of the client against an in-memory pipe, where the server's bytes must be exact. The
//! tests against a real server use the shared harness: `tests/replication.rs`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;
use crate::error::Classify;

/// A stream whose server side the test writes by hand.
fn stream_over_pipe() -> (ReplicationStream, DuplexStream) {
    let (ours, theirs) = duplex(64 * 1024);
    let stream = ReplicationStream {
        conn: Connection::new(Box::new(ours)),
        server_done: false,
    };
    (stream, theirs)
}

/// One backend message: tag, length, body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A CopyData frame holding an XLogData message.
fn xlog_frame(start: u64, data: &[u8]) -> Vec<u8> {
    let mut body = vec![b'w'];
    body.extend_from_slice(&start.to_be_bytes());
    body.extend_from_slice(&(start + 100).to_be_bytes());
    body.extend_from_slice(&0i64.to_be_bytes());
    body.extend_from_slice(data);
    frame(b'd', &body)
}

#[tokio::test]
async fn a_dropped_next_future_loses_no_bytes() {
    let (mut stream, mut server) = stream_over_pipe();
    let whole = xlog_frame(7, &[b'I'; 1000]);
    let (first, rest) = whole.split_at(300);
    server.write_all(first).await.unwrap();
    let pending = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
    assert!(pending.is_err(), "a third of a frame produced a message");
    server.write_all(rest).await.unwrap();
    server.write_all(&xlog_frame(8, b"C")).await.unwrap();
    let Some(ReplicationMessage::XLogData {
        wal_start, data, ..
    }) = stream.next().await.unwrap()
    else {
        panic!("expected XLogData");
    };
    assert_eq!((wal_start, data.len()), (Lsn(7), 1000));
    assert!(matches!(
        stream.next().await.unwrap(),
        Some(ReplicationMessage::XLogData {
            wal_start: Lsn(8),
            ..
        })
    ));
}

#[tokio::test]
async fn next_is_none_once_the_server_ends_the_copy() {
    let (mut stream, mut server) = stream_over_pipe();
    server.write_all(&xlog_frame(1, b"B")).await.unwrap();
    server.write_all(&frame(b'c', &[])).await.unwrap();
    assert!(stream.next().await.unwrap().is_some());
    assert!(stream.next().await.unwrap().is_none());
    // Later calls do not read: the server may be sending CommandComplete by now.
    assert!(stream.next().await.unwrap().is_none());
}

#[tokio::test]
async fn a_walsender_shutting_down_ends_the_stream_with_command_complete() {
    let (mut stream, mut server) = stream_over_pipe();
    server.write_all(&xlog_frame(1, b"B")).await.unwrap();
    server.write_all(&frame(b'C', b"COPY 0\0")).await.unwrap();
    assert!(stream.next().await.unwrap().is_some());
    assert!(stream.next().await.unwrap().is_none());
}

#[tokio::test]
async fn an_error_while_streaming_keeps_its_code() {
    let (mut stream, mut server) = stream_over_pipe();
    let body = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0";
    server.write_all(&frame(b'E', body)).await.unwrap();
    let err = stream.next().await.unwrap_err();
    assert_eq!(err.code(), Some("57P01"));
    assert!(err.is_transient());
}

#[tokio::test]
async fn garbage_while_streaming_is_an_error_not_a_panic() {
    for body in [&b""[..], b"w", b"k\0\0", b"x123456789"] {
        let (mut stream, mut server) = stream_over_pipe();
        server.write_all(&frame(b'd', body)).await.unwrap();
        assert!(
            matches!(stream.next().await, Err(ReplicationError::Protocol(_))),
            "{body:?}"
        );
    }
}

#[tokio::test]
async fn status_updates_go_out_as_one_copy_data_frame() {
    let (mut stream, mut server) = stream_over_pipe();
    stream
        .send_status(Lsn(1), Lsn(2), Lsn(3), true)
        .await
        .unwrap();
    let mut sent = vec![0u8; 1 + 4 + wire::STATUS_UPDATE_LEN];
    server.read_exact(&mut sent).await.unwrap();
    assert_eq!(sent[0], b'd');
    assert_eq!(&sent[1..5], &38u32.to_be_bytes());
    assert_eq!(sent[5], b'r');
    assert_eq!(&sent[14..22], &2u64.to_be_bytes());
    assert_eq!(sent[38], 1);
}

#[test]
fn futures_are_send_so_they_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let config = tokio_postgres::Config::new();
    assert_send(&ReplicationClient::connect(&config, "test"));
    let (mut stream, _server) = stream_over_pipe();
    assert_send(&stream.next());
    assert_send(&stream.send_status(Lsn(0), Lsn(0), Lsn(0), false));
    assert_send(&stream.finish());
}

#[tokio::test]
async fn finish_sends_copy_done_then_terminate() {
    let (stream, mut server) = stream_over_pipe();
    let finished = tokio::spawn(stream.finish());
    let mut copy_done = [0u8; 5];
    server.read_exact(&mut copy_done).await.unwrap();
    assert_eq!(copy_done, [b'c', 0, 0, 0, 4]);
    // In-flight WAL, the server's CopyDone and CommandComplete are drained before ReadyForQuery.
    server.write_all(&xlog_frame(1, b"B")).await.unwrap();
    server.write_all(&frame(b'c', &[])).await.unwrap();
    server
        .write_all(&frame(b'C', b"START_REPLICATION\0"))
        .await
        .unwrap();
    server.write_all(&frame(b'Z', b"I")).await.unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, [b'X', 0, 0, 0, 4]);
    finished.await.unwrap();
}

/// A one-connection server that answers the SSLRequest with `answer` and returns what it read
/// afterwards (up to the client closing).
async fn answer_ssl_request(answer: u8) -> (u16, tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = vec![0; 8];
        socket.read_exact(&mut request).await.unwrap();
        socket.write_all(&[answer]).await.unwrap();
        let mut rest = Vec::new();
        // Read the startup message, if one comes, then hang up.
        let mut chunk = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.read(&mut chunk)).await
        {
            rest.extend_from_slice(&chunk[..n]);
        }
        (request, rest)
    });
    (port, server)
}

#[tokio::test]
async fn sslmode_require_fails_permanently_when_the_server_refuses_tls() {
    let (port, server) = answer_ssl_request(b'N').await;
    let config: tokio_postgres::Config =
        format!("host=127.0.0.1 port={port} user=u password=hunter2 sslmode=require")
            .parse()
            .unwrap();
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("connected without TLS");
    };
    let (request, rest) = server.await.unwrap();
    // SSLRequest: length 8, code 80877103.
    assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
    assert!(rest.is_empty(), "the startup message went out in clear");
    assert!(matches!(err, ReplicationError::Tls(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1") && text.contains("sslmode=require"),
        "{text}"
    );
    assert!(!text.contains("hunter2"));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn sslmode_prefer_falls_back_to_plain_when_the_server_refuses_tls() {
    let (port, server) = answer_ssl_request(b'N').await;
    let config: tokio_postgres::Config = format!("host=127.0.0.1 port={port} user=u")
        .parse()
        .unwrap();
    let _ = ReplicationClient::connect(&config, "test").await;
    let (request, rest) = server.await.unwrap();
    assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
    // The startup message (protocol 3.0) follows in clear on the same socket.
    assert_eq!(rest.get(4..8), Some(&[0, 3, 0, 0][..]), "{rest:?}");
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    // A port the kernel just handed out and took back: nothing listens on it.
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config: tokio_postgres::Config = format!("host=127.0.0.1 port={port} user=u")
        .parse()
        .unwrap();
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("connected to a closed port");
    };
    assert!(matches!(err, ReplicationError::Io(_)), "{err}");
    assert!(err.is_transient());
}

#[test]
fn the_urls_options_come_first_and_an_unpaired_trailing_backslash_is_refused() {
    let ours = crate::source::text_form_options();
    assert_eq!(startup_options(None).unwrap(), ours);
    assert_eq!(
        startup_options(Some("-c search_path=app")).unwrap(),
        format!("-c search_path=app {ours}")
    );
    // A doubled backslash is a backslash of the value: nothing is escaped past it.
    assert!(startup_options(Some(r"-c x=a\\")).is_ok());
    for unpaired in [r"-c search_path=x\", r"-c x=a\\\"] {
        let err = startup_options(Some(unpaired)).unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("unpaired backslash"), "{err}");
    }
}
