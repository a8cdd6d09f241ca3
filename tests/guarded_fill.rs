//! The guarded fill: the Redis Functions library `invalidator` (`invalidator_get`,
//! `invalidator_fill`) against real Redis servers and clusters, loaded by `setup`, reported by
//! `check`, removed by `teardown`, and the read-populate race it closes, played step by step
//! against the real sidecar.

use redis::Value;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Cache, Fixture, in_both_modes_and_on_a_cluster};
use crate::support::{RedisCluster, RedisServer};

/// `FCALL invalidator_get 1 key lease_ms`: the tag and the value, token or milliseconds.
fn get(cache: &Cache, key: &str, lease_ms: u64) -> (String, Value) {
    let reply: Vec<Value> = cache
        .query(
            redis::cmd("FCALL")
                .arg("invalidator_get")
                .arg(1)
                .arg(key)
                .arg(lease_ms),
        )
        .expect("FCALL invalidator_get");
    let [tag, value] = <[Value; 2]>::try_from(reply).expect("a two-element reply");
    (redis::from_redis_value(tag).expect("a tag"), value)
}

/// `FCALL invalidator_fill 1 key token value ttl_ms`: 1 stored, 0 refused.
fn fill(cache: &Cache, key: &str, token: &str, value: &str, ttl_ms: u64) -> i64 {
    cache
        .query(
            redis::cmd("FCALL")
                .arg("invalidator_fill")
                .arg(1)
                .arg(key)
                .arg(token)
                .arg(value)
                .arg(ttl_ms),
        )
        .expect("FCALL invalidator_fill")
}

/// The token of a `["fill", token]` reply; panics on any other.
fn token(reply: (String, Value)) -> String {
    assert_eq!(reply.0, "fill", "{reply:?}");
    redis::from_redis_value(reply.1).expect("a token")
}

/// Loads the library as `setup` does, through the library's own API.
async fn load(url: &str) {
    let mut deleter = invalidator::redis::Deleter::connect(url)
        .await
        .expect("connect");
    deleter.load_library().await.expect("FUNCTION LOAD");
}

#[tokio::test]
async fn a_lease_is_never_data_and_only_its_own_token_fills_it() {
    let redis = RedisServer::start();
    load(&redis.url()).await;
    let cache = Cache::Single(redis);

    let first = token(get(&cache, "k", 60_000));
    // Another reader waits, for what is left of the lease.
    let (tag, ms) = get(&cache, "k", 60_000);
    let ms: u64 = redis::from_redis_value(ms).unwrap();
    assert!(tag == "wait" && ms > 0 && ms <= 60_000, "{tag} {ms}");
    // A plain client never reads the lease as a value: GET fails, MGET sees nothing.
    let plain: redis::RedisResult<Option<String>> = cache.query(redis::cmd("GET").arg("k"));
    let err = plain.expect_err("GET of a lease");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    let many: Vec<Option<String>> = cache.query(redis::cmd("MGET").arg("k")).unwrap();
    assert_eq!(many, vec![None]);
    // A stranger's token is refused; the holder's is taken, once.
    assert_eq!(fill(&cache, "k", "1.000000.1", "v", 0), 0);
    assert_eq!(fill(&cache, "k", &first, "v1", 0), 1);
    assert_eq!(fill(&cache, "k", &first, "v2", 0), 0);
    let (tag, value) = get(&cache, "k", 60_000);
    assert_eq!(
        (
            tag.as_str(),
            redis::from_redis_value::<String>(value).unwrap().as_str()
        ),
        ("hit", "v1")
    );
    let ttl: i64 = cache.query(redis::cmd("PTTL").arg("k")).unwrap();
    assert_eq!(ttl, -1, "ttl_ms 0 stores without expiry");

    // A delete destroys the lease: the fill in flight is refused, the next reader fills.
    let doomed = token(get(&cache, "d", 60_000));
    let _: i64 = cache.query(redis::cmd("UNLINK").arg("d")).unwrap();
    assert_eq!(fill(&cache, "d", &doomed, "old", 1000), 0);
    let next = token(get(&cache, "d", 60_000));
    assert_ne!(next, doomed);
    assert_eq!(fill(&cache, "d", &next, "new", 5000), 1);
    let ttl: i64 = cache.query(redis::cmd("PTTL").arg("d")).unwrap();
    assert!(ttl > 0 && ttl <= 5000, "{ttl}");

    // A plain SET over a lease wins; the leaseholder's fill is then refused.
    let held = token(get(&cache, "s", 60_000));
    let _: () = cache
        .query(redis::cmd("SET").arg("s").arg("plain"))
        .unwrap();
    assert_eq!(fill(&cache, "s", &held, "guarded", 0), 0);

    // An expired lease is taken over with a new token; the old one fills nothing.
    let expired = token(get(&cache, "e", 1));
    crate::support::wait_until(
        std::time::Duration::from_secs(5),
        "the lease expired",
        || !cache.query::<bool>(redis::cmd("EXISTS").arg("e")).unwrap(),
    );
    let taken = token(get(&cache, "e", 60_000));
    assert_ne!(taken, expired);
    assert_eq!(fill(&cache, "e", &expired, "x", 0), 0);

    // Bad arguments are errors that say what was expected.
    let bad: redis::RedisResult<Value> = cache.query(
        redis::cmd("FCALL")
            .arg("invalidator_get")
            .arg(1)
            .arg("k")
            .arg("soon"),
    );
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("lease_ms must be an integer")
    );
    let _: () = cache
        .query(redis::cmd("HSET").arg("h").arg("f").arg("v"))
        .unwrap();
    let other: redis::RedisResult<Value> = cache.query(
        redis::cmd("FCALL")
            .arg("invalidator_get")
            .arg(1)
            .arg("h")
            .arg(10),
    );
    assert!(
        other
            .unwrap_err()
            .to_string()
            .contains("not a cached string value")
    );
}

