//! Postgres over TLS: a cluster that accepts only `hostssl` connections, with a certificate for
//! 127.0.0.1 signed by a private CA, and the real binary against it.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::sidecar::{Setup, binary};
use crate::support::{PgCluster, RedisServer, make_certificates, unique_name, wait_until};

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, name text);";

const RULES: &str = "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

/// A role of the TLS cluster that must log in with a SCRAM-SHA-256 password.
const SCRAM_ROLE: &str = "scram_app";

/// Its password.
const SCRAM_PASSWORD: &str = "scram-pw-never-logged";

/// The TLS-only cluster shared by this module's tests (each has its own database).
struct TlsCluster {
    /// The server.
    pg: PgCluster,
    /// The CA certificate that signed the server's certificate.
    ca_file: PathBuf,
}

/// Starts the cluster once: certificates in its own directory (so the watchdog removes them),
/// `ssl = on`, and a pg_hba that accepts TLS and rejects plain TCP.
fn tls_cluster() -> &'static TlsCluster {
    static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pg = PgCluster::start();
        let dir = pg.socket_dir().join("tls");
        std::fs::create_dir(&dir).expect("create the certificate directory");
        make_certificates(&dir);
        // Postgres reads the key as its own user and refuses one others can read.
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown the certificates");
        let status = Command::new("chmod")
            .arg("600")
            .arg(dir.join("server.key"))
            .status()
            .expect("chmod");
        assert!(status.success(), "chmod the key");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        pg.psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}';\n\
                 ALTER SYSTEM SET ssl_key_file = '{}';\n\
                 ALTER SYSTEM SET ssl = on;\n",
                path("server.crt"),
                path("server.key"),
            ),
        );
        // One role must authenticate with a SCRAM password; the others are trusted.
        pg.psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET password_encryption = 'scram-sha-256';\n\
                 SELECT pg_reload_conf();\n\
                 SET password_encryption = 'scram-sha-256';\n\
                 CREATE ROLE {SCRAM_ROLE} LOGIN REPLICATION PASSWORD '{SCRAM_PASSWORD}';"
            ),
        );
        pg.set_hba(&[
            &format!("hostssl all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256"),
            "hostssl all all 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 reject",
        ]);
        assert_eq!(pg.psql("postgres", "SHOW ssl"), "on", "{}", pg.log());
        TlsCluster {
            pg,
            ca_file: dir.join("ca.crt"),
        }
    })
}

/// A fresh database with [`SCHEMA`] in the TLS cluster; returns its name.
fn database(cluster: &TlsCluster) -> String {
    let db = unique_name("db");
    cluster.pg.create_database(&db);
    cluster.pg.psql(&db, SCHEMA);
    db
}

/// A configuration for `url`, with `[postgres] ca_file` when given.
fn setup(url: &str, redis: &RedisServer, ca_file: Option<&PathBuf>) -> Setup {
    let setup = Setup::new(url, &redis.url(), RULES);
    if let Some(ca) = ca_file {
        let text = std::fs::read_to_string(setup.config()).unwrap();
        let text = text.replacen(
            "[postgres]\n",
            &format!("[postgres]\nca_file = \"{}\"\n", ca.display()),
            1,
        );
        std::fs::write(setup.config(), text).unwrap();
    }
    setup
}

/// Runs a subcommand until it exits, killing it after `deadline`; its status and output.
fn run_to_exit(setup: &Setup, args: &[&str], deadline: Duration) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let mut child = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(setup.config())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
        .spawn()
        .expect("spawn invalidator");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "invalidator {args:?} still runs after {deadline:?}:\n{}",
                std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("err")).unwrap_or_default();
    (status, text)
}

