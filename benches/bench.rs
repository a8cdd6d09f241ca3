//! `cargo bench`: what `invalidator` costs and how fast it is, measured in one run against the
//! bare decode limit (`pg_recvlogical`) and the Node.js peer in `shared/peers/node`.
//!
//! Everything runs on a private Postgres cluster and a private Redis server started by the test
//! harness (`tests/support`), so the figures never depend on what else this machine serves. Every
//! consumer runs alone, on the same workload, and the output on stdout is markdown that can be
//! pasted into the README; progress goes to stderr.
//!
//! Sections:
//! 1. drain: 100k row updates (100 transactions of 1000 rows) already in the WAL, three rounds.
//! 2. latency: commit → key gone at a steady 300 and 1000 commits/s, seen from the client and
//!    from the WAL commit timestamp, plus invalidator's own figure from its debug log.
//! 3. wildcards: 200 `slots:{id}:*` patterns in one transaction over 1M keys, against one bare
//!    SCAN pass, a SCAN per pattern and the KEYS strategy.
//! 4. resources: CPU, peak and steady memory of each consumer.
//! 5. consistency: cache-aside readers racing writers, plain fill against guarded fill, with and
//!    without deletes waiting for visibility (`consistency.rs`).
//! 6. patterns and 7. pgbench: see `patterns.rs`.
//!
//! `cargo bench -- NAME...` runs only the named sections (drain, latency, wildcards,
//! consistency, patterns, pgbench; resources come with drain and latency); no names run them
//! all.

mod consistency;
#[path = "../tests/support/mod.rs"]
mod support;

#[path = "sections/patterns.rs"]
mod patterns;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use support::{PgCluster, RedisServer, free_port, unique_name};
use tokio_postgres::{Client, NoTls};

/// Rows in `items`; the drain updates all of them.
const ITEMS: i32 = 100_000;
/// Rows per drain transaction (so 100 transactions).
const ROWS_PER_TXN: i32 = 1_000;
/// Rounds of the drain section; the median is reported.
const ROUNDS: usize = 3;
/// Rows in `vehicles`; each owns `KEYS_PER_VEHICLE` keys `slots:{id}:{n}`.
const VEHICLES: i32 = 10_000;
/// Keys per vehicle, so 1,000,000 keys in all.
const KEYS_PER_VEHICLE: i32 = 100;
/// Vehicles updated in the one wildcard transaction: 200 patterns, 20,000 keys.
const BURST_VEHICLES: i32 = 200;
/// Commit rates of the latency section and how many commits each runs (about 10 s each).
const RATES: [(u32, usize); 2] = [(300, 3_000), (1_000, 10_000)];
/// Commits made before a latency run starts, so connections, caches and JITs are warm.
const WARM_UP_COMMITS: i32 = 20;
/// The publication every consumer reads: both tables.
const PUBLICATION: &str = "bench";
/// How long one consumer may take for one drain before it counts as failed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for deletions that are still missing after the last commit of a latency run.
const LATENCY_GRACE: Duration = Duration::from_secs(5);
/// Keys per MSET and MSETs per pipeline when loading Redis: large enough to load 1M keys in a
/// few seconds, small enough not to stall the server for long.
const MSET_KEYS: usize = 1_000;
/// See [`MSET_KEYS`].
const MSETS_PER_PIPELINE: usize = 20;

/// The rules every consumer reads: two keys per item, one pattern per vehicle.
const RULES: &str = r#"# The rules every consumer of the benchmark reads.
[[rule]]
table = "items"
keys = ["item:{id}", "item:{id}:detail"]

[[rule]]
table = "vehicles"
keys = ["slots:{id}:*"]
"#;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    runtime.block_on(run());
}

/// Runs every section in order and prints the tables.
async fn run() {
    let started = Instant::now();
    let bench = Bench::start().await;
    let header = bench.header().await;
    eprintln!("{header}");

    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |section: &str| named.is_empty() || named.iter().any(|n| n == section);
    let mut out = String::new();
    writeln!(out, "{header}\n").expect("write to a string");
    let peer_missing = bench.peer.as_ref().err().map(String::as_str);
    if wanted("drain") || wanted("latency") {
        let drain = drain_section(&bench).await;
        let latency = latency_section(&bench).await;
        print_drain(&mut out, &drain, peer_missing);
        print_latency(&mut out, &latency, peer_missing);
        print_resources(&mut out, &drain, &latency);
    }
    if wanted("wildcards") {
        let wildcards = wildcard_section(&bench).await;
        print_wildcards(&mut out, &wildcards);
    }
    if wanted("consistency") {
        let runs = consistency::section(
            &bench.cluster,
            &bench.db_url,
            &bench.redis,
            bench.work.path(),
        )
        .await;
        consistency::print(&mut out, &runs);
    }
    if wanted("patterns") {
        let results = patterns::patterns_section(&bench).await;
        patterns::print_patterns(&mut out, &results);
    }
    if wanted("pgbench") {
        let results = patterns::pgbench_section(&bench).await;
        patterns::print_pgbench(&mut out, &results);
    }
    println!("{out}");
    eprintln!(
        "benchmark finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The servers, the schema and the consumers' tools.

/// The consumers being compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Consumer {
    /// `pg_recvlogical` writing pgoutput to /dev/null: decoding and sending, nothing else.
    Recvlogical,
    /// The release binary of this crate.
    Invalidator,
    /// The Node.js peer (`pg-logical-replication` + `ioredis`).
    Peer,
}

impl Consumer {
    /// The name used in tables.
    fn name(self) -> &'static str {
        match self {
            Consumer::Recvlogical => "pg_recvlogical",
            Consumer::Invalidator => "invalidator",
            Consumer::Peer => "node peer",
        }
    }

    /// A short tag for slot names.
    fn tag(self) -> &'static str {
        match self {
            Consumer::Recvlogical => "recv",
            Consumer::Invalidator => "inv",
            Consumer::Peer => "peer",
        }
    }
}

/// The servers, connections and tools every section shares.
struct Bench {
    /// The private cluster; dropping it stops the server.
    cluster: PgCluster,
    /// The private Redis server; dropping it stops the server.
    redis: RedisServer,
    /// `postgres://postgres@127.0.0.1:PORT/bench`.
    db_url: String,
    /// Admin queries and slot polling.
    pg: Client,
    /// Loading, checking and restoring keys.
    redis_con: MultiplexedConnection,
    /// Configs, rules and logs of this run.
    work: tempfile::TempDir,
    /// The rules directory every consumer reads.
    rules_dir: PathBuf,
    /// The `pg_recvlogical` binary of the newest installed Postgres.
    recvlogical: PathBuf,
    /// The ready-to-run peer directory, or why the peer cannot run.
    peer: Result<PathBuf, String>,
    /// Clock ticks per second, to turn /proc CPU times into seconds.
    clock_ticks: f64,
}

