//! Section 5, consistency: readers doing cache-aside on real Postgres and Redis with the sidecar
//! running, writers updating the same rows, and a delay injected between a reader's database
//! read and its fill so that the read-populate race is likely. Three runs side by side:
//!
//! - plain: `GET`, on a miss `SELECT`, wait, `SET` (today's sidecar: deletes wait for
//!   visibility);
//! - guarded, deletes not waiting for visibility (`[pipeline] wait_visible = false`);
//! - guarded, deletes waiting for visibility (the default).
//!
//! Guarded readers call `invalidator_get` and `invalidator_fill`. After the writes stop and the
//! sidecar has caught up (asked through `/wait`), every cached value is compared with the row.
//! Before each guarded run, commit → key gone and commit → `/wait` answered are measured on
//! their own; after the three, the same probe runs once more against a sidecar in notify mode
//! (outbox and triggers set up for it, torn down after), so `/wait` is measured in both modes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{PgCluster, RedisServer, free_port};
use crate::{connect_pg, format_lsn, parse_lsn};

/// Rows the readers and writers share.
const ROWS: i32 = 200;
/// Concurrent readers.
const READERS: usize = 8;
/// Concurrent writers, each pausing [`WRITE_PAUSE`] between commits.
const WRITERS: usize = 2;
/// Between two commits of one writer.
const WRITE_PAUSE: Duration = Duration::from_millis(5);
/// The delay injected between a reader's database read and its fill.
const FILL_DELAY: Duration = Duration::from_millis(5);
/// How long each run's load lasts.
const RUN: Duration = Duration::from_secs(20);
/// The lease a guarded reader asks for.
const LEASE_MS: u64 = 2_000;
/// Commits of the latency probe, one at a time on an idle system.
const PROBES: usize = 300;

/// One run's way of reading.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// `GET` / `SET`.
    Plain,
    /// `invalidator_get` / `invalidator_fill`, deletes not waiting for visibility.
    GuardedNoWait,
    /// `invalidator_get` / `invalidator_fill`, deletes waiting for visibility.
    Guarded,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Fill::Plain => "plain GET/SET",
            Fill::GuardedNoWait => "guarded, no visibility wait",
            Fill::Guarded => "guarded (default)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Fill::Plain => "plain",
            Fill::GuardedNoWait => "nowait",
            Fill::Guarded => "guarded",
        }
    }

    fn wait_visible(self) -> bool {
        self != Fill::GuardedNoWait
    }
}

/// What one run measured.
pub struct Run {
    fill: Fill,
    /// Keys whose cached value differs from the row at the end.
    stale_keys: u64,
    /// Keys cached at the end.
    cached_keys: u64,
    /// Hits that returned a value older than a commit the sidecar had acknowledged (its slot's
    /// `confirmed_flush_lsn` past the commit) before the read: stale after the invalidation.
    stale_reads: u64,
    /// Reads answered (hits and database reads).
    reads: u64,
    /// Database reads.
    db_reads: u64,
    /// Fills stored.
    fills: u64,
    /// Guarded fills refused.
    refused: u64,
    /// `["wait", ms]` replies.
    waits: u64,
    /// Commits of the writers.
    commits: u64,
    /// Seconds the load ran.
    seconds: f64,
    /// Commit → key gone and commit → `/wait` 200, medians and p99 in ms; `None` for plain.
    latency: Option<[f64; 4]>,
}

/// What the section measured.
pub struct Section {
    /// The three runs, in replication mode.
    runs: Vec<Run>,
    /// The probe against a sidecar in notify mode: commit → key gone and commit → `/wait` 200,
    /// medians and p99 in ms.
    notify: [f64; 4],
}

