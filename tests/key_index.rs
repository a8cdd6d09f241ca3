//! The live key index (`[redis] key_index`): a pattern under an indexed prefix is resolved from
//! the keys the deleter keeps in memory, and must delete exactly what per-pattern SCAN MATCH
//! finds, whatever creates the keys, while others write, after the notification connection is
//! lost or cut for its output buffer, when notifications are switched off, when the server
//! refuses CONFIG, and when the index is full. The last tests run the whole sidecar.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use invalidator::glob;
use invalidator::redis::{
    DeleteStats, Deleter, DeleterOptions, KEY_INDEX_FALLBACKS, KeyIndexOptions, KeyIndexState,
};

use crate::deleter::chain;
use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Cache, Fixture};
use crate::support::{Random, RedisCluster, RedisServer, wait_until};

/// How long the index may take to reach a state (a hang guard, not a timing assertion).
const STATE_DEADLINE: Duration = Duration::from_secs(20);

/// A generous cap, for tests that do not test the cap.
pub(crate) const NO_CAP: usize = 10_000_000;

/// One database of a test server, through its own client (the harness's helpers use db 0).
struct Db {
    /// `redis://127.0.0.1:<port>/<db>`, also what the deleter is given.
    url: String,
    /// A client for that database.
    client: redis::Client,
}

impl Db {
    /// Database `db` of `server`.
    fn of(server: &RedisServer, db: u32) -> Db {
        let url = format!("redis://127.0.0.1:{}/{db}", server.port());
        let client = redis::Client::open(url.as_str()).expect("a redis client");
        Db { url, client }
    }

    /// A blocking connection to the database.
    fn con(&self) -> redis::Connection {
        self.client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis")
    }

    /// Runs one command, failing the test on an error.
    fn run(&self, command: &mut redis::Cmd) {
        command
            .exec(&mut self.con())
            .unwrap_or_else(|e| panic!("a redis command failed: {e}"));
    }

    /// The keys SCAN MATCH `pattern` returns (the server's own matcher: the truth).
    fn scan(&self, pattern: &[u8]) -> HashSet<Vec<u8>> {
        let mut con = self.con();
        redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter::<Vec<u8>>(&mut con)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN page")
    }

    /// Every key of the database.
    fn all(&self) -> HashSet<Vec<u8>> {
        self.scan(b"*")
    }

    /// What per-pattern SCAN MATCH finds for `patterns` now.
    fn truth(&self, patterns: &[String]) -> HashSet<Vec<u8>> {
        patterns
            .iter()
            .flat_map(|p| self.scan(p.as_bytes()))
            .collect()
    }

    /// Sets each of `keys` to "1", in large pipelines.
    fn load<K: AsRef<[u8]>>(&self, keys: &[K]) {
        let mut con = self.con();
        for chunk in keys.chunks(10_000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("SET").arg(key.as_ref()).arg("1").ignore();
            }
            pipe.exec(&mut con).expect("SET keys");
        }
    }

    /// Whether `key` exists.
    fn exists(&self, key: impl AsRef<[u8]>) -> bool {
        redis::cmd("EXISTS")
            .arg(key.as_ref())
            .query(&mut self.con())
            .expect("EXISTS")
    }

    /// The server's `notify-keyspace-events`.
    fn notify_flags(&self) -> String {
        let (_, value): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query(&mut self.con())
            .expect("CONFIG GET notify-keyspace-events");
        value
    }

    /// Sets the server's `notify-keyspace-events`, as an operator or another service would.
    fn set_notify_flags(&self, flags: &str) {
        self.run(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(flags),
        );
    }

    /// The ids of the clients in pub/sub mode (the index's notification connection).
    fn pubsub_clients(&self) -> HashSet<u64> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut self.con())
            .expect("CLIENT LIST");
        list.lines()
            .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect()
    }
}