/// The text of the library loaded on `node`, if any.
fn loaded_code(node: &RedisServer) -> Option<String> {
    let libraries: Vec<Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("invalidator")
        .arg("WITHCODE")
        .query(&mut node.connection())
        .expect("FUNCTION LIST");
    libraries.into_iter().find_map(|library| {
        let fields: Vec<Value> = redis::from_redis_value(library).ok()?;
        let at = fields.iter().position(|f| {
            redis::from_redis_value::<String>(f.clone()).ok().as_deref() == Some("library_code")
        })?;
        redis::from_redis_value(fields[at + 1].clone()).ok()
    })
}

#[test]
fn setup_loads_the_library_on_every_primary_check_names_the_one_out_of_date_teardown_removes_all() {
    let f = Fixture::with_cache(SCHEMA, RULES, Cache::Cluster(RedisCluster::start(3)));
    let code = invalidator::redis::library::CODE;
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(
        status.success() && out.contains("FUNCTION LOAD REPLACE"),
        "{out}"
    );
    assert!(
        f.redis
            .cluster()
            .primaries()
            .iter()
            .all(|p| loaded_code(p).is_none())
    );

    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("done: load the Redis Functions library invalidator version 2"),
        "{out}"
    );
    let primaries = f.redis.cluster().primaries();
    assert_eq!(primaries.len(), 3);
    for primary in &primaries {
        assert_eq!(
            loaded_code(primary).as_deref(),
            Some(code),
            "{}",
            primary.url()
        );
    }
    // Keys of every slot get leases: each primary runs the functions.
    for i in 0..30 {
        token(get(&f.redis, &format!("item:{i}"), 60_000));
    }

    // One primary loses it, another has an older version: check names both.
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("invalidator")
        .query(&mut primaries[0].connection())
        .unwrap();
    let older = code.replace("local VERSION = 2", "local VERSION = 1");
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&older)
        .query(&mut primaries[1].connection())
        .unwrap();
    let (status, out) = f.setup.command(&["check", "--format", "json"]);
    assert_eq!(
        status.code(),
        Some(1),
        "an older library is an error: {out}"
    );
    // The JSON document on stdout, before whatever was logged.
    let doc: serde_json::Value = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON document: {out}"));
    let about = |list: &str, port: u16| {
        doc[list].as_array().unwrap().iter().any(|finding| {
            finding["kind"] == "redis_library"
                && finding["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!(":{port}"))
        })
    };
    assert!(about("warnings", primaries[0].port()), "missing: {doc}");
    assert!(about("errors", primaries[1].port()), "older: {doc}");
    assert!(
        !about("errors", primaries[2].port()) && !about("warnings", primaries[2].port()),
        "{doc}"
    );

    let (status, out) = f.setup.command(&["setup"]);
    assert!(
        status.success() && out.contains("version 1, older than 2"),
        "{out}"
    );
    for primary in &primaries {
        assert_eq!(loaded_code(primary).as_deref(), Some(code));
    }
    let (status, out) = f.setup.command(&["check", "--format", "json"]);
    assert!(status.success() && !out.contains("redis_library"), "{out}");

    // Teardown deletes it from every primary, one that lacks it included.
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("invalidator")
        .query(&mut primaries[2].connection())
        .unwrap();
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    for primary in &primaries {
        assert_eq!(loaded_code(primary), None, "{}", primary.url());
    }
}

