//! Patterns at keyspace size: per-pattern SCAN against the shared pass, and a pgbench run with
//! a pattern rule.
//!
//! 5. patterns: at 1M and 5M keys, a lone pattern's latency (call to every matching key gone)
//!    and a burst of 200 single-pattern commits arriving one per millisecond, in bare SCAN
//!    passes of wall time. Per-pattern SCAN is the delete loop before the shared pass: it takes
//!    what has arrived, walks once per pattern (one shared pass above eight), and only then
//!    takes the next batch. The shared pass hands every pattern to the walk as it arrives.
//! 6. pgbench: TPC-B, 8 clients, scale 10, with the rule `hist:{aid}:*` on `pgbench_history`
//!    over 2M keys: tps without and with the sidecar, its lag when pgbench ends, how long it
//!    takes to catch up, and the keys of inserted rows still there (must be none).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use invalidator::redis::Deleter;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use super::{Bench, format_lsn, median, parse_lsn, percentile, scan_pass, set_keys};

/// Keyspace sizes of the pattern section.
const SIZES: [u64; 2] = [1_000_000, 5_000_000];
/// Keys per pattern: `pat:{v}:{n}` for n in 1..=KEYS_PER_GROUP.
const KEYS_PER_GROUP: u64 = 100;
/// Lone-pattern samples per strategy at each size (fewer at 5M, where each is a 5M-key pass).
const LONE_SAMPLES: [usize; 2] = [15, 7];
/// Patterns in the burst.
const BURST: u64 = 200;
/// Between two arrivals of the burst: about what one client's single-row commits take.
const ARRIVAL: Duration = Duration::from_millis(1);
/// Above this many patterns the old delete loop shared one pass (`SHARED_PASS_THRESHOLD`).
const OLD_THRESHOLD: usize = invalidator::redis::SHARED_PASS_THRESHOLD;
/// pgbench's run length, with and without the sidecar.
const PGBENCH_SECONDS: u32 = 30;
/// pgbench's scale (100,000 accounts each).
const PGBENCH_SCALE: u32 = 10;
/// Keys per account: `hist:{aid}:{n}`, so 2M keys at scale 10.
const KEYS_PER_ACCOUNT: u64 = 2;

/// One keyspace size's figures.
pub struct SizeResults {
    /// Keys loaded.
    keys: u64,
    /// Seconds of one bare SCAN pass.
    pass: f64,
    /// Lone-pattern seconds: per-pattern SCAN, shared pass.
    lone: [Vec<f64>; 2],
    /// Burst wall seconds: per-pattern SCAN, shared pass.
    burst: [f64; 2],
}

/// The pattern section: every size.
pub async fn patterns_section(bench: &Bench) -> Vec<SizeResults> {
    let mut results = Vec::new();
    for (size, samples) in SIZES.into_iter().zip(LONE_SAMPLES) {
        let mut con = bench.redis();
        flush(&mut con).await;
        let groups = size / KEYS_PER_GROUP;
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
        let mut lone = [Vec::new(), Vec::new()];
        for i in 0..samples as u64 {
            for (strategy, seconds) in lone.iter_mut().enumerate() {
                let group = 1 + (i * 7919 + strategy as u64 * 104_729) % groups;
                let pattern = HashSet::from([format!("pat:{group}:*")]);
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
                check_and_restore(&mut con, &[group]).await;
            }
        }
        eprintln!(
            "patterns: lone p50 per-pattern {:.3} s, shared {:.3} s",
            median(&lone[0]).unwrap_or(f64::NAN),
            median(&lone[1]).unwrap_or(f64::NAN)
        );
        let burst_groups: Vec<u64> = (0..BURST).map(|i| 1 + (i * 4999) % groups).collect();
        let old = old_loop(&mut deleter, &burst_groups).await;
        check_and_restore(&mut con, &burst_groups).await;
        let shared = shared_burst(&mut deleter, &burst_groups).await;
        check_and_restore(&mut con, &burst_groups).await;
        eprintln!(
            "patterns: burst of {BURST}: per-pattern {old:.3} s, shared {shared:.3} s \
             ({:.2} / {:.2} passes)",
            old / pass,
            shared / pass
        );
        results.push(SizeResults {
            keys: size,
            pass,
            lone,
            burst: [old, shared],
        });
        flush(&mut con).await;
    }
    results
}

