//! The Redis deleter against real redis-server processes.

use std::collections::HashSet;
use std::error::Error as _;
use std::time::{Duration, Instant};

use invalidator::error::Classify;
use invalidator::redis::{
    DeleteError, DeleteStats, Deleter, DeleterOptions, KeyIndexCheck, KeyIndexOptions,
    KeyIndexState, SHARED_PASS_THRESHOLD,
};

use crate::support::{CutMode, RedisCluster, RedisServer, TcpProxy, unique_name, wait_for};

/// Builds a set of owned strings.
pub fn set<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> HashSet<String> {
    items.into_iter().map(|s| s.as_ref().to_owned()).collect()
}

/// The error and all its sources, as a log line with the chain would show them.
pub fn chain(err: &DeleteError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Retries `delete` as the pipeline does: transient errors until Redis is back (here: for 60 s),
/// a permanent one fails the test at once.
pub async fn delete_until_ok(
    deleter: &mut Deleter,
    keys: &HashSet<String>,
    patterns: &HashSet<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match deleter.delete(keys, patterns).await {
            Ok(_) => return,
            Err(err) if !err.is_transient() => panic!("permanent error: {}", chain(&err)),
            Err(err) if Instant::now() >= deadline => {
                panic!("the deleter did not recover: {}", chain(&err))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Options with short timeouts, for tests that make Redis fail on purpose.
fn impatient() -> DeleterOptions {
    DeleterOptions {
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(1),
        ..DeleterOptions::default()
    }
}

/// Keys that Redis itself returns for `pattern` (the truth the deleter must match).
fn server_matches(redis: &RedisServer, pattern: &str) -> HashSet<Vec<u8>> {
    redis.scan_raw_keys(pattern).into_iter().collect()
}

#[tokio::test]
async fn deletes_literal_keys_and_counts_only_those_that_existed() {
    let redis = RedisServer::shared();
    let p = unique_name("lit");
    redis.set_keys([
        format!("{p}:a"),
        format!("{p}:b"),
        format!("{p}:c"),
        format!("{p}:keep"),
    ]);
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let keys = set([
        format!("{p}:a"),
        format!("{p}:b"),
        format!("{p}:c"),
        format!("{p}:missing1"),
        format!("{p}:missing2"),
    ]);
    let stats = deleter
        .delete(&keys, &HashSet::new())
        .await
        .expect("delete");
    assert_eq!(
        stats,
        DeleteStats {
            keys_deleted: 3,
            patterns_scanned: 0,
            scan_calls: 0,
            patterns_indexed: 0,
        }
    );
    assert_eq!(redis.scan_keys(&format!("{p}:*")), [format!("{p}:keep")]);
}

#[tokio::test]
async fn deleting_only_missing_keys_is_fine_and_repeatable() {
    let redis = RedisServer::shared();
    let p = unique_name("missing");
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let keys = set([format!("{p}:nothing")]);
    let patterns = set([format!("{p}:none:*")]);
    for _ in 0..2 {
        let stats = deleter.delete(&keys, &patterns).await.expect("delete");
        assert_eq!(stats.keys_deleted, 0);
        assert_eq!(stats.patterns_scanned, 1);
    }
}

#[tokio::test]
async fn a_pattern_deletes_its_matches_and_spares_the_rest() {
    let redis = RedisServer::shared();
    let p = unique_name("pat");
    redis.set_keys([
        format!("{p}:car:1:avail"),
        format!("{p}:car:1:price"),
        format!("{p}:car:2:avail"),
        format!("{p}:car:10:avail"),
    ]);
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let patterns = set([format!("{p}:car:1:*"), format!("{p}:car:?:avail")]);
    let stats = deleter
        .delete(&HashSet::new(), &patterns)
        .await
        .expect("delete");
    assert_eq!(stats.keys_deleted, 3);
    assert_eq!(stats.patterns_scanned, 2);
    assert!(stats.scan_calls >= 2);
    assert_eq!(
        redis.scan_keys(&format!("{p}:*")),
        [format!("{p}:car:10:avail")]
    );
}

#[tokio::test]
async fn escaped_glob_characters_delete_only_the_exact_key() {
    let redis = RedisServer::shared();
    let p = unique_name("esc");
    redis.set_keys([
        format!("{p}:user:*:x"),
        format!("{p}:user:1:x"),
        format!("{p}:q?"),
        format!("{p}:qa"),
        format!("{p}:[b]"),
        format!("{p}:b"),
    ]);
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let patterns = set([
        format!(r"{p}:user:\*:x"),
        format!(r"{p}:q\?"),
        format!(r"{p}:\[b\]"),
    ]);
    let stats = deleter
        .delete(&HashSet::new(), &patterns)
        .await
        .expect("delete");
    assert_eq!(stats.keys_deleted, 3);
    assert_eq!(
        redis.scan_keys(&format!("{p}:*")),
        [format!("{p}:b"), format!("{p}:qa"), format!("{p}:user:1:x")]
    );
}

#[tokio::test]
async fn a_wider_prefix_pattern_is_scanned_instead_of_the_ones_it_covers() {
    let redis = RedisServer::shared();
    let p = unique_name("cover");
    redis.set_keys([format!("{p}:u:1:a"), format!("{p}:u:2:b"), format!("{p}:v")]);
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let patterns = set([
        format!("{p}:u:*"),
        format!("{p}:u:1:*"),
        format!("{p}:u:?:b"),
    ]);
    let stats = deleter
        .delete(&HashSet::new(), &patterns)
        .await
        .expect("delete");
    assert_eq!(stats.patterns_scanned, 1);
    assert_eq!(stats.keys_deleted, 2);
    assert_eq!(redis.scan_keys(&format!("{p}:*")), [format!("{p}:v")]);
}

#[tokio::test]
async fn many_patterns_share_one_pass_and_delete_exactly_what_redis_matches() {
    // A private server, so the number of SCAN calls depends on our keys only.
    let redis = RedisServer::start();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for i in 0..40 {
        for suffix in ["a", "b", "*", "?", "[x]", "\\"] {
            keys.push(format!("t:{i}:{suffix}").into_bytes());
        }
    }
    keys.push(b"t:1:\xff\xfe binary".to_vec());
    keys.push(b"other:\xff".to_vec());
    redis.set_keys(&keys);
    let patterns = set([
        "t:1:*",
        "t:2:?",
        r"t:3:\*",
        r"t:4:\?",
        r"t:5:\[x\]",
        r"t:6:\\",
        "t:1[0-3]:a",
        "t:2[^0-5]:b",
        "t:3?:[ab]",
        "t:*:\\[*",
        "t:9*",
    ]);
    assert!(patterns.len() > SHARED_PASS_THRESHOLD);
    let mut expected = HashSet::new();
    for pattern in &patterns {
        expected.extend(server_matches(&redis, pattern));
    }
    let before = server_matches(&redis, "*");
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let stats = deleter
        .delete(&HashSet::new(), &patterns)
        .await
        .expect("delete");
    let deleted: HashSet<Vec<u8>> = before
        .difference(&server_matches(&redis, "*"))
        .cloned()
        .collect();
    assert_eq!(deleted, expected);
    assert!(deleted.contains(&b"t:1:\xff\xfe binary"[..]));
    assert!(redis.exists(b"other:\xff"));
    assert_eq!(stats.keys_deleted, expected.len() as u64);
    assert_eq!(stats.patterns_scanned, patterns.len() as u64);
    assert!(
        stats.scan_calls <= 3,
        "one pass over a small keyspace: {stats:?}"
    );
}

/// A small deterministic generator (xorshift64*), so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    /// A string of `1..=max` bytes from `alphabet`.
    fn text(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
        let len = 1 + self.below(max);
        (0..len)
            .map(|_| alphabet[self.below(alphabet.len())])
            .collect()
    }
}

#[tokio::test]
async fn the_shared_pass_deletes_exactly_what_one_pass_per_pattern_deletes() {
    // Two servers with the same keys: one resolves every pattern of a batch in one shared pass,
    // the other gets the patterns one at a time (a SCAN MATCH pass each, Redis's own matching).
    let shared = RedisServer::start();
    let per_pattern = RedisServer::start();
    // Glob bytes in keys and patterns, and `slots:{n}:` prefixes like the rules render.
    let alphabet = b"ab:*?[]^-\\0123";
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut keys: Vec<Vec<u8>> = (0..3_000)
            .map(|i| format!("slots:{}:{i}", rng.below(300)).into_bytes())
            .collect();
        // Keys equal to a pattern's literal prefix, the edge of a prefix lookup.
        keys.extend((0..100).map(|_| format!("slots:{}:", rng.below(300)).into_bytes()));
        keys.extend((0..2_000).map(|_| rng.text(alphabet, 8)));
        for server in [&shared, &per_pattern] {
            server.set_keys(&keys);
        }
        let mut patterns: HashSet<String> = (0..40)
            .map(|_| format!("slots:{}:*", rng.below(300)))
            .collect();
        while patterns.len() < 60 {
            let glob = String::from_utf8(rng.text(alphabet, 5)).expect("ASCII alphabet");
            // A leading `*` would empty the keyspace and leave nothing to compare.
            if !glob.starts_with('*') {
                patterns.insert(glob);
            }
        }
        assert!(patterns.len() > SHARED_PASS_THRESHOLD);

        let mut one = Deleter::connect(&shared.url()).await.expect("connect");
        let stats = one
            .delete(&HashSet::new(), &patterns)
            .await
            .expect("shared pass");
        let mut each = Deleter::connect(&per_pattern.url()).await.expect("connect");
        for pattern in &patterns {
            each.delete(&HashSet::new(), &set([pattern]))
                .await
                .expect("per-pattern pass");
        }
        let left = shared.scan_raw_keys("*");
        assert_eq!(left, per_pattern.scan_raw_keys("*"), "seed {seed}");
        assert!(
            stats.keys_deleted > 0 && !left.is_empty(),
            "seed {seed}: {stats:?}"
        );
        for server in [&shared, &per_pattern] {
            redis::cmd("FLUSHALL")
                .exec(&mut server.connection())
                .expect("FLUSHALL");
        }
    }
}

#[tokio::test]
async fn ten_thousand_keys_and_twenty_patterns_are_deleted() {
    let redis = RedisServer::start();
    let literal: Vec<String> = (0..10_000).map(|i| format!("lit:{i}")).collect();
    let matched: Vec<String> = (0..10_000).map(|i| format!("grp:{}:{i}", i % 20)).collect();
    let spared: Vec<String> = (0..1_000).map(|i| format!("grp:keep{i}")).collect();
    redis.set_keys(literal.iter().chain(&matched).chain(&spared));
    let patterns: HashSet<String> = (0..20).map(|g| format!("grp:{g}:*")).collect();
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let stats = deleter
        .delete(&set(&literal), &patterns)
        .await
        .expect("delete");
    assert_eq!(stats.keys_deleted, 20_000);
    assert_eq!(stats.patterns_scanned, 20);
    // One shared pass over ~11k keys takes a few dozen pages; twenty passes would take hundreds.
    assert!(stats.scan_calls < 60, "{stats:?}");
    assert_eq!(redis.scan_keys("*").len(), 1_000);
    assert!(
        redis
            .scan_keys("*")
            .iter()
            .all(|k| k.starts_with("grp:keep"))
    );
}

#[tokio::test]
async fn the_keys_command_is_never_sent() {
    let redis = RedisServer::start();
    redis.set_keys((0..200).map(|i| format!("k:{i}:v")));
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let few = set(["k:1*", "k:2:?"]);
    let many: HashSet<String> = (0..12).map(|i| format!("k:{i}?:*")).collect();
    deleter
        .delete(&set(["k:0:v"]), &few)
        .await
        .expect("few patterns");
    deleter
        .delete(&HashSet::new(), &many)
        .await
        .expect("many patterns");
    deleter
        .delete(&HashSet::new(), &set(["*"]))
        .await
        .expect("everything");
    assert!(redis.scan_keys("*").is_empty());
    let stats = redis.command_stats();
    assert!(stats.contains("cmdstat_scan:"), "{stats}");
    assert!(stats.contains("cmdstat_unlink:"), "{stats}");
    assert!(!stats.contains("cmdstat_keys:"), "{stats}");
}

#[tokio::test]
async fn an_empty_invalidation_sends_no_command() {
    let redis = RedisServer::start();
    let mut deleter = Deleter::connect(&redis.url()).await.expect("connect");
    let stats = deleter
        .delete(&HashSet::new(), &HashSet::new())
        .await
        .expect("delete");
    assert_eq!(stats, DeleteStats::default());
    let stats = redis.command_stats();
    assert!(
        !stats.contains("cmdstat_scan:") && !stats.contains("cmdstat_unlink:"),
        "{stats}"
    );
}

#[tokio::test]
async fn a_killed_redis_is_a_transient_error_and_the_same_deleter_recovers() {
    let redis = RedisServer::start();
    let mut deleter = Deleter::connect_with(&redis.url(), impatient())
        .await
        .expect("connect");
    deleter.ping().await.expect("ping");
    redis.kill();
    let err = deleter
        .delete(&set(["a"]), &set(["b:*"]))
        .await
        .expect_err("redis is down");
    assert!(err.is_transient(), "{}", chain(&err));
    let err = deleter.ping().await.expect_err("still down");
    assert!(err.is_transient(), "{}", chain(&err));

    redis.start_again();
    redis.set_keys(["a", "b:1"]);
    delete_until_ok(&mut deleter, &set(["a"]), &set(["b:*"])).await;
    assert!(redis.scan_keys("*").is_empty());
}

#[tokio::test]
async fn a_blackholed_redis_times_out_with_a_transient_error() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let url = format!("redis://127.0.0.1:{}/0", proxy.port());
    let mut deleter = Deleter::connect_with(&url, impatient())
        .await
        .expect("connect");
    deleter.ping().await.expect("ping");
    proxy.cut(CutMode::Blackhole);
    // The deadline only turns a hang into a failure; the deleter must give up well before it.
    for _ in 0..2 {
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            deleter.delete(&set(["a"]), &HashSet::new()),
        )
        .await
        .expect("the deleter gave up by itself");
        let err = outcome.expect_err("nothing answers");
        assert!(err.is_transient(), "{}", chain(&err));
    }
    proxy.restore();
    redis.set_keys(["a"]);
    delete_until_ok(&mut deleter, &set(["a"]), &HashSet::new()).await;
    assert!(!redis.exists("a"));
}