#[test]
fn the_sidecar_streams_and_invalidates_over_tls_with_the_ca_given() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    let url = format!("{}?sslmode=require", cluster.pg.url(&db));
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    let sidecar = setup.start();
    redis.set_keys(["item:1", "item:2"]);
    cluster
        .pg
        .psql(&db, "INSERT INTO items VALUES (1, 'a'), (2, 'b')");
    wait_until(
        Duration::from_secs(30),
        "item:1 and item:2 are deleted",
        || !redis.exists("item:1") && !redis.exists("item:2"),
    );
    sidecar.assert_alive();
    // The walsender's session is encrypted (plain TCP is rejected anyway).
    let ssl = cluster.pg.psql(
        &db,
        &format!(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) \
             WHERE r.application_name = 'invalidator' AND r.pid IN \
             (SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{}')",
            setup.slot
        ),
    );
    assert_eq!(ssl, "t");
}

#[test]
fn without_the_ca_the_certificate_is_refused_naming_the_host_and_not_the_password() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    // Trust authentication: the password is never needed, but must never be shown either.
    let url = format!(
        "postgres://postgres:sekrit-pw@127.0.0.1:{}/{db}?sslmode=require",
        cluster.pg.port()
    );
    let setup = setup(&url, &redis, None);
    for args in [&["run"][..], &["check"], &["status"]] {
        let (status, out) = run_to_exit(&setup, args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {out}");
        assert!(
            out.contains("certificate") && out.contains("127.0.0.1") && out.contains("ca_file"),
            "{args:?}: {out}"
        );
        assert!(!out.contains("sekrit-pw"), "{args:?}: {out}");
    }
}

#[test]
fn setup_check_and_status_work_over_tls() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    let url = format!("{}?sslmode=require", cluster.pg.url(&db));
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    let (status, out) = setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    assert!(out.contains("ok"), "{out}");
    let (status, out) = setup.command(&["status"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("slot {}: inactive", setup.slot)),
        "{out}"
    );
    // prefer (the default) also takes TLS when the server offers it, verified with a CA...
    let setup = self::setup(&cluster.pg.url(&db), &redis, Some(&cluster.ca_file));
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    // ...and, like libpq's prefer, encrypted but unverified without one (a self-signed local
    // server works out of the box).
    let setup = self::setup(&cluster.pg.url(&db), &redis, None);
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    let sidecar = setup.start();
    drop(sidecar);
}

#[test]
fn sslmode_disable_against_a_tls_only_server_fails_clearly() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    let url = format!("{}?sslmode=disable", cluster.pg.url(&db));
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    for args in [&["run"][..], &["check"]] {
        let (status, out) = run_to_exit(&setup, args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {out}");
        assert!(
            out.contains("pg_hba.conf") && out.contains("no encryption"),
            "{args:?}: {out}"
        );
    }
}

/// `?sslmode=verify-full` and `verify-ca` for a database of the TLS cluster, reached as
/// `host` (resolved through `hostaddr=127.0.0.1`, so the certificate for 127.0.0.1 does not name
/// it unless `host` is 127.0.0.1).
fn url_via(cluster: &TlsCluster, host: &str, db: &str, sslmode: &str) -> String {
    format!(
        "postgres://postgres@{host}:{}/{db}?hostaddr=127.0.0.1&sslmode={sslmode}",
        cluster.pg.port()
    )
}

/// Inserts a row and waits until the sidecar deleted its key.
fn invalidates(cluster: &TlsCluster, db: &str, redis: &RedisServer, id: u32) {
    let key = format!("item:{id}");
    redis.set_keys([&key]);
    cluster
        .pg
        .psql(db, &format!("INSERT INTO items VALUES ({id}, 'x')"));
    wait_until(
        Duration::from_secs(30),
        &format!("{key} is deleted"),
        || !redis.exists(&key),
    );
}

#[test]
fn verify_full_with_the_right_ca_works_for_both_connections() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    let url = url_via(cluster, "127.0.0.1", &db, "verify-full");
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    // The SQL connection...
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    // ...and the replication connection (and the SQL one of the reloader).
    let sidecar = setup.start();
    invalidates(cluster, &db, &redis, 1);
    sidecar.assert_alive();
}

