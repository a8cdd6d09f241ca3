//! The replication client against real walsenders: authentication, replication commands,
//! streaming, keepalives and cancel-safety. Tests that only need a database use the shared
//! cluster with their own database and slot; tests that change server settings or pg_hba.conf
//! start their own cluster. The byte-exact tests against an in-memory pipe are unit tests beside
//! the client.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use invalidator::change::Lsn;
use invalidator::config::{Mode, PostgresConfig};
use invalidator::error::Classify;
use invalidator::source::connect;
use invalidator::source::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream,
};

use crate::support::{PgCluster, unique_name, wait_until};

/// How long any single wait on the server may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Connection settings parsed from a harness URL.
fn config(url: &str) -> tokio_postgres::Config {
    url.parse()
        .unwrap_or_else(|err| panic!("bad test url {url}: {err}"))
}

/// A replication connection to `url` that must succeed.
async fn connect(url: &str) -> ReplicationClient {
    within("connect", ReplicationClient::connect(&config(url), "test"))
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

/// A fresh database on the shared cluster; returns its name and URL.
fn fresh_database(prefix: &str) -> (String, String) {
    let db = unique_name(prefix);
    let url = PgCluster::shared().create_database(&db);
    (db, url)
}

/// Quotes `name` as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates `table` (id int, payload text) and a publication for it in `db`.
fn table_and_publication(cluster: &PgCluster, db: &str, table: &str, publication: &str) {
    cluster.psql(
        db,
        &format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, payload text); \
             CREATE PUBLICATION {} FOR TABLE {table}",
            ident(publication)
        ),
    );
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