#[tokio::test]
async fn an_unreachable_redis_at_connect_is_transient() {
    let redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let err = Deleter::connect_with(&url, impatient())
        .await
        .expect_err("down");
    assert!(err.is_transient(), "{}", chain(&err));
}

#[tokio::test]
async fn a_wrong_password_is_permanent_and_never_shown() {
    let redis = RedisServer::start_with(&["--requirepass", "right-pass"]);
    let url = format!("redis://:hunter2-secret@127.0.0.1:{}/0", redis.port());
    let err = Deleter::connect(&url).await.expect_err("wrong password");
    assert!(!err.is_transient(), "{}", chain(&err));
    assert!(!chain(&err).contains("hunter2"), "{}", chain(&err));
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    assert!(chain(&err).contains(":***@"), "{}", chain(&err));
}

#[tokio::test]
async fn an_acl_user_and_its_password_in_the_url_work_and_a_wrong_password_is_permanent() {
    // `app` may only touch `app:*`; the default user stays for the harness.
    let redis = RedisServer::start_with(&["--user", "app", "on", ">acl-secret", "~app:*", "+@all"]);
    redis.set_keys(["app:1", "app:2", "other:1"]);
    let url = format!("redis://app:acl-secret@127.0.0.1:{}/0", redis.port());
    let mut deleter = Deleter::connect(&url).await.expect("connect as app");
    assert_eq!(
        deleter.target(),
        format!("redis://app:***@127.0.0.1:{}/0", redis.port())
    );
    let stats = deleter
        .delete(&set(["app:1"]), &set(["app:*"]))
        .await
        .expect("delete as app");
    assert_eq!(stats.keys_deleted, 2);
    // The session is app's: a key outside its key pattern is refused, and permanently.
    let err = deleter
        .delete(&set(["other:1"]), &HashSet::new())
        .await
        .expect_err("outside app's keys");
    assert!(!err.is_transient(), "{}", chain(&err));
    assert!(redis.exists("other:1"));

    let url = format!("redis://app:acl-wrong-secret@127.0.0.1:{}/0", redis.port());
    let err = Deleter::connect(&url).await.expect_err("wrong password");
    assert!(!err.is_transient(), "{}", chain(&err));
    assert!(!chain(&err).contains("acl-wrong-secret"), "{}", chain(&err));
    assert!(!format!("{err:?}").contains("acl-wrong-secret"), "{err:?}");
    assert!(chain(&err).contains("app:***@"), "{}", chain(&err));
}

