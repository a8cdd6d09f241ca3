//! Patterns at keyspace size: per-pattern SCAN, the shared pass and the live key index, and a
//! pgbench run with a pattern rule, without and with the index.
//!
//! 5. patterns: at 1M and 5M keys, a lone pattern's latency (call to every matching key gone)
//!    and a burst of 200 single-pattern commits arriving one per millisecond, in bare SCAN
//!    passes of wall time. Per-pattern SCAN is the delete loop before the shared pass: it takes
//!    what has arrived, walks once per pattern (one shared pass above eight), and only then
//!    takes the next batch. The shared pass hands every pattern to the walk as it arrives. The
//!    key index resolves each pattern from the keys it holds under `pat:`, once a barrier
//!    proved them current; it runs last at each size, on a Deleter of its own that is Ready
//!    before the first sample, and its memory per million keys is the bench process's VmRSS
//!    grown while it was built.
//! 6. pgbench: TPC-B, 8 clients, scale 10, with the rule `hist:{aid}:*` on `pgbench_history`
//!    over 2M keys: tps without the sidecar, with it, and with it and its key index
//!    (`INVALIDATOR_REDIS_KEY_INDEX=true`); its lag when pgbench ends, how long it takes to
//!    catch up, and the keys of inserted rows still there (must be none).
//!
//! For a smoke run, `INVALIDATOR_BENCH_PATTERN_SIZES` (keyspace sizes, comma-separated, e.g.
//! `100000`), `INVALIDATOR_BENCH_PGBENCH_SCALE` and `INVALIDATOR_BENCH_PGBENCH_SECONDS` shrink
//! the sections; the figures are only meaningful at the defaults.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use invalidator::redis::{DeleteStats, Deleter, DeleterOptions, KeyIndexOptions, KeyIndexState};
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use super::{Bench, Proc, format_lsn, median, mib, parse_lsn, percentile, scan_pass, set_keys};

/// Keyspace sizes of the pattern section, unless `INVALIDATOR_BENCH_PATTERN_SIZES` says others.
const SIZES: [u64; 2] = [1_000_000, 5_000_000];
/// Keys per pattern: `pat:{v}:{n}` for n in 1..=KEYS_PER_GROUP.
const KEYS_PER_GROUP: u64 = 100;
/// The prefix of every key of the pattern section, the one the key index covers.
const PATTERN_PREFIX: &str = "pat:";
/// Lone-pattern samples of the walking strategies up to 1M keys, and above (where each sample
/// is a pass over 5M keys).
const LONE_SAMPLES: [usize; 2] = [15, 7];
/// Lone-pattern samples of the key index: each costs a barrier and one UNLINK, so enough for a
/// p99 that is not simply the maximum of a handful.
const INDEX_SAMPLES: usize = 100;
/// How long the key index may take to become Ready (one SCAN of the whole keyspace).
const INDEX_BUILD_DEADLINE: Duration = Duration::from_secs(300);
/// The strategies of the pattern table, in the order of [`SizeResults`]'s arrays.
const STRATEGIES: [&str; 3] = ["per-pattern SCAN", "shared pass", "key index"];
/// Patterns in the burst.
const BURST: u64 = 200;
/// Between two arrivals of the burst: about what one client's single-row commits take.
const ARRIVAL: Duration = Duration::from_millis(1);
/// Above this many patterns the old delete loop shared one pass (`SHARED_PASS_THRESHOLD`).
const OLD_THRESHOLD: usize = invalidator::redis::SHARED_PASS_THRESHOLD;
/// pgbench's run length, with and without the sidecar, unless
/// `INVALIDATOR_BENCH_PGBENCH_SECONDS` says otherwise.
const PGBENCH_SECONDS: u32 = 30;
/// pgbench's scale (100,000 accounts each), unless `INVALIDATOR_BENCH_PGBENCH_SCALE` says
/// otherwise.
const PGBENCH_SCALE: u32 = 10;
/// Keys per account: `hist:{aid}:{n}`, so 2M keys at scale 10.
const KEYS_PER_ACCOUNT: u64 = 2;
/// How long a sidecar's key index may take to hold the pgbench keys.
const SIDECAR_INDEX_DEADLINE: Duration = Duration::from_secs(120);

