//! Tests of the client: against an in-memory pipe where the server's bytes must be exact, and
//! against a private Postgres cluster (wal_level=logical) for everything else.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

/// How long any single wait on the server may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---------------------------------------------------------------------------------------------
// Against an in-memory pipe.

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

#[tokio::test]
async fn sslmode_require_is_refused_before_connecting() {
    // Port 1 is never listened on: reaching the network would fail differently.
    let config: tokio_postgres::Config =
        "host=127.0.0.1 port=1 user=u password=hunter2 sslmode=require"
            .parse()
            .unwrap();
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("connected without TLS");
    };
    assert!(matches!(err, ReplicationError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("sslmode=require"));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let port = free_port();
    let config: tokio_postgres::Config = format!("host=127.0.0.1 port={port} user=u")
        .parse()
        .unwrap();
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("connected to a closed port");
    };
    assert!(matches!(err, ReplicationError::Io(_)), "{err}");
    assert!(err.is_transient());
}

// ---------------------------------------------------------------------------------------------
// Against a private cluster.

/// A throwaway Postgres cluster with wal_level=logical, stopped and deleted on drop.
struct Cluster {
    /// The directory holding the data directory, the socket directory and the log.
    root: PathBuf,
    /// The Postgres binaries.
    bin: PathBuf,
    /// The TCP port on 127.0.0.1.
    port: u16,
}

impl Cluster {
    /// Creates and starts a cluster with trust authentication.
    fn start() -> Cluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "invalidator-repl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sock")).unwrap();
        run(Command::new("chown").arg("-R").arg("postgres:").arg(&root));
        let bin = pg_bindir();
        let data = root.join("data");
        run(as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        // A port can be taken between probing and binding; a fresh one fixes that.
        for _ in 0..3 {
            let port = free_port();
            let options = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {} -c wal_level=logical \
                 -c fsync=off -c max_wal_senders=10 -c max_replication_slots=10",
                root.join("sock").display()
            );
            let started = as_postgres(&bin.join("pg_ctl"))
                .args(["-w", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(root.join("log"))
                .args(["-o", &options, "start"])
                .output()
                .unwrap();
            if started.status.success() {
                return Cluster { root, bin, port };
            }
        }
        panic!("postgres did not start; see {}", root.join("log").display());
    }

    /// Settings for connecting over TCP as `user` to database `postgres`.
    fn config(&self, user: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("postgres");
        config
    }

    /// A connection as the superuser.
    async fn connect(&self) -> ReplicationClient {
        within(
            "connect",
            ReplicationClient::connect(&self.config("postgres"), "test"),
        )
        .await
        .unwrap()
    }

    /// Replaces pg_hba.conf and waits until new connections see it.
    async fn set_hba(&self, hba: &str, admin: &mut ReplicationClient) {
        std::fs::write(self.root.join("data/pg_hba.conf"), hba).unwrap();
        admin.simple_query("SELECT pg_reload_conf()").await.unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.root.join("data"))
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The directory of `initdb` and `pg_ctl`, from `pg_config` or the newest Debian install.
fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed")
        .map(|entry| entry.unwrap().path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL binaries found")
}

/// A command that runs as the `postgres` user, which initdb and postgres insist on.
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

/// Runs a command and fails the test if it fails.
fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs SQL and returns the first column of the first row.
async fn scalar(client: &mut ReplicationClient, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.unwrap();
    rows.into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten())
}