#[tokio::test]
async fn a_missing_password_is_permanent() {
    let redis = RedisServer::start_with(&["--requirepass", "right-pass"]);
    let outcome = match Deleter::connect(&redis.url()).await {
        Err(err) => Err(err),
        Ok(mut deleter) => deleter
            .delete(&set(["a"]), &HashSet::new())
            .await
            .map(|_| ()),
    };
    let err = outcome.expect_err("no password");
    assert!(!err.is_transient(), "{}", chain(&err));
}

#[tokio::test]
async fn the_right_password_works_and_the_target_hides_it() {
    let redis = RedisServer::start_with(&["--requirepass", "right-pass"]);
    let url = format!("redis://:right-pass@127.0.0.1:{}/0", redis.port());
    let mut deleter = Deleter::connect(&url).await.expect("connect");
    deleter.ping().await.expect("ping");
    assert_eq!(
        deleter.target(),
        format!("redis://:***@127.0.0.1:{}/0", redis.port())
    );
    assert!(!format!("{deleter:?}").contains("right-pass"));
}

#[tokio::test]
async fn tls_with_a_private_ca_works() {
    let redis = RedisServer::start_tls();
    redis.set_keys(["tls:1", "tls:2", "tls:3"]);
    let options = DeleterOptions {
        tls_ca_pem: redis.tls_ca_pem().map(<[u8]>::to_vec),
        ..DeleterOptions::default()
    };
    let mut deleter = Deleter::connect_with(&redis.url(), options)
        .await
        .expect("connect");
    let stats = deleter
        .delete(&set(["tls:1"]), &set(["tls:*"]))
        .await
        .expect("delete");
    assert_eq!(stats.keys_deleted, 3);
}