/// One keyspace size's figures.
pub struct SizeResults {
    /// Keys loaded.
    keys: u64,
    /// Seconds of one bare SCAN pass.
    pass: f64,
    /// Lone-pattern seconds of each of [`STRATEGIES`].
    lone: [Vec<f64>; 3],
    /// Burst wall seconds of each of [`STRATEGIES`].
    burst: [f64; 3],
    /// What the key index cost and did.
    index: IndexFigures,
}

/// The key index's build, memory and resolutions at one size.
struct IndexFigures {
    /// Seconds from connecting its Deleter to `Ready`.
    build: f64,
    /// Keys it held when Ready.
    keys: u64,
    /// VmRSS of the bench process in KiB: before connecting, once Ready, after dropping it.
    rss_kib: [u64; 3],
    /// Patterns resolved from the index, of the lone samples and the burst.
    indexed: u64,
    /// Patterns handed to it, of the lone samples and the burst.
    patterns: u64,
}

/// A number from the environment variable `name`, or `default` when unset or not a number.
fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The keyspace sizes: `INVALIDATOR_BENCH_PATTERN_SIZES` (comma-separated, each at least one
/// group of keys), or [`SIZES`].
fn sizes() -> Vec<u64> {
    let given: Vec<u64> = std::env::var("INVALIDATOR_BENCH_PATTERN_SIZES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .filter(|&v| v >= KEYS_PER_GROUP)
        .collect();
    if given.is_empty() {
        SIZES.to_vec()
    } else {
        given
    }
}

/// The group of lone sample `i` of strategy `strategy`: spread over the keyspace, and different
/// for each strategy so none finds its keys just restored.
fn lone_group(i: u64, strategy: u64, groups: u64) -> u64 {
    1 + (i * 7919 + strategy * 104_729) % groups
}

/// The pattern section: every size.
pub async fn patterns_section(bench: &Bench) -> Vec<SizeResults> {
    let mut results = Vec::new();
    for size in sizes() {
        let samples = if size <= 1_000_000 {
            LONE_SAMPLES[0]
        } else {
            LONE_SAMPLES[1]
        };
        let mut con = bench.redis();
        flush(&mut con).await;
        let groups = size / KEYS_PER_GROUP;
        let size = groups * KEYS_PER_GROUP;
        eprintln!("patterns: loading {size} keys");
        for chunk in (1..=groups).collect::<Vec<_>>().chunks(10_000) {
            set_keys(&mut con, &group_keys(chunk.iter().copied())).await;
        }
        let pass = median(&[
            scan_pass(&mut con).await.0,
            scan_pass(&mut con).await.0,
            scan_pass(&mut con).await.0,
        ])
        .unwrap_or(f64::NAN);
        eprintln!("patterns: {size} keys, one SCAN pass {pass:.3} s");
        let mut deleter = Deleter::connect(&bench.redis.url()).await.expect("connect");
        let mut lone = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..samples as u64 {
            for (strategy, seconds) in lone.iter_mut().take(2).enumerate() {
                let group = lone_group(i, strategy as u64, groups);
                let pattern = HashSet::from([format!("{PATTERN_PREFIX}{group}:*")]);
                let start = Instant::now();
                if strategy == 0 {
                    deleter
                        .delete(&HashSet::new(), &pattern)
                        .await
                        .expect("delete");
                } else {
                    let started = deleter.start(&HashSet::new(), &pattern).await;
                    started.expect("start").await.expect("resolve");
                }
                seconds.push(start.elapsed().as_secs_f64());
                check_and_restore(&mut con, &[group], size).await;
            }
        }
        eprintln!(
            "patterns: lone p50 per-pattern {:.3} s, shared {:.3} s",
            median(&lone[0]).unwrap_or(f64::NAN),
            median(&lone[1]).unwrap_or(f64::NAN)
        );
        let burst_groups: Vec<u64> = (0..BURST).map(|i| 1 + (i * 4999) % groups).collect();
        let old = old_loop(&mut deleter, &burst_groups).await;
        check_and_restore(&mut con, &burst_groups, size).await;
        let (shared, _) = shared_burst(&mut deleter, &burst_groups).await;
        check_and_restore(&mut con, &burst_groups, size).await;
        drop(deleter);
        let (index_lone, index_burst, index) =
            key_index(bench, &mut con, size, &burst_groups).await;
        lone[2] = index_lone;
        eprintln!(
            "patterns: burst of {BURST}: per-pattern {old:.3} s, shared {shared:.3} s, \
             key index {index_burst:.3} s ({:.2} / {:.2} / {:.2} passes)",
            old / pass,
            shared / pass,
            index_burst / pass
        );
        results.push(SizeResults {
            keys: size,
            pass,
            lone,
            burst: [old, shared, index_burst],
            index,
        });
        flush(&mut con).await;
    }
    results
}

/// The key index at `size` keys: connects a Deleter that indexes [`PATTERN_PREFIX`], waits
/// until it is Ready, then takes the lone samples and the burst; returns the lone seconds, the
/// burst's wall seconds and the index's figures.
///
/// It runs after the walking strategies because the index turns on keyspace notifications,
/// which every write then pays for; they are turned off again when it is dropped, so each size
/// starts without them.
async fn key_index(
    bench: &Bench,
    con: &mut MultiplexedConnection,
    size: u64,
    burst_groups: &[u64],
) -> (Vec<f64>, f64, IndexFigures) {
    let groups = size / KEYS_PER_GROUP;
    let before = self_rss_kib();
    let options = DeleterOptions {
        key_index: Some(KeyIndexOptions {
            prefixes: vec![PATTERN_PREFIX.to_owned()],
            // Room above the keyspace, so the restores between samples never make it Full.
            max_keys: 2 * size as usize,
        }),
        ..DeleterOptions::default()
    };
    let connected = Instant::now();
    let mut deleter = Deleter::connect_with(&bench.redis.url(), options)
        .await
        .expect("connect the key index deleter");
    let keys = wait_ready(&deleter).await;
    let build = connected.elapsed().as_secs_f64();
    let ready = self_rss_kib();
    assert_eq!(keys, size, "the key index holds {keys} of {size} keys");
    eprintln!(
        "patterns: key index ready in {build:.3} s, {keys} keys, VmRSS {:.1} → {:.1} MiB",
        mib(before),
        mib(ready)
    );
    let mut lone = Vec::new();
    let mut indexed = 0;
    for i in 0..INDEX_SAMPLES as u64 {
        let group = lone_group(i, 2, groups);
        let pattern = HashSet::from([format!("{PATTERN_PREFIX}{group}:*")]);
        let start = Instant::now();
        let started = deleter.start(&HashSet::new(), &pattern).await;
        let stats = started.expect("start").await.expect("resolve");
        lone.push(start.elapsed().as_secs_f64());
        indexed += stats.patterns_indexed;
        check_and_restore(con, &[group], size).await;
    }
    let (burst, stats) = shared_burst(&mut deleter, burst_groups).await;
    indexed += stats.patterns_indexed;
    check_and_restore(con, burst_groups, size).await;
    let patterns = INDEX_SAMPLES as u64 + burst_groups.len() as u64;
    assert!(
        indexed > 0,
        "no pattern was resolved from the key index (state {:?})",
        deleter.key_index_state()
    );
    if indexed < patterns {
        eprintln!(
            "patterns: only {indexed} of {patterns} patterns came from the key index, the rest \
             were walked"
        );
    }
    drop(deleter);
    // Dropping the Deleter cancels the index task; give it a moment to end and free the keys.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dropped = self_rss_kib();
    notifications_off(con).await;
    let figures = IndexFigures {
        build,
        keys,
        rss_kib: [before, ready, dropped],
        indexed,
        patterns,
    };
    (lone, burst, figures)
}

/// Polls the key index until it is Ready and returns the keys it holds; panics if it becomes
/// Full or Unavailable, or is still building at [`INDEX_BUILD_DEADLINE`].
async fn wait_ready(deleter: &Deleter) -> u64 {
    let deadline = Instant::now() + INDEX_BUILD_DEADLINE;
    loop {
        match deleter.key_index_state() {
            KeyIndexState::Ready { keys } => return keys as u64,
            KeyIndexState::Building if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            state => panic!("the key index did not become ready: {state:?}"),
        }
    }
}

/// VmRSS of the bench process in KiB, from /proc/self/status (0 if it cannot be read), after
/// handing the allocator's free memory back to the system: glibc keeps freed memory (the keys
/// loaded, an earlier size's index) mapped and reuses it, which would hide part of an index
/// built on top of it, and keep a dropped one counted.
fn self_rss_kib() -> u64 {
    trim_allocator();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// glibc's `malloc_trim(0)`: returns the free memory of every arena to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_allocator() {
    unsafe extern "C" {
        // Takes a plain number, touches only the allocator's own state under its locks, and
        // may be called at any time from any thread.
        safe fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    malloc_trim(0);
}

/// Elsewhere the allocator's free memory stays counted in VmRSS (no portable way to return it).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_allocator() {}

/// Turns keyspace notifications off again after a key index turned them on.
async fn notifications_off(con: &mut MultiplexedConnection) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .exec_async(con)
        .await
        .expect("disable keyspace notifications");
}

/// `pat:{v}:{n}` for every group `v` and n in 1..=KEYS_PER_GROUP.
fn group_keys(groups: impl Iterator<Item = u64>) -> Vec<String> {
    groups
        .flat_map(|v| (1..=KEYS_PER_GROUP).map(move |n| format!("{PATTERN_PREFIX}{v}:{n}")))
        .collect()
}

/// Checks that exactly the groups' keys were deleted (none of them left, the keyspace of `size`
/// keys short by just theirs), and sets them again.
async fn check_and_restore(con: &mut MultiplexedConnection, groups: &[u64], size: u64) {
    let keys = group_keys(groups.iter().copied());
    let left = super::count_existing(con, &keys).await;
    assert_eq!(left, 0, "{left} keys of the patterns were not deleted");
    // A small keyspace can give the burst a group twice.
    let distinct = keys.iter().collect::<HashSet<_>>().len() as u64;
    let kept = super::dbsize(con).await;
    assert_eq!(
        kept,
        size - distinct,
        "keys other than the patterns' were deleted"
    );
    set_keys(con, &keys).await;
}

/// Empties the bench Redis.
async fn flush(con: &mut MultiplexedConnection) {
    redis::cmd("FLUSHALL")
        .exec_async(con)
        .await
        .expect("FLUSHALL");
}

/// Sends one pattern per group into a channel, one every [`ARRIVAL`].
fn arrivals(groups: &[u64]) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let groups = groups.to_vec();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ARRIVAL);
        for group in groups {
            tick.tick().await;
            let _ = tx.send(format!("{PATTERN_PREFIX}{group}:*"));
        }
    });
    rx
}