impl Bench {
    /// Starts the servers, creates the schema, the publication and the rules, and prepares the
    /// Node peer.
    async fn start() -> Bench {
        eprintln!("starting postgres and redis");
        // Commit timestamps give the inside latency (WAL commit → key gone).
        let cluster = PgCluster::start_with(&[("track_commit_timestamp", "on")]);
        let db_url = cluster.create_database("bench");
        cluster.psql(
            "bench",
            &format!(
                "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
                 ALTER TABLE items REPLICA IDENTITY FULL;
                 INSERT INTO items SELECT i, 0, 'item ' || i FROM generate_series(1, {ITEMS}) i;
                 CREATE TABLE vehicles (id int PRIMARY KEY, v int);
                 INSERT INTO vehicles SELECT i, 0 FROM generate_series(1, {VEHICLES}) i;
                 CREATE PUBLICATION {PUBLICATION} FOR TABLE items, vehicles;
                 VACUUM ANALYZE;"
            ),
        );
        let pg = connect_pg(&db_url).await;
        let redis = RedisServer::start();
        // The driver's default 500 ms response timeout is shorter than one KEYS over 1M keys
        // can take, and the point of that baseline is how long it blocks.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(120)));
        let redis_con = redis
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to the bench redis");
        let work = tempfile::tempdir().expect("create the work directory");
        let rules_dir = work.path().join("rules");
        std::fs::create_dir(&rules_dir).expect("create the rules directory");
        std::fs::write(rules_dir.join("bench.toml"), RULES).expect("write the rules");
        let peer = prepare_peer();
        if let Err(reason) = &peer {
            eprintln!("node peer: n/a ({reason})");
        }
        Bench {
            cluster,
            redis,
            db_url,
            pg,
            redis_con,
            work,
            rules_dir,
            recvlogical: pg_bindir().join("pg_recvlogical"),
            peer,
            clock_ticks: clock_ticks(),
        }
    }

    /// The line above the tables: machine, server versions, node.
    async fn header(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let pg_version: String = self
            .pg
            .query_one("SHOW server_version", &[])
            .await
            .expect("SHOW server_version")
            .get(0);
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.redis_con.clone())
            .await
            .expect("INFO server");
        let redis_version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        let node = Command::new("node")
            .arg("--version")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map_or("n/a".to_owned(), |out| {
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            });
        format!(
            "cores: {cores}, PostgreSQL {pg_version} \
             (synchronous_commit=on, fsync=off), Redis {redis_version}, node {node}, \
             invalidator {} (bench profile)",
            env!("CARGO_PKG_VERSION")
        )
    }

    /// A fresh connection for the latency load, apart from the admin one.
    async fn connect(&self) -> Client {
        connect_pg(&self.db_url).await
    }

    /// Creates a pgoutput slot named `name` at the current end of the WAL.
    async fn create_slot(&self, name: &str) {
        self.pg
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&name],
            )
            .await
            .unwrap_or_else(|e| panic!("create slot {name}: {e}"));
    }

    /// Drops slot `name`, waiting for the walsender of a consumer that just exited to let go.
    async fn drop_slot(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let result = self
                .pg
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await;
            match result {
                Ok(_) => return,
                // "is active for PID": the walsender has not noticed the exit yet.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("drop slot {name}: {e}"),
            }
        }
    }

    /// The current end of the WAL.
    async fn wal_lsn(&self) -> u64 {
        let text: String = self
            .pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn")
            .get(0);
        parse_lsn(&text)
    }

    /// Waits until slot `slot` has acknowledged `lsn` or more, polling every millisecond;
    /// returns false at the deadline or, through `alive`, when the consumer died.
    async fn wait_confirmed(
        &self,
        slot: &str,
        lsn: u64,
        deadline: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> bool {
        let stmt = self
            .pg
            .prepare(
                "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) \
                 FROM pg_replication_slots WHERE slot_name = $2",
            )
            .await
            .expect("prepare the slot poll");
        let lsn = format_lsn(lsn);
        let start = Instant::now();
        loop {
            let done: bool = self
                .pg
                .query_one(&stmt, &[&lsn, &slot])
                .await
                .unwrap_or_else(|e| panic!("poll slot {slot}: {e}"))
                .get(0);
            if done {
                return true;
            }
            if start.elapsed() >= deadline || !alive() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Writes a config for `invalidator run` on `slot` and returns it with its HTTP port.
    fn invalidator_config(&self, slot: &str) -> (PathBuf, u16) {
        let http = free_port();
        let config = self.work.path().join(format!("{slot}.toml"));
        let text = format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{PUBLICATION}\"\n\n\
             [redis]\nurl = \"{}\"\n\n[rules]\npath = \"{}\"\n\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\n[log]\nlevel = \"warn\"\n",
            self.db_url,
            self.redis.url(),
            self.rules_dir.display()
        );
        std::fs::write(&config, text).expect("write the invalidator config");
        (config, http)
    }

    /// Starts a consumer on `slot`. `stop_at` is where the self-stopping consumers (pg_recvlogical
    /// and the peer) exit: for pg_recvlogical the end of the WAL, for the peer a position that
    /// only the last commit's end reaches. `debug_log` turns on invalidator's per-transaction
    /// JSON log.
    fn spawn(
        &self,
        consumer: Consumer,
        slot: &str,
        stop_at: Option<(u64, u64)>,
        debug_log: bool,
    ) -> Result<Proc, String> {
        let log = self
            .work
            .path()
            .join(format!("{slot}-{}.log", unique_name("run")));
        let mut cmd;
        let mut http = None;
        match consumer {
            Consumer::Invalidator => {
                let (config, port) = self.invalidator_config(slot);
                http = Some(port);
                cmd = invalidator_command(&config);
                if debug_log {
                    cmd.env("RUST_LOG", "info,invalidator::pipeline=debug")
                        .env("INVALIDATOR_LOG_FORMAT", "json");
                }
            }
            Consumer::Recvlogical => {
                let (end, _) = stop_at.expect("pg_recvlogical always gets an end position");
                cmd = Command::new(&self.recvlogical);
                cmd.args(["-h", "127.0.0.1", "-p"])
                    .arg(self.cluster.port().to_string())
                    .args(["-U", "postgres", "-d", "bench", "--slot", slot, "--start"])
                    .args(["-o", "proto_version=1", "-o"])
                    .arg(format!("publication_names={PUBLICATION}"))
                    .arg("--endpos")
                    .arg(format_lsn(end))
                    .args(["--no-loop", "-f", "/dev/null"]);
            }
            Consumer::Peer => {
                let dir = self.peer.as_ref().map_err(Clone::clone)?;
                cmd = Command::new("node");
                cmd.current_dir(dir)
                    .arg("peer.mjs")
                    .arg(&self.db_url)
                    .arg(slot)
                    .arg(PUBLICATION)
                    .arg(&self.rules_dir)
                    .env("PEER_REDIS_PORT", self.redis.port().to_string());
                if let Some((_, peer_stop)) = stop_at {
                    cmd.arg("--stop-at-lsn").arg(format_lsn(peer_stop));
                }
            }
        }
        self.launch(consumer, cmd, log, http)
    }

    /// Starts `invalidator run` with `config` (its HTTP port `http`) and the settings `env` on
    /// top, for a section with rules and a database of its own; the log is named after `slot`.
    fn spawn_invalidator(
        &self,
        slot: &str,
        config: &Path,
        http: u16,
        env: &[(&str, &str)],
    ) -> Result<Proc, String> {
        let log = self
            .work
            .path()
            .join(format!("{slot}-{}.log", unique_name("run")));
        let mut cmd = invalidator_command(config);
        cmd.envs(env.iter().copied());
        self.launch(Consumer::Invalidator, cmd, log, Some(http))
    }

    /// Spawns `cmd` for `consumer` with its stderr in `log`.
    fn launch(
        &self,
        consumer: Consumer,
        mut cmd: Command,
        log: PathBuf,
        http: Option<u16>,
    ) -> Result<Proc, String> {
        let stderr = std::fs::File::create(&log).map_err(|e| format!("create {log:?}: {e}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", consumer.name()))?;
        Ok(Proc {
            name: consumer.name(),
            child: Some(child),
            log,
            http,
            clock_ticks: self.clock_ticks,
        })
    }

    /// A clone of the shared Redis connection (multiplexed, so clones are cheap).
    fn redis(&self) -> MultiplexedConnection {
        self.redis_con.clone()
    }
}

/// `invalidator run --config <config>` with none of the caller's INVALIDATOR_* variables:
/// unknown ones are errors for the binary, and the bench's own INVALIDATOR_BENCH_PEER_DIR is
/// one; URLs come from the config only.
fn invalidator_command(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_invalidator"));
    cmd.arg("run").arg("--config").arg(config);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("INVALIDATOR_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG");
    cmd
}

/// Connects to Postgres and drives the connection in the background.
async fn connect_pg(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection ended: {e}");
        }
    });
    client
}