#[tokio::test]
async fn tls_without_trusting_the_ca_fails() {
    let redis = RedisServer::start_tls();
    let err = Deleter::connect_with(&redis.url(), impatient())
        .await
        .expect_err("untrusted");
    assert!(!err.is_transient(), "{}", chain(&err));
    assert!(
        chain(&err).to_lowercase().contains("certificate"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn a_cluster_routes_keys_by_slot_and_scans_every_primary() {
    let cluster = RedisCluster::start(3);
    let literal: Vec<String> = (0..3000).map(|i| format!("lit:{i}")).collect();
    let matched: Vec<String> = (0..3000).map(|i| format!("grp:{}:{i}", i % 12)).collect();
    let spared: Vec<String> = (0..300).map(|i| format!("keep:{i}")).collect();
    cluster.set_keys(literal.iter().chain(&matched).chain(&spared));
    assert_eq!(cluster.nodes_with_keys(), 3);
    let options = DeleterOptions {
        cluster: Some(true),
        ..DeleterOptions::default()
    };
    let mut deleter = Deleter::connect_with(&cluster.url(), options)
        .await
        .expect("connect");
    deleter.ping().await.expect("ping");
    let few = set(["grp:0:*", "grp:1:*"]);
    let stats = deleter
        .delete(&set(&literal), &few)
        .await
        .expect("few patterns");
    assert_eq!(stats.keys_deleted, 3000 + 500);
    assert!(
        stats.scan_calls >= 2 * 3,
        "two passes on each of three primaries: {stats:?}"
    );
    let many: HashSet<String> = (2..12).map(|g| format!("grp:{g}:*")).collect();
    let stats = deleter
        .delete(&HashSet::new(), &many)
        .await
        .expect("many patterns");
    assert_eq!(stats.keys_deleted, 2500);
    assert_eq!(cluster.all_keys(), {
        let mut spared = spared.clone();
        spared.sort();
        spared
    });

    // A dead primary fails the batch (its keys cannot be deleted) with a transient error, and
    // the same deleter works again once the primary is back.
    cluster.nodes()[1].kill();
    let err = deleter
        .delete(&set(&spared), &set(["keep:*"]))
        .await
        .expect_err("a primary is down");
    assert!(err.is_transient(), "{}", chain(&err));
    cluster.nodes()[1].start_again();
    delete_until_ok(&mut deleter, &set(&spared), &set(["keep:*"])).await;
    assert!(cluster.all_keys().is_empty());
}

/// Waits until `replica` is connected to its primary and in sync.
fn wait_replica_in_sync(replica: &RedisServer) {
    crate::support::wait_until(Duration::from_secs(30), "the replica is in sync", || {
        redis::cmd("INFO")
            .arg("replication")
            .query::<String>(&mut replica.connection())
            .is_ok_and(|info| info.contains("master_link_status:up"))
    });
}

/// A primary with one replica in sync, and a deleter with `wait_replicas = 1` on the primary.
async fn primary_with_replica_waited_for() -> (RedisServer, RedisServer, Deleter) {
    let primary = RedisServer::start();
    let port = primary.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    wait_replica_in_sync(&replica);
    let options = DeleterOptions {
        wait_replicas: 1,
        ..impatient()
    };
    let deleter = Deleter::connect_with(&primary.url(), options)
        .await
        .expect("connect");
    (primary, replica, deleter)
}

#[tokio::test]
async fn with_wait_replicas_a_delete_is_done_only_once_a_replica_confirmed_it() {
    let (primary, replica, mut deleter) = primary_with_replica_waited_for().await;

    primary.set_keys(["w:1"]);
    deleter
        .delete(&set(["w:1"]), &HashSet::new())
        .await
        .expect("one replica confirms");

    // Without its replica the primary still deletes, but the batch is not done: a failover now
    // would bring the key back.
    replica.kill();
    primary.set_keys(["w:2"]);
    let err = deleter
        .delete(&set(["w:2"]), &HashSet::new())
        .await
        .expect_err("no replica confirms");
    assert!(
        matches!(
            err,
            DeleteError::NotReplicated {
                confirmed: 0,
                wanted: 1,
                ..
            }
        ),
        "{}",
        chain(&err)
    );
    assert!(err.is_transient(), "{}", chain(&err));

    replica.start_again();
    wait_replica_in_sync(&replica);
    primary.set_keys(["w:3"]);
    delete_until_ok(&mut deleter, &set(["w:3"]), &HashSet::new()).await;
    assert!(!replica.exists("w:3"));
}

#[tokio::test]
async fn wait_replicas_is_awaited_on_a_retry_that_finds_nothing_left_to_delete() {
    let (primary, replica, mut deleter) = primary_with_replica_waited_for().await;

    // The first attempt deletes and is not replicated; the retry of the same batch deletes
    // nothing (the keys are gone on the primary), but the first attempt's deletes are still
    // only on the primary, so the retry must not count as done either.
    replica.kill();
    primary.set_keys(["r:1", "r:p:1"]);
    for attempt in ["first attempt", "retry"] {
        let err = deleter
            .delete(&set(["r:1"]), &set(["r:p:*"]))
            .await
            .expect_err(attempt);
        assert!(
            matches!(err, DeleteError::NotReplicated { confirmed: 0, .. }),
            "{attempt}: {}",
            chain(&err)
        );
    }

    replica.start_again();
    wait_replica_in_sync(&replica);
    delete_until_ok(&mut deleter, &set(["r:1"]), &set(["r:p:*"])).await;
}

#[tokio::test]
async fn a_pattern_under_the_key_index_is_resolved_from_it_including_keys_made_after_it_was_built()
{
    // Its own server: the index sets notify-keyspace-events.
    let redis = RedisServer::start();
    redis.set_keys(["idx:1:a", "idx:1:b", "idx:2:a", "other:1:a"]);
    let mut deleter = indexed(&redis, &["idx:"], 1000).await;
    wait_for(Duration::from_secs(10), "the key index is ready", || {
        let ready = matches!(deleter.key_index_state(), KeyIndexState::Ready { .. });
        async move { ready }
    })
    .await;
    // Made after the build: only the events (and the barrier before the resolution) know it.
    redis.set_keys(["idx:1:late"]);
    let resolution = deleter
        .start(&HashSet::new(), &set(["idx:1:*"]))
        .await
        .expect("start");
    let stats = resolution.await.expect("resolved");
    assert_eq!(
        (stats.patterns_indexed, stats.keys_deleted, stats.scan_calls),
        (1, 3, 0)
    );
    assert_eq!(redis.scan_keys("idx:*"), ["idx:2:a"]);
    // Outside the indexed prefixes: the walk resolves it.
    let stats = deleter
        .start(&HashSet::new(), &set(["other:*"]))
        .await
        .expect("start")
        .await
        .expect("resolved");
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (0, 1));
    // `delete`, which finishes the patterns in the call, uses the index as well.
    redis.set_keys(["idx:2:late"]);
    let stats = deleter
        .delete(&HashSet::new(), &set(["idx:2:*"]))
        .await
        .expect("delete");
    assert_eq!(
        (
            stats.patterns_indexed,
            stats.patterns_scanned,
            stats.keys_deleted
        ),
        (1, 0, 2)
    );
    let report = deleter.key_index_report().expect("an index");
    assert_eq!(report.resolutions, 2);
    assert_eq!(report.fallbacks, [0, 0, 0, 1, 0, 0]);
}

#[tokio::test]
async fn where_the_flags_hide_the_new_event_a_probe_key_proves_it_and_notices_it_turned_off() {
    // With every class on, Redis reads `AKEn` back as `AKE`: `n` cannot be seen there.
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "AKE"]);
    redis.set_keys(["idx:1:a"]);
    let mut deleter = indexed(&redis, &["idx:"], 1000).await;
    let ready =
        |deleter: &Deleter| matches!(deleter.key_index_state(), KeyIndexState::Ready { .. });
    wait_for(Duration::from_secs(10), "the key index is ready", || {
        let ready = ready(&deleter);
        async move { ready }
    })
    .await;
    let resolve = async |deleter: &mut Deleter, pattern: &str| {
        let started = deleter.start(&HashSet::new(), &set([pattern])).await;
        started.expect("start").await.expect("resolved")
    };
    let stats = resolve(&mut deleter, "idx:1:*").await;
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (1, 1));
    // Someone drops `n` (invisible in CONFIG GET): keys made from now on raise no `new` event.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("AK")
        .query(&mut redis.connection())
        .expect("CONFIG SET");
    redis.set_keys(["idx:2:late"]);
    let stats = resolve(&mut deleter, "idx:2:*").await;
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (0, 1));
    assert!(redis.scan_keys("idx:*").is_empty());
    let report = deleter.key_index_report().expect("an index");
    assert_eq!(report.fallbacks, [0, 0, 0, 0, 1, 0]);
}