/// The delete loop before the shared pass: take what has arrived, delete it (a pass per pattern,
/// or one shared pass above the threshold), repeat. Returns the wall seconds.
async fn old_loop(deleter: &mut Deleter, groups: &[u64]) -> f64 {
    let mut arriving = arrivals(groups);
    let start = Instant::now();
    let mut done = 0;
    while done < groups.len() {
        let Some(first) = arriving.recv().await else {
            break;
        };
        let mut batch = HashSet::from([first]);
        while let Ok(next) = arriving.try_recv() {
            batch.insert(next);
        }
        done += batch.len();
        let passes = if batch.len() > OLD_THRESHOLD {
            1
        } else {
            batch.len()
        };
        eprintln!(
            "patterns: old loop: batch of {} ({passes} passes)",
            batch.len()
        );
        deleter
            .delete(&HashSet::new(), &batch)
            .await
            .expect("delete");
    }
    start.elapsed().as_secs_f64()
}

/// Every pattern handed to `deleter` as it arrives: to the shared walk, or resolved from the
/// key index when the Deleter keeps one. Returns the wall seconds and the summed statistics.
async fn shared_burst(deleter: &mut Deleter, groups: &[u64]) -> (f64, DeleteStats) {
    let mut arriving = arrivals(groups);
    let start = Instant::now();
    let mut resolutions = Vec::new();
    while let Some(pattern) = arriving.recv().await {
        let started = deleter
            .start(&HashSet::new(), &HashSet::from([pattern]))
            .await;
        resolutions.push(started.expect("start"));
    }
    let mut total = DeleteStats::default();
    for resolution in resolutions {
        let stats = resolution.await.expect("resolve");
        total.keys_deleted += stats.keys_deleted;
        total.patterns_indexed += stats.patterns_indexed;
    }
    (start.elapsed().as_secs_f64(), total)
}