#[tokio::test]
async fn trust_connect_identifies_the_system_over_tcp_and_unix_socket() {
    let cluster = PgCluster::shared();
    let (db, url) = fresh_database("repl_identify");
    let mut tcp = config(&url);
    // Startup options reach the server.
    tcp.options("-c wal_sender_timeout=7s");
    let mut client = within("connect", ReplicationClient::connect(&tcp, "test"))
        .await
        .unwrap();
    assert!(client.process_id() > 0);
    assert!(client.parameter("server_version").is_some());
    let info = client.identify_system().await.unwrap();
    assert_eq!(info.timeline, 1);
    assert_eq!(info.dbname.as_deref(), Some(db.as_str()));
    assert!(info.xlog_pos > Lsn(0));
    assert!(info.system_id.parse::<u64>().is_ok(), "{}", info.system_id);
    let app = scalar(
        &mut client,
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(app.as_deref(), Some("test"));
    let timeout = scalar(&mut client, "SHOW wal_sender_timeout").await;
    assert_eq!(timeout.as_deref(), Some("7s"));

    let mut unix = tokio_postgres::Config::new();
    unix.host_path(cluster.socket_dir())
        .port(cluster.port())
        .user("postgres")
        .dbname(&db);
    let mut unix = within(
        "connect over the socket",
        ReplicationClient::connect(&unix, "test"),
    )
    .await
    .unwrap();
    assert_eq!(
        unix.identify_system().await.unwrap().system_id,
        info.system_id
    );
}

#[tokio::test]
async fn a_failed_query_keeps_its_code_and_the_client_usable() {
    let (_db, url) = fresh_database("repl_failed_query");
    let mut client = connect(&url).await;
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
async fn password_methods_authenticate_and_a_wrong_password_is_permanent_and_never_shown() {
    // pg_hba.conf is server-wide, so this test owns its cluster.
    let cluster = PgCluster::start();
    cluster.psql(
        "postgres",
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret'; \
         CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain-secret'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret'",
    );
    cluster.set_hba(&[
        "host all postgres 127.0.0.1/32 trust",
        "host all md5_user 127.0.0.1/32 md5",
        "host all plain_user 127.0.0.1/32 password",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]);

    for (user, password) in [
        ("scram_user", "scram-secret"),
        ("md5_user", "md5-secret"),
        ("plain_user", "plain-secret"),
    ] {
        let mut client = connect(&cluster.url_as(user, password, "postgres")).await;
        client
            .identify_system()
            .await
            .unwrap_or_else(|err| panic!("{user}: {err}"));
    }

    let wrong = "wrong-password-0451";
    let url = cluster.url_as("scram_user", wrong, "postgres");
    let Err(err) = within(
        "a refusal",
        ReplicationClient::connect(&config(&url), "test"),
    )
    .await
    else {
        panic!("a wrong password was accepted");
    };
    assert_eq!(err.code(), Some("28P01"), "{err}");
    assert!(!err.is_transient());
    // The refusal names the server that gave it, which matters when the URL names several.
    let host = format!("127.0.0.1:{}", cluster.port());
    assert!(err.to_string().contains(&host), "{err}");
    assert!(!err.to_string().contains(wrong), "{err}");
    assert!(!format!("{err:?}").contains(wrong), "{err:?}");
}

#[tokio::test]
async fn a_role_without_replication_is_refused_with_42501() {
    let cluster = PgCluster::shared();
    let (db, _url) = fresh_database("repl_norepl");
    let role = unique_name("norepl");
    cluster.psql("postgres", &format!("CREATE ROLE {role} LOGIN"));
    let url = cluster.url_as(&role, "unused", &db);
    let Err(err) = within(
        "a refusal",
        ReplicationClient::connect(&config(&url), "test"),
    )
    .await
    else {
        panic!("a role without REPLICATION opened a walsender");
    };
    assert_eq!(err.code(), Some("42501"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_missing_database_is_refused_with_3d000() {
    let url = PgCluster::shared().url(&unique_name("no_such_database"));
    let Err(err) = within(
        "a refusal",
        ReplicationClient::connect(&config(&url), "test"),
    )
    .await
    else {
        panic!("connected to a missing database");
    };
    assert_eq!(err.code(), Some("3D000"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn streams_a_transaction_and_confirms_the_flush_position() {
    let cluster = PgCluster::shared();
    let (db, url) = fresh_database("repl_streams");
    let slot = unique_name("streams");
    // An awkward name proves the publication is quoted as an identifier inside a literal.
    let publication = "It's \"Pub\", too";
    table_and_publication(cluster, &db, "items", publication);
    let mut client = connect(&url).await;
    let walsender = client.process_id();
    let start = client.create_slot(&slot).await.unwrap();
    assert_eq!(
        client.create_slot(&slot).await.unwrap_err().code(),
        Some("42710")
    );
    let err = client.create_slot("Bad-Name").await.unwrap_err();
    assert!(matches!(err, ReplicationError::Invalid(_)), "{err}");
    // The duplicate slot was logged as an error; only what comes after it counts below.
    let log_before = cluster.log().lines().count();

    cluster.psql(&db, "INSERT INTO items VALUES (1, 'a')");
    let mut stream = within(
        "START_REPLICATION",
        client.start_replication(&slot, start, publication, false),
    )
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
    let slot_column = |column: &str| {
        cluster.psql(
            &db,
            &format!("SELECT {column} FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
    };
    wait_until(DEADLINE, "confirmed_flush_lsn reaches the commit", || {
        slot_column("confirmed_flush_lsn").parse::<Lsn>().unwrap() >= end
    });

    stream.finish().await;
    wait_until(DEADLINE, "the slot is released", || {
        slot_column("active") == "f"
    });
    // finish() only logs a failure; the server would log a goodbye that was not clean.
    let log = cluster.log();
    let marker = format!("[{walsender}] ");
    let complaints: Vec<&str> = log
        .lines()
        .skip(log_before)
        .filter(|line| line.contains(&marker))
        .filter(|line| {
            ["ERROR:", "FATAL:", "unexpected EOF"]
                .iter()
                .any(|bad| line.contains(bad))
        })
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
}

#[tokio::test]
async fn keepalives_arrive_and_answering_them_keeps_the_stream_alive() {
    // A one-second timeout makes the server ask for replies every half second.
    let cluster = PgCluster::start_with(&[("wal_sender_timeout", "'1s'")]);
    table_and_publication(&cluster, "postgres", "beats", "beats");
    let mut client = connect(&cluster.url("postgres")).await;
    let start = client.create_slot("beats").await.unwrap();
    let mut stream = client
        .start_replication("beats", start, "beats", false)
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
    cluster.psql("postgres", "INSERT INTO beats VALUES (1, 'x')");
    assert_eq!(next_xlog(&mut stream).await[0], b'B');
}

#[tokio::test]
async fn a_slot_active_elsewhere_gives_55006_and_a_missing_one_42704() {
    let cluster = PgCluster::shared();
    let (db, url) = fresh_database("repl_busy");
    let slot = unique_name("busy");
    table_and_publication(cluster, &db, "busy", "busy");
    let mut owner = connect(&url).await;
    let start = owner.create_slot(&slot).await.unwrap();
    let _stream = owner
        .start_replication(&slot, start, "busy", false)
        .await
        .unwrap();

    let Err(err) = within(
        "a refusal",
        connect(&url)
            .await
            .start_replication(&slot, Lsn(0), "busy", false),
    )
    .await
    else {
        panic!("two connections streamed one slot");
    };
    assert_eq!(err.code(), Some("55006"), "{err}");
    assert!(err.is_transient());

    let Err(err) = within(
        "a refusal",
        connect(&url)
            .await
            .start_replication(&unique_name("missing"), Lsn(0), "busy", false),
    )
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
    let cluster = PgCluster::shared();
    let (db, url) = fresh_database("repl_cancel");
    let slot = unique_name("big");
    table_and_publication(cluster, &db, "big", "big");
    let mut client = connect(&url).await;
    let start = client.create_slot(&slot).await.unwrap();
    // ~100 KB per row, so most frames arrive in several reads.
    cluster.psql(
        &db,
        &format!(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3200) FROM generate_series(1, {ROWS}) g"
        ),
    );
    let mut stream = client
        .start_replication(&slot, start, "big", false)
        .await
        .unwrap();

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

/// What the SQL sessions (setup's, the visibility gate's, the catalog reads') are given.
fn sql_session(url: String) -> PostgresConfig {
    PostgresConfig {
        url,
        mode: Mode::Replication,
        slot: "invalidator".to_owned(),
        publication: "invalidator".to_owned(),
        flush_on_slot_loss: true,
        stream_large_transactions: false,
        ca_file: None,
    }
}

/// Whether the SQL session of `url` landed on a read-only server (a standby).
async fn sql_session_is_read_only(url: String) -> bool {
    let db = within("sql connect", connect::connect(&sql_session(url)))
        .await
        .unwrap_or_else(|err| panic!("sql connect: {err}"));
    let row = db
        .query_one("SHOW transaction_read_only", &[])
        .await
        .unwrap();
    row.get::<_, String>(0) == "on"
}

/// Both kinds of connection, the replication one and the SQL sessions, try the hosts in turn.
#[tokio::test]
async fn several_hosts_are_tried_in_turn_and_read_write_passes_over_a_standby() {
    let primary = PgCluster::start();
    let standby = primary.start_standby(&unique_name("standby"), &[]);
    let dead = crate::support::free_port();
    // A host that refuses, then the standby: the standby takes the connection.
    let url = format!(
        "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{}/postgres",
        standby.port()
    );
    let mut client = connect(&url).await;
    assert_eq!(
        client
            .simple_query("SHOW transaction_read_only")
            .await
            .unwrap()[0][0]
            .as_deref(),
        Some("on")
    );
    // read-write passes over the standby to the primary.
    let url = format!(
        "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{}/postgres\
         ?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    let mut client = connect(&url).await;
    assert_eq!(
        client
            .simple_query("SHOW transaction_read_only")
            .await
            .unwrap()[0][0]
            .as_deref(),
        Some("off")
    );
    // With no read-write host, the answer says why.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?target_session_attrs=read-write",
        standby.port()
    );
    let err = within("connect", ReplicationClient::connect(&config(&url), "test"))
        .await
        .err()
        .expect("a standby alone is refused");
    assert!(matches!(err, ReplicationError::ReadOnly), "{err}");
    assert!(err.is_transient(), "a standby may be promoted");
    // A refusal names the host that refused.
    let nobody = crate::support::free_port();
    let url = format!("postgres://postgres:s3cret@127.0.0.1:{nobody}/postgres");
    let err = within("connect", ReplicationClient::connect(&config(&url), "test"))
        .await
        .err()
        .expect("nobody listens");
    let text = err.to_string();
    assert!(
        text.contains(&format!("connecting to 127.0.0.1:{nobody}: ")),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");

    // The SQL sessions: past the refusing host to the standby, and with read-write past the
    // standby to the primary.
    let refused_then_standby = format!(
        "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{}/postgres",
        standby.port()
    );
    assert!(sql_session_is_read_only(refused_then_standby).await);
    let to_the_primary = format!(
        "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{}/postgres\
         ?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    assert!(!sql_session_is_read_only(to_the_primary).await);
    // With no host left, the answer names the last one tried, and never the password.
    let standby_alone = format!(
        "postgres://postgres:s3cret@127.0.0.1:{dead},127.0.0.1:{}/postgres\
         ?target_session_attrs=read-write",
        standby.port()
    );
    let err = within("sql connect", connect::connect(&sql_session(standby_alone)))
        .await
        .expect_err("a standby alone is refused");
    // As main prints it: the error and its causes.
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(next) = cause {
        text = format!("{text}: {next}");
        cause = next.source();
    }
    let tried = format!("connecting to 127.0.0.1:{} of ", standby.port());
    assert!(text.starts_with(&tried), "{text}");
    assert!(text.contains("does not allow writes"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(err.is_transient(), "a standby may be promoted");
}
