//! Runs the real `invalidator` binary against a test's own database and Redis server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::support::{PgCluster, RedisCluster, RedisServer, free_port, unique_name, wait_until};

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_invalidator")
}

/// A configuration directory: `invalidator.toml` and `rules/`.
pub struct Setup {
    /// Holds the files; removed on drop.
    pub dir: tempfile::TempDir,
    /// Slot and publication name.
    pub slot: String,
    /// HTTP port.
    pub http: u16,
}

impl Setup {
    /// Writes a configuration for `db_url` and `redis_url` with `rules` as `rules/rules.toml`.
    pub fn new(db_url: &str, redis_url: &str, rules: &str) -> Setup {
        Setup::with_slot(db_url, redis_url, rules, &unique_name("slot"))
    }

    /// Like [`Setup::new`], but with the given slot and publication name, so that a second
    /// configuration (with its own HTTP port) can compete for the same slot.
    pub fn with_slot(db_url: &str, redis_url: &str, rules: &str, slot: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let slot = slot.to_owned();
        let http = free_port();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/rules.toml"), rules).unwrap();
        let config = format!(
            "[postgres]\nurl = \"{db_url}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n\
             [redis]\nurl = \"{redis_url}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [pipeline]\nstatus_interval_ms = 500\n\n[log]\nlevel = \"invalidator=debug,info\"\n\
             format = \"text\"\n"
        );
        std::fs::write(dir.path().join("invalidator.toml"), config).unwrap();
        Setup { dir, slot, http }
    }

    /// Sets `postgres.mode = "notify"` in the configuration.
    pub fn notify_mode(&self) {
        let path = self.config();
        let config = std::fs::read_to_string(&path).expect("read the config");
        let config = config.replacen("[postgres]\n", "[postgres]\nmode = \"notify\"\n", 1);
        std::fs::write(&path, config).expect("write the config");
    }

    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("invalidator.toml")
    }

    /// Runs a subcommand to completion; returns its status and combined output.
    pub fn command(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .output()
            .expect("run invalidator");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    /// Starts `invalidator run` in the background.
    pub fn spawn(&self) -> Sidecar {
        self.spawn_with(&[])
    }

    /// Starts `invalidator run` with `args` (after `--config`) in the background.
    pub fn spawn_with(&self, args: &[&str]) -> Sidecar {
        self.spawn_with_env(args, &[])
    }

    /// Like [`Setup::spawn_with`], with the variables `env` set, for settings given as
    /// `INVALIDATOR_<SECTION>_<KEY>`.
    pub fn spawn_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let log = self
            .dir
            .path()
            .join(format!("run-{}.log", unique_name("log")));
        let child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn invalidator run");
        Sidecar {
            child: Some(child),
            http: self.http,
            log,
        }
    }

    /// Starts `invalidator run` and waits until `/readyz` says ready.
    pub fn start(&self) -> Sidecar {
        let sidecar = self.spawn();
        sidecar.wait_ready();
        sidecar
    }
}

/// A running `invalidator run` process.
pub struct Sidecar {
    child: Option<Child>,
    http: u16,
    log: PathBuf,
}

impl Sidecar {
    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        wait_until(Duration::from_secs(30), "the sidecar is ready", || {
            self.assert_alive();
            http_get(self.http, "/readyz").is_some_and(|(status, _)| status == 200)
        });
    }

    /// Panics with the log if the process has exited.
    pub fn assert_alive(&self) {
        let pid = self.child.as_ref().map(Child::id);
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && !std::fs::read_to_string(format!("/proc/{}/stat", pid.unwrap_or(0)))
                .is_ok_and(|s| s.contains(") Z "));
        assert!(alive, "the sidecar exited; its log:\n{}", self.log());
    }

    /// The sidecar's HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http
    }

    /// GET a path on the sidecar's HTTP port.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path)
    }

    /// The value of an unlabelled counter or gauge in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("metrics answer");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of every series of a counter or gauge in `/metrics`, whatever its labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("metrics answer");
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().expect("wait")
    }

    /// SIGTERM, then waits up to `deadline` for the exit status; `None` if the process is still
    /// running then (it is killed with SIGKILL, so nothing outlives the test).
    pub fn terminate_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        signal(self.child.as_ref().expect("running").id(), "TERM");
        self.exit_within(deadline)
    }

    /// Waits up to `deadline` for the process to exit by itself; `None` if it is still running
    /// then (it is killed with SIGKILL, so nothing outlives the test).
    pub fn exit_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("running");
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if start.elapsed() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal by name with `kill`, which every machine has.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// A minimal HTTP/1.0 GET: status code and body, or `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Where the sidecar reads changes from: both sources promise the same invalidations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Logical replication with pgoutput (the default).
    Replication,
    /// Triggers, the outbox table and LISTEN/NOTIFY.
    Notify,
}