/// Prints the pattern table and the key index's memory beside it.
pub fn print_patterns(out: &mut String, results: &[SizeResults]) {
    writeln!(
        out,
        "### Patterns at keyspace size\n\n\
         Lone pattern: from the call to every matching key gone (p50 / p99 / samples). Burst: \
         {BURST} single-pattern batches arriving one per {} ms, wall time from the first \
         arrival to the last key gone, in bare SCAN passes (COUNT 1000) of that keyspace. Key \
         index: a Deleter with `key_index` on `{PATTERN_PREFIX}`, Ready before the first \
         sample; every resolution waits for its barrier, and its burst cannot end before the \
         last arrival, {} ms after the first.\n\n\
         | keys | one pass (s) | strategy | lone p50 (s) | lone p99 (s) | burst (s) | burst (passes) |\n\
         |---|---|---|---|---|---|---|",
        ARRIVAL.as_millis(),
        (BURST - 1) as u128 * ARRIVAL.as_millis()
    )
    .expect("write to a string");
    for r in results {
        for (i, name) in STRATEGIES.iter().enumerate() {
            writeln!(
                out,
                "| {} | {:.3} | {name} | {:.4} | {:.4} ({}) | {:.3} | {:.3} |",
                r.keys,
                r.pass,
                median(&r.lone[i]).unwrap_or(f64::NAN),
                percentile(&r.lone[i], 99.0).unwrap_or(f64::NAN),
                r.lone[i].len(),
                r.burst[i],
                r.burst[i] / r.pass
            )
            .expect("write to a string");
        }
    }
    writeln!(
        out,
        "\nKey index memory: VmRSS of the bench process (/proc/self/status) just before its \
         Deleter connected and once `key_index_state()` was Ready; the growth divided by the \
         keys it holds; before each reading the allocator's free memory is handed back \
         (glibc `malloc_trim`), so memory kept from earlier work neither hides nor inflates \
         it. VmRSS after dropping the Deleter, read the same way, shows how much came back.\n\n\
         | keys | build, connect → Ready (s) | keys held | VmRSS before / Ready / dropped (MiB) | MiB per million keys | patterns from the index |\n\
         |---|---|---|---|---|---|"
    )
    .expect("write to a string");
    for r in results {
        let [before, ready, dropped] = r.index.rss_kib;
        writeln!(
            out,
            "| {} | {:.3} | {} | {:.1} / {:.1} / {:.1} | {:.1} | {} of {} |",
            r.keys,
            r.index.build,
            r.index.keys,
            mib(before),
            mib(ready),
            mib(dropped),
            per_million(ready.saturating_sub(before), r.index.keys),
            r.index.indexed,
            r.index.patterns
        )
        .expect("write to a string");
    }
    writeln!(out).expect("write to a string");
}