/// The bin directory of the newest Postgres under /usr/lib/postgresql, where pg_recvlogical
/// lives (Debian puts only wrappers on PATH); falls back to PATH.
fn pg_bindir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| dir.join("pg_recvlogical").exists())
        .collect();
    found.sort();
    found.pop().map_or_else(PathBuf::new, |(_, dir)| dir)
}

/// Clock ticks per second (`getconf CLK_TCK`), the unit of the CPU times in /proc/PID/stat.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Copies the Node peer to `target/bench-node-peer` (the shared directory may be read-only) and
/// installs its packages once; any failure makes the peer `n/a` instead of failing the bench.
fn prepare_peer() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::env::var_os("INVALIDATOR_BENCH_PEER_DIR")
        .map_or_else(|| manifest.join("../shared/peers/node"), PathBuf::from);
    let dest = manifest.join("target/bench-node-peer");
    if !source.join("peer.mjs").exists() {
        return Err(format!("no peer.mjs in {}", source.display()));
    }
    let version = Command::new("node").arg("--version").output();
    if !version.is_ok_and(|out| out.status.success()) {
        return Err("node is not installed".to_owned());
    }
    std::fs::create_dir_all(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    for entry in std::fs::read_dir(&source).map_err(|e| format!("read {source:?}: {e}"))? {
        let entry = entry.map_err(|e| format!("read {source:?}: {e}"))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file {
            std::fs::copy(entry.path(), dest.join(entry.file_name()))
                .map_err(|e| format!("copy {:?}: {e}", entry.path()))?;
        }
    }
    if !dest.join("node_modules").exists() {
        eprintln!("node peer: npm install in {}", dest.display());
        let log = dest.join("npm-install.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("create {log:?}: {e}"))?;
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&dest)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .status()
            .map_err(|e| format!("npm: {e}"))?;
        if !status.success() {
            // A half-installed node_modules would be taken as installed next time.
            let _ = std::fs::remove_dir_all(dest.join("node_modules"));
            return Err(format!("npm install failed, see {}", log.display()));
        }
    }
    Ok(dest)
}

// ---------------------------------------------------------------------------------------------
// Processes and what /proc says about them.

/// CPU and memory of a consumer, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    /// utime + stime in seconds.
    cpu_seconds: f64,
    /// Peak resident set (VmHWM) in KiB.
    peak_kib: u64,
    /// Current resident set (VmRSS) in KiB.
    rss_kib: u64,
}

/// A consumer process; dropping it kills it.
struct Proc {
    /// The consumer's name, for messages.
    name: &'static str,
    /// The process; `None` once reaped.
    child: Option<Child>,
    /// Its stderr.
    log: PathBuf,
    /// invalidator's HTTP port (`/metrics`).
    http: Option<u16>,
    /// Clock ticks per second.
    clock_ticks: f64,
}

impl Proc {
    /// The process id.
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The state letter and utime + stime in seconds from /proc/PID/stat; `None` once reaped.
    fn stat(&self) -> Option<(char, f64)> {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // The command name may contain spaces; the fields after its closing parenthesis do not.
        let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
        let state = fields.first()?.chars().next()?;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((state, (utime + stime) / self.clock_ticks))
    }