in_both_modes_and_on_a_cluster! {
    /// The race every cache-aside cache has, one step at a time: a reader takes the lease and
    /// reads the old row, a writer commits, the real sidecar deletes the key (and so the lease),
    /// and the reader's fill of the old row is refused. A literal key and a key the rules
    /// resolve from a pattern alike.
    fn a_fill_of_a_row_read_before_the_commit_is_refused_after_the_sidecar_deletes(
        mode: Mode,
        topology: Topology
    ) {
        let f = Fixture::with_mode_on(SCHEMA, RULES, mode, topology);
        let (status, out) = f.setup.command(&["setup"]);
        assert!(status.success(), "{out}");
        f.sql("INSERT INTO items VALUES (1, 'old', 'c', 1)");
        let _sidecar = f.setup.start();
        crate::e2e::barrier(&f);

        // `item:{id}` is a literal key; `items:name:{name}:*` a pattern the sidecar resolves.
        let keys = ["item:1", "items:name:old:page:1"];
        let leases: Vec<String> = keys.iter().map(|k| token(get(&f.redis, k, 60_000))).collect();
        let read = f.sql("SELECT name FROM items WHERE id = 1");
        assert_eq!(read.trim(), "old");
        f.sql("UPDATE items SET name = 'new' WHERE id = 1");
        f.wait_deleted(&keys);
        for (key, lease) in keys.iter().zip(&leases) {
            assert_eq!(fill(&f.redis, key, lease, read.trim(), 0), 0, "{key}: the stale fill");
            assert!(!f.redis.exists(key), "{key} holds the old row");
        }
        // The next reader fills from the new row.
        let next = token(get(&f.redis, "item:1", 60_000));
        let read = f.sql("SELECT name FROM items WHERE id = 1");
        assert_eq!(fill(&f.redis, "item:1", &next, read.trim(), 0), 1);
        let (tag, value) = get(&f.redis, "item:1", 60_000);
        assert_eq!((tag.as_str(), redis::from_redis_value::<String>(value).unwrap().as_str()), ("hit", "new"));
    }
}

/// The visibility window held open: with `synchronous_standby_names` naming a standby that never
/// comes, a commit is flushed (so the walsender sends it and the sidecar decodes it) but waits
/// before it leaves the proc array, invisible to new snapshots, until its wait is cancelled.
/// Whenever the key is gone, a new snapshot must already read the new row: otherwise a reader
/// taking its lease after the delete would fill the old one.
// Multi-threaded: the writer's connection runs while the test blocks on psql.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_deleted_only_once_its_commit_is_visible_to_new_snapshots() {
    deleted_only_once_visible(0).await;
}

/// The same past a wraparound of the 32-bit xid (epoch 1), after an earlier batch left the gate
/// a snapshot: a transaction newer than that snapshot must not be read as one of the epoch
/// before, which the snapshot would call finished long ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_an_xid_wraparound_a_key_is_deleted_only_once_its_commit_is_visible() {
    deleted_only_once_visible(1).await;
}