#[test]
fn a_wrong_ca_is_refused_naming_the_host_in_both_verify_modes() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path());
    let wrong_ca = other.path().join("ca.crt");
    for sslmode in ["verify-full", "verify-ca"] {
        let url = url_via(cluster, "127.0.0.1", &db, sslmode);
        let setup = setup(&url, &redis, Some(&wrong_ca));
        for args in [&["run"][..], &["check"]] {
            let (status, out) = run_to_exit(&setup, args, Duration::from_secs(30));
            assert_eq!(status.code(), Some(1), "{sslmode} {args:?}: {out}");
            assert!(
                out.contains("certificate") && out.contains("127.0.0.1"),
                "{sslmode} {args:?}: {out}"
            );
        }
    }
}

#[test]
fn verify_ca_accepts_a_certificate_for_another_name_and_verify_full_refuses_it() {
    let cluster = tls_cluster();
    let db = database(cluster);
    let redis = RedisServer::start();
    // The certificate names 127.0.0.1 only; "localhost" is another name for the same server.
    let url = url_via(cluster, "localhost", &db, "verify-ca");
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    let sidecar = setup.start();
    invalidates(cluster, &db, &redis, 1);
    drop(sidecar);
    // verify-full, and require (which checks exactly what verify-full does), refuse the name.
    for sslmode in ["verify-full", "require"] {
        let url = url_via(cluster, "localhost", &db, sslmode);
        let setup = self::setup(&url, &redis, Some(&cluster.ca_file));
        for args in [&["run"][..], &["check"]] {
            let (status, out) = run_to_exit(&setup, args, Duration::from_secs(30));
            assert_eq!(status.code(), Some(1), "{sslmode} {args:?}: {out}");
            assert!(
                out.contains("certificate") && out.contains("localhost"),
                "{sslmode} {args:?}: {out}"
            );
        }
    }
}

#[test]
fn a_scram_password_authenticates_both_connections_and_a_wrong_one_stops_without_showing_it() {
    let cluster = tls_cluster();
    let db = database(cluster);
    // The role owns the table, so `setup` (the publication) runs as it too.
    cluster.pg.psql(
        &db,
        &format!(
            "ALTER TABLE items OWNER TO {SCRAM_ROLE}; \
             GRANT CREATE ON DATABASE {db} TO {SCRAM_ROLE};"
        ),
    );
    let redis = RedisServer::start();
    let port = cluster.pg.port();
    let url = format!(
        "postgres://{SCRAM_ROLE}:{SCRAM_PASSWORD}@127.0.0.1:{port}/{db}?sslmode=verify-full"
    );
    let setup = setup(&url, &redis, Some(&cluster.ca_file));
    let (status, out) = setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = setup.command(&["check"]);
    assert!(status.success(), "{out}");
    let sidecar = setup.start();
    invalidates(cluster, &db, &redis, 1);
    // Both connections authenticated with SCRAM, not trust.
    let methods = cluster.pg.psql(
        "postgres",
        &format!(
            "SELECT DISTINCT backend_type FROM pg_stat_activity WHERE usename = '{SCRAM_ROLE}' \
             ORDER BY 1"
        ),
    );
    assert!(methods.contains("walsender"), "{methods}");
    assert!(
        !sidecar.log().contains(SCRAM_PASSWORD),
        "the password reached the log"
    );
    drop(sidecar);

    let wrong = "wrong-pw-never-logged";
    let url = format!("postgres://{SCRAM_ROLE}:{wrong}@127.0.0.1:{port}/{db}?sslmode=verify-full");
    let setup = self::setup(&url, &redis, Some(&cluster.ca_file));
    for args in [&["run"][..], &["check"], &["status"]] {
        let (status, out) = run_to_exit(&setup, args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {out}");
        assert!(
            out.contains("password authentication failed"),
            "{args:?}: {out}"
        );
        assert!(!out.contains(wrong), "{args:?}: {out}");
    }
}