/// A deleter with a key index of `prefixes`, holding at most `max_keys`.
async fn indexed(redis: &RedisServer, prefixes: &[&str], max_keys: usize) -> Deleter {
    let options = DeleterOptions {
        key_index: Some(KeyIndexOptions {
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            max_keys,
        }),
        ..DeleterOptions::default()
    };
    Deleter::connect_with(&redis.url(), options)
        .await
        .expect("connect")
}

/// Waits until the key index of `deleter` is in a state `wanted` accepts.
async fn wait_index(deleter: &Deleter, what: &str, wanted: fn(&KeyIndexState) -> bool) {
    wait_for(Duration::from_secs(10), what, || {
        let reached = wanted(&deleter.key_index_state());
        async move { reached }
    })
    .await;
}

#[tokio::test]
async fn a_killed_subscription_drops_the_index_and_it_is_rebuilt_with_the_keys_made_meanwhile() {
    let redis = RedisServer::start();
    let mut deleter = indexed(&redis, &["idx:"], 1000).await;
    let ready = |s: &KeyIndexState| matches!(s, KeyIndexState::Ready { .. });
    wait_index(&deleter, "the key index is ready", ready).await;
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.connection())
        .expect("CLIENT KILL");
    // Made while no subscription listens: only the rebuild's SCAN can find it.
    redis.set_keys(["idx:1:meanwhile"]);
    let stats = deleter
        .start(&HashSet::new(), &set(["idx:1:*"]))
        .await
        .expect("start")
        .await
        .expect("resolved");
    // Whichever way this batch went, the key is gone.
    assert_eq!(stats.keys_deleted, 1);
    wait_index(&deleter, "the key index is rebuilt", ready).await;
    redis.set_keys(["idx:1:again"]);
    let stats = deleter
        .start(&HashSet::new(), &set(["idx:1:*"]))
        .await
        .expect("start")
        .await
        .expect("resolved");
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (1, 1));
}