/// MiB per million keys of `kib` spent on `keys` keys (NaN for none).
fn per_million(kib: u64, keys: u64) -> f64 {
    if keys == 0 {
        return f64::NAN;
    }
    mib(kib) * 1e6 / keys as f64
}

/// The pgbench figures.
pub struct PgbenchResults {
    /// pgbench's scale.
    scale: u32,
    /// pgbench's seconds per run.
    seconds: u32,
    /// Keys `hist:{aid}:{n}` loaded.
    keys: u64,
    /// tps without the sidecar.
    bare_tps: f64,
    /// The sidecar alone, then with its key index.
    runs: Vec<SidecarRun>,
}

/// One pgbench run beside the sidecar.
struct SidecarRun {
    /// Whether the sidecar kept the key index.
    key_index: bool,
    /// tps.
    tps: f64,
    /// Bytes of WAL not yet acknowledged when pgbench ended.
    lag_bytes: u64,
    /// Seconds from pgbench's end until the sidecar acknowledged all of it (None: not within
    /// the deadline).
    catch_up: Option<f64>,
    /// Accounts with a history row from this run.
    accounts: u64,
    /// Keys of those accounts still in Redis.
    missed: u64,
    /// The sidecar's VmRSS in KiB once ready (with the index: once it held the keys), before
    /// pgbench started.
    rss_kib: Option<u64>,
    /// With the index: what it held and did, from `/metrics`.
    index: Option<SidecarIndex>,
}