/// Runs the three runs, then the notify-mode probe.
pub async fn section(
    cluster: &PgCluster,
    db_url: &str,
    redis: &RedisServer,
    work: &Path,
) -> Section {
    eprintln!("consistency: setting up");
    cluster.psql(
        "bench",
        &format!(
            "CREATE TABLE fresh (id int PRIMARY KEY, v bigint NOT NULL);
             INSERT INTO fresh SELECT i, 0 FROM generate_series(0, {ROWS}) i;
             CREATE PUBLICATION fresh FOR TABLE fresh;"
        ),
    );
    let rules = work.join("fresh-rules");
    std::fs::create_dir_all(&rules).expect("create the rules directory");
    std::fs::write(
        rules.join("fresh.toml"),
        "[[rule]]\ntable = \"fresh\"\nkeys = [\"fresh:{id}\"]\n",
    )
    .expect("write the rules");
    let mut deleter = invalidator::redis::Deleter::connect(&redis.url())
        .await
        .expect("connect to redis");
    deleter.load_library().await.expect("load the library");
    let mut runs = Vec::new();
    for fill in [Fill::Plain, Fill::GuardedNoWait, Fill::Guarded] {
        runs.push(run(fill, db_url, redis, work, &rules).await);
    }
    let notify = notify_probe(db_url, redis, work, &rules).await;
    Section { runs, notify }
}

/// The probe against a sidecar in notify mode: `setup` adds the outbox and the trigger on
/// `fresh`, `teardown` removes them (and the library, loaded again by the next user), so the
/// replication runs before it pay nothing for them.
async fn notify_probe(db_url: &str, redis: &RedisServer, work: &Path, rules: &Path) -> [f64; 4] {
    eprintln!("consistency: notify mode: latency probe");
    let http = free_port();
    let config = write_config(
        work,
        "fresh_notify",
        // A slot and a publication of its own, which teardown removes if setup made them.
        &format!(
            "url = \"{db_url}\"\nmode = \"notify\"\nslot = \"fresh_notify\"\n\
             publication = \"fresh_notify\""
        ),
        redis,
        rules,
        http,
        true,
    );
    let (code, out) = invalidator(&config, "setup");
    assert_eq!(code, Some(0), "setup in notify mode: {out}");
    let mut child = spawn(work, "fresh_notify", &config, http).await;
    let admin = connect_pg(db_url).await;
    let latency = probe(&admin, redis_connection(redis).await, http).await;
    let _ = child.kill();
    let _ = child.wait();
    // Postgres may take a moment to end the killed reader's session, which holds the lock
    // teardown checks.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = invalidator(&config, "teardown");
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "teardown in notify mode: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latency
}

/// Writes the configuration of one sidecar named `name`; `postgres` is the body of its
/// `[postgres]` section.
fn write_config(
    work: &Path,
    name: &str,
    postgres: &str,
    redis: &RedisServer,
    rules: &Path,
    http: u16,
    wait_visible: bool,
) -> PathBuf {
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[postgres]\n{postgres}\n\n\
             [redis]\nurl = \"{}\"\n\n[rules]\npath = \"{}\"\n\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\n[pipeline]\nwait_visible = {wait_visible}\n\n\
             [log]\nlevel = \"warn\"\n",
            redis.url(),
            rules.display(),
        ),
    )
    .expect("write the config");
    config
}

/// The binary, with no configuration from this process's environment.
fn command(config: &Path, subcommand: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_invalidator"));
    command.arg(subcommand).arg("--config").arg(config);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("INVALIDATOR_") {
            command.env_remove(name);
        }
    }
    command.env_remove("DATABASE_URL").env_remove("REDIS_URL");
    command
}

