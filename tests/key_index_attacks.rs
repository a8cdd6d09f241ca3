//! Attacks on the live key index by an operator on a bad day: `invalidator check` asked where
//! the index cannot work (one primary refusing CONFIG, a user without channels, a probe key it
//! may not write) must name every target where `run` will find the index unavailable, and no
//! other; a cluster primary restarted at its address from an old snapshot must be indexed
//! again, its keys deleted exactly as a SCAN of every primary finds them, and no batch fail;
//! a slot migration left half begun (importing on its target, nothing on its source) must fall
//! back and still delete the keys already on the target.

use std::time::{Duration, Instant};

use invalidator::redis::slot::key_slot;
use invalidator::redis::{
    Deleter, DeleterOptions, KEY_INDEX_FALLBACKS, KeyIndexCheck, KeyIndexState,
};

use crate::deleter::chain;
use crate::key_index::{NO_CAP, indexed, strings, wait_ready, wait_state};
use crate::key_index_cluster::resolve_exactly;
use crate::support::{RedisCluster, RedisServer, wait_until};

/// `check`'s answer for `url`, through a deleter without the index (as `check` builds it).
async fn check(url: &str) -> Vec<(Option<String>, KeyIndexCheck)> {
    let mut deleter = Deleter::connect_with(url, DeleterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connect: {}", chain(&e)));
    deleter
        .key_index_check()
        .await
        .unwrap_or_else(|e| panic!("check: {}", chain(&e)))
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_one_primary_that_refuses_config_and_no_other() {
    let cluster = RedisCluster::start(3);
    for node in cluster.primaries() {
        node.acl_user(&["~*", "&*", "+@all"]);
    }
    let refusing = cluster.primaries()[1];
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sidecar")
        .arg("-config")
        .exec(&mut refusing.connection())
        .expect("ACL SETUSER -config");
    let url = format!("redis://sidecar:pw@127.0.0.1:{}", cluster.nodes()[0].port());
    let checks = check(&url).await;
    assert_eq!(checks.len(), 3, "one answer per primary: {checks:?}");
    for (primary, found) in &checks {
        let primary = primary.as_deref().expect("named by its address");
        let refused = matches!(found, KeyIndexCheck::Refused { .. });
        assert_eq!(
            refused,
            primary.ends_with(&format!(":{}", refusing.port())),
            "{primary}: {found:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_says_the_index_is_unavailable_to_a_user_without_channels() {
    let redis = RedisServer::start();
    // What `ACL SETUSER` gives a new user on Redis 7 (`acl-pubsub-default resetchannels`):
    // CONFIG is allowed, so only the subscription is refused when `run` starts the index.
    let url = redis.acl_user(&["~*", "+@all", "resetchannels"]);
    let checks = check(&url).await;
    let [(None, KeyIndexCheck::NoChannels { reason })] = &checks[..] else {
        panic!("check must say the index is unavailable: {checks:?}");
    };
    assert!(
        reason.to_uppercase().contains("NOPERM"),
        "the reason names the refusal: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_says_the_index_is_unavailable_where_a_shows_and_the_probe_key_is_refused() {
    let redis = RedisServer::start();
    // `A` hides `n`, so every barrier writes a probe key; this user may write the cache's keys
    // alone.
    let mut admin = redis.connection();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("AK")
        .exec(&mut admin)
        .expect("CONFIG SET");
    let url = redis.acl_user(&["~ix:*", "&*", "+@all"]);
    let checks = check(&url).await;
    let [(None, KeyIndexCheck::NoProbe { reason })] = &checks[..] else {
        panic!("check must say the index is unavailable: {checks:?}");
    };
    assert!(
        reason.to_uppercase().contains("NOPERM"),
        "the reason names the refusal: {reason}"
    );
    // And so it is, for the same reason, when the index starts.
    let deleter = indexed(&url, &["ix:"], NO_CAP).await;
    let state = wait_state(&deleter, "unavailable", |s| {
        matches!(s, KeyIndexState::Unavailable(_))
    })
    .await;
    assert!(format!("{state:?}").contains("probe key"), "{state:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_restarted_from_an_old_snapshot_is_indexed_again_and_its_keys_deleted() {
    let cluster = RedisCluster::start(3);
    let keys = |round: u32| (0..300).map(move |i| format!("rs:r{round}:{i}"));
    cluster.set_keys(keys(0));
    let mut deleter = indexed(&cluster.url(), &["rs:"], NO_CAP).await;
    wait_ready(&deleter).await;
    let restarted = cluster.primaries()[2];
    // The snapshot holds round 0, which the next batch deletes from the index and the server.
    redis::cmd("SAVE")
        .exec(&mut restarted.connection())
        .expect("SAVE");
    let patterns = strings(&["rs:*"]);
    let stats = resolve_exactly(&cluster, &mut deleter, &patterns).await;
    assert_eq!(stats.patterns_indexed, 1, "{stats:?}");
    // Same address, same node id, and round 0's keys of its slots back, without an event.
    restarted.kill();
    restarted.start_again();
    wait_until(
        Duration::from_secs(30),
        "the cluster is whole again",
        || {
            cluster.primaries().iter().all(|node| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node.connection())
                    .expect("CLUSTER INFO");
                info.contains("cluster_state:ok")
            })
        },
    );
    let back = restarted.scan_keys("rs:r0:*").len();
    assert!(back > 0, "the snapshot brought keys back");
    cluster.set_keys(keys(1));
    let start = Instant::now();
    loop {
        // No batch may fail: the first proven after the restart must not UNLINK through the
        // deleter's connection to the killed process (it would wait out its timeout).
        let stats = resolve_exactly(&cluster, &mut deleter, &patterns).await;
        if stats.patterns_indexed == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the index did not serve again: {:?}",
            deleter.key_index_report()
        );
        cluster.set_keys(keys(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cluster.scan_keys("rs:*").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_importing_on_its_target_alone_falls_back_as_moving_and_misses_nothing() {
    let cluster = RedisCluster::start(3);
    let slot = key_slot(b"hm");
    let (from, to) = cluster.owner_and_another(slot);
    // One slot's keys, for a pattern with its hash tag (walked on the owner alone) and one
    // without (walked on every primary).
    let keys = (0..150)
        .map(|i| format!("{{hm}}:{i}"))
        .chain((0..150).map(|i| format!("hm:{{hm}}:{i}")));
    cluster.set_keys(keys);
    let mut deleter = indexed(&cluster.url(), &["{hm}:", "hm:"], NO_CAP).await;
    wait_ready(&deleter).await;
    // An operator's half-begun resharding: the target imports, the source was never marked
    // migrating, and some keys were MIGRATEd over all the same. No client reaches them now;
    // every one will be served once the slot is handed over.
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(RedisCluster::node_id(from))
        .exec(&mut to.connection())
        .expect("IMPORTING");
    assert_eq!(cluster.migrate_keys(slot, from, to, 200), 200);
    for (round, pattern) in ["{hm}:*", "hm:*"].into_iter().enumerate() {
        assert!(
            !to.scan_keys(pattern).is_empty(),
            "{pattern}: keys on the target"
        );
        let stats = resolve_exactly(&cluster, &mut deleter, &strings(&[pattern])).await;
        assert_eq!(stats.patterns_indexed, 0, "{stats:?}");
        assert_eq!(stats.keys_deleted, 150, "{pattern}: {stats:?}");
        let report = deleter.key_index_report().expect("an index");
        let moving = KEY_INDEX_FALLBACKS.iter().position(|r| *r == "moving");
        assert_eq!(
            report.fallbacks[moving.expect("a reason")],
            round as u64 + 1
        );
    }
}