async fn deleted_only_once_visible(epoch: u32) {
    let cluster = crate::support::PgCluster::start_with(&[
        ("synchronous_standby_names", "'nobody'"),
        ("synchronous_commit", "local"),
    ]);
    if epoch > 0 {
        cluster.set_xid_epoch(epoch);
    }
    let url = cluster.create_database("visible");
    cluster.psql("visible", SCHEMA);
    cluster.psql("visible", "INSERT INTO items VALUES (1, 'old', 'c', 1)");
    let redis = RedisServer::start();
    let setup = crate::sidecar::Setup::new(&url, &redis.url(), RULES);
    let _sidecar = setup.start();
    let cache = Cache::Single(redis);
    let f = |sql: &str| cluster.psql("visible", sql).trim().to_owned();
    assert_eq!(
        f("SELECT pg_current_xact_id()::text::bigint >> 32"),
        epoch.to_string()
    );
    // An earlier batch through the gate, so that it holds a snapshot older than the update.
    cache
        .query::<()>(redis::cmd("SET").arg("item:2").arg("x"))
        .unwrap();
    f("INSERT INTO items VALUES (2, 'two', 'c', 1)");
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "item:2 is deleted",
        || {
            !cache
                .query::<bool>(redis::cmd("EXISTS").arg("item:2"))
                .unwrap()
        },
    );
    // Other transactions take xids meanwhile, as on any busy server: the update's is past the
    // xmax of the gate's snapshot, not equal to it.
    for _ in 0..3 {
        f("SELECT pg_current_xact_id()");
    }

    let (writer, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect the writer");
    tokio::spawn(connection);
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    writer
        .batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    cache
        .query::<()>(redis::cmd("SET").arg("item:1").arg("old"))
        .unwrap();
    let update = tokio::spawn(async move {
        writer
            .execute("UPDATE items SET name = 'new' WHERE id = 1", &[])
            .await
            .map(|_| ())
    });
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "the commit is flushed, sent to the sidecar, and waits for the standby",
        || {
            f(&format!(
                "SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = {pid}"
            )) == "t"
                && f(
                    "SELECT count(*) > 0 AND bool_and(sent_lsn >= pg_current_wal_flush_lsn()) \
                      FROM pg_stat_replication",
                ) == "t"
        },
    );
    // The sidecar has the commit; give it the time it needs to delete without the wait.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        f("SELECT name FROM items WHERE id = 1"),
        "old",
        "still invisible"
    );
    assert!(
        cache
            .query::<bool>(redis::cmd("EXISTS").arg("item:1"))
            .unwrap(),
        "the key was deleted while its commit was invisible: a reader could fill the old row"
    );
    f(&format!("SELECT pg_cancel_backend({pid})"));
    update.await.unwrap().expect("the update committed locally");
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "item:1 is deleted",
        || {
            !cache
                .query::<bool>(redis::cmd("EXISTS").arg("item:1"))
                .unwrap()
        },
    );
    assert_eq!(f("SELECT name FROM items WHERE id = 1"), "new");
}

/// A lease or TTL too long for Redis (or not finite) is refused before anything is written: a
/// lease the server took without its expiry would make every reader wait on the key forever.
#[tokio::test]
async fn a_lease_too_long_for_redis_is_refused_and_leaves_no_lease_behind() {
    let redis = RedisServer::start();
    load(&redis.url()).await;
    let cache = Cache::Single(redis);
    for lease_ms in ["9223372036854775807", "1e999", "99999999999999999"] {
        let reply: redis::RedisResult<Value> = cache.query(
            redis::cmd("FCALL")
                .arg("invalidator_get")
                .arg(1)
                .arg("k")
                .arg(lease_ms),
        );
        let err = reply.expect_err(lease_ms);
        assert!(
            err.to_string().contains("lease_ms must be an integer"),
            "{lease_ms}: {err}"
        );
        let exists: bool = cache.query(redis::cmd("EXISTS").arg("k")).unwrap();
        assert!(!exists, "{lease_ms} left a lease without expiry");
    }
    // The longest accepted lease still expires.
    token(get(&cache, "k", (1 << 53) - 1));
    let ttl: i64 = cache.query(redis::cmd("PTTL").arg("k")).unwrap();
    assert!(ttl > 0, "{ttl}");
    let held = token(get(&cache, "t", 60_000));
    let reply: redis::RedisResult<Value> = cache.query(
        redis::cmd("FCALL")
            .arg("invalidator_fill")
            .arg(1)
            .arg("t")
            .arg(&held)
            .arg("v")
            .arg("9223372036854775807"),
    );
    assert!(
        reply
            .expect_err("a TTL too long")
            .to_string()
            .contains("ttl_ms must be an integer"),
    );
    assert_eq!(fill(&cache, "t", &held, "v", 5000), 1);
}

