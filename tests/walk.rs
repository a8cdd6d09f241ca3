//! The shared SCAN walk (`Deleter::start`) against real servers: it deletes exactly what
//! per-pattern SCAN finds, however patterns arrive, under concurrent writes and rehashing,
//! across reconnects and restarts, and in a cluster during a live slot migration.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use invalidator::redis::slot::key_slot;
use invalidator::redis::{DeleteError, Deleter, DeleterOptions, Resolution};

use crate::deleter::{chain, delete_until_ok, set};
use crate::support::{CutMode, Random, RedisCluster, RedisServer, TcpProxy};

/// Bytes keys are made of: letters that patterns name, glob bytes that must be escaped to be
/// matched, and separators.
const KEY_BYTES: &[&str] = &[
    "a", "b", "c", "x", ":", "*", "?", "[", "]", "\\", "-", "1", "2",
];

/// A random key of the first family: it begins with `a`, `b` or `c`, which every pattern's first
/// byte names, so keys written by [`write_noise`] (beginning with `W`) never match one.
fn random_key(random: &mut Random) -> String {
    let mut key = random.pick(&["a", "b", "c"]).to_owned();
    for _ in 0..1 + random.below(7) {
        key.push_str(random.pick(KEY_BYTES));
    }
    key
}

/// A random pattern: a literal first byte, then literals, escaped glob bytes, `?`, `*` and
/// classes (ranges, negation, escapes inside), as rules render them.
fn random_pattern(random: &mut Random) -> String {
    let mut pattern = random.pick(&["a", "b", "c", "[ab]", "\\a"]).to_owned();
    for _ in 0..random.below(5) {
        pattern.push_str(random.pick(&[
            "a", "b", ":", "x", "1", "\\*", "\\?", "\\[", "\\]", "\\\\", "?", "*", "[a-c]", "[^x]",
            "[\\*x]", "[1-2:]",
        ]));
    }
    if random.below(2) == 0 {
        pattern.push('*');
    }
    pattern
}

/// Loads `keys` in large pipelines.
fn load(redis: &RedisServer, keys: &[String]) {
    let mut con = redis.connection();
    for chunk in keys.chunks(20_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET").arg(key).arg("1").ignore();
        }
        pipe.exec(&mut con).expect("SET keys");
    }
}

/// Every key of the server, as SCAN sees it.
fn all_keys(redis: &RedisServer) -> HashSet<Vec<u8>> {
    redis.scan_raw_keys("*").into_iter().collect()
}

/// What per-pattern SCAN MATCH (the server's own matcher) finds for `patterns` now.
fn truth(redis: &RedisServer, patterns: &[String]) -> HashSet<Vec<u8>> {
    patterns
        .iter()
        .flat_map(|p| redis.scan_raw_keys(p))
        .collect()
}

/// Starts each pattern as its own batch, one after the other while the walk runs, as
/// single-pattern commits arrive; returns the resolutions.
async fn start_one_by_one(deleter: &mut Deleter, patterns: &[String]) -> Vec<Resolution> {
    let mut resolutions = Vec::new();
    for pattern in patterns {
        let started = deleter.start(&HashSet::new(), &set([pattern])).await;
        resolutions.push(started.unwrap_or_else(|e| panic!("start: {}", chain(&e))));
        // Lets the walk take a step or two, so patterns join at different cursors.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    resolutions
}

/// Waits for every resolution (a hang guard, not a timing assertion).
async fn resolve_all(resolutions: Vec<Resolution>) {
    for resolution in resolutions {
        let done = tokio::time::timeout(Duration::from_secs(120), resolution).await;
        let done = done.expect("the walk completes the pattern");
        done.unwrap_or_else(|e: DeleteError| panic!("resolution: {}", chain(&e)));
    }
}

/// Writes and deletes keys beginning with `W` until `stop`: the hash table grows, rehashes and
/// shrinks under the walk while no key a pattern could match changes.
fn write_noise(redis: &RedisServer, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let mut con = redis.connection();
    std::thread::spawn(move || {
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let mut pipe = redis::pipe();
            for i in 0..2_000 {
                pipe.cmd("SET")
                    .arg(format!("W{round}:{i}"))
                    .arg("1")
                    .ignore();
            }
            if round >= 5 {
                for i in 0..2_000 {
                    pipe.cmd("UNLINK")
                        .arg(format!("W{}:{i}", round - 5))
                        .ignore();
                }
            }
            pipe.exec(&mut con).expect("noise");
            round += 1;
        }
    })
}