/// The sidecar's key index, from its metrics.
struct SidecarIndex {
    /// `invalidator_key_index_keys` before pgbench started (0: it never became ready).
    keys: f64,
    /// `invalidator_key_index_resolutions_total` at the end.
    resolutions: f64,
    /// `invalidator_key_index_fallbacks_total` at the end, the reasons that are not 0.
    fallbacks: Vec<(String, f64)>,
}

/// What every run of the pgbench section shares.
struct Pgbench<'a> {
    /// The servers.
    bench: &'a Bench,
    /// The database.
    db: &'static str,
    /// Its URL.
    url: String,
    /// pgbench's arguments for one measured run.
    run: Vec<String>,
    /// The rules directory.
    rules: std::path::PathBuf,
}

impl Pgbench<'_> {
    /// Runs pgbench with `args` on the database and returns its stdout; panics if it fails.
    fn pgbench(&self, args: &[String]) -> String {
        let out = Command::new(super::pg_bindir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.bench.cluster.port().to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg(self.db)
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// One measured pgbench run beside a sidecar on slot `slot`, with or without its key index.
    /// The history starts empty, and the keys of the accounts this run invalidated are set again
    /// at the end, so every run starts with all of them.
    async fn sidecar_run(&self, slot: &str, key_index: bool) -> SidecarRun {
        let bench = self.bench;
        bench.cluster.psql(
            self.db,
            &format!(
                "TRUNCATE pgbench_history; \
                 SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
            ),
        );
        let http = super::free_port();
        let config = bench.work.path().join(format!("{slot}.toml"));
        std::fs::write(
            &config,
            format!(
                "[postgres]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pgb\"\n\n\
                 [redis]\nurl = \"{}\"\n\n[rules]\npath = \"{}\"\n\n\
                 [http]\nlisten = \"127.0.0.1:{http}\"\n\n[log]\nlevel = \"warn\"\n",
                self.url,
                bench.redis.url(),
                self.rules.display()
            ),
        )
        .expect("write the config");
        // The default limit (5,000,000 keys) holds the 2M keys of scale 10 with room to spare.
        let env: &[(&str, &str)] = if key_index {
            &[("INVALIDATOR_REDIS_KEY_INDEX", "true")]
        } else {
            &[]
        };
        let mut proc = bench
            .spawn_invalidator(slot, &config, http, env)
            .expect("start invalidator");
        let ready = Instant::now();
        while super::http_get(http, "/readyz").is_none_or(|r| !r.contains("200"))
            && ready.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let index_keys = if key_index {
            Some(index_ready(&proc).await)
        } else {
            None
        };
        let rss_kib = proc.usage().map(|u| u.rss_kib);
        let tps = tps(&self.pgbench(&self.run));
        let pg = super::connect_pg(&self.url).await;
        let end: String = pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("wal lsn")
            .get(0);
        let end = parse_lsn(&end);
        let lag_bytes = end.saturating_sub(confirmed(&pg, slot).await);
        let ended = Instant::now();
        let mut catch_up = None;
        while ended.elapsed() < Duration::from_secs(180) {
            if confirmed(&pg, slot).await >= end {
                catch_up = Some(ended.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "pgbench: with the sidecar{} {tps:.0} tps, lag {lag_bytes} bytes at the end \
             ({}), caught up in {catch_up:?} s",
            if key_index { " and its key index" } else { "" },
            format_lsn(end)
        );
        let aids: Vec<i32> = pg
            .query("SELECT DISTINCT aid FROM pgbench_history", &[])
            .await
            .expect("history")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let keys: Vec<String> = aids
            .iter()
            .flat_map(|&a| (1..=KEYS_PER_ACCOUNT).map(move |n| format!("hist:{a}:{n}")))
            .collect();
        let mut con = bench.redis();
        let missed = if keys.is_empty() {
            0
        } else {
            super::count_existing(&mut con, &keys).await
        };
        let index = index_keys.map(|keys| SidecarIndex {
            keys,
            resolutions: proc
                .metric_series("invalidator_key_index_resolutions_total")
                .iter()
                .map(|(_, v)| v)
                .sum(),
            fallbacks: proc
                .metric_series("invalidator_key_index_fallbacks_total")
                .into_iter()
                .filter(|(_, v)| *v > 0.0)
                .collect(),
        });
        proc.terminate();
        bench.drop_slot(slot).await;
        set_keys(&mut con, &keys).await;
        SidecarRun {
            key_index,
            tps,
            lag_bytes,
            catch_up,
            accounts: aids.len() as u64,
            missed,
            rss_kib,
            index,
        }
    }
}

/// Waits until the sidecar's key index holds keys (`invalidator_key_index_keys` above 0, which
/// it is only when Ready) and returns how many; 0 if it did not within
/// [`SIDECAR_INDEX_DEADLINE`], and then pgbench runs against the walk, which the table shows.
async fn index_ready(proc: &Proc) -> f64 {
    let start = Instant::now();
    loop {
        let keys = proc.metric("invalidator_key_index_keys").unwrap_or(0.0);
        if keys > 0.0 {
            eprintln!(
                "pgbench: the sidecar's key index holds {keys} keys after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return keys;
        }
        if start.elapsed() >= SIDECAR_INDEX_DEADLINE {
            eprintln!(
                "pgbench: the sidecar's key index is not ready: {}",
                proc.log_tail()
            );
            return 0.0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tps pgbench printed (NaN if none).
fn tps(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The pgbench section.
pub async fn pgbench_section(bench: &Bench) -> PgbenchResults {
    let scale: u32 = env_or("INVALIDATOR_BENCH_PGBENCH_SCALE", PGBENCH_SCALE).max(1);
    let seconds: u32 = env_or("INVALIDATOR_BENCH_PGBENCH_SECONDS", PGBENCH_SECONDS).max(1);
    let db = "pgb";
    let url = bench.cluster.create_database(db);
    let rules = bench.work.path().join("pgb-rules");
    std::fs::create_dir_all(&rules).expect("create the rules directory");
    std::fs::write(
        rules.join("pgb.toml"),
        "[[rule]]\ntable = \"pgbench_history\"\non = [\"insert\"]\nkeys = [\"hist:{aid}:*\"]\n",
    )
    .expect("write the rules");
    let run: Vec<String> = ["-c", "8", "-j", "2", "-T", &seconds.to_string(), "-n"]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    let pgb = Pgbench {
        bench,
        db,
        url,
        run,
        rules,
    };
    eprintln!("pgbench: initialising scale {scale}");
    pgb.pgbench(&["-i".into(), "-q".into(), "-s".into(), scale.to_string()]);
    bench
        .cluster
        .psql(db, "CREATE PUBLICATION pgb FOR TABLE pgbench_history;");
    let accounts = u64::from(scale) * 100_000;
    let mut con = bench.redis();
    flush(&mut con).await;
    let hist_keys = |aids: std::ops::RangeInclusive<u64>| -> Vec<String> {
        aids.flat_map(|a| (1..=KEYS_PER_ACCOUNT).map(move |n| format!("hist:{a}:{n}")))
            .collect()
    };
    for start in (1..=accounts).step_by(50_000) {
        set_keys(&mut con, &hist_keys(start..=(start + 49_999).min(accounts))).await;
    }
    let keys = super::dbsize(&mut con).await;
    eprintln!("pgbench: {keys} keys loaded");
    // Without the sidecar there is no slot, so nothing holds or decodes the WAL; each sidecar
    // run makes its own slot, so it starts after the WAL of the runs before.
    let bare_tps = tps(&pgb.pgbench(&pgb.run));
    eprintln!("pgbench: without the sidecar {bare_tps:.0} tps");
    let plain = pgb.sidecar_run("pgb", false).await;
    let indexed = pgb.sidecar_run("pgbi", true).await;
    // The sidecar's index turned keyspace notifications on; later sections run without them.
    notifications_off(&mut con).await;
    flush(&mut con).await;
    PgbenchResults {
        scale,
        seconds,
        keys,
        bare_tps,
        runs: vec![plain, indexed],
    }
}

/// Prints the pgbench table.
pub fn print_pgbench(out: &mut String, r: &PgbenchResults) {
    writeln!(
        out,
        "### pgbench with a pattern rule\n\n\
         TPC-B (`pgbench -c 8 -j 2 -T {}`, scale {}), rule `hist:{{aid}}:*` on inserts into \
         `pgbench_history`, {} keys. With the key index the sidecar runs with \
         `INVALIDATOR_REDIS_KEY_INDEX=true` and pgbench starts once the index holds the keys \
         (`invalidator_key_index_keys` above 0). Sidecar VmRSS: once ready, before pgbench.\n\n\
         | run | tps | lag at the end | caught up after | accounts invalidated | keys missed | sidecar VmRSS (MiB) | patterns from the index / walked |\n\
         |---|---|---|---|---|---|---|---|\n\
         | without the sidecar | {:.0} | — | — | — | — | — | — |",
        r.seconds, r.scale, r.keys, r.bare_tps
    )
    .expect("write to a string");
    for run in &r.runs {
        let from_index = run.index.as_ref().map_or("—".to_owned(), |index| {
            let walked: f64 = index.fallbacks.iter().map(|(_, v)| v).sum();
            let reasons: Vec<String> = index
                .fallbacks
                .iter()
                .map(|(labels, v)| format!("{v:.0} {labels}"))
                .collect();
            if reasons.is_empty() {
                format!("{:.0} / 0", index.resolutions)
            } else {
                format!(
                    "{:.0} / {walked:.0} ({})",
                    index.resolutions,
                    reasons.join(", ")
                )
            }
        });
        writeln!(
            out,
            "| {} | {:.0} | {:.1} MB | {} | {} | {} | {} | {from_index} |",
            if run.key_index {
                "sidecar + key index"
            } else {
                "sidecar"
            },
            run.tps,
            run.lag_bytes as f64 / 1e6,
            run.catch_up
                .map_or("not within 180 s".to_owned(), |s| format!("{s:.1} s")),
            run.accounts,
            run.missed,
            run.rss_kib
                .map_or("n/a".to_owned(), |k| format!("{:.1}", mib(k)))
        )
        .expect("write to a string");
    }
    // The two sidecars differ only in the index, and each is a process of its own, so the
    // difference of their VmRSS is the index's memory, free of the bench's own allocations.
    let plain = r.runs.iter().find(|run| !run.key_index);
    let indexed = r.runs.iter().find(|run| run.key_index);
    if let (Some(plain), Some(indexed)) = (plain, indexed)
        && let (Some(without), Some(with), Some(index)) =
            (plain.rss_kib, indexed.rss_kib, indexed.index.as_ref())
        && index.keys > 0.0
    {
        writeln!(
            out,
            "\nKey index memory in the sidecar: (VmRSS with it − without it) / keys held = \
             {:.1} MiB per million keys ({:.0} keys held).",
            per_million(with.saturating_sub(without), index.keys as u64),
            index.keys
        )
        .expect("write to a string");
    }
    writeln!(out).expect("write to a string");
}

/// The confirmed LSN of slot `slot`.
async fn confirmed(pg: &tokio_postgres::Client, slot: &str) -> u64 {
    let row = pg
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot");
    parse_lsn(&row.get::<_, String>(0))
}