/// The visibility gate waits at most its second even when Postgres hangs for it: here the
/// replication session still streams, but the gate's own session (opened for the first batch)
/// is accepted and never answered. The delete must go through after the longest wait, not stall
/// the pipeline for as long as the server hangs.
#[test]
fn a_hung_snapshot_session_holds_the_deletes_no_longer_than_the_longest_wait() {
    let cluster = crate::support::PgCluster::shared();
    let db = crate::support::unique_name("db");
    let url = cluster.create_database(&db);
    cluster.psql(&db, SCHEMA);
    cluster.psql(&db, "INSERT INTO items VALUES (1, 'a', 'c', 1)");
    let proxy = crate::support::TcpProxy::start(cluster.port());
    let url = url.replace(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", proxy.port()),
    );
    let redis = RedisServer::start();
    redis.set_keys(["item:1"]);
    let setup = crate::sidecar::Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    proxy.cut_new(crate::support::CutMode::Blackhole);
    cluster.psql(&db, "UPDATE items SET price = 2 WHERE id = 1");
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "item:1 is deleted though the gate's session hangs",
        || !redis.exists("item:1"),
    );
    assert!(
        sidecar.metric("invalidator_visibility_timeouts_total") >= 1.0,
        "{}",
        sidecar.log()
    );
}

/// Whether `FUNCTION LIST` shows the library.
fn library_loaded(cache: &Cache) -> bool {
    let listed: Vec<Value> = cache
        .query(
            redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg("invalidator"),
        )
        .expect("FUNCTION LIST");
    !listed.is_empty()
}

/// A Redis that keeps nothing on disk loses the library with a restart, and `FUNCTION FLUSH`
/// removes it; either way every `FCALL` of the applications fails until it is back, so `run`
/// loads it again by itself, and logs that it did.
#[test]
fn run_loads_the_library_again_after_a_function_flush_and_a_restart_that_kept_nothing() {
    let f = Fixture::with_mode(SCHEMA, RULES, crate::sidecar::Mode::Replication);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let sidecar = f.setup.start();
    crate::e2e::barrier(&f);
    assert!(library_loaded(&f.redis), "setup loaded it");
    let deadline = std::time::Duration::from_secs(30);

    let flushed: String = f
        .redis
        .query(redis::cmd("FUNCTION").arg("FLUSH"))
        .expect("FLUSH");
    assert_eq!(flushed, "OK");
    crate::support::wait_until(deadline, "the library is back after FUNCTION FLUSH", || {
        library_loaded(&f.redis)
    });
    assert!(
        sidecar.log().contains("library invalidator was missing"),
        "{}",
        sidecar.log()
    );
    let lease = token(get(&f.redis, "item:1", 60_000));
    assert_eq!(fill(&f.redis, "item:1", &lease, "row", 0), 1);

    f.redis.kill();
    f.redis.start_again();
    crate::support::wait_until(deadline, "the library is back after a restart", || {
        library_loaded(&f.redis)
    });
    // And invalidation goes on as before.
    f.redis.set_keys(["item:1"]);
    f.sql("INSERT INTO items VALUES (1, 'a', 'c', 1)");
    f.wait_deleted(&["item:1"]);
}