/// Declares scenarios that take a [`Mode`] and runs each as two tests, `replication::NAME` and
/// `notify::NAME`.
macro_rules! in_both_modes {
    ($($(#[$meta:meta])* fn $name:ident($mode:ident: Mode) $body:block)*) => {
        $($(#[$meta])* fn $name($mode: crate::sidecar::Mode) $body)*

        mod replication {
            $(#[test]
            fn $name() {
                super::$name(crate::sidecar::Mode::Replication)
            })*
        }

        mod notify {
            $(#[test]
            fn $name() {
                super::$name(crate::sidecar::Mode::Notify)
            })*
        }
    };
}
pub(crate) use in_both_modes;

/// Which Redis the sidecar deletes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One `redis-server`.
    Single,
    /// A Redis Cluster of 3 primaries without replicas (`[redis] cluster` left unset, so the
    /// sidecar detects it from `INFO cluster`).
    Cluster,
}

/// Like [`in_both_modes!`] for scenarios that take a [`Mode`] and a [`Topology`]: each runs as
/// `replication::NAME` and `notify::NAME` against one Redis server, and as `cluster::NAME`
/// (replication mode) against a Redis Cluster of 3 primaries with a replica each.
macro_rules! in_both_modes_and_on_a_cluster {
    ($($(#[$meta:meta])* fn $name:ident($mode:ident: Mode, $topology:ident: Topology) $body:block)*) => {
        $($(#[$meta])* fn $name($mode: crate::sidecar::Mode, $topology: crate::sidecar::Topology) $body)*

        mod replication {
            $(#[test]
            fn $name() {
                super::$name(crate::sidecar::Mode::Replication, crate::sidecar::Topology::Single)
            })*
        }

        mod notify {
            $(#[test]
            fn $name() {
                super::$name(crate::sidecar::Mode::Notify, crate::sidecar::Topology::Single)
            })*
        }

        mod cluster {
            $(#[test]
            fn $name() {
                super::$name(crate::sidecar::Mode::Replication, crate::sidecar::Topology::Cluster)
            })*
        }
    };
}
pub(crate) use in_both_modes_and_on_a_cluster;

/// A test's own Redis: one server or a cluster, with what the scenarios ask of either.
pub enum Cache {
    /// One server, which tests may kill and restart.
    Single(RedisServer),
    /// A cluster; keys live on the primary that owns their slot.
    Cluster(RedisCluster),
}

impl Cache {
    /// Starts a fresh Redis of the given topology.
    pub fn start(topology: Topology) -> Cache {
        match topology {
            Topology::Single => Cache::Single(RedisServer::start()),
            // Three primaries with a replica each, as a production cluster runs.
            Topology::Cluster => Cache::Cluster(RedisCluster::start_with_replicas(3, 1)),
        }
    }

    /// The URL the sidecar is configured with (a seed node for a cluster).
    pub fn url(&self) -> String {
        match self {
            Cache::Single(server) => server.url(),
            Cache::Cluster(cluster) => cluster.url(),
        }
    }

    /// Sets each of `keys` to "1" (on the owning primary, in a cluster).
    pub fn set_keys<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) {
        match self {
            Cache::Single(server) => server.set_keys(keys),
            Cache::Cluster(cluster) => cluster.set_keys(keys),
        }
    }

    /// Whether `key` exists (asked of the owning primary, in a cluster).
    pub fn exists(&self, key: impl AsRef<[u8]>) -> bool {
        match self {
            Cache::Single(server) => server.exists(key),
            Cache::Cluster(cluster) => cluster.exists(key),
        }
    }

    /// The keys matching `pattern`, sorted (over every primary, in a cluster).
    pub fn scan_keys(&self, pattern: &str) -> Vec<String> {
        match self {
            Cache::Single(server) => server.scan_keys(pattern),
            Cache::Cluster(cluster) => cluster.scan_keys(pattern),
        }
    }

    /// The single server, for tests that kill, restart or inspect it; panics for a cluster.
    pub fn server(&self) -> &RedisServer {
        match self {
            Cache::Single(server) => server,
            Cache::Cluster(_) => panic!("this test needs a single Redis server, not a cluster"),
        }
    }

    /// The cluster, for tests that inspect or kill its nodes; panics for a single server.
    pub fn cluster(&self) -> &RedisCluster {
        match self {
            Cache::Cluster(cluster) => cluster,
            Cache::Single(_) => panic!("this test needs a Redis Cluster, not a single server"),
        }
    }

    /// Runs `command` (routed by its key, in a cluster) and returns the reply.
    pub fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Cache::Single(server) => command.query(&mut server.connection()),
            Cache::Cluster(cluster) => {
                let mut connection = cluster.client().get_connection()?;
                command.query(&mut connection)
            }
        }
    }

    /// Kills the single server (see [`RedisServer::kill`]).
    pub fn kill(&self) {
        self.server().kill();
    }

    /// Starts the single server again (see [`RedisServer::start_again`]).
    pub fn start_again(&self) {
        self.server().start_again();
    }
}

/// A test's own database (in the shared cluster), Redis server and configuration.
pub struct Fixture {
    /// The database name.
    pub db: String,
    /// The test's Redis: one server, or a cluster.
    pub redis: Cache,
    /// The configuration.
    pub setup: Setup,
}

impl Fixture {
    /// Creates a database with `schema` applied, a Redis server, and a configuration.
    pub fn new(schema: &str, rules: &str) -> Fixture {
        Fixture::with_cache(schema, rules, Cache::start(Topology::Single))
    }

    /// Like [`Fixture::new`], with `redis` (a server or a cluster) as the sidecar's Redis.
    pub fn with_cache(schema: &str, rules: &str, redis: Cache) -> Fixture {
        let cluster = PgCluster::shared();
        let db = unique_name("db");
        let url = cluster.create_database(&db);
        cluster.psql(&db, schema);
        let setup = Setup::new(&url, &redis.url(), rules);
        Fixture { db, redis, setup }
    }

    /// Like [`Fixture::new`], reading changes as `mode` says.
    pub fn with_mode(schema: &str, rules: &str, mode: Mode) -> Fixture {
        Fixture::with_mode_on(schema, rules, mode, Topology::Single)
    }

    /// Like [`Fixture::with_mode`], deleting from a Redis of the given topology.
    pub fn with_mode_on(schema: &str, rules: &str, mode: Mode, topology: Topology) -> Fixture {
        let f = Fixture::with_cache(schema, rules, Cache::start(topology));
        f.use_mode(mode);
        f
    }

    /// Switches the configuration to `mode`, once the rules are final. Notify mode's triggers
    /// are installed with `invalidator setup`, as a user would: `run` does not install them.
    pub fn use_mode(&self, mode: Mode) {
        if mode == Mode::Replication {
            return;
        }
        self.setup.notify_mode();
        let (status, out) = self.setup.command(&["setup"]);
        assert!(status.success(), "setup in notify mode failed: {out}");
    }

    /// Waits until every change committed so far has been processed and acknowledged: the
    /// slot's confirmed position or the outbox, as `mode` says.
    pub fn wait_acknowledged(&self, mode: Mode) {
        let done = || match mode {
            Mode::Replication => {
                self.sql(&format!(
                    "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('{0}', NULL, NULL, \
                     'proto_version', '1', 'publication_names', '{0}')",
                    self.setup.slot
                ))
                .trim()
                    == "0"
            }
            Mode::Notify => self.sql("SELECT count(*) FROM invalidator.outbox").trim() == "0",
        };
        wait_until(Duration::from_secs(30), "everything is acknowledged", done);
    }

    /// Waits until a running sidecar has acknowledged every change committed so far: the
    /// slot's confirmed position reaches the WAL position of now (it moves past other
    /// databases' WAL when idle), or the outbox is empty. A barrier before caching keys that an
    /// earlier commit invalidates.
    pub fn wait_confirmed_while_running(&self, mode: Mode) {
        let end = self.sql("SELECT pg_current_wal_lsn()");
        let done = || match mode {
            Mode::Replication => {
                self.sql(&format!(
                    "SELECT confirmed_flush_lsn >= '{}' FROM pg_replication_slots \
                     WHERE slot_name = '{}'",
                    end.trim(),
                    self.setup.slot
                )) == "t"
            }
            Mode::Notify => self.sql("SELECT count(*) FROM invalidator.outbox").trim() == "0",
        };
        wait_until(
            Duration::from_secs(30),
            "the running sidecar acknowledged",
            done,
        );
    }

    /// Runs SQL in the test's database.
    pub fn sql(&self, sql: &str) -> String {
        PgCluster::shared().psql(&self.db, sql)
    }

    /// Caches `keys` (value `cached`).
    pub fn cache(&self, keys: &[&str]) {
        self.redis.set_keys(keys.iter());
    }

    /// Waits until none of `keys` exists.
    pub fn wait_deleted(&self, keys: &[&str]) {
        wait_until(
            Duration::from_secs(30),
            &format!("{keys:?} are deleted"),
            || keys.iter().all(|k| !self.redis.exists(k)),
        );
    }

    /// Asserts every one of `keys` still exists.
    pub fn assert_kept(&self, keys: &[&str]) {
        for k in keys {
            assert!(
                self.redis.exists(k),
                "{k} was deleted but should have been kept"
            );
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Free the slot so the shared cluster keeps neither WAL nor slot capacity for it.
        let _ = PgCluster::shared().try_psql(
            "postgres",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}' AND NOT active",
                self.setup.slot
            ),
        );
    }
}
