//! The live key index on a Redis Cluster: one index per primary, proven together. Patterns must
//! delete exactly what a SCAN of every primary finds, resolved from the index, and never miss a
//! key while others write, while a slot migrates, across failovers (one, and two between
//! batches that bring the same address back as primary) and after a subscription is cut.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use invalidator::redis::slot::key_slot;
use invalidator::redis::{DeleteStats, Deleter, KEY_INDEX_FALLBACKS, KeyIndexCheck, KeyIndexState};

use crate::key_index::{NO_CAP, indexed, resolve, strings, wait_ready, wait_state};
use crate::support::{RedisCluster, RedisServer, wait_until};

/// How long the cluster may take to settle after a failover (a hang guard).
const SETTLE: Duration = Duration::from_secs(30);

/// The fallbacks counted so far for `reason` (one of [`KEY_INDEX_FALLBACKS`]).
fn fallbacks(deleter: &Deleter, reason: &str) -> u64 {
    let report = deleter.key_index_report().expect("an index");
    let at = KEY_INDEX_FALLBACKS.iter().position(|r| *r == reason);
    report.fallbacks[at.expect("a known reason")]
}

/// Resolves `patterns` and checks that the cluster holds exactly what it held before without
/// what SCAN on every primary found for them; returns the statistics.
pub(crate) async fn resolve_exactly(
    cluster: &RedisCluster,
    deleter: &mut Deleter,
    patterns: &[String],
) -> DeleteStats {
    let before: HashSet<String> = cluster.all_keys().into_iter().collect();
    let doomed: HashSet<String> = patterns.iter().flat_map(|p| cluster.scan_keys(p)).collect();
    let stats = resolve(deleter, patterns).await;
    let after: HashSet<String> = cluster.all_keys().into_iter().collect();
    let expected: HashSet<String> = before.difference(&doomed).cloned().collect();
    let missed: Vec<&String> = after.intersection(&doomed).take(5).collect();
    let wrongly: Vec<&String> = expected.difference(&after).take(5).collect();
    assert!(
        missed.is_empty() && wrongly.is_empty(),
        "{patterns:?}: missed {missed:?}, wrongly deleted {wrongly:?} ({stats:?})"
    );
    stats
}

/// Keys under `kc:` and `{kc:` with hash tags, glob bytes and escapes, spread over every slot.
fn spread_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..600).map(|i| format!("kc:{}:{i}", i % 40)).collect();
    keys.extend((0..200).map(|i| format!("{{kc:{}}}:item:{i}", i % 8)));
    keys.extend((0..20).map(|i| format!("kc:star*:{i}")));
    keys.extend((0..20).map(|i| format!("kc:[br]:{i}")));
    keys.extend((0..20).map(|i| format!("kc:q?:{i}")));
    keys
}

/// Patterns over [`spread_keys`]: classes, `?`, escapes, whole hash tags and a tag's pattern.
fn spread_patterns() -> Vec<String> {
    strings(&[
        "kc:1*",
        "kc:2?:*",
        "kc:[34]:*",
        "kc:[^0-9k]*:1",
        "kc:star\\*:*",
        "kc:\\[br\\]:1?",
        "kc:q\\?:*",
        "{kc:3}:*",
        "{kc:5}:item:1?",
        "{kc:*}:item:7",
    ])
}