/// `pat:{v}:{n}` for every group `v` and n in 1..=KEYS_PER_GROUP.
fn group_keys(groups: impl Iterator<Item = u64>) -> Vec<String> {
    groups
        .flat_map(|v| (1..=KEYS_PER_GROUP).map(move |n| format!("pat:{v}:{n}")))
        .collect()
}

/// Checks that the groups' keys are gone, and sets them again.
async fn check_and_restore(con: &mut MultiplexedConnection, groups: &[u64]) {
    let keys = group_keys(groups.iter().copied());
    let left = super::count_existing(con, &keys).await;
    assert_eq!(left, 0, "{left} keys of the patterns were not deleted");
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
            let _ = tx.send(format!("pat:{group}:*"));
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

/// The shared pass: every pattern handed to the walk as it arrives. Returns the wall seconds.
async fn shared_burst(deleter: &mut Deleter, groups: &[u64]) -> f64 {
    let mut arriving = arrivals(groups);
    let start = Instant::now();
    let mut resolutions = Vec::new();
    while let Some(pattern) = arriving.recv().await {
        let started = deleter
            .start(&HashSet::new(), &HashSet::from([pattern]))
            .await;
        resolutions.push(started.expect("start"));
    }
    for resolution in resolutions {
        resolution.await.expect("resolve");
    }
    start.elapsed().as_secs_f64()
}

/// Prints the pattern table.
pub fn print_patterns(out: &mut String, results: &[SizeResults]) {
    writeln!(
        out,
        "### Patterns at keyspace size\n\n\
         Lone pattern: from the call to every matching key gone (p50 / p99 / samples). Burst: \
         {BURST} single-pattern batches arriving one per {} ms, wall time from the first \
         arrival to the last key gone, in bare SCAN passes (COUNT 1000) of that keyspace.\n\n\
         | keys | one pass (s) | strategy | lone p50 (s) | lone p99 (s) | burst (s) | burst (passes) |\n\
         |---|---|---|---|---|---|---|",
        ARRIVAL.as_millis()
    )
    .expect("write to a string");
    for r in results {
        for (i, name) in ["per-pattern SCAN", "shared pass"].iter().enumerate() {
            writeln!(
                out,
                "| {} | {:.3} | {name} | {:.3} | {:.3} ({}) | {:.3} | {:.2} |",
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
    writeln!(out).expect("write to a string");
}

/// The pgbench figures.
pub struct PgbenchResults {
    /// tps without the sidecar.
    bare_tps: f64,
    /// tps with it.
    sidecar_tps: f64,
    /// Bytes of WAL not yet acknowledged when pgbench ended.
    lag_bytes: u64,
    /// Seconds from pgbench's end until the sidecar acknowledged all of it (None: not within
    /// the deadline).
    catch_up: Option<f64>,
    /// Accounts with a history row from the sidecar's run.
    accounts: u64,
    /// Keys of those accounts still in Redis.
    missed: u64,
}

/// The pgbench section.
pub async fn pgbench_section(bench: &Bench) -> PgbenchResults {
    let db = "pgb";
    let url = bench.cluster.create_database(db);
    let pgbench = super::pg_bindir().join("pgbench");
    let port = bench.cluster.port().to_string();
    let run_pgbench = |args: &[&str]| {
        let out = Command::new(&pgbench)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg(db)
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
    };
    eprintln!("pgbench: initialising scale {PGBENCH_SCALE}");
    run_pgbench(&["-i", "-q", "-s", &PGBENCH_SCALE.to_string()]);
    bench.cluster.psql(
        db,
        "CREATE PUBLICATION pgb FOR TABLE pgbench_history; \
         SELECT pg_create_logical_replication_slot('pgb', 'pgoutput');",
    );
    let accounts = u64::from(PGBENCH_SCALE) * 100_000;
    let mut con = bench.redis();
    flush(&mut con).await;
    let hist_keys = |aids: std::ops::RangeInclusive<u64>| -> Vec<String> {
        aids.flat_map(|a| (1..=KEYS_PER_ACCOUNT).map(move |n| format!("hist:{a}:{n}")))
            .collect()
    };
    for start in (1..=accounts).step_by(50_000) {
        set_keys(&mut con, &hist_keys(start..=(start + 49_999).min(accounts))).await;
    }
    eprintln!("pgbench: {} keys loaded", super::dbsize(&mut con).await);
    let tps = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let duration = PGBENCH_SECONDS.to_string();
    let run = ["-c", "8", "-j", "2", "-T", duration.as_str(), "-n"];
    // Without the sidecar: the slot exists but nothing reads it (as with the sidecar stopped);
    // it is dropped and made again so the sidecar starts after this run's WAL.
    bench
        .cluster
        .psql(db, "SELECT pg_drop_replication_slot('pgb');");
    let bare_tps = tps(&run_pgbench(&run));
    eprintln!("pgbench: without the sidecar {bare_tps:.0} tps");
    bench.cluster.psql(
        db,
        "TRUNCATE pgbench_history; SELECT pg_create_logical_replication_slot('pgb', 'pgoutput');",
    );
    let rules = bench.work.path().join("pgb-rules");
    std::fs::create_dir_all(&rules).expect("create the rules directory");
    std::fs::write(
        rules.join("pgb.toml"),
        "[[rule]]\ntable = \"pgbench_history\"\non = [\"insert\"]\nkeys = [\"hist:{aid}:*\"]\n",
    )
    .expect("write the rules");
    let http = super::free_port();
    let config = bench.work.path().join("pgb.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"pgb\"\npublication = \"pgb\"\n\n\
             [redis]\nurl = \"{}\"\n\n[rules]\npath = \"{}\"\n\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\n[log]\nlevel = \"warn\"\n",
            bench.redis.url(),
            rules.display()
        ),
    )
    .expect("write the config");
    let mut proc = bench
        .spawn_invalidator("pgb", &config, http)
        .expect("start invalidator");
    let ready = Instant::now();
    while super::http_get(http, "/readyz").is_none_or(|r| !r.contains("200"))
        && ready.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sidecar_tps = tps(&run_pgbench(&run));
    let pg = super::connect_pg(&url).await;
    let end: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal lsn")
        .get(0);
    let end = parse_lsn(&end);
    let lag_bytes = end.saturating_sub(confirmed(&pg).await);
    let ended = Instant::now();
    let mut catch_up = None;
    while ended.elapsed() < Duration::from_secs(180) {
        if confirmed(&pg).await >= end {
            catch_up = Some(ended.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "pgbench: with the sidecar {sidecar_tps:.0} tps, lag {lag_bytes} bytes at the end \
         ({}), caught up in {catch_up:?} s",
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
    let missed = if keys.is_empty() {
        0
    } else {
        super::count_existing(&mut con, &keys).await
    };
    proc.terminate();
    flush(&mut con).await;
    PgbenchResults {
        bare_tps,
        sidecar_tps,
        lag_bytes,
        catch_up,
        accounts: aids.len() as u64,
        missed,
    }
}

/// Prints the pgbench table.
pub fn print_pgbench(out: &mut String, r: &PgbenchResults) {
    writeln!(
        out,
        "### pgbench with a pattern rule\n\n\
         TPC-B (`pgbench -c 8 -j 2 -T {PGBENCH_SECONDS}`, scale {PGBENCH_SCALE}), rule \
         `hist:{{aid}}:*` on inserts into `pgbench_history`, {} keys.\n\n\
         | tps without | tps with sidecar | lag at the end | caught up after | accounts invalidated | keys missed |\n\
         |---|---|---|---|---|---|\n\
         | {:.0} | {:.0} | {:.1} MB | {} | {} | {} |\n",
        u64::from(PGBENCH_SCALE) * 100_000 * KEYS_PER_ACCOUNT,
        r.bare_tps,
        r.sidecar_tps,
        r.lag_bytes as f64 / 1e6,
        r.catch_up
            .map_or("not within 180 s".to_owned(), |s| format!("{s:.1} s")),
        r.accounts,
        r.missed
    )
    .expect("write to a string");
}

/// The confirmed LSN of slot `pgb`.
async fn confirmed(pg: &tokio_postgres::Client) -> u64 {
    let row = pg
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots \
             WHERE slot_name = 'pgb'",
            &[],
        )
        .await
        .expect("slot");
    parse_lsn(&row.get::<_, String>(0))
}