/// A key as readable text: printable ASCII as is, other bytes escaped.
fn show(key: &[u8]) -> String {
    key.iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// A few of `keys`, readable, for a failure message.
fn some(keys: impl IntoIterator<Item = Vec<u8>>) -> Vec<String> {
    keys.into_iter().take(5).map(|k| show(&k)).collect()
}

/// Deleter options with the index on `prefixes` (at most `max_keys` keys) and short timeouts.
fn indexed_options(prefixes: &[&str], max_keys: usize) -> DeleterOptions {
    DeleterOptions {
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(2),
        key_index: Some(KeyIndexOptions {
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            max_keys,
        }),
        ..DeleterOptions::default()
    }
}

/// A deleter for `url` that indexes `prefixes`.
pub(crate) async fn indexed(url: &str, prefixes: &[&str], max_keys: usize) -> Deleter {
    Deleter::connect_with(url, indexed_options(prefixes, max_keys))
        .await
        .unwrap_or_else(|e| panic!("connect: {}", chain(&e)))
}

/// Polls the index's state until `wanted` holds; panics with the last state seen after
/// [`STATE_DEADLINE`].
pub(crate) async fn wait_state(
    deleter: &Deleter,
    what: &str,
    wanted: impl Fn(&KeyIndexState) -> bool,
) -> KeyIndexState {
    let start = Instant::now();
    loop {
        let state = deleter.key_index_state();
        if wanted(&state) {
            return state;
        }
        assert!(
            start.elapsed() < STATE_DEADLINE,
            "timed out after {STATE_DEADLINE:?} waiting until the index is {what}; it is {state:?}"
        );
        // Short: some tests catch a state that lasts only while the index rebuilds.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the index is Ready on a subscription that is alive and not one of `dead`.
/// The clients are read before the state: a subscription that exists was opened after the
/// index started over, so a Ready read after it is that subscription's, never a stale one.
async fn wait_ready_on_a_live_subscription(deleter: &Deleter, db: &Db, dead: &HashSet<u64>) {
    let start = Instant::now();
    loop {
        let alive = db.pubsub_clients().iter().any(|id| !dead.contains(id));
        let state = deleter.key_index_state();
        if alive && matches!(state, KeyIndexState::Ready { .. }) {
            return;
        }
        assert!(
            start.elapsed() < STATE_DEADLINE,
            "timed out after {STATE_DEADLINE:?} waiting until the index is ready on a new \
             subscription; it is {state:?}, subscribed: {alive}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the index is Ready and returns how many keys it holds.
pub(crate) async fn wait_ready(deleter: &Deleter) -> usize {
    match wait_state(deleter, "ready", |s| {
        matches!(s, KeyIndexState::Ready { .. })
    })
    .await
    {
        KeyIndexState::Ready { keys } => keys,
        other => unreachable!("wait_state returned {other:?}"),
    }
}

/// Starts `patterns` as one batch (no literal keys) and waits for its resolution.
pub(crate) async fn resolve(deleter: &mut Deleter, patterns: &[String]) -> DeleteStats {
    let patterns: HashSet<String> = patterns.iter().cloned().collect();
    let resolution = deleter.start(&HashSet::new(), &patterns).await;
    let resolution = resolution.unwrap_or_else(|e| panic!("start: {}", chain(&e)));
    let done = tokio::time::timeout(Duration::from_secs(60), resolution).await;
    let done = done.expect("the patterns resolve");
    done.unwrap_or_else(|e| panic!("resolution: {}", chain(&e)))
}

/// Checks that the database holds exactly `before` without `doomed`.
fn assert_exact(db: &Db, before: &HashSet<Vec<u8>>, doomed: &HashSet<Vec<u8>>, context: &str) {
    let after = db.all();
    let missed: Vec<Vec<u8>> = after.intersection(doomed).cloned().collect();
    let wrongly: Vec<Vec<u8>> = before
        .difference(doomed)
        .filter(|k| !after.contains(*k))
        .cloned()
        .collect();
    let (n_missed, n_wrongly) = (missed.len(), wrongly.len());
    assert!(
        n_missed == 0 && n_wrongly == 0,
        "{context}: missed {n_missed} keys {:?}, wrongly deleted {n_wrongly} keys {:?}",
        some(missed),
        some(wrongly),
    );
}

/// Resolves `patterns` as one batch and checks that exactly the keys per-pattern SCAN MATCH
/// found before are gone; returns the statistics.
async fn resolve_exactly(
    db: &Db,
    deleter: &mut Deleter,
    patterns: &[String],
    context: &str,
) -> DeleteStats {
    let before = db.all();
    let doomed = db.truth(patterns);
    let stats = resolve(deleter, patterns).await;
    assert_exact(db, &before, &doomed, &format!("{context} {patterns:?}"));
    stats
}

/// Owned strings.
pub(crate) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The prefixes the exactness tests index.
const PREFIXES: [&str; 3] = ["ix:a:", "ix:bb:", "iy:"];

/// Where keys of the random keyspaces begin: the indexed prefixes, and neighbours that are not
/// under any (`ix:` alone, `ix:a` without the colon, `iy` alone, another family).
const KEY_STARTS: &[&str] = &["ix:a:", "ix:bb:", "iy:", "ix:", "ix:a", "ix:c:", "iy", "z:"];

/// Bytes key tails are made of: what patterns name, glob bytes that must be escaped to be
/// matched, and bytes that are not UTF-8 or not printable.
const KEY_BYTES: &[&[u8]] = &[
    b"a", b"b", b"c", b"x", b":", b"1", b"2", b"-", b"*", b"?", b"[", b"]", b"\\", b"\xff",
    b"\xc3", b"\x00", b" ", b"\n",
];

/// Pattern pieces after an escaped prefix: literals, escaped glob bytes, and wildcards.
const PATTERN_PIECES: &[&str] = &[
    "a", "b", "c", ":", "x", "1", "\\*", "\\?", "\\[", "\\]", "\\\\", "?", "*", "[a-c]", "[^x]",
    "[\\*x]", "[1-2:]", "[^a-c]",
];

/// The wildcards a pattern ends with when its pieces held none.
const WILDCARDS: &[&str] = &["*", "?", "[a-c]", "[^x]"];

/// A random key under one of [`KEY_STARTS`] (the start itself is a key too).
fn random_key(random: &mut Random) -> Vec<u8> {
    let mut key = random.pick(KEY_STARTS).as_bytes().to_vec();
    for _ in 0..random.below(8) {
        key.extend_from_slice(random.pick(KEY_BYTES));
    }
    key
}

/// A random pattern under `prefix`: the prefix escaped, then random pieces, with at least one
/// wildcard.
fn random_pattern(random: &mut Random, prefix: &str) -> String {
    let mut pattern = glob::escape(prefix);
    let mut wild = false;
    for _ in 0..random.below(5) {
        let piece = random.pick(PATTERN_PIECES);
        wild |= matches!(piece.as_bytes()[0], b'*' | b'?' | b'[');
        pattern.push_str(piece);
    }
    if !wild || random.below(2) == 0 {
        pattern.push_str(random.pick(WILDCARDS));
    }
    pattern
}

/// How many of `keys` are under one of `prefixes`.
fn under(keys: &HashSet<Vec<u8>>, prefixes: &[&str]) -> usize {
    keys.iter()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p.as_bytes())))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn patterns_under_indexed_prefixes_delete_exactly_what_per_pattern_scan_finds() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    for seed in 1..=3u64 {
        db.run(&mut redis::cmd("FLUSHALL"));
        let mut random = Random(seed);
        // Some keys exist before the index is built (its SCAN learns them), more are written
        // once it is ready (its notifications tell it), before every round.
        let early: Vec<Vec<u8>> = (0..20_000).map(|_| random_key(&mut random)).collect();
        db.load(&early);
        let mut deleter = indexed(&db.url, &PREFIXES, NO_CAP).await;
        let learnt = wait_ready(&deleter).await;
        assert_eq!(
            learnt,
            under(&db.all(), &PREFIXES),
            "seed {seed}: the build learns every key under the prefixes"
        );
        for round in 0..3 {
            let late: Vec<Vec<u8>> = (0..10_000).map(|_| random_key(&mut random)).collect();
            db.load(&late);
            assert!(
                late.iter()
                    .any(|k| k.starts_with(b"ix:a:") && k.contains(&0xff)),
                "seed {seed}: keys that are not UTF-8 are written after the build"
            );
            // Single-pattern batches, all started before any is awaited, as commits arrive.
            let patterns: Vec<String> = (0..12)
                .map(|_| {
                    let prefix = random.pick(&PREFIXES);
                    random_pattern(&mut random, prefix)
                })
                .collect();
            let before = db.all();
            let doomed = db.truth(&patterns);
            assert!(!doomed.is_empty(), "seed {seed}: the patterns match keys");
            let mut resolutions = Vec::new();
            for pattern in &patterns {
                let batch: HashSet<String> = HashSet::from([pattern.clone()]);
                let started = deleter.start(&HashSet::new(), &batch).await;
                resolutions.push(started.unwrap_or_else(|e| panic!("start: {}", chain(&e))));
            }
            for (pattern, resolution) in patterns.iter().zip(resolutions) {
                let done = tokio::time::timeout(Duration::from_secs(60), resolution).await;
                let stats = done
                    .expect("the pattern resolves")
                    .unwrap_or_else(|e| panic!("resolution: {}", chain(&e)));
                assert_eq!(
                    stats.patterns_indexed, 1,
                    "seed {seed} round {round}: {pattern} was not served by the index: {stats:?}"
                );
            }
            assert_exact(
                &db,
                &before,
                &doomed,
                &format!("seed {seed} round {round} {patterns:?}"),
            );
            // And as one batch of many patterns.
            let patterns: Vec<String> = (0..20)
                .map(|_| {
                    let prefix = random.pick(&PREFIXES);
                    random_pattern(&mut random, prefix)
                })
                .collect();
            let stats = resolve_exactly(&db, &mut deleter, &patterns, "one batch").await;
            assert!(
                stats.patterns_indexed > 0,
                "seed {seed}: the batch was not served by the index: {stats:?}"
            );
        }
        // Patterns that reach beyond every indexed prefix walk, and are exact all the same.
        for pattern in ["ix:a*", "ix:?:*", "i[xy]:a:*", "z:*", "*\\**", "ix:*"] {
            let stats = resolve_exactly(&db, &mut deleter, &strings(&[pattern]), "uncovered").await;
            assert_eq!(
                stats.patterns_indexed, 0,
                "seed {seed}: {pattern} is not under an indexed prefix: {stats:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prefixes_with_glob_bytes_are_indexed_literally() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    // As globs these prefixes match other keys, and their own keys not at all: subscribing to
    // or scanning for them unescaped misses keys.
    let prefixes = ["s*[1]?\\:", "q[^a]-", "ключ:"];
    // Keys the unescaped prefixes would match as globs, and keys under the literal prefixes.
    let decoys: Vec<&[u8]> = vec![b"sX1Y:k", b"qb-k", b"s*1?:k"];
    let mut random = Random(7);
    let keys = |random: &mut Random, n: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut key = random.pick(&prefixes).as_bytes().to_vec();
                for _ in 0..random.below(6) {
                    key.extend_from_slice(random.pick(KEY_BYTES));
                }
                key
            })
            .collect()
    };
    db.load(&keys(&mut random, 2_000));
    db.load(&decoys);
    let mut deleter = indexed(&db.url, &prefixes, NO_CAP).await;
    let learnt = wait_ready(&deleter).await;
    assert_eq!(learnt, under(&db.all(), &prefixes), "the build learns them");
    db.load(&keys(&mut random, 2_000));
    for prefix in prefixes {
        let patterns: Vec<String> = (0..5)
            .map(|_| random_pattern(&mut random, prefix))
            .collect();
        let stats = resolve_exactly(&db, &mut deleter, &patterns, prefix).await;
        assert!(stats.patterns_indexed > 0, "{prefix}: {stats:?}");
        let all = strings(&[&format!("{}*", glob::escape(prefix))]);
        let stats = resolve_exactly(&db, &mut deleter, &all, prefix).await;
        assert_eq!(stats.patterns_indexed, 1, "{prefix}: {stats:?}");
    }
    for decoy in decoys {
        assert!(db.exists(decoy), "{} was deleted", show(decoy));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resolutions_while_the_index_builds_are_exact() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("bd:{}:{i}", i % 100))
        .collect();
    db.load(&keys);
    let mut deleter = indexed(&db.url, &["bd:"], NO_CAP).await;
    // Started at once: the build's SCAN over 100,000 keys is under way (or done; either way
    // the batch must delete exactly its keys).
    for group in 0..5 {
        let patterns = vec![format!("bd:{group}:*"), format!("bd:{}?:*", group + 1)];
        resolve_exactly(&db, &mut deleter, &patterns, "building").await;
    }
    wait_ready(&deleter).await;
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["bd:7*"]), "ready").await;
    assert_eq!(stats.patterns_indexed, 1, "{stats:?}");
}

/// The keys one round of [`write_under_the_prefix`] creates that the patterns match.
fn doomed_of_round(i: u64) -> [String; 3] {
    [
        format!("kc:doomed:{i}"),
        format!("kc:doomed:t{i}"),
        format!("kc:doomed:o{i}"),
    ]
}

/// How many keys `kc:churn:*` a writer leaves behind: each round deletes the one of three
/// rounds before.
const CHURN_KEPT: u64 = 3;

/// How many rounds a writer may run ahead of the last resolution's start: it keeps writing
/// through every resolution, and the keyspace (which a walk covers) stays small.
const WRITER_LEAD: u64 = 2_000;

/// Writes under the prefix `kc:` until `stop`, one round after the other on one connection and
/// never beyond round `allowed`: keys the patterns match (by SET, by RENAME within the prefix
/// and by RENAME from outside it), keys they do not match (also renamed into place from a
/// matching name), and keys created and deleted again. `rounds` counts the rounds whose replies
/// have all come back.
fn write_under_the_prefix(
    db: &Db,
    rounds: Arc<AtomicU64>,
    allowed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut con = db.con();
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if i >= allowed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let [set, renamed, moved_in] = doomed_of_round(i);
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(&set).arg("1").ignore();
            pipe.cmd("SET")
                .arg(format!("kc:kept:{i}"))
                .arg("1")
                .ignore();
            pipe.exec(&mut con).expect("SET");
            // Keys that appear by RENAME, each created and renamed in one transaction.
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("SET")
                .arg(format!("kc:tmp:{i}"))
                .arg("1")
                .ignore()
                .cmd("RENAME")
                .arg(format!("kc:tmp:{i}"))
                .arg(&renamed)
                .ignore()
                .cmd("SET")
                .arg(format!("out:{i}"))
                .arg("1")
                .ignore()
                .cmd("RENAME")
                .arg(format!("out:{i}"))
                .arg(&moved_in)
                .ignore()
                .cmd("SET")
                .arg(format!("kc:doomed:m{i}"))
                .arg("1")
                .ignore()
                .cmd("RENAME")
                .arg(format!("kc:doomed:m{i}"))
                .arg(format!("kc:kept:m{i}"))
                .ignore();
            pipe.exec(&mut con).expect("RENAME");
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(format!("kc:churn:{i}"))
                .arg("1")
                .ignore();
            if i >= CHURN_KEPT {
                pipe.cmd("DEL")
                    .arg(format!("kc:churn:{}", i - CHURN_KEPT))
                    .ignore();
            }
            pipe.exec(&mut con).expect("churn");
            i += 1;
            rounds.store(i, Ordering::SeqCst);
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_written_before_start_is_deleted_while_a_writer_keeps_going() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    let mut deleter = indexed(&db.url, &["kc:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let rounds = Arc::new(AtomicU64::new(0));
    let allowed = Arc::new(AtomicU64::new(WRITER_LEAD));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_under_the_prefix(&db, rounds.clone(), allowed.clone(), stop.clone());
    let patterns = strings(&["kc:doomed:*", "kc:doomed:?1*", "kc:doomed:[ot]*"]);
    let mut indexed_batches = 0;
    let mut written = 0;
    for _ in 0..15 {
        // Fresh keys before every batch, and the writer goes on while it resolves.
        wait_until(Duration::from_secs(10), "the writer moves on", || {
            rounds.load(Ordering::SeqCst) >= written + 200
        });
        // Every round below this one had its replies back before `start`.
        written = rounds.load(Ordering::SeqCst);
        allowed.store(written + WRITER_LEAD, Ordering::SeqCst);
        let stats = resolve(&mut deleter, &patterns).await;
        indexed_batches += usize::from(stats.patterns_indexed > 0);
        let left: Vec<String> = db
            .scan(b"kc:doomed:*")
            .into_iter()
            .map(|k| String::from_utf8(k).expect("ASCII"))
            .filter(|k| {
                let n: u64 = k
                    .trim_start_matches("kc:doomed:")
                    .trim_start_matches(['t', 'o'])
                    .parse()
                    .expect("a round number");
                n < written
            })
            .collect();
        assert!(
            left.is_empty(),
            "{} keys written before start survived (rounds < {written}): {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the writer");
    let total = rounds.load(Ordering::SeqCst);
    // Not all: a task that falls behind the writer's events misses the barrier's deadline, and
    // the batch walks (exact all the same).
    assert!(
        indexed_batches > 0,
        "no batch was served by the index: {:?}",
        deleter.key_index_state()
    );
    // Nothing the patterns do not match was touched.
    let kept = db.scan(b"kc:kept:*");
    for i in 0..total {
        for key in [format!("kc:kept:{i}"), format!("kc:kept:m{i}")] {
            assert!(kept.contains(key.as_bytes()), "{key} was deleted");
        }
    }
    let churn = db.scan(b"kc:churn:*");
    let expected: HashSet<Vec<u8>> = (total.saturating_sub(CHURN_KEPT)..total)
        .map(|i| format!("kc:churn:{i}").into_bytes())
        .collect();
    assert_eq!(churn, expected, "the writer's own deletes alone");
    assert!(db.scan(b"kc:tmp:*").is_empty() && db.scan(b"out:*").is_empty());
}

/// Waits until the server's clock (`TIME`, which touches no key) is past `unix_ms`.
fn wait_server_time_past(db: &Db, unix_ms: u64) {
    wait_until(
        Duration::from_secs(5),
        "the server's clock moves on",
        || {
            let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut db.con()).expect("TIME");
            secs * 1000 + micros / 1000 > unix_ms
        },
    );
}

/// The server's clock in milliseconds.
fn server_ms(db: &Db) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut db.con()).expect("TIME");
    secs * 1000 + micros / 1000
}

/// Checks that `event` made keys under `ke:` and that the index serves `ke:*` exactly.
async fn found(db: &Db, deleter: &mut Deleter, event: &str) {
    let made = db.scan(b"ke:*");
    assert!(!made.is_empty(), "{event}: the commands made no key");
    let stats = resolve_exactly(db, deleter, &strings(&["ke:*"]), event).await;
    assert_eq!(stats.patterns_indexed, 1, "{event}: {stats:?}");
    assert_eq!(
        stats.keys_deleted,
        made.len() as u64,
        "{event}: {:?}",
        some(made)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_created_by_any_command_are_found() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    // Not database 0, so notifications of the wrong database would not do; keys arrive from
    // database 0 too.
    let db = Db::of(&redis, 5);
    let other = Db::of(&redis, 0);
    // The server, not the active expiry cycle, must meet the expired key on SET.
    db.run(redis::cmd("DEBUG").arg("SET-ACTIVE-EXPIRE").arg("0"));
    let mut deleter = indexed(&db.url, &["ke:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let d = &mut deleter;

    db.load(&["elsewhere:r"]);
    db.run(redis::cmd("RENAME").arg("elsewhere:r").arg("ke:rename"));
    found(&db, d, "RENAME into the prefix").await;

    db.load(&["elsewhere:r", "ke:rename"]);
    db.run(redis::cmd("RENAME").arg("elsewhere:r").arg("ke:rename"));
    found(&db, d, "RENAME over a key").await;

    other.load(&["ke:move"]);
    other.run(redis::cmd("MOVE").arg("ke:move").arg(5));
    found(&db, d, "MOVE from another database").await;

    db.load(&["elsewhere:c"]);
    db.run(redis::cmd("COPY").arg("elsewhere:c").arg("ke:copy"));
    found(&db, d, "COPY").await;

    other.load(&["elsewhere:c"]);
    other.run(
        redis::cmd("COPY")
            .arg("elsewhere:c")
            .arg("ke:copy")
            .arg("DB")
            .arg(5),
    );
    found(&db, d, "COPY from another database").await;

    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg("elsewhere:c")
        .query(&mut db.con())
        .expect("DUMP");
    db.run(redis::cmd("RESTORE").arg("ke:restore").arg(0).arg(dump));
    found(&db, d, "RESTORE").await;

    let at = server_ms(&db) + 20;
    db.run(
        redis::cmd("SET")
            .arg("ke:expired")
            .arg("1")
            .arg("PXAT")
            .arg(at),
    );
    wait_server_time_past(&db, at);
    db.run(redis::cmd("SET").arg("ke:expired").arg("2"));
    found(&db, d, "SET over an expired key").await;

    db.run(redis::cmd("RPUSH").arg("ke:list").arg("a"));
    db.run(redis::cmd("LPOP").arg("ke:list"));
    db.run(redis::cmd("RPUSH").arg("ke:list").arg("b"));
    found(&db, d, "a list emptied by LPOP and pushed again").await;

    db.run(redis::cmd("RPUSH").arg("ke:list").arg("a"));
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("LPOP")
        .arg("ke:list")
        .ignore()
        .cmd("RPUSH")
        .arg("ke:list")
        .arg("b")
        .ignore();
    pipe.exec(&mut db.con()).expect("MULTI");
    found(&db, d, "the same in one transaction").await;

    db.run(redis::cmd("INCR").arg("ke:incr"));
    db.run(redis::cmd("HSET").arg("ke:hash").arg("f").arg("v"));
    db.run(
        redis::cmd("XADD")
            .arg("ke:stream")
            .arg("*")
            .arg("f")
            .arg("v"),
    );
    db.run(redis::cmd("PFADD").arg("ke:hll").arg("a"));
    db.run(redis::cmd("SETRANGE").arg("ke:range").arg(3).arg("x"));
    found(&db, d, "INCR, HSET, XADD, PFADD, SETRANGE").await;

    db.run(redis::cmd("SADD").arg("elsewhere:s").arg("1").arg("2"));
    db.run(redis::cmd("SUNIONSTORE").arg("ke:union").arg("elsewhere:s"));
    db.run(
        redis::cmd("SORT")
            .arg("elsewhere:s")
            .arg("STORE")
            .arg("ke:sorted"),
    );
    db.run(
        redis::cmd("SMOVE")
            .arg("elsewhere:s")
            .arg("ke:smove")
            .arg("1"),
    );
    db.run(redis::cmd("RPUSH").arg("elsewhere:l").arg("a"));
    db.run(
        redis::cmd("LMOVE")
            .arg("elsewhere:l")
            .arg("ke:lmove")
            .arg("LEFT")
            .arg("RIGHT"),
    );
    db.run(
        redis::cmd("BITOP")
            .arg("OR")
            .arg("ke:bitop")
            .arg("elsewhere:c"),
    );
    found(&db, d, "commands that store a result").await;

    db.run(
        redis::cmd("EVAL")
            .arg("redis.call('SET', KEYS[1], '1')")
            .arg(1)
            .arg("ke:script"),
    );
    found(&db, d, "a script").await;
}

/// Writes `n` keys `<prefix><i>`.
fn write_keys(db: &Db, prefix: &str, n: usize) {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    db.load(&keys);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_notification_connection_is_killed_the_index_rebuilds_and_misses_nothing() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    write_keys(&db, "rc:before:", 1_000);
    let mut deleter = indexed(&db.url, &["rc:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let old = db.pubsub_clients();
    assert!(!old.is_empty(), "the index subscribes");
    db.run(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    // Notified to nobody: only a new SCAN can learn these.
    write_keys(&db, "rc:while:", 1_000);
    wait_ready_on_a_live_subscription(&deleter, &db, &old).await;
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["rc:*"]), "rebuilt").await;
    assert_eq!(stats.patterns_indexed, 1, "{stats:?}");
    assert_eq!(stats.keys_deleted, 2_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_subscription_keeps_dropping_resolutions_fall_back_and_stay_exact() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    // Enough keys that a rebuild takes longer than the pause between two kills.
    write_keys(&db, "rk:base:", 20_000);
    let mut deleter = indexed(&db.url, &["rk:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (stop, mut con) = (stop.clone(), db.con());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .exec(&mut con)
                    .expect("CLIENT KILL");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_state(&deleter, "not ready", |s| {
        !matches!(s, KeyIndexState::Ready { .. })
    })
    .await;
    let mut fell_back = 0;
    for round in 0..6 {
        write_keys(&db, &format!("rk:down{round}:"), 200);
        let patterns = vec![format!("rk:down{round}:*"), "rk:base:1*".to_owned()];
        let stats = resolve_exactly(&db, &mut deleter, &patterns, "while lost").await;
        fell_back += usize::from(stats.patterns_indexed == 0);
    }
    assert!(
        fell_back > 0,
        "no resolution fell back while the index was lost"
    );
    // Written while lost, deleted once it is back.
    write_keys(&db, "rk:last:", 500);
    stop.store(true, Ordering::SeqCst);
    killer.join().expect("the killer");
    wait_ready_on_a_live_subscription(&deleter, &db, &HashSet::new()).await;
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["rk:*"]), "back").await;
    assert_eq!(stats.patterns_indexed, 1, "{stats:?}");
}

/// How often the server cut a client for its output buffer, as its log says (Redis 7.0 counts
/// it nowhere else).
fn output_buffer_disconnections(redis: &RedisServer) -> usize {
    redis
        .log()
        .matches("for overcoming of output buffer limits")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_cut_for_its_output_buffer_misses_nothing_and_is_rebuilt() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    let mut deleter = indexed(&db.url, &["ob:"], NO_CAP).await;
    wait_ready(&deleter).await;
    db.run(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 1kb 0 0"),
    );
    // One pipeline: thousands of notifications pile up in the subscriber's buffer at once.
    write_keys(&db, "ob:burst:", 20_000);
    wait_until(Duration::from_secs(10), "redis cuts the subscriber", || {
        output_buffer_disconnections(&redis) > 0
    });
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["ob:*"]), "cut").await;
    assert_eq!(stats.keys_deleted, 20_000);
    // Deleting them may have cut the subscription again. A handful of keys at a time fits the
    // small buffer: once rebuilt, the index serves them and holds.
    let start = Instant::now();
    for round in 0.. {
        wait_ready(&deleter).await;
        write_keys(&db, &format!("ob:after{round}:"), 3);
        let stats = resolve_exactly(&db, &mut deleter, &strings(&["ob:*"]), "rebuilt").await;
        assert_eq!(stats.keys_deleted, 3);
        if stats.patterns_indexed == 1 {
            break;
        }
        assert!(
            start.elapsed() < STATE_DEADLINE,
            "the rebuilt index never served a resolution: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_switched_off_or_narrowed_are_noticed_before_a_resolution() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    let mut deleter = indexed(&db.url, &["nf:"], NO_CAP).await;
    // Off; keyevent only; without new-key events; without keyspace events; everything but new
    // keys (`A` lacks `n`).
    for (round, flags) in ["", "E$", "Kgxe", "Egxen", "KEA"].into_iter().enumerate() {
        wait_ready(&deleter).await;
        let on = db.notify_flags();
        let has = |f: char| on.contains(f) || (matches!(f, 'g' | 'x' | 'e') && on.contains('A'));
        assert!(
            "Kgx".chars().all(has) && (on.contains('n') || on.contains('A')),
            "the index asked for Kgxen, the server has {on:?}"
        );
        db.set_notify_flags(flags);
        let groups = ["a", "b", "c", "d"].map(|g| format!("nf:{round}:{g}:"));
        for group in &groups {
            write_keys(&db, group, 300);
        }
        let first = strings(&[&format!("{}*", groups[0])]);
        let stats = resolve_exactly(&db, &mut deleter, &first, flags).await;
        assert_eq!(stats.keys_deleted, 300, "flags {flags:?}: {stats:?}");
        // The other groups, written while the index was blind too, one batch at a time once
        // it says it is ready (it may take a batch or two more to notice): one of them must be
        // served by the index, which therefore learnt the keyspace anew.
        let mut served = false;
        for group in &groups[1..] {
            wait_ready(&deleter).await;
            let batch = strings(&[&format!("{group}*")]);
            let stats = resolve_exactly(&db, &mut deleter, &batch, flags).await;
            assert_eq!(stats.keys_deleted, 300, "flags {flags:?}: {stats:?}");
            if stats.patterns_indexed == 1 {
                served = true;
                break;
            }
        }
        assert!(served, "flags {flags:?}: the index never served again");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notification_flags_already_set_are_kept_and_understood() {
    for flags in ["Ex", "AKE"] {
        let redis = RedisServer::start_with(&["--notify-keyspace-events", flags]);
        let db = Db::of(&redis, 0);
        let mut deleter = indexed(&db.url, &["nk:"], NO_CAP).await;
        wait_ready(&deleter).await;
        let now = db.notify_flags();
        for f in flags.chars() {
            assert!(now.contains(f), "{flags:?} lost {f:?}: {now:?}");
        }
        write_keys(&db, "nk:", 100);
        let stats = resolve_exactly(&db, &mut deleter, &strings(&["nk:*"]), flags).await;
        assert_eq!(stats.patterns_indexed, 1, "{flags:?}: {stats:?}");
        assert_eq!(stats.keys_deleted, 100);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_config_the_index_is_unavailable_and_patterns_walk() {
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let db = Db::of(&redis, 0);
    write_keys(&db, "nc:", 500);
    let mut deleter = indexed(&db.url, &["nc:"], NO_CAP).await;
    let state = wait_state(&deleter, "unavailable", |s| {
        matches!(s, KeyIndexState::Unavailable(_))
    })
    .await;
    let KeyIndexState::Unavailable(reason) = state else {
        unreachable!()
    };
    assert!(
        reason.contains("CONFIG"),
        "the reason names CONFIG: {reason}"
    );
    write_keys(&db, "nc:later:", 100);
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["nc:*"]), "unavailable").await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    assert_eq!(stats.keys_deleted, 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_channel_permissions_makes_the_index_unavailable() {
    let redis = RedisServer::start();
    // What `ACL SETUSER` gives a new user on Redis 7 (`acl-pubsub-default resetchannels`):
    // every command and key, no channel.
    let url = redis.acl_user(&["~*", "+@all", "resetchannels"]);
    let db = Db::of(&redis, 0);
    write_keys(&db, "np:", 200);
    let mut deleter = indexed(&url, &["np:"], NO_CAP).await;
    // Refused, not lost: retrying cannot help, and the operator must be told what to grant.
    let state = wait_state(&deleter, "unavailable", |s| {
        matches!(s, KeyIndexState::Unavailable(_))
    })
    .await;
    let KeyIndexState::Unavailable(reason) = state else {
        unreachable!()
    };
    assert!(
        reason.to_uppercase().contains("NOPERM"),
        "the reason names the refusal: {reason}"
    );
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["np:*"]), "no channels").await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    assert_eq!(stats.keys_deleted, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn past_its_cap_the_index_is_full_and_patterns_walk() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    // Full at build.
    write_keys(&db, "fa:", 500);
    let mut deleter = indexed(&db.url, &["fa:"], 100).await;
    wait_state(&deleter, "full", |s| {
        *s == KeyIndexState::Full { max_keys: 100 }
    })
    .await;
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["fa:1*"]), "full").await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    // Full as keys arrive.
    let mut deleter = indexed(&db.url, &["fb:"], 100).await;
    write_keys(&db, "fb:", 50);
    wait_state(&deleter, "ready with 50 keys", |s| {
        *s == KeyIndexState::Ready { keys: 50 }
    })
    .await;
    write_keys(&db, "fb:more:", 100);
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["fb:*"]), "grown").await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    assert_eq!(stats.keys_deleted, 150);
    // Past the cap it scans again first (flushed keys leave no event), and that scan finds
    // more than 100 keys: full.
    write_keys(&db, "fb:again:", 150);
    wait_state(&deleter, "full", |s| {
        *s == KeyIndexState::Full { max_keys: 100 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_database_does_not_count_against_the_cap() {
    let redis = RedisServer::start();
    let db = Db::of(&redis, 0);
    let mut deleter = indexed(&db.url, &["fl:"], 150).await;
    wait_ready(&deleter).await;
    write_keys(&db, "fl:old:", 100);
    wait_state(&deleter, "ready with 100 keys", |s| {
        *s == KeyIndexState::Ready { keys: 100 }
    })
    .await;
    // FLUSHDB (an operator emptying the cache) publishes no keyspace event at all.
    db.run(&mut redis::cmd("FLUSHDB"));
    write_keys(&db, "fl:new:", 100);
    // Never more than 100 keys under the prefix, and a cap of 150: past the cap with the
    // flushed keys, the index scans again and holds what Redis holds. A resolution first, so
    // that the index has seen the new keys (its barrier comes after their events).
    resolve_exactly(&db, &mut deleter, &strings(&["fl:none:*"]), "synced").await;
    wait_state(&deleter, "ready with the 100 keys Redis holds", |s| {
        *s == KeyIndexState::Ready { keys: 100 }
    })
    .await;
    let stats = resolve_exactly(&db, &mut deleter, &strings(&["fl:new:*"]), "refilled").await;
    assert_eq!(
        stats.patterns_indexed,
        1,
        "the index holds the flushed keys too: {:?}",
        deleter.key_index_state()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_cluster_the_index_serves_every_primary() {
    let cluster = RedisCluster::start(3);
    let keys: Vec<String> = (0..300).map(|i| format!("cl:{i}")).collect();
    cluster.set_keys(&keys);
    assert_eq!(cluster.nodes_with_keys(), 3);
    let mut deleter = indexed(&cluster.url(), &["cl:"], NO_CAP).await;
    assert_eq!(
        wait_ready(&deleter).await,
        300,
        "the sum over the primaries"
    );
    let stats = resolve(&mut deleter, &strings(&["cl:1*"])).await;
    assert_eq!(
        (stats.patterns_indexed, stats.keys_deleted),
        (1, 111),
        "{stats:?}"
    );
    assert!(cluster.scan_keys("cl:1*").is_empty());
    assert_eq!(cluster.scan_keys("cl:*").len(), 300 - 111);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resync_from_another_primary_is_noticed_and_its_keys_are_deleted() {
    let (redis, other) = (RedisServer::start(), RedisServer::start());
    let db = Db::of(&redis, 0);
    let mut deleter = indexed(&db.url, &["rs:"], NO_CAP).await;
    wait_ready(&deleter).await;
    redis.set_keys(["rs:mine:1"]);
    let stats = resolve(&mut deleter, &strings(&["rs:mine:*"])).await;
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (1, 1));
    let theirs: Vec<String> = (0..20).map(|i| format!("rs:theirs:{i}")).collect();
    other.set_keys(&theirs);
    // A full resync replaces the data without an event per key; the subscription stays.
    db.run(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(other.port()));
    wait_until(STATE_DEADLINE, "the resync brought the keys", || {
        redis.info("replication").contains("master_link_status:up")
            && theirs.iter().all(|k| db.exists(k))
    });
    db.run(redis::cmd("REPLICAOF").arg("NO").arg("ONE"));
    resolve(&mut deleter, &strings(&["rs:theirs:*"])).await;
    let left = db.scan(b"rs:theirs:*");
    assert!(
        left.is_empty(),
        "{} of {} keys left",
        left.len(),
        theirs.len()
    );
}

#[test]
fn the_sidecar_resolves_rule_patterns_from_the_index_and_says_so_in_metrics() {
    let f = Fixture::new(SCHEMA, RULES);
    // Rule "item" renders `items:name:{name}:*`: the index holds `items:name:`.
    f.cache(&[
        "items:name:alpha:1",
        "items:name:alpha:2",
        "items:name:beta:1",
    ]);
    let sidecar = f
        .setup
        .spawn_with_env(&[], &[("INVALIDATOR_REDIS_KEY_INDEX", "true")]);
    sidecar.wait_ready();
    let (_, metrics) = sidecar.get("/metrics").expect("metrics");
    for reason in KEY_INDEX_FALLBACKS {
        let series = format!("invalidator_key_index_fallbacks_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
    wait_until(Duration::from_secs(20), "the index holds the keys", || {
        sidecar.assert_alive();
        sidecar.metric("invalidator_key_index_keys") == 3.0
    });
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["items:name:alpha:1", "items:name:alpha:2"]);
    f.assert_kept(&["items:name:beta:1"]);
    wait_until(Duration::from_secs(20), "a resolution is counted", || {
        sidecar.metric("invalidator_key_index_resolutions_total") >= 1.0
    });
    let first = sidecar.metric("invalidator_key_index_resolutions_total");
    // Cached after the index was built: learnt from a notification.
    f.cache(&["items:name:gamma:1"]);
    f.sql("INSERT INTO items VALUES (2, 'gamma', 'cars', 10)");
    f.wait_deleted(&["items:name:gamma:1"]);
    wait_until(Duration::from_secs(20), "the resolutions grow", || {
        sidecar.metric("invalidator_key_index_resolutions_total") > first
    });
    f.assert_kept(&["items:name:beta:1"]);
    wait_until(Duration::from_secs(20), "the gauge follows", || {
        sidecar.metric("invalidator_key_index_keys") == 1.0
    });
}

#[test]
fn without_config_the_sidecar_is_ready_with_a_note_and_check_says_why() {
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let f = Fixture::with_cache(SCHEMA, RULES, Cache::Single(redis));
    // The file this time, not the environment.
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).expect("read the config");
    std::fs::write(
        &path,
        config.replacen("[redis]\n", "[redis]\nkey_index = true\n", 1),
    )
    .expect("write the config");
    let (_, out) = f.setup.command(&["check"]);
    assert!(
        out.contains("notify-keyspace-events"),
        "check does not say that notifications cannot be set:\n{out}"
    );
    let sidecar = f.setup.start();
    wait_until(Duration::from_secs(20), "/readyz carries a note", || {
        sidecar.assert_alive();
        sidecar
            .get("/readyz")
            .is_some_and(|(status, body)| status == 200 && body.contains("CONFIG"))
    });
    f.cache(&["items:name:alpha:1", "items:name:beta:1"]);
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["items:name:alpha:1"]);
    f.assert_kept(&["items:name:beta:1"]);
    wait_until(Duration::from_secs(20), "the fallback is counted", || {
        sidecar.metric("invalidator_key_index_fallbacks_total{reason=\"unavailable\"}") >= 1.0
    });
    assert_eq!(
        sidecar.metric("invalidator_key_index_resolutions_total"),
        0.0
    );
}

#[test]
fn a_cap_from_the_environment_makes_the_sidecar_walk_as_full() {
    let f = Fixture::new(SCHEMA, RULES);
    f.cache(&[
        "items:name:alpha:1",
        "items:name:alpha:2",
        "items:name:beta:1",
    ]);
    let sidecar = f.setup.spawn_with_env(
        &[],
        &[
            ("INVALIDATOR_REDIS_KEY_INDEX", "true"),
            ("INVALIDATOR_REDIS_KEY_INDEX_MAX_KEYS", "2"),
        ],
    );
    sidecar.wait_ready();
    // The build stops at the third key; until then a batch would be counted as building.
    wait_until(
        Duration::from_secs(20),
        "/readyz notes a full index",
        || {
            sidecar.assert_alive();
            sidecar
                .get("/readyz")
                .is_some_and(|(status, body)| status == 200 && body.contains("key index full"))
        },
    );
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["items:name:alpha:1", "items:name:alpha:2"]);
    f.assert_kept(&["items:name:beta:1"]);
    wait_until(
        Duration::from_secs(20),
        "the fallback is counted as full",
        || {
            sidecar.assert_alive();
            sidecar.metric("invalidator_key_index_fallbacks_total{reason=\"full\"}") >= 1.0
        },
    );
    assert_eq!(
        sidecar.metric("invalidator_key_index_resolutions_total"),
        0.0
    );
    assert_eq!(sidecar.metric("invalidator_key_index_keys"), 0.0);
}