/// Builds a random keyspace of `keys` keys with `seed`, starts `patterns` random patterns one by
/// one, lets `disturb` act while they resolve, and checks that exactly the keys per-pattern SCAN
/// found before are gone.
async fn shared_walk_matches_per_pattern_scan(
    redis: &RedisServer,
    url: &str,
    seed: u64,
    keys: usize,
    patterns: usize,
    disturb: impl FnOnce(),
) {
    redis::cmd("FLUSHALL")
        .exec(&mut redis.connection())
        .expect("FLUSHALL");
    let mut random = Random(seed);
    let keyspace: Vec<String> = (0..keys).map(|_| random_key(&mut random)).collect();
    load(redis, &keyspace);
    let patterns: Vec<String> = (0..patterns).map(|_| random_pattern(&mut random)).collect();
    let before: HashSet<Vec<u8>> = all_keys(redis)
        .into_iter()
        .filter(|k| !k.starts_with(b"W"))
        .collect();
    let doomed = truth(redis, &patterns);
    assert!(
        !doomed.is_empty(),
        "seed {seed}: the patterns match something"
    );
    let options = DeleterOptions {
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(2),
        ..DeleterOptions::default()
    };
    let mut deleter = Deleter::connect_with(url, options).await.expect("connect");
    let resolutions = start_one_by_one(&mut deleter, &patterns).await;
    disturb();
    resolve_all(resolutions).await;
    let after: HashSet<Vec<u8>> = all_keys(redis)
        .into_iter()
        .filter(|k| !k.starts_with(b"W"))
        .collect();
    let expected: HashSet<Vec<u8>> = before.difference(&doomed).cloned().collect();
    let missed: Vec<String> = after
        .difference(&expected)
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .take(5)
        .collect();
    let wrongly: Vec<String> = expected
        .difference(&after)
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .take(5)
        .collect();
    assert!(
        missed.is_empty() && wrongly.is_empty(),
        "seed {seed}: missed {missed:?}, wrongly deleted {wrongly:?} (patterns {patterns:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_walk_deletes_exactly_what_per_pattern_scan_finds() {
    let redis = RedisServer::start();
    for seed in 1..=4 {
        shared_walk_matches_per_pattern_scan(&redis, &redis.url(), seed, 30_000, 40, || {}).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_present_from_commit_to_completion_is_missed_while_the_table_rehashes() {
    let redis = RedisServer::start();
    for seed in 11..=13 {
        let stop = Arc::new(AtomicBool::new(false));
        let noise = write_noise(&redis, stop.clone());
        shared_walk_matches_per_pattern_scan(&redis, &redis.url(), seed, 20_000, 30, || {}).await;
        stop.store(true, Ordering::SeqCst);
        noise.join().expect("noise thread");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_walk_cut_off_mid_pass_resumes_and_deletes_exactly_the_same() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    for seed in 21..=22 {
        shared_walk_matches_per_pattern_scan(&redis, &url, seed, 200_000, 20, || {
            proxy.cut(CutMode::Refuse);
            std::thread::sleep(Duration::from_millis(300));
            proxy.restore();
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_keeps_failing_slows_the_walk_but_never_restarts_it() {
    let redis = RedisServer::start();
    let proxy = Arc::new(TcpProxy::start(redis.port()));
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    let stop = Arc::new(AtomicBool::new(false));
    let cutter = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            // Far shorter than a pass over 300k keys: a walk that started over at every failure
            // would never finish.
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(60));
                proxy.cut(CutMode::Refuse);
                proxy.restore();
            }
        })
    };
    shared_walk_matches_per_pattern_scan(&redis, &url, 31, 300_000, 5, || {}).await;
    stop.store(true, Ordering::SeqCst);
    cutter.join().expect("cutter");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restarted_mid_walk_is_walked_again_from_its_start() {
    // Persisted, so the keys come back after the restart, in a new process whose hash table
    // (and so whose cursor order) is not the old one's.
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    shared_walk_matches_per_pattern_scan(&redis, &redis.url(), 41, 200_000, 10, || {
        redis.kill();
        redis.start_again();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn patterns_that_arrive_one_by_one_during_a_pass_share_it() {
    let redis = RedisServer::start();
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("share:{}:{i}", i % 500))
        .collect();
    load(&redis, &keys);
    // The pages of one full pass, counted by walking it once with the deleter's page size.
    let one_pass = {
        let mut con = redis.connection();
        let mut cursor = 0u64;
        let mut pages = 0u64;
        loop {
            let (next, _): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
                .expect("SCAN");
            pages += 1;
            if next == 0 {
                break pages;
            }
            cursor = next;
        }
    };
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .exec(&mut redis.connection())
        .expect("RESETSTAT");
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let patterns: Vec<String> = (0..50).map(|v| format!("share:{v}:*")).collect();
    let resolutions = start_one_by_one(&mut deleter, &patterns).await;
    resolve_all(resolutions).await;
    // Read before the checks below, which SCAN too.
    let stats = redis.command_stats();
    for pattern in &patterns {
        assert!(redis.scan_keys(pattern).is_empty(), "{pattern} left keys");
    }
    let scans: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("SCAN calls");
    // Per-pattern walks would take 50 passes; a shared one at most the pass the last pattern
    // needs after the first one started it.
    assert!(
        scans <= 2 * one_pass,
        "{scans} SCAN calls for 50 patterns; one pass is {one_pass}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_a_slot_migrated_mid_walk_are_not_missed_by_both_primaries() {
    let cluster = RedisCluster::start(3);
    // Enough keys that a pass over a primary lasts well beyond the migration.
    cluster.load_slots_keys(2_999, 100);
    let moving: Vec<String> = (0..3_000).map(|i| format!("{{mv}}:k:{i}")).collect();
    let spread: Vec<String> = (0..3_000).map(|i| format!("mv:{i}")).collect();
    let slot = key_slot(b"mv");
    cluster.set_keys(moving.iter().chain(&spread));
    let (from, to) = cluster.owner_and_another(slot);
    // The keys of `mv:*` in the migrating slot, besides the tagged ones.
    let spread_moving = spread
        .iter()
        .filter(|k| key_slot(k.as_bytes()) == slot)
        .count();
    let mut deleter = Deleter::connect(&cluster.url()).await.expect("connect");
    let resolution = deleter
        .start(&HashSet::new(), &set(["{mv}:k:*", "mv:*"]))
        .await
        .unwrap_or_else(|e| panic!("start: {}", chain(&e)));
    cluster.migrate_slot(slot, from, to);
    resolve_all(vec![resolution]).await;
    let left = cluster.scan_keys("{mv}:*");
    assert!(
        left.is_empty(),
        "{} of the moved keys were missed",
        left.len()
    );
    assert!(
        cluster.scan_keys("mv:*").is_empty(),
        "{spread_moving} moved"
    );
    assert_eq!(cluster.scan_keys("slots:*").len(), 299_900, "nothing else");
}

/// The calls of `command` (as `INFO commandstats` names it: `scan`, `cluster|getkeysinslot`)
/// on a server since its last `CONFIG RESETSTAT`.
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    redis
        .command_stats()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The `cmdstat_scan` calls of a server since its last `CONFIG RESETSTAT`.
fn scan_calls(redis: &RedisServer) -> u64 {
    calls(redis, "scan")
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_mid_walk_the_promoted_primary_is_swept_with_scan_not_slot_by_slot() {
    let cluster = RedisCluster::start_with_replicas(3, 1);
    cluster.load_slots_keys(2_999, 100);
    let doomed: Vec<String> = (0..3_000).map(|i| format!("fo:{i}")).collect();
    cluster.set_keys(&doomed);
    // Every key has reached the replicas before a primary is killed.
    cluster.wait_replicated();
    let options = DeleterOptions {
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(1),
        ..DeleterOptions::default()
    };
    let mut deleter = Deleter::connect_with(&cluster.url(), options)
        .await
        .expect("connect");
    let resolution = deleter
        .start(&HashSet::new(), &set(["fo:*"]))
        .await
        .unwrap_or_else(|e| panic!("start: {}", chain(&e)));
    // The pattern joined the victim's walk, which can never finish there: its slots are swept.
    cluster.kill_primary_and_wait_failover(cluster.primaries()[1]);
    resolve_all(vec![resolution]).await;
    let left = cluster.scan_keys("fo:*");
    assert!(left.is_empty(), "{} keys survived the failover", left.len());
    assert_eq!(cluster.scan_keys("slots:*").len(), 299_900, "nothing else");
    let running: Vec<&RedisServer> = cluster.nodes().iter().filter(|n| n.is_running()).collect();
    let per_slot: u64 = running
        .iter()
        .map(|node| calls(node, "cluster|countkeysinslot"))
        .sum();
    // The promoted primary serves 5,461 slots and holds 100,000 keys: a hundred pages of SCAN.
    assert!(
        per_slot < 100,
        "the moved slots were read one by one: {per_slot} COUNTKEYSINSLOT calls"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_pattern_costs_at_most_one_pass() {
    let redis = RedisServer::start();
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("lone:{}:{i}", i % 100))
        .collect();
    load(&redis, &keys);
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    // Pages of one pass with the deleter's page size, measured by per-pattern SCAN.
    let reset = || {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .exec(&mut redis.connection())
            .expect("RESETSTAT");
    };
    reset();
    delete_until_ok(&mut deleter, &HashSet::new(), &set(["lone:0:*"])).await;
    let one_pass = scan_calls(&redis);
    for group in 1..6 {
        reset();
        let pattern = format!("lone:{group}:*");
        resolve_all(start_one_by_one(&mut deleter, std::slice::from_ref(&pattern)).await).await;
        let calls = scan_calls(&redis);
        assert!(redis.scan_keys(&pattern).is_empty(), "{pattern} left keys");
        // Joined wherever the walk stopped last: one lap, and at most the page it joined on.
        assert!(
            calls <= one_pass + 1,
            "{calls} SCAN calls for a lone pattern; one pass is {one_pass}"
        );
    }
}
