//! Attacks on the live key index by an operator on a bad day: `invalidator check` asked where
//! the index cannot work (one primary refusing CONFIG, a user without channels) must name every
//! target where `run` will find the index unavailable, and no other.

use invalidator::redis::{Deleter, DeleterOptions, KeyIndexCheck, KeyIndexState};

use crate::deleter::chain;
use crate::key_index::{NO_CAP, indexed, wait_state};
use crate::support::{RedisCluster, RedisServer};

/// Creates the user `sidecar` (password `pw`) on `server` with every command, key and channel.
fn add_user(server: &RedisServer) {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sidecar")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .exec(&mut server.connection())
        .expect("ACL SETUSER");
}

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
        add_user(node);
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
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sidecar")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("+@all")
        .arg("resetchannels")
        .exec(&mut redis.connection())
        .expect("ACL SETUSER");
    let url = format!("redis://sidecar:pw@127.0.0.1:{}/0", redis.port());
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
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sidecar")
        .arg("on")
        .arg(">pw")
        .arg("~ix:*")
        .arg("&*")
        .arg("+@all")
        .exec(&mut admin)
        .expect("ACL SETUSER");
    let url = format!("redis://sidecar:pw@127.0.0.1:{}/0", redis.port());
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