#[tokio::test]
async fn past_max_keys_the_index_is_dropped_for_good_and_patterns_are_walked() {
    let redis = RedisServer::start();
    redis.set_keys(["idx:1", "idx:2", "idx:3"]);
    let mut deleter = indexed(&redis, &["idx:"], 2).await;
    let full = |s: &KeyIndexState| *s == KeyIndexState::Full { max_keys: 2 };
    wait_index(&deleter, "the key index is full", full).await;
    let stats = deleter
        .start(&HashSet::new(), &set(["idx:*"]))
        .await
        .expect("start")
        .await
        .expect("resolved");
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (0, 3));
    let report = deleter.key_index_report().expect("an index");
    assert_eq!(report.fallbacks, [0, 0, 1, 0, 0, 0]);
    assert_eq!(
        deleter.key_index_state(),
        KeyIndexState::Full { max_keys: 2 }
    );
}

#[tokio::test]
async fn check_tells_whether_the_key_index_gets_its_events_without_changing_them() {
    let plain = RedisServer::start();
    let mut deleter = Deleter::connect(&plain.url()).await.expect("connect");
    let settable = vec![(
        None,
        KeyIndexCheck::Settable {
            now: String::new(),
            wanted: "Kngxe".to_owned(),
        },
    )];
    assert_eq!(deleter.key_index_check().await.expect("check"), settable);
    // Asking set nothing.
    assert_eq!(deleter.key_index_check().await.expect("check"), settable);
    let set = RedisServer::start_with(&["--notify-keyspace-events", "Kgxen"]);
    let mut deleter = Deleter::connect(&set.url()).await.expect("connect");
    assert_eq!(
        deleter.key_index_check().await.expect("check"),
        [(None, KeyIndexCheck::Set)]
    );
    let renamed = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    let mut deleter = Deleter::connect(&renamed.url()).await.expect("connect");
    let found = deleter.key_index_check().await.expect("check");
    assert!(
        matches!(found.as_slice(), [(None, KeyIndexCheck::Refused { now: None, reason })] if reason.contains("CONFIG")),
        "{found:?}"
    );
}

#[tokio::test]
async fn without_config_the_index_is_unavailable_with_the_reason_and_patterns_are_walked() {
    let redis = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
    redis.set_keys(["idx:1"]);
    let mut deleter = indexed(&redis, &["idx:"], 1000).await;
    let unavailable = |s: &KeyIndexState| matches!(s, KeyIndexState::Unavailable(reason) if reason.contains("CONFIG GET"));
    wait_index(&deleter, "the key index is unavailable", unavailable).await;
    let stats = deleter
        .start(&HashSet::new(), &set(["idx:*"]))
        .await
        .expect("start")
        .await
        .expect("resolved");
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (0, 1));
    let report = deleter.key_index_report().expect("an index");
    assert_eq!(report.fallbacks, [0, 1, 0, 0, 0, 0]);
}