/// The next XLogData payload, skipping keepalives.
async fn next_xlog(stream: &mut ReplicationStream) -> Bytes {
    within("XLogData", async {
        loop {
            match stream.next().await.unwrap() {
                Some(ReplicationMessage::XLogData { data, .. }) => return data,
                Some(ReplicationMessage::Keepalive { .. }) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await
}

/// The end LSN of a pgoutput Commit message: tag, flags, commit LSN, then end LSN.
fn commit_end_lsn(commit: &[u8]) -> Lsn {
    assert_eq!(commit[0], b'C');
    Lsn(u64::from_be_bytes(commit[10..18].try_into().unwrap()))
}

/// Creates `table` (id int, payload text) and a publication for it.
async fn table_and_publication(client: &mut ReplicationClient, table: &str, publication: &str) {
    let sql = format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, payload text); \
         CREATE PUBLICATION {} FOR TABLE {table}",
        wire::quote_ident(publication)
    );
    client.simple_query(&sql).await.unwrap();
}

#[tokio::test]
async fn trust_connect_identifies_the_system_over_tcp_and_unix_socket() {
    let cluster = Cluster::start();
    let mut client = cluster.connect().await;
    assert!(client.process_id() > 0);
    assert!(client.parameter("server_version").is_some());
    let info = client.identify_system().await.unwrap();
    assert_eq!(info.timeline, 1);
    assert_eq!(info.dbname.as_deref(), Some("postgres"));
    assert!(info.xlog_pos > Lsn(0));
    assert!(info.system_id.parse::<u64>().is_ok(), "{}", info.system_id);
    let app = scalar(
        &mut client,
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(app.as_deref(), Some("test"));

    let mut config_unix = tokio_postgres::Config::new();
    config_unix
        .host_path(cluster.root.join("sock"))
        .port(cluster.port)
        .user("postgres")
        .dbname("postgres");
    let mut unix = ReplicationClient::connect(&config_unix, "test")
        .await
        .unwrap();
    assert_eq!(
        unix.identify_system().await.unwrap().system_id,
        info.system_id
    );
}

#[tokio::test]
async fn a_failed_query_keeps_its_code_and_the_client_usable() {
    let cluster = Cluster::start();
    let mut client = cluster.connect().await;
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code(), Some("22012"));
    let rows = client
        .simple_query("SELECT 'a', NULL; SELECT 'é'")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("a".to_owned()), None], vec![Some("é".to_owned())]]
    );
    assert!(client.simple_query("").await.unwrap().is_empty());
}