    /// A `Vm*` line of /proc/PID/status in KiB (absent for a zombie).
    fn status_kib(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// CPU and memory now; `None` if the process has exited.
    fn usage(&self) -> Option<Usage> {
        let (state, cpu_seconds) = self.stat()?;
        if state == 'Z' {
            return None;
        }
        Some(Usage {
            cpu_seconds,
            peak_kib: self.status_kib("VmHWM")?,
            rss_kib: self.status_kib("VmRSS")?,
        })
    }

    /// Whether the process still runs (not exited, not a zombie).
    fn alive(&self) -> bool {
        self.stat().is_some_and(|(state, _)| state != 'Z')
    }

    /// Waits until the process exits on its own, polling /proc every millisecond. The CPU time
    /// is the zombie's final figure (read before reaping, so it is exact); the peak memory is
    /// the last VmHWM seen alive, which a process winding down no longer raises.
    async fn wait_exit(&mut self, deadline: Duration) -> Result<(Instant, Usage), String> {
        let start = Instant::now();
        let mut last = Usage::default();
        loop {
            match self.stat() {
                Some(('Z', cpu_seconds)) => {
                    let exited = Instant::now();
                    let status = self.reap();
                    if !status.is_some_and(|s| s.success()) {
                        return Err(format!("{} exited with {status:?}", self.name));
                    }
                    last.cpu_seconds = cpu_seconds;
                    return Ok((exited, last));
                }
                Some(_) => {
                    if let Some(usage) = self.usage() {
                        last = usage;
                    }
                }
                None => return Err(format!("{} vanished", self.name)),
            }
            if start.elapsed() >= deadline {
                return Err(format!("timeout after {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends SIGTERM and waits up to 20 s for the exit, then kills.
    fn terminate(&mut self) {
        if self.child.is_none() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.alive() {
            eprintln!("{} did not stop on SIGTERM, killing it", self.name);
        }
        self.kill();
    }

    /// Kills (if still running) and reaps.
    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.reap();
    }

    /// Reaps the process and returns its exit status.
    fn reap(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut child| child.wait().ok())
    }

    /// The last lines of its stderr, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// A counter from invalidator's `/metrics`, if it is there.
    fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.http?, "/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Every series of metric `name` in invalidator's `/metrics` as (labels, value), the labels
    /// as written between the braces ("" for none); empty if nothing answers.
    fn metric_series(&self, name: &str) -> Vec<(String, f64)> {
        let Some(body) = self.http.and_then(|port| http_get(port, "/metrics")) else {
            return Vec::new();
        };
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (labels, value) = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                Some((labels.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET that returns the body, or `None` if nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Redis helpers.

/// Sets every key to "1" with pipelined MSETs.
async fn set_keys(con: &mut MultiplexedConnection, keys: &[String]) {
    for chunk in keys.chunks(MSET_KEYS * MSETS_PER_PIPELINE) {
        let mut pipe = redis::pipe();
        for mset in chunk.chunks(MSET_KEYS) {
            let cmd = pipe.cmd("MSET");
            for key in mset {
                cmd.arg(key).arg("1");
            }
            cmd.ignore();
        }
        pipe.exec_async(con).await.expect("MSET keys");
    }
}

/// How many of `keys` exist (pipelined EXISTS).
async fn count_existing(con: &mut MultiplexedConnection, keys: &[String]) -> u64 {
    let mut pipe = redis::pipe();
    for chunk in keys.chunks(MSET_KEYS) {
        pipe.cmd("EXISTS").arg(chunk);
    }
    let counts: Vec<u64> = pipe.query_async(con).await.expect("EXISTS keys");
    counts.iter().sum()
}

/// The number of keys in the database.
async fn dbsize(con: &mut MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(con).await.expect("DBSIZE")
}

/// `item:{id}` and `item:{id}:detail` for every id in `ids`.
fn item_keys(ids: impl Iterator<Item = i32>) -> Vec<String> {
    ids.flat_map(|id| [format!("item:{id}"), format!("item:{id}:detail")])
        .collect()
}

/// The keys of vehicles `vehicles`: `slots:{v}:{n}` for n in 1..=KEYS_PER_VEHICLE.
fn slot_keys(vehicles: impl Iterator<Item = i32>) -> Vec<String> {
    vehicles
        .flat_map(|v| (1..=KEYS_PER_VEHICLE).map(move |n| format!("slots:{v}:{n}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Drain.

/// One consumer's drain of one round.
#[derive(Clone, Copy, Debug)]
struct Drain {
    /// From spawn until done.
    seconds: f64,
    /// CPU and memory of the consumer.
    usage: Usage,
    /// Item keys still in Redis afterwards (must be 0 for consumers that delete).
    left: u64,
}

/// Every drain, per consumer, in round order.
type DrainResults = Vec<(Consumer, Vec<Result<Drain, String>>)>;

/// The consumers that take part: the peer only when it could be installed.
fn consumers(bench: &Bench) -> Vec<Consumer> {
    let mut all = vec![Consumer::Recvlogical, Consumer::Invalidator];
    if bench.peer.is_ok() {
        all.push(Consumer::Peer);
    }
    all
}

/// Three rounds of: fresh slots, 100k updates in the WAL, then each consumer alone (the order
/// rotates, so no consumer always runs first on a cold cache or last on a warm one).
async fn drain_section(bench: &Bench) -> DrainResults {
    let lineup = consumers(bench);
    let mut results: DrainResults = lineup.iter().map(|&c| (c, Vec::new())).collect();
    for round in 0..ROUNDS {
        let mut order = lineup.clone();
        let shift = round % order.len();
        order.rotate_left(shift);
        // Slots before the writes, so every consumer reads the same WAL.
        let slots: Vec<String> = order
            .iter()
            .map(|c| format!("drain_{round}_{}", c.tag()))
            .collect();
        for slot in &slots {
            bench.create_slot(slot).await;
        }
        eprintln!("drain round {}: writing 100k updates", round + 1);
        let (end, peer_stop) = write_drain_updates(bench).await;
        for (consumer, slot) in order.iter().zip(&slots) {
            // Every key present, so each UNLINK deletes something.
            set_keys(&mut bench.redis(), &item_keys(1..=ITEMS)).await;
            let result = drain_one(bench, *consumer, slot, end, peer_stop).await;
            match &result {
                Ok(d) => eprintln!(
                    "drain round {}: {:<15} {:.3} s, cpu {:.2} s, peak {:.1} MiB",
                    round + 1,
                    consumer.name(),
                    d.seconds,
                    d.usage.cpu_seconds,
                    mib(d.usage.peak_kib)
                ),
                Err(e) => eprintln!("drain round {}: {} FAILED: {e}", round + 1, consumer.name()),
            }
            if let Ok(d) = &result
                && d.left > 0
            {
                eprintln!(
                    "!!! drain round {}: {} left {} item keys behind",
                    round + 1,
                    consumer.name(),
                    d.left
                );
            }
            bench.drop_slot(slot).await;
            let entry = results
                .iter_mut()
                .find(|(c, _)| c == consumer)
                .expect("every consumer has an entry");
            entry.1.push(result);
        }
    }
    // The drain leaves no keys, so the next section starts from an empty Redis.
    redis::cmd("FLUSHALL")
        .exec_async(&mut bench.redis())
        .await
        .expect("FLUSHALL");
    results
}

/// Writes 100 transactions of 1000 updated rows. Returns the end of the WAL afterwards (where
/// pg_recvlogical stops and invalidator must have acknowledged) and the position just past the
/// WAL before the last commit, which only the last commit's end LSN reaches (the peer stops at
/// the first commit whose end reaches it, and a later unrelated WAL record would never be one).
async fn write_drain_updates(bench: &Bench) -> (u64, u64) {
    // One statement per simple query, so the DO block's COMMITs are allowed.
    bench
        .pg
        .batch_execute(&format!(
            "DO $$ BEGIN
               FOR lo IN 1..{ITEMS} - {ROWS_PER_TXN} BY {ROWS_PER_TXN} LOOP
                 UPDATE items SET v = v + 1 WHERE id BETWEEN lo AND lo + {ROWS_PER_TXN} - 1;
                 COMMIT;
               END LOOP;
             END $$"
        ))
        .await
        .expect("write the drain updates");
    let before_last = bench.wal_lsn().await;
    bench
        .pg
        .execute(
            "UPDATE items SET v = v + 1 WHERE id > $1",
            &[&(ITEMS - ROWS_PER_TXN)],
        )
        .await
        .expect("write the last drain transaction");
    (bench.wal_lsn().await, before_last + 1)
}

/// Runs one consumer until it has processed everything up to `end` and measures it.
async fn drain_one(
    bench: &Bench,
    consumer: Consumer,
    slot: &str,
    end: u64,
    peer_stop: u64,
) -> Result<Drain, String> {
    let start = Instant::now();
    let mut proc = bench.spawn(consumer, slot, Some((end, peer_stop)), false)?;
    let (done, usage) = match consumer {
        Consumer::Invalidator => {
            // It never exits on its own: done is when the slot says everything is acknowledged.
            let confirmed = bench
                .wait_confirmed(slot, end, DRAIN_TIMEOUT, || proc.alive())
                .await;
            let done = Instant::now();
            let usage = proc.usage();
            match (confirmed, usage) {
                (true, Some(usage)) => {
                    proc.terminate();
                    (done, usage)
                }
                _ => return Err(format!("did not finish: {}", proc.log_tail())),
            }
        }
        Consumer::Recvlogical | Consumer::Peer => proc
            .wait_exit(DRAIN_TIMEOUT)
            .await
            .map_err(|e| format!("{e}: {}", proc.log_tail()))?,
    };
    let left = match consumer {
        Consumer::Recvlogical => 0,
        Consumer::Invalidator | Consumer::Peer => dbsize(&mut bench.redis()).await,
    };
    Ok(Drain {
        seconds: (done - start).as_secs_f64(),
        usage,
        left,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Latency.

/// One consumer at one rate.
#[derive(Debug, Default)]
struct Latency {
    /// Commits sent.
    commits: usize,
    /// Commits per second actually achieved by the load.
    achieved_rate: f64,
    /// Commit returned to the client → key gone, in ms.
    outside: Vec<f64>,
    /// WAL commit timestamp → key gone, in ms.
    inside: Vec<f64>,
    /// invalidator's own commit → confirmed figures, in ms (`None`: not in its log).
    self_measured: Option<Vec<f64>>,
    /// Commits whose key was never seen deleted.
    missing: usize,
    /// VmRSS at the end of the run.
    rss_kib: u64,
}

/// Every latency run: rate, consumer, result.
type LatencyResults = Vec<(u32, Consumer, Result<Latency, String>)>;

/// Each rate, each consumer alone (the peer only when installed).
async fn latency_section(bench: &Bench) -> LatencyResults {
    // "E": keyevent notifications, "g": generic commands (DEL, UNLINK emit "del").
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Eg")
        .exec_async(&mut bench.redis())
        .await
        .expect("enable keyspace notifications");
    let load = bench.connect().await;
    let mut results = Vec::new();
    for (rate, commits) in RATES {
        for consumer in consumers(bench) {
            if consumer == Consumer::Recvlogical {
                continue;
            }
            eprintln!(
                "latency: {} at {rate}/s, {commits} commits",
                consumer.name()
            );
            let result = latency_one(bench, &load, consumer, rate, commits).await;
            match &result {
                Ok(l) => eprintln!(
                    "latency: {} at {rate}/s: achieved {:.0}/s, outside p50 {:.3} ms, \
                     missing {}",
                    consumer.name(),
                    l.achieved_rate,
                    percentile(&l.outside, 50.0).unwrap_or(f64::NAN),
                    l.missing
                ),
                Err(e) => eprintln!("latency: {} at {rate}/s FAILED: {e}", consumer.name()),
            }
            results.push((rate, consumer, result));
        }
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .exec_async(&mut bench.redis())
        .await
        .expect("disable keyspace notifications");
    redis::cmd("FLUSHALL")
        .exec_async(&mut bench.redis())
        .await
        .expect("FLUSHALL");
    results
}

/// One consumer at one rate: start it, warm it up, run the open-loop load, collect deletions.
async fn latency_one(
    bench: &Bench,
    load: &Client,
    consumer: Consumer,
    rate: u32,
    commits: usize,
) -> Result<Latency, String> {
    let slot = format!("latency_{rate}_{}", consumer.tag());
    bench.create_slot(&slot).await;
    let commits_i32 = i32::try_from(commits).expect("commits fit in an id");
    set_keys(&mut bench.redis(), &item_keys(1..=commits_i32)).await;
    let mut proc = match bench.spawn(consumer, &slot, None, true) {
        Ok(proc) => proc,
        Err(e) => {
            bench.drop_slot(&slot).await;
            return Err(e);
        }
    };
    let outcome = async {
        warm_up(bench, &slot, &proc).await?;
        let log_offset = std::fs::metadata(&proc.log).map_or(0, |m| m.len());
        let gone = watch_deletions(bench, commits_i32).await;
        let sent = open_loop(load, rate, commits_i32).await;
        // Deletions still in flight after the last commit get a grace period.
        let deadline = Instant::now() + LATENCY_GRACE;
        while lock(&gone.seen).len() < commits && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rss_kib = proc.usage().map_or(0, |u| u.rss_kib);
        gone.task.abort();
        let self_measured = match consumer {
            Consumer::Invalidator => self_measured(&proc.log, log_offset),
            _ => None,
        };
        let seen = std::mem::take(&mut *lock(&gone.seen));
        Ok::<_, String>((sent, seen, self_measured, rss_kib))
    }
    .await;
    proc.terminate();
    bench.drop_slot(&slot).await;
    let (sent, seen, self_measured, rss_kib) = outcome?;
    let commit_ts = commit_timestamps(bench, &sent.commits).await;
    let mut latency = Latency {
        commits,
        achieved_rate: sent.achieved_rate,
        self_measured,
        rss_kib,
        ..Latency::default()
    };
    for (id, commit) in (1..).zip(&sent.commits) {
        let Some(gone) = seen.get(&id) else {
            latency.missing += 1;
            continue;
        };
        let gone_us = unix_us(*gone);
        latency
            .outside
            .push((gone_us - unix_us(commit.returned)) as f64 / 1e3);
        if let Some(ts) = commit_ts.get(&commit.txid) {
            latency.inside.push((gone_us - ts) as f64 / 1e3);
        }
    }
    Ok(latency)
}

/// Commits a few updates on ids outside the measured range and waits until the consumer has
/// acknowledged the last one, so it is connected, streaming and caught up when the load starts.
async fn warm_up(bench: &Bench, slot: &str, proc: &Proc) -> Result<(), String> {
    let mut before_last = 0;
    for id in ITEMS - WARM_UP_COMMITS + 1..=ITEMS {
        before_last = bench.wal_lsn().await;
        bench
            .pg
            .execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&id])
            .await
            .expect("warm-up update");
    }
    let caught_up = bench
        .wait_confirmed(slot, past(before_last), Duration::from_secs(60), || {
            proc.alive()
        })
        .await;
    if caught_up {
        Ok(())
    } else {
        Err(format!("did not catch up: {}", proc.log_tail()))
    }
}

/// The keyspace-notification listener of one latency run.
struct Deletions {
    /// id → when `item:{id}` was reported deleted (the first time).
    seen: Arc<Mutex<HashMap<i32, SystemTime>>>,
    /// The task reading notifications; aborted at the end of the run.
    task: tokio::task::JoinHandle<()>,
}

/// Subscribes to `del` events (UNLINK emits them too) and records when each `item:{id}` with
/// id in 1..=max went; returns once subscribed, so no deletion of the run is missed.
async fn watch_deletions(bench: &Bench, max: i32) -> Deletions {
    let mut pubsub = bench
        .redis
        .client()
        .get_async_pubsub()
        .await
        .expect("open a pub/sub connection");
    pubsub
        .subscribe("__keyevent@0__:del")
        .await
        .expect("subscribe to del events");
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let sink = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            // The clock first, before any parsing or locking.
            let now = SystemTime::now();
            let id = std::str::from_utf8(msg.get_payload_bytes())
                .ok()
                .and_then(|key| key.strip_prefix("item:")?.parse::<i32>().ok());
            if let Some(id) = id.filter(|id| (1..=max).contains(id)) {
                lock(&sink).entry(id).or_insert(now);
            }
        }
    });
    Deletions { seen, task }
}

/// One commit of the load.
struct Commit {
    /// `txid_current()` of the commit (epoch-qualified).
    txid: i64,
    /// When the commit returned to the client.
    returned: SystemTime,
}

/// The commits of one run and the rate the load achieved.
struct Sent {
    /// Commit i updated id i + 1.
    commits: Vec<Commit>,
    /// Commits per second, first to last.
    achieved_rate: f64,
}

/// Sends `count` single-row autocommit updates, commit i at t0 + i/rate (at once when behind:
/// open loop, so a slow consumer cannot slow the load down and hide its own latency).
async fn open_loop(load: &Client, rate: u32, count: i32) -> Sent {
    let stmt = load
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1 RETURNING txid_current()")
        .await
        .expect("prepare the load update");
    let mut commits = Vec::with_capacity(count as usize);
    let t0 = tokio::time::Instant::now();
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
        tokio::time::sleep_until(due).await;
        let row = load
            .query_one(&stmt, &[&(i + 1)])
            .await
            .expect("load update");
        commits.push(Commit {
            txid: row.get(0),
            returned: SystemTime::now(),
        });
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Sent {
        achieved_rate: f64::from(count - 1) / elapsed.max(1e-9),
        commits,
    }
}

/// The WAL commit timestamps (µs since the epoch) of `commits`, by txid, in one query.
async fn commit_timestamps(bench: &Bench, commits: &[Commit]) -> HashMap<i64, i64> {
    let txids: Vec<i64> = commits.iter().map(|c| c.txid).collect();
    // txid_current() carries the epoch in its high 32 bits; xid is the low 32.
    let rows = bench
        .pg
        .query(
            "SELECT x, (extract(epoch FROM pg_xact_commit_timestamp( \
                 (x % 4294967296)::text::xid)) * 1000000)::int8 \
             FROM unnest($1::int8[]) AS x",
            &[&txids],
        )
        .await
        .expect("fetch commit timestamps");
    rows.iter()
        .filter_map(|row| Some((row.get::<_, i64>(0), row.get::<_, Option<i64>>(1)?)))
        .collect()
}

/// invalidator's own commit → confirmed figures (ms) from its JSON log after `offset`, or
/// `None` when the log has no "transaction confirmed" events.
fn self_measured(log: &Path, offset: u64) -> Option<Vec<f64>> {
    let bytes = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(offset as usize..)?);
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["fields"]["message"] == "transaction confirmed")
        .filter_map(|event| event["fields"]["commit_to_confirmed_us"].as_f64())
        .map(|us| us / 1e3)
        .collect();
    (!values.is_empty()).then_some(values)
}

// ---------------------------------------------------------------------------------------------
// 3. Wildcards.

/// One strategy of the wildcard section.
struct Wildcard {
    /// What ran.
    label: String,
    /// Patterns per burst actually run: all 200, or a sample for the strategies that pay a
    /// whole keyspace walk per pattern (their cost is linear in patterns, so it scales).
    patterns: i32,
    /// Seconds of each round, or why there are none.
    rounds: Result<Vec<f64>, String>,
    /// SCAN calls of one round, if known.
    scan_calls: Option<u64>,
    /// `None` if every round deleted exactly the burst's keys; otherwise what was wrong.
    wrong: Option<String>,
}

impl Wildcard {
    /// A row without figures, saying why.
    fn not_run(label: &str, patterns: i32, reason: String) -> Wildcard {
        Wildcard {
            label: label.to_owned(),
            patterns,
            rounds: Err(reason),
            scan_calls: None,
            wrong: None,
        }
    }
}

/// The wildcard results and the unit: one bare SCAN pass.
struct WildcardResults {
    /// Seconds of each round of one SCAN pass over the whole keyspace.
    pass_rounds: Vec<f64>,
    /// SCAN calls of one pass.
    pass_calls: u64,
    /// The strategies, in the order they ran.
    rows: Vec<Wildcard>,
}

/// The in-process baselines, each over one Redis connection.
#[derive(Clone, Copy)]
enum Baseline {
    /// SCAN MATCH p COUNT 1000 to the end for each pattern, UNLINK per page.
    PerPatternScan,
    /// KEYS p for each pattern, then one DEL of everything (the seed plan).
    Keys,
}

/// How many patterns the per-pattern strategies run: each pattern costs a whole keyspace walk
/// (about 0.8 s over 1M keys here), so all 200 would take minutes; env
/// `INVALIDATOR_BENCH_SAMPLE_PATTERNS` (1..=200) changes it, 200 runs them all.
fn sample_patterns() -> i32 {
    std::env::var("INVALIDATOR_BENCH_SAMPLE_PATTERNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .clamp(1, BURST_VEHICLES)
}

/// 1M keys, a burst of 200 patterns: invalidator (one transaction), the bare SCAN pass, SCAN per
/// pattern, KEYS per pattern, and the peer.
async fn wildcard_section(bench: &Bench) -> WildcardResults {
    let mut con = bench.redis();
    let all = slot_keys(1..=VEHICLES);
    eprintln!("wildcards: loading {} keys", all.len());
    let t = Instant::now();
    set_keys(&mut con, &all).await;
    eprintln!(
        "wildcards: loaded in {:.1} s, dbsize {}",
        t.elapsed().as_secs_f64(),
        dbsize(&mut con).await
    );
    drop(all);

    let mut pass_rounds = Vec::new();
    let mut pass_calls = 0;
    for _ in 0..ROUNDS {
        let (seconds, calls) = scan_pass(&mut con).await;
        eprintln!("wildcards: one SCAN pass {seconds:.3} s, {calls} calls");
        pass_rounds.push(seconds);
        pass_calls = calls;
    }

    let mut rows = vec![
        wildcard_consumer(
            bench,
            Consumer::Invalidator,
            "invalidator (one transaction, commit → acknowledged)",
            BURST_VEHICLES,
            ROUNDS,
        )
        .await,
    ];
    let sample = sample_patterns();
    for (baseline, label) in [
        (
            Baseline::PerPatternScan,
            "SCAN MATCH per pattern + UNLINK per page (one connection)",
        ),
        (Baseline::Keys, "KEYS per pattern, then one DEL (seed plan)"),
    ] {
        rows.push(run_baseline(&mut con, baseline, label, sample).await);
    }
    let label = "node peer (one transaction, SCAN per pattern)";
    rows.push(match &bench.peer {
        Err(reason) => Wildcard::not_run(label, sample, format!("n/a ({reason})")),
        Ok(_) => wildcard_consumer(bench, Consumer::Peer, label, sample, 1).await,
    });
    redis::cmd("FLUSHALL")
        .exec_async(&mut con)
        .await
        .expect("FLUSHALL");
    WildcardResults {
        pass_rounds,
        pass_calls,
        rows,
    }
}

/// One SCAN pass over the whole keyspace, COUNT 1000 and no MATCH, ignoring the keys: the
/// least any SCAN-based strategy must spend. Returns seconds and calls.
async fn scan_pass(con: &mut MultiplexedConnection) -> (f64, u64) {
    let start = Instant::now();
    let mut cursor = 0u64;
    let mut calls = 0;
    loop {
        let (next, _keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .expect("SCAN");
        calls += 1;
        if next == 0 {
            return (start.elapsed().as_secs_f64(), calls);
        }
        cursor = next;
    }
}

/// Runs an in-process baseline once on the first `patterns` vehicles' patterns, checks that
/// exactly their keys went, and restores them.
async fn run_baseline(
    con: &mut MultiplexedConnection,
    baseline: Baseline,
    label: &str,
    patterns: i32,
) -> Wildcard {
    let burst: Vec<String> = (1..=patterns).map(|v| format!("slots:{v}:*")).collect();
    let start = Instant::now();
    let calls = match baseline {
        Baseline::PerPatternScan => per_pattern_scan(con, &burst).await,
        Baseline::Keys => {
            keys_strategy(con, &burst).await;
            0
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let wrong = check_and_restore(con, patterns).await;
    eprintln!("wildcards: {label}: {patterns} patterns in {seconds:.3} s, {calls} SCAN calls");
    Wildcard {
        label: label.to_owned(),
        patterns,
        rounds: Ok(vec![seconds]),
        scan_calls: Some(calls),
        wrong,
    }
}

/// The per-pattern strategy: SCAN MATCH p COUNT 1000 to the end for each pattern, UNLINKing
/// each page's keys. Returns the SCAN calls.
async fn per_pattern_scan(con: &mut MultiplexedConnection, patterns: &[String]) -> u64 {
    let mut calls = 0;
    for pattern in patterns {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(con)
                .await
                .expect("SCAN MATCH");
            calls += 1;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .exec_async(con)
                    .await
                    .expect("UNLINK");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    calls
}

/// The seed plan's strategy: KEYS p for each pattern, then one DEL of everything found.
async fn keys_strategy(con: &mut MultiplexedConnection, patterns: &[String]) {
    let mut found: Vec<Vec<u8>> = Vec::new();
    for pattern in patterns {
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(con)
            .await
            .expect("KEYS");
        found.extend(keys);
    }
    if !found.is_empty() {
        redis::cmd("DEL")
            .arg(&found)
            .exec_async(con)
            .await
            .expect("DEL");
    }
}

/// Starts `consumer` on a fresh slot and, once it is caught up, `rounds` times: commits one
/// transaction updating vehicles 1..=`vehicles` (one pattern each) and times from the commit's
/// return until the slot acknowledged it, then checks and restores the keys.
async fn wildcard_consumer(
    bench: &Bench,
    consumer: Consumer,
    label: &str,
    vehicles: i32,
    rounds: usize,
) -> Wildcard {
    let slot = format!("wildcards_{}", consumer.tag());
    bench.create_slot(&slot).await;
    let mut row = Wildcard::not_run(label, vehicles, String::new());
    let result = async {
        let proc = bench.spawn(consumer, &slot, None, false)?;
        // The warm-up touches items only; no item keys exist now, so it deletes nothing.
        warm_up(bench, &slot, &proc).await?;
        let mut seconds = Vec::new();
        for round in 0..rounds {
            let scans_before = scan_calls(consumer, &proc, bench).await;
            let before = bench.wal_lsn().await;
            bench
                .pg
                .execute("UPDATE vehicles SET v = v + 1 WHERE id <= $1", &[&vehicles])
                .await
                .expect("update the vehicles");
            let committed = Instant::now();
            let acked = bench
                .wait_confirmed(&slot, past(before), DRAIN_TIMEOUT, || proc.alive())
                .await;
            // invalidator acknowledges only what Redis confirmed, but the peer's library also
            // acknowledges what it merely received once 10 s pass without a status update, so
            // done is acknowledged *and* the keys are gone (one DBSIZE when both agree).
            let gone = acked && wait_keys_gone(&mut bench.redis(), vehicles).await;
            let elapsed = committed.elapsed().as_secs_f64();
            if !acked || !gone {
                return Err(format!("not done in time: {}", proc.log_tail()));
            }
            let scans_after = scan_calls(consumer, &proc, bench).await;
            if let (Some(b), Some(a)) = (scans_before, scans_after) {
                row.scan_calls = Some((a - b) as u64);
            }
            let wrong = check_and_restore(&mut bench.redis(), vehicles).await;
            eprintln!(
                "wildcards: {label}: round {}: {vehicles} patterns in {elapsed:.3} s, \
                 SCAN calls {:?}",
                round + 1,
                row.scan_calls
            );
            row.wrong = row.wrong.take().or(wrong);
            seconds.push(elapsed);
        }
        Ok((proc, seconds))
    }
    .await;
    row.rounds = match result {
        Ok((mut proc, seconds)) => {
            proc.terminate();
            Ok(seconds)
        }
        Err(e) => Err(format!("n/a ({})", short(&e))),
    };
    bench.drop_slot(&slot).await;
    row
}

/// SCAN calls so far: invalidator's own counter from `/metrics`, for the peer Redis's
/// `INFO commandstats` (nothing else scans while a consumer runs).
async fn scan_calls(consumer: Consumer, proc: &Proc, bench: &Bench) -> Option<f64> {
    if consumer == Consumer::Invalidator {
        return proc.metric("invalidator_scan_calls_total");
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut bench.redis())
        .await
        .expect("INFO commandstats");
    // `cmdstat_scan:calls=N,...`, absent until the first SCAN.
    let calls = stats.lines().find_map(|l| {
        l.strip_prefix("cmdstat_scan:calls=")?
            .split(',')
            .next()?
            .parse()
            .ok()
    });
    Some(calls.unwrap_or(0.0))
}

/// Polls DBSIZE every millisecond until the keys of vehicles 1..=`vehicles` are gone, for at
/// most [`DRAIN_TIMEOUT`].
async fn wait_keys_gone(con: &mut MultiplexedConnection, vehicles: i32) -> bool {
    let expected = (VEHICLES * KEYS_PER_VEHICLE - vehicles * KEYS_PER_VEHICLE) as u64;
    let start = Instant::now();
    while dbsize(con).await > expected {
        if start.elapsed() >= DRAIN_TIMEOUT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Checks that exactly the keys of vehicles 1..=`vehicles` are gone (DBSIZE is the rest, and
/// none of them exists); returns what was wrong, if anything, and restores them.
async fn check_and_restore(con: &mut MultiplexedConnection, vehicles: i32) -> Option<String> {
    let doomed = slot_keys(1..=vehicles);
    let expected = (VEHICLES * KEYS_PER_VEHICLE) as u64 - doomed.len() as u64;
    let size = dbsize(con).await;
    let survivors = count_existing(con, &doomed).await;
    set_keys(con, &doomed).await;
    if size == expected && survivors == 0 {
        return None;
    }
    let wrong = format!("dbsize {size} (want {expected}), {survivors} burst keys survived");
    eprintln!("!!! wildcards: {wrong}");
    Some(wrong)
}

// ---------------------------------------------------------------------------------------------
// Output.

/// Prints the drain table: seconds per round, median, ratio to pg_recvlogical.
fn print_drain(out: &mut String, drain: &DrainResults, peer_missing: Option<&str>) {
    let recv_median = drain
        .iter()
        .find(|(c, _)| *c == Consumer::Recvlogical)
        .and_then(|(_, runs)| median(&seconds(runs)));
    let _ = writeln!(
        out,
        "**1. Drain**: 100,000 row updates already in the WAL (100 transactions × 1,000 rows, \
         2 keys per row), each consumer alone on its own slot, spawn → done, {ROUNDS} rounds \
         in rotated order\n"
    );
    let mut head = "| consumer |".to_owned();
    let mut rule = "|---|".to_owned();
    for round in 1..=ROUNDS {
        let _ = write!(head, " round {round} (s) |");
        rule.push_str("---:|");
    }
    let _ = writeln!(
        out,
        "{head} median (s) | × pg_recvlogical | changes/s | keys left |\n{rule}---:|---:|---:|---:|"
    );
    for (consumer, runs) in drain {
        let mut line = format!("| {} |", consumer.name());
        for run in runs {
            match run {
                Ok(d) => {
                    let _ = write!(line, " {:.3} |", d.seconds);
                }
                Err(e) => {
                    let _ = write!(line, " failed ({}) |", short(e));
                }
            }
        }
        let med = median(&seconds(runs));
        let ratio = match (med, recv_median) {
            (Some(m), Some(r)) => format!("{:.2}×", m / r),
            _ => "n/a".to_owned(),
        };
        let left: u64 = runs.iter().flatten().map(|d| d.left).sum();
        let left = match consumer {
            Consumer::Recvlogical => "—".to_owned(),
            _ => left.to_string(),
        };
        let _ = writeln!(
            line,
            " {} | {ratio} | {} | {left} |",
            fmt_opt(med, 3),
            med.map_or("n/a".to_owned(), |m| format!("{:.0}", f64::from(ITEMS) / m)),
        );
        out.push_str(&line);
    }
    if let Some(reason) = peer_missing {
        let _ = writeln!(out, "| node peer | n/a ({reason}) |");
    }
    out.push('\n');
}

/// Prints the latency table, with invalidator's self-measured figure as an extra row.
fn print_latency(out: &mut String, latency: &LatencyResults, peer_missing: Option<&str>) {
    let _ = writeln!(
        out,
        "**2. Latency**: open-loop single-row autocommit updates at a steady rate, each \
         consumer alone and caught up; outside = commit returned to the client → key gone \
         (keyspace notification), inside = WAL commit timestamp → key gone; ms\n"
    );
    let _ = writeln!(
        out,
        "| rate | consumer | achieved/s | outside p50 | outside p99 | outside max | inside p50 \
         | inside p99 | inside max | never gone | steady RSS (MiB) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (rate, consumer, result) in latency {
        let commits = RATES.iter().find(|(r, _)| r == rate).map_or(0, |(_, c)| *c);
        let what = format!("{rate}/s ({commits} commits)");
        match result {
            Ok(l) => {
                let _ = writeln!(
                    out,
                    "| {what} | {} | {:.0} | {} | {} | {} of {} | {:.1} |",
                    consumer.name(),
                    l.achieved_rate,
                    triple(&l.outside),
                    triple(&l.inside),
                    l.missing,
                    l.commits,
                    mib(l.rss_kib),
                );
                if *consumer == Consumer::Invalidator {
                    let cells = match &l.self_measured {
                        Some(values) => triple(values),
                        None => "n/a | n/a | n/a".to_owned(),
                    };
                    let _ = writeln!(
                        out,
                        "| {what} | invalidator (self-measured, WAL commit ts → UNLINK \
                         confirmed) | — | — | — | — | {cells} | — | — |"
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "| {what} | {} | n/a ({}) | | | | | | | | |",
                    consumer.name(),
                    short(e)
                );
            }
        }
    }
    if let Some(reason) = peer_missing {
        let _ = writeln!(out, "| all | node peer | n/a ({reason}) |");
    }
    out.push('\n');
}

/// Prints the wildcard table in units of one bare SCAN pass; strategies run on a sample of the
/// patterns are scaled to 200 (marked ≈).
fn print_wildcards(out: &mut String, w: &WildcardResults) {
    let pass_s = median(&w.pass_rounds).unwrap_or(f64::NAN);
    let pass_calls = w.pass_calls;
    let _ = writeln!(
        out,
        "**3. Wildcards**: {} keys `slots:{{v}}:{{n}}`, a burst of {BURST_VEHICLES} patterns \
         `slots:{{v}}:*` (one per updated row) deleting {} keys; unit: one SCAN pass over the \
         whole keyspace (COUNT 1000, no MATCH, one connection) = {pass_s:.3} s (median of \
         {}), {pass_calls} calls. Strategies that walk the keyspace once per pattern ran on \
         the first patterns only and are scaled linearly to {BURST_VEHICLES} (≈)\n",
        VEHICLES * KEYS_PER_VEHICLE,
        BURST_VEHICLES * KEYS_PER_VEHICLE,
        w.pass_rounds.len(),
    );
    let _ = writeln!(
        out,
        "| strategy | patterns run | seconds per round | seconds for {BURST_VEHICLES} \
         patterns | × 1 SCAN pass | SCAN calls for {BURST_VEHICLES} | × pass calls | deleted \
         exactly the burst's keys |\n|---|---:|---:|---:|---:|---:|---:|---|"
    );
    let _ = writeln!(
        out,
        "| one SCAN pass, no MATCH (the unit) | — | {} | — | 1.00 | {pass_calls} | 1.00 | — |",
        list(&w.pass_rounds)
    );
    for row in &w.rows {
        let scale = f64::from(BURST_VEHICLES) / f64::from(row.patterns);
        let approx = if row.patterns < BURST_VEHICLES {
            "≈ "
        } else {
            ""
        };
        let (rounds, secs, times) = match &row.rounds {
            Ok(rounds) => {
                let med = median(rounds).unwrap_or(f64::NAN) * scale;
                (
                    list(rounds),
                    format!("{approx}{med:.3}"),
                    format!("{approx}{:.2}", med / pass_s),
                )
            }
            Err(e) => (e.clone(), String::new(), String::new()),
        };
        let (calls, calls_times) = match row.scan_calls {
            Some(0) => ("0".to_owned(), "0.00".to_owned()),
            Some(c) => {
                let c = c as f64 * scale;
                (
                    format!("{approx}{c:.0}"),
                    format!("{approx}{:.2}", c / pass_calls as f64),
                )
            }
            None => ("n/a".to_owned(), "n/a".to_owned()),
        };
        let ok = match (&row.rounds, &row.wrong) {
            (Err(_), _) => "—".to_owned(),
            (Ok(_), None) => format!("yes ({} keys)", row.patterns * KEYS_PER_VEHICLE),
            (Ok(_), Some(wrong)) => format!("**NO**: {wrong}"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {rounds} | {secs} | {times} | {calls} | {calls_times} | {ok} |",
            row.label, row.patterns
        );
    }
    out.push('\n');
}

/// Prints CPU and memory per consumer: drain peak and CPU, steady RSS at 1000/s.
fn print_resources(out: &mut String, drain: &DrainResults, latency: &LatencyResults) {
    let _ = writeln!(
        out,
        "**4. Resources**: CPU (utime + stime) and peak RSS (VmHWM) from /proc during the \
         drain (median CPU, highest peak of {ROUNDS} rounds), steady RSS (VmRSS) at the end \
         of the 1000/s latency run\n"
    );
    let _ = writeln!(
        out,
        "| consumer | CPU s per 100k changes | peak RSS (MiB) | steady RSS at 1000/s (MiB) |\n\
         |---|---:|---:|---:|"
    );
    let top_rate = RATES[RATES.len() - 1].0;
    for (consumer, runs) in drain {
        let ok: Vec<&Drain> = runs.iter().flatten().collect();
        let cpu: Vec<f64> = ok.iter().map(|d| d.usage.cpu_seconds).collect();
        let peak = ok.iter().map(|d| d.usage.peak_kib).max();
        let steady = latency
            .iter()
            .find(|(rate, c, _)| *rate == top_rate && c == consumer)
            .and_then(|(_, _, r)| r.as_ref().ok())
            .map_or("—".to_owned(), |l| format!("{:.1}", mib(l.rss_kib)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {steady} |",
            consumer.name(),
            fmt_opt(median(&cpu), 2),
            peak.map_or("n/a".to_owned(), |p| format!("{:.1}", mib(p))),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// The drain seconds of the successful runs.
fn seconds(runs: &[Result<Drain, String>]) -> Vec<f64> {
    runs.iter().flatten().map(|d| d.seconds).collect()
}

/// The median of `values` (the lower middle one for an even count), `None` when empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The nearest-rank percentile `p` of `values`, `None` when empty.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// "p50 | p99 | max" in ms with three decimals.
fn triple(values: &[f64]) -> String {
    let cell = |p| fmt_opt(percentile(values, p), 3);
    format!("{} | {} | {}", cell(50.0), cell(99.0), cell(100.0))
}

/// Seconds of each round, " / " between them.
fn list(values: &[f64]) -> String {
    let cells: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
    cells.join(" / ")
}

/// A number with `decimals`, or "n/a".
fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// KiB to MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The first line of an error, cut to fit a table cell.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").replace('|', "/");
    line.chars().take(80).collect()
}

/// Locks a mutex, ignoring poisoning (the listener never panics while holding it).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Microseconds since the Unix epoch.
fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Parses a Postgres LSN (`X/Y`, hex).
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("bad LSN {text}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|e| panic!("bad LSN {text}: {e}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|e| panic!("bad LSN {text}: {e}"));
    (hi << 32) | lo
}

/// A position that a slot's confirmed LSN reaches only once the first commit after `before`
/// (the WAL end just before it was written) is acknowledged. The margin is two bytes, not one,
/// because the Node peer's library reports LSN + 1 for what it processed, so a peer that has
/// acknowledged only the previous commit already shows `before + 1`; every commit ends dozens
/// of bytes after `before`.
fn past(before: u64) -> u64 {
    before + 2
}

/// Formats an LSN as Postgres does.
fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