/// Runs `invalidator <subcommand>` to the end: its exit code and output.
fn invalidator(config: &Path, subcommand: &str) -> (Option<i32>, String) {
    let out = command(config, subcommand)
        .output()
        .unwrap_or_else(|e| panic!("run invalidator {subcommand}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Starts `invalidator run` (its log in `<name>.log`) and waits until `/readyz` says 200.
async fn spawn(work: &Path, name: &str, config: &Path, http: u16) -> std::process::Child {
    let log = std::fs::File::create(work.join(format!("{name}.log"))).expect("create the log");
    let child = command(config, "run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn invalidator");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(http, "/readyz").await != Some(200) {
        assert!(Instant::now() < deadline, "the sidecar did not get ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// A connection to `redis` for the probe and the readers.
async fn redis_connection(redis: &RedisServer) -> MultiplexedConnection {
    // The driver's default 500 ms response timeout is too short on a busy machine.
    let options =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis
        .client()
        .get_multiplexed_async_connection_with_config(&options)
        .await
        .expect("connect to redis")
}

/// One run: the sidecar, the probe (guarded runs), the load, the comparison.
async fn run(fill: Fill, db_url: &str, redis: &RedisServer, work: &Path, rules: &Path) -> Run {
    let slot = format!("fresh_{}", fill.tag());
    let admin = connect_pg(db_url).await;
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("create the slot");
    let http = free_port();
    let config = write_config(
        work,
        &slot,
        &format!("url = \"{db_url}\"\nslot = \"{slot}\"\npublication = \"fresh\""),
        redis,
        rules,
        http,
        fill.wait_visible(),
    );
    let mut child = spawn(work, &slot, &config, http).await;
    let redis_con = redis_connection(redis).await;
    let latency = if fill == Fill::Plain {
        None
    } else {
        eprintln!("consistency: {}: latency probe", fill.name());
        Some(probe(&admin, redis_con.clone(), http).await)
    };
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut redis_con.clone())
        .await
        .expect("FLUSHDB");

    eprintln!("consistency: {}: {} s of load", fill.name(), RUN.as_secs());
    let counters = Arc::new(Counters::default());
    let versions: Versions = Arc::default();
    let stop_writes = Arc::new(AtomicBool::new(false));
    let stop_reads = Arc::new(AtomicBool::new(false));
    // What the sidecar has acknowledged, polled from its slot: the end of the invalidation
    // window of every commit before it.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let poller = {
        let (db, acknowledged, stop, slot) = (
            connect_pg(db_url).await,
            acknowledged.clone(),
            stop_reads.clone(),
            slot.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let row = db
                    .query_one(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .expect("poll the slot");
                let lsn: Option<String> = row.get(0);
                acknowledged.store(lsn.map_or(0, |l| parse_lsn(&l)), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (db, versions, stop, counters) = (
            connect_pg(db_url).await,
            versions.clone(),
            stop_writes.clone(),
            counters.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9 + w as u64);
            while !stop.load(Ordering::Relaxed) {
                let id = 1 + (rng.next() % ROWS as u64) as i32;
                let row = db
                    .query_one(
                        "UPDATE fresh SET v = v + 1 WHERE id = $1 RETURNING v",
                        &[&id],
                    )
                    .await
                    .expect("update");
                let v: i64 = row.get(0);
                let at: String = db
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .expect("pg_current_wal_lsn")
                    .get(0);
                let at = parse_lsn(&at);
                versions
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push((v, at));
                counters.commits.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(WRITE_PAUSE).await;
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..READERS {
        let (db, mut con, versions, stop, counters, acknowledged) = (
            connect_pg(db_url).await,
            redis_con.clone(),
            versions.clone(),
            stop_reads.clone(),
            counters.clone(),
            acknowledged.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut rng = Rng(0x5851_F42D + r as u64);
            while !stop.load(Ordering::Relaxed) {
                let id = 1 + (rng.next() % ROWS as u64) as i32;
                let asked = acknowledged.load(Ordering::Relaxed);
                if let Some(v) = read(fill, &db, &mut con, id, &counters).await {
                    let newer = versions
                        .lock()
                        .unwrap()
                        .get(&id)
                        .is_some_and(|list| list.iter().any(|&(w, at)| w > v && at <= asked));
                    if newer {
                        counters.stale_reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counters.reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(RUN).await;
    stop_writes.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    let seconds = started.elapsed().as_secs_f64();
    // Readers go on until the sidecar has caught up, so their last fills race the last writes.
    let end: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn")
        .get(0);
    let path = format!("/wait?lsn={end}&timeout_ms=30000");
    assert_eq!(
        http_status(http, &path).await,
        Some(200),
        "the sidecar caught up"
    );
    tokio::time::sleep(FILL_DELAY * 4).await;
    stop_reads.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.expect("reader");
    }
    poller.await.expect("poller");

    let rows = admin
        .query("SELECT id, v FROM fresh WHERE id > 0", &[])
        .await
        .expect("read the rows");
    let mut con = redis_con.clone();
    let (mut stale_keys, mut cached_keys) = (0, 0);
    for row in rows {
        let (id, v): (i32, i64) = (row.get(0), row.get(1));
        let cached: redis::RedisResult<Option<String>> = redis::cmd("GET")
            .arg(format!("fresh:{id}"))
            .query_async(&mut con)
            .await;
        // A lease (WRONGTYPE) holds no value.
        if let Ok(Some(text)) = cached {
            cached_keys += 1;
            if text.parse::<i64>().ok() != Some(v) {
                stale_keys += 1;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "drop slot {slot}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = &counters;
    Run {
        fill,
        stale_keys,
        cached_keys,
        stale_reads: c.stale_reads.load(Ordering::Relaxed),
        reads: c.reads.load(Ordering::Relaxed),
        db_reads: c.db_reads.load(Ordering::Relaxed),
        fills: c.fills.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        waits: c.waits.load(Ordering::Relaxed),
        commits: c.commits.load(Ordering::Relaxed),
        seconds,
        latency,
    }
}

/// Each row's committed values and the WAL position read after each commit returned.
type Versions = Arc<Mutex<HashMap<i32, Vec<(i64, u64)>>>>;

/// The counters the readers and writers share.
#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    db_reads: AtomicU64,
    fills: AtomicU64,
    refused: AtomicU64,
    waits: AtomicU64,
    stale_reads: AtomicU64,
    commits: AtomicU64,
}

/// One cache-aside read of row `id`: the cached value of a hit, `None` when it came from the
/// database.
async fn read(
    fill: Fill,
    db: &tokio_postgres::Client,
    con: &mut MultiplexedConnection,
    id: i32,
    counters: &Counters,
) -> Option<i64> {
    let key = format!("fresh:{id}");
    if fill == Fill::Plain {
        let cached: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(con)
            .await
            .expect("GET");
        if let Some(text) = cached {
            return text.parse().ok();
        }
        let v = select(db, id, counters).await;
        tokio::time::sleep(FILL_DELAY).await;
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(v)
            .query_async(con)
            .await
            .expect("SET");
        counters.fills.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    loop {
        let (tag, value): (String, redis::Value) = redis::cmd("FCALL")
            .arg("invalidator_get")
            .arg(1)
            .arg(&key)
            .arg(LEASE_MS)
            .query_async(con)
            .await
            .expect("invalidator_get");
        match tag.as_str() {
            "hit" => {
                let text: String = redis::from_redis_value(value).expect("a value");
                return text.parse().ok();
            }
            "fill" => {
                let token: String = redis::from_redis_value(value).expect("a token");
                let v = select(db, id, counters).await;
                tokio::time::sleep(FILL_DELAY).await;
                let stored: i64 = redis::cmd("FCALL")
                    .arg("invalidator_fill")
                    .arg(1)
                    .arg(&key)
                    .arg(token)
                    .arg(v)
                    .arg(0)
                    .query_async(con)
                    .await
                    .expect("invalidator_fill");
                let counter = if stored == 1 {
                    &counters.fills
                } else {
                    &counters.refused
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {
                counters.waits.fetch_add(1, Ordering::Relaxed);
                let ms: u64 = redis::from_redis_value(value).unwrap_or(1);
                tokio::time::sleep(Duration::from_millis(ms.clamp(1, 2))).await;
            }
        }
    }
}

/// Reads row `id` from the database.
async fn select(db: &tokio_postgres::Client, id: i32, counters: &Counters) -> i64 {
    counters.db_reads.fetch_add(1, Ordering::Relaxed);
    db.query_one("SELECT v FROM fresh WHERE id = $1", &[&id])
        .await
        .expect("select")
        .get(0)
}

/// Commit → key gone and commit → `/wait` 200, one commit at a time: medians and p99, in ms.
async fn probe(db: &tokio_postgres::Client, mut con: MultiplexedConnection, http: u16) -> [f64; 4] {
    let (mut gone, mut waited) = (Vec::new(), Vec::new());
    for i in 0..PROBES {
        let _: () = redis::cmd("SET")
            .arg("fresh:0")
            .arg(1)
            .query_async(&mut con)
            .await
            .expect("SET");
        if i % 2 == 0 {
            db.execute("UPDATE fresh SET v = v + 1 WHERE id = 0", &[])
                .await
                .expect("update");
            let committed = Instant::now();
            loop {
                let exists: bool = redis::cmd("EXISTS")
                    .arg("fresh:0")
                    .query_async(&mut con)
                    .await
                    .expect("EXISTS");
                if !exists {
                    break;
                }
            }
            gone.push(committed.elapsed().as_secs_f64() * 1e3);
        } else {
            db.execute("UPDATE fresh SET v = v + 1 WHERE id = 0", &[])
                .await
                .expect("update");
            let committed = Instant::now();
            let lsn: String = db
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .expect("lsn")
                .get(0);
            let lsn = format_lsn(parse_lsn(&lsn));
            let status = http_status(http, &format!("/wait?lsn={lsn}&timeout_ms=5000")).await;
            assert_eq!(status, Some(200), "/wait");
            waited.push(committed.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (g50, g99) = percentiles(&mut gone);
    let (w50, w99) = percentiles(&mut waited);
    [g50, g99, w50, w99]
}

/// Median and p99 of `values`.
fn percentiles(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// The status of `GET path` on the sidecar's HTTP port.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// xorshift64: the readers' and writers' row choice, the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Prints the tables.
pub fn print(out: &mut String, section: &Section) {
    let runs = &section.runs;
    let _ = writeln!(
        out,
        "**5. Consistency**: {READERS} readers doing cache-aside on {ROWS} rows, {WRITERS} \
         writers updating them ({} ms apart each), {} ms injected between a reader's database \
         read and its fill, {} s per run; a stale read is a hit older than a commit the \
         sidecar had already acknowledged (its slot past the commit) when the read began; \
         stale keys are compared with the rows once `/wait` says the sidecar has caught up\n",
        WRITE_PAUSE.as_millis(),
        FILL_DELAY.as_millis(),
        RUN.as_secs(),
    );
    let _ = writeln!(
        out,
        "| fill | stale keys at the end | stale reads | reads served | database reads/s | fills (refused) | waits | commits |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} of {} | {} | {} | {:.0} | {} ({}) | {} | {} |",
            r.fill.name(),
            r.stale_keys,
            r.cached_keys,
            r.stale_reads,
            r.reads,
            r.db_reads as f64 / r.seconds,
            r.fills,
            r.refused,
            r.waits,
            r.commits
        );
    }
    let _ = writeln!(
        out,
        "\nOne commit at a time ({PROBES} probes, half each): commit returned → key gone, and → \
         `/wait` answered (after `SELECT pg_current_wal_lsn()`), median / p99 in ms\n"
    );
    let _ = writeln!(
        out,
        "| mode, deletes | commit → gone | commit → /wait 200 |"
    );
    let _ = writeln!(out, "|---|---|---|");
    let row = |out: &mut String, name: &str, [g50, g99, w50, w99]: [f64; 4]| {
        let _ = writeln!(
            out,
            "| {name} | {g50:.2} / {g99:.2} | {w50:.2} / {w99:.2} |"
        );
    };
    for r in runs {
        if let Some(latency) = r.latency {
            let name = if r.fill.wait_visible() {
                "replication, waiting for visibility"
            } else {
                "replication, not waiting"
            };
            row(out, name, latency);
        }
    }
    row(out, "notify (outbox rounds)", section.notify);
    let _ = writeln!(out);
}