#[tokio::test]
async fn password_methods_authenticate_and_failures_are_permanent() {
    let cluster = Cluster::start();
    let mut admin = cluster.connect().await;
    admin
        .simple_query(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret'; \
             CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain-secret'; \
             CREATE ROLE norepl_user LOGIN PASSWORD 'norepl-secret'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret'",
        )
        .await
        .unwrap();
    cluster
        .set_hba(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all plain_user 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
            &mut admin,
        )
        .await;
    // The postmaster reloads asynchronously: wait until a password is demanded.
    within("pg_hba.conf reload", async {
        while !matches!(
            ReplicationClient::connect(&cluster.config("scram_user"), "test").await,
            Err(ReplicationError::Auth(_))
        ) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    for (user, password) in [
        ("scram_user", "scram-secret"),
        ("md5_user", "md5-secret"),
        ("plain_user", "plain-secret"),
    ] {
        let mut config = cluster.config(user);
        config.password(password);
        let mut client = ReplicationClient::connect(&config, "test")
            .await
            .unwrap_or_else(|err| panic!("{user}: {err}"));
        client.identify_system().await.unwrap();
    }

    let wrong = "wrong-password-0451";
    let mut config = cluster.config("scram_user");
    config.password(wrong);
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("a wrong password was accepted");
    };
    assert_eq!(err.code(), Some("28P01"));
    assert!(!err.is_transient());
    assert!(!err.to_string().contains(wrong), "{err}");
    assert!(!format!("{err:?}").contains(wrong), "{err:?}");

    let mut config = cluster.config("norepl_user");
    config.password("norepl-secret");
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("a role without REPLICATION opened a walsender");
    };
    assert_eq!(err.code(), Some("42501"), "{err}");
    assert!(!err.is_transient());

    let mut config = cluster.config("postgres");
    config.dbname("no_such_database");
    let Err(err) = ReplicationClient::connect(&config, "test").await else {
        panic!("connected to a missing database");
    };
    assert_eq!(err.code(), Some("3D000"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn streams_a_transaction_and_confirms_the_flush_position() {
    let cluster = Cluster::start();
    let mut admin = cluster.connect().await;
    // An awkward name proves the publication is quoted as an identifier inside a literal.
    let publication = "It's \"Pub\", too";
    table_and_publication(&mut admin, "items", publication).await;
    let mut client = cluster.connect().await;
    let start = client.create_slot("streams").await.unwrap();
    assert_eq!(
        client.create_slot("streams").await.unwrap_err().code(),
        Some("42710")
    );
    let err = client.create_slot("Bad-Name").await.unwrap_err();
    assert!(matches!(err, ReplicationError::Invalid(_)));

    admin
        .simple_query("INSERT INTO items VALUES (1, 'a')")
        .await
        .unwrap();
    let mut stream = client
        .start_replication("streams", start, publication)
        .await
        .unwrap();
    let mut messages = Vec::new();
    for _ in 0..4 {
        messages.push(next_xlog(&mut stream).await);
    }
    let tags: Vec<u8> = messages.iter().map(|m| m[0]).collect();
    assert_eq!(tags, b"BRIC");
    let end = commit_end_lsn(&messages[3]);

    stream.send_status(end, end, end, false).await.unwrap();
    within("confirmed_flush_lsn to move", async {
        loop {
            let confirmed = scalar(
                &mut admin,
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'streams'",
            )
            .await
            .unwrap();
            if confirmed.parse::<Lsn>().unwrap() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // What finish() does, without hiding a failure in a log line.
    within("a clean goodbye", stream.close()).await.unwrap();
    within("the slot to be released", async {
        while scalar(
            &mut admin,
            "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'streams'",
        )
        .await
        .as_deref()
            != Some("false")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn keepalives_arrive_and_answering_them_keeps_the_stream_alive() {
    let cluster = Cluster::start();
    let mut admin = cluster.connect().await;
    table_and_publication(&mut admin, "beats", "beats").await;
    // A one-second timeout makes the server ask for replies every half second.
    let mut config = cluster.config("postgres");
    config.options("-c wal_sender_timeout=1s");
    let mut client = ReplicationClient::connect(&config, "test").await.unwrap();
    let start = client.create_slot("beats").await.unwrap();
    let mut stream = client
        .start_replication("beats", start, "beats")
        .await
        .unwrap();

    // Asking for a reply must produce a keepalive.
    stream.send_status(start, start, start, true).await.unwrap();
    let mut answered = 0;
    within("keepalives", async {
        while answered < 4 {
            match stream.next().await.unwrap() {
                Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    server_time_us,
                }) => {
                    assert!(wal_end >= start);
                    assert!(server_time_us > 1_600_000_000_000_000);
                    if reply_requested || answered == 0 {
                        stream
                            .send_status(start, start, start, false)
                            .await
                            .unwrap();
                        answered += 1;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;

    // Several timeouts have passed; the stream still delivers.
    admin
        .simple_query("INSERT INTO beats VALUES (1, 'x')")
        .await
        .unwrap();
    assert_eq!(next_xlog(&mut stream).await[0], b'B');
}

#[tokio::test]
async fn a_slot_active_elsewhere_gives_55006_and_a_missing_one_42704() {
    let cluster = Cluster::start();
    let mut admin = cluster.connect().await;
    table_and_publication(&mut admin, "busy", "busy").await;
    let mut owner = cluster.connect().await;
    let start = owner.create_slot("busy").await.unwrap();
    let _stream = owner
        .start_replication("busy", start, "busy")
        .await
        .unwrap();

    let Err(err) = cluster
        .connect()
        .await
        .start_replication("busy", Lsn(0), "busy")
        .await
    else {
        panic!("two connections streamed one slot");
    };
    assert_eq!(err.code(), Some("55006"), "{err}");
    assert!(err.is_transient());

    let Err(err) = cluster
        .connect()
        .await
        .start_replication("missing", Lsn(0), "busy")
        .await
    else {
        panic!("streamed a missing slot");
    };
    assert_eq!(err.code(), Some("42704"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn dropping_next_futures_in_a_select_loses_no_frame() {
    const ROWS: usize = 200;
    let cluster = Cluster::start();
    let mut admin = cluster.connect().await;
    table_and_publication(&mut admin, "big", "big").await;
    let mut client = cluster.connect().await;
    let start = client.create_slot("big").await.unwrap();
    // ~100 KB per row, so most frames arrive in several reads.
    admin
        .simple_query(&format!(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3200) FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .unwrap();
    let mut stream = client.start_replication("big", start, "big").await.unwrap();

    let mut tags = Vec::new();
    let mut ids = Vec::new();
    let mut cancelled = 0u64;
    within("the whole transaction", async {
        while tags.last() != Some(&b'C') {
            // The yield wins whenever next() cannot finish in one poll, dropping it mid-frame.
            tokio::select! {
                biased;
                () = tokio::task::yield_now() => cancelled += 1,
                message = stream.next() => {
                    if let Some(ReplicationMessage::XLogData { data, .. }) = message.unwrap() {
                        tags.push(data[0]);
                        if data[0] == b'I' {
                            ids.push(insert_id(&data));
                        }
                    }
                }
            }
        }
    })
    .await;
    assert!(cancelled > 0, "no next() future was ever dropped");
    assert_eq!(tags.first(), Some(&b'B'));
    assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());
    assert_eq!(tags.len(), ROWS + 3, "B, R, {ROWS} x I, C");
}

/// The `id` (first column, text) of a pgoutput Insert: tag, relation id, 'N', column count,
/// then per column a kind byte and a length-prefixed value.
fn insert_id(insert: &[u8]) -> usize {
    assert_eq!((insert[0], insert[5]), (b'I', b'N'));
    assert_eq!(insert[8], b't');
    let len = u32::from_be_bytes(insert[9..13].try_into().unwrap()) as usize;
    std::str::from_utf8(&insert[13..13 + len])
        .unwrap()
        .parse()
        .unwrap()
}