/// Every pattern of [`spread_patterns`], one batch each, must delete exactly what SCAN finds and
/// be resolved from the index; `flags`, when given, is set on every node first.
async fn patterns_resolve_exactly_from_the_index(flags: Option<&str>) {
    let cluster = RedisCluster::start(3);
    if let Some(flags) = flags {
        for node in cluster.nodes() {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(flags)
                .exec(&mut node.connection())
                .expect("CONFIG SET");
        }
    }
    let keys = spread_keys();
    cluster.set_keys(&keys);
    assert_eq!(
        cluster.nodes_with_keys(),
        3,
        "the keys are on every primary"
    );
    let mut deleter = indexed(&cluster.url(), &["kc:", "{kc:"], NO_CAP).await;
    assert_eq!(wait_ready(&deleter).await, keys.len());
    // Learnt from notifications, on every primary.
    let later: Vec<String> = (0..300)
        .map(|i| format!("kc:{}:later{i}", i % 40))
        .collect();
    cluster.set_keys(&later);
    for pattern in spread_patterns() {
        let stats = resolve_exactly(&cluster, &mut deleter, std::slice::from_ref(&pattern)).await;
        assert_eq!(stats.patterns_indexed, 1, "{pattern}: {stats:?}");
    }
    let report = deleter.key_index_report().expect("an index");
    assert_eq!(report.resolutions, spread_patterns().len() as u64);
    assert_eq!(report.fallbacks, [0; KEY_INDEX_FALLBACKS.len()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn patterns_on_three_primaries_delete_exactly_what_scan_finds_from_the_index() {
    patterns_resolve_exactly_from_the_index(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn where_the_flags_hide_new_each_primary_is_probed_on_a_slot_it_serves() {
    // `AK` reads back without `n`: every barrier creates its probe key on the primary itself.
    patterns_resolve_exactly_from_the_index(Some("AK")).await;
}

/// Writes `prefix<n>` keys through a cluster connection until `stop`, recording each one after
/// its SET returned.
fn spawn_writer(
    cluster: &RedisCluster,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let mut con = cluster.client().get_connection().expect("connect");
    std::thread::spawn(move || {
        let mut written = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let key = format!("{prefix}{n}");
            redis::cmd("SET")
                .arg(&key)
                .arg("1")
                .exec(&mut con)
                .expect("SET");
            written.push(key);
            n += 1;
            // About a thousand keys a second: unthrottled, a round's few thousand keys, one
            // UNLINK per slot each, outran the test's 2 s response timeout on a loaded machine.
            std::thread::sleep(Duration::from_millis(1));
        }
        written
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_written_while_patterns_resolve_are_never_missed() {
    let cluster = RedisCluster::start(3);
    let mut deleter = indexed(&cluster.url(), &["kw:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&cluster, "kw:", stop.clone());
    // A hash tag of each primary's, for bursts written straight to it in one pipeline.
    let mut tags: Vec<(&RedisServer, String)> = Vec::new();
    for n in 0.. {
        let tag = format!("t{n}");
        let owner = cluster.owner_of(key_slot(tag.as_bytes()));
        if !tags.iter().any(|(node, _)| node.port() == owner.port()) {
            tags.push((owner, tag));
        }
        if tags.len() == 3 {
            break;
        }
    }
    let mut indexed_rounds = 0;
    for round in 0..30 {
        // Just before the call, so that their events are still on their way to the index
        // when its barriers run.
        for (node, tag) in &tags {
            node.set_keys((0..500).map(|i| format!("kw:{{{tag}}}:r{round}:{i}")));
        }
        // Every key that exists now was written before the call and must be gone after it.
        let before: Vec<String> = cluster.scan_keys("kw:*");
        let stats = resolve(&mut deleter, &strings(&["kw:*"])).await;
        indexed_rounds += stats.patterns_indexed;
        // The writer never writes a key twice: one still there was missed.
        let after: HashSet<String> = cluster.scan_keys("kw:*").into_iter().collect();
        let left: Vec<&String> = before.iter().filter(|key| after.contains(*key)).collect();
        assert!(
            left.is_empty(),
            "round {round}: {} of {} keys missed, e.g. {:?}",
            left.len(),
            before.len(),
            left.first()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("the writer");
    assert!(written.len() > 100, "the writer kept writing");
    assert_eq!(
        indexed_rounds, 30,
        "every round was resolved from the index"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_slot_migrates_patterns_fall_back_as_moving_and_miss_nothing() {
    let cluster = RedisCluster::start(3);
    let slot = key_slot(b"mg");
    let (from, to) = cluster.owner_and_another(slot);
    let tagged = |round: u32| -> Vec<String> {
        (0..400)
            .map(|i| format!("{{mg}}:r{round}:{i}"))
            .chain((0..200).map(|i| format!("mg:r{round}:{i}")))
            .collect()
    };
    cluster.set_keys(tagged(0));
    let mut deleter = indexed(&cluster.url(), &["{mg}:", "mg:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let patterns = strings(&["{mg}:*", "mg:*"]);
    let stats = resolve_exactly(&cluster, &mut deleter, &patterns).await;
    assert_eq!(stats.patterns_indexed, 2, "{stats:?}");
    cluster.set_keys(tagged(1));
    cluster.begin_migration(slot, from, to);
    // Half the slot's keys on each side.
    cluster.migrate_keys(slot, from, to, 200);
    let stats = resolve_exactly(&cluster, &mut deleter, &patterns).await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    assert_eq!(fallbacks(&deleter, "moving"), 2);
    cluster.set_keys(tagged(2));
    cluster.migrate_keys(slot, from, to, 100);
    resolve_exactly(&cluster, &mut deleter, &patterns).await;
    assert_eq!(fallbacks(&deleter, "moving"), 4);
    cluster.set_keys(tagged(3));
    while cluster.migrate_keys(slot, from, to, 200) > 0 {}
    cluster.end_migration(slot, to);
    wait_until(SETTLE, "no node shows the migration", || {
        cluster.primaries().iter().all(|node| {
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut node.connection())
                .expect("CLUSTER NODES");
            !text.contains("->-") && !text.contains("-<-")
        })
    });
    // The keys that moved were learnt by the new owner's index from their RESTORE events.
    let stats = resolve_exactly(&cluster, &mut deleter, &patterns).await;
    assert_eq!(
        stats.patterns_indexed, 2,
        "the index serves again: {stats:?}"
    );
    assert_eq!(cluster.owner_of(slot).port(), to.port());
}

/// Resolves `prefix*` after writing fresh keys under it, until a batch is resolved from the
/// index; every batch must miss nothing.
async fn until_indexed(cluster: &RedisCluster, deleter: &mut Deleter, prefix: &str) {
    let start = Instant::now();
    let mut round = 0;
    loop {
        round += 1;
        cluster.set_keys((0..30).map(|i| format!("{prefix}u{round}:{i}")));
        let stats = resolve_exactly(cluster, deleter, &[format!("{prefix}*")]).await;
        if stats.patterns_indexed == 1 {
            return;
        }
        assert!(
            start.elapsed() < SETTLE,
            "the index did not serve again: {:?}",
            deleter.key_index_report()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn across_failovers_patterns_fall_back_until_the_new_primary_is_indexed_and_miss_nothing() {
    let cluster = RedisCluster::start_with_replicas(3, 1);
    cluster.set_keys((0..300).map(|i| format!("fo:a:{i}")));
    let mut deleter = indexed(&cluster.url(), &["fo:"], NO_CAP).await;
    wait_ready(&deleter).await;
    until_indexed(&cluster, &mut deleter, "fo:a:").await;
    let old = cluster.primaries()[0];
    cluster.set_keys((0..300).map(|i| format!("fo:b:{i}")));
    cluster.wait_replicated();
    cluster.kill_primary_and_wait_failover(old);
    // The promoted replica has no index yet: this batch is walked.
    let stats = resolve_exactly(&cluster, &mut deleter, &strings(&["fo:b:*"])).await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    until_indexed(&cluster, &mut deleter, "fo:c:").await;
    // Two failovers between two batches: the index of this address outlives both.
    let (primary, replica) = cluster
        .primaries()
        .into_iter()
        .find_map(|node| Some((node, replica_of(&cluster, node)?)))
        .expect("a primary with a replica");
    // Its full resync waits until the index has rebuilt on the restarted node, still empty.
    set_config(replica, "repl-diskless-sync-delay", "60");
    cluster.kill_primary_and_wait_failover(primary);
    // Only the full resync brings these to the old primary: no event announces them there.
    let resynced: Vec<String> = (0..300).map(|i| format!("fo:d:{i}")).collect();
    cluster.set_keys(&resynced);
    primary.start_again();
    wait_until(
        SETTLE,
        "the restarted node is a replica with an index",
        || {
            let subscribed = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query::<String>(&mut primary.connection())
                .is_ok_and(|list| !list.is_empty());
            subscribed
                && primary.info("replication").contains("role:slave")
                && matches!(deleter.key_index_state(), KeyIndexState::Ready { .. })
        },
    );
    set_config(replica, "repl-diskless-sync-delay", "0");
    wait_until(
        SETTLE,
        "the restarted node is an up-to-date replica",
        || {
            let info = primary.info("replication");
            info.contains("master_link_status:up") && !info.contains("master_sync_in_progress:1")
        },
    );
    // A manual failover waits until the replica has caught up with its primary.
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .exec(&mut primary.connection())
        .expect("CLUSTER FAILOVER");
    // Until every node sees the demoted one as a replica: a view that still counts it as a
    // primary would make the index learn it, and that batch fall back as building anyway.
    let demoted = format!(":{}@", replica.port());
    wait_until(
        SETTLE,
        "every node sees the same address primary again",
        || {
            let running = cluster.nodes().iter().filter(|n| n.is_running());
            primary.info("replication").contains("role:master")
                && running.into_iter().all(|node| {
                    let nodes = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query::<String>(&mut node.connection())
                        .unwrap_or_default();
                    let line = nodes.lines().find(|line| line.contains(&demoted));
                    line.is_some_and(|line| line.contains("slave"))
                })
        },
    );
    // The first batch after it may find a connection the kill broke: it falls back as lost
    // and the connection is replaced. The next one must not trust the index of that address.
    resolve_exactly(&cluster, &mut deleter, &strings(&["fo:x:*"])).await;
    resolve_exactly(&cluster, &mut deleter, &strings(&["fo:d:*"])).await;
    until_indexed(&cluster, &mut deleter, "fo:e:").await;
}

/// The running node that replicates `primary`, if there is one.
fn replica_of<'c>(cluster: &'c RedisCluster, primary: &RedisServer) -> Option<&'c RedisServer> {
    let port = format!("master_port:{}", primary.port());
    let mut running = cluster.nodes().iter().filter(|n| n.is_running());
    running.find(|n| n.info("replication").contains(&port))
}

/// Sets one configuration parameter of `node`.
fn set_config(node: &RedisServer, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .exec(&mut node.connection())
        .expect("CONFIG SET");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_whose_subscription_is_killed_falls_back_rebuilds_and_misses_nothing() {
    let cluster = RedisCluster::start(3);
    cluster.set_keys((0..300).map(|i| format!("pk:a:{i}")));
    let mut deleter = indexed(&cluster.url(), &["pk:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let stats = resolve_exactly(&cluster, &mut deleter, &strings(&["pk:a:*"])).await;
    assert_eq!(stats.patterns_indexed, 1, "{stats:?}");
    let victim = cluster.primaries()[1];
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .exec(&mut victim.connection())
        .expect("CLIENT KILL");
    // At once, well within the rebuild's first backoff (100 ms): that primary's index is
    // building, or its barrier reaches no subscriber.
    cluster.set_keys(["pk:a:again"]);
    let stats = resolve(&mut deleter, &strings(&["pk:a:*"])).await;
    assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
    assert_eq!(
        fallbacks(&deleter, "lost") + fallbacks(&deleter, "building"),
        1,
        "{:?}",
        deleter.key_index_report()
    );
    assert!(cluster.scan_keys("pk:a:*").is_empty());
    // Notified to nobody on that primary while it had no subscription: only a new SCAN learns
    // the ones written before the rebuild.
    cluster.set_keys((0..300).map(|i| format!("pk:b:{i}")));
    resolve_exactly(&cluster, &mut deleter, &strings(&["pk:b:*"])).await;
    until_indexed(&cluster, &mut deleter, "pk:c:").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_asks_every_primary_and_a_refused_config_makes_the_index_unavailable_there() {
    let cluster = RedisCluster::start(3);
    let mut deleter = Deleter::connect(&cluster.url()).await.expect("connect");
    let checks = deleter.key_index_check().await.expect("check");
    let mut ports: Vec<u16> = cluster.primaries().iter().map(|n| n.port()).collect();
    ports.sort();
    let mut named: Vec<u16> = checks
        .iter()
        .map(|(primary, _)| {
            let primary = primary.as_deref().expect("named by its address");
            primary
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .expect("a port")
        })
        .collect();
    named.sort();
    assert_eq!(named, ports, "{checks:?}");
    assert!(
        checks
            .iter()
            .all(|(_, check)| matches!(check, KeyIndexCheck::Settable { .. })),
        "{checks:?}"
    );
    // One primary refuses CONFIG to this user: its answer is an error reply, on a connection
    // to that primary alone.
    let refusing = cluster.primaries()[2];
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-config")
        .exec(&mut refusing.connection())
        .expect("ACL SETUSER");
    let checks = deleter.key_index_check().await.expect("check");
    let port = format!(":{}", refusing.port());
    for (primary, check) in &checks {
        let refused = matches!(check, KeyIndexCheck::Refused { reason, .. } if reason.to_lowercase().contains("noperm"));
        let here = primary.as_deref().is_some_and(|p| p.ends_with(&port));
        assert_eq!(refused, here, "{checks:?}");
    }
    cluster.set_keys((0..100).map(|i| format!("rf:{i}")));
    let mut deleter = indexed(&cluster.url(), &["rf:"], NO_CAP).await;
    let state = wait_state(&deleter, "unavailable", |s| {
        matches!(s, KeyIndexState::Unavailable(_))
    })
    .await;
    let KeyIndexState::Unavailable(reason) = state else {
        unreachable!("waited for it")
    };
    assert!(
        reason.contains(&port) && reason.to_lowercase().contains("noperm"),
        "{reason}"
    );
    let stats = resolve(&mut deleter, &strings(&["rf:*"])).await;
    assert_eq!((stats.patterns_indexed, stats.keys_deleted), (0, 100));
    assert_eq!(fallbacks(&deleter, "unavailable"), 1);
}
