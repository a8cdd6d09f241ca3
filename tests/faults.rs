//! Fault injection against real servers (the README's Delivery): Redis cut off or killed, Postgres
//! restarted or its walsender terminated, the sidecar killed at random instants or stopped in the
//! middle of a burst, and a standby that takes over.
//!
//! Every test caches `item:<id>` for the ids it will write, commits one row per id (one
//! transaction each, so every commit invalidates exactly one key), and finally asserts that every
//! one of those keys is gone: invalidations expected are the commits made, invalidations done are
//! the keys that disappeared. Each test prints one `fault-report` line (fault, runs, expected, done,
//! recovery time from the end of the fault until the backlog is deleted) for the closing note.
//!
//! Each row records `pg_current_wal_insert_lsn()` in its own transaction. With one writer, commit
//! `k` ends between the positions of rows `k` and `k + 1`, so a slot whose confirmed position
//! reaches row `k + 1` while `item:k` is still cached has acknowledged a commit whose key was
//! not deleted: [`Rig::assert_ack_covers_only_deleted`] checks exactly that.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use invalidator::change::Lsn;

use crate::sidecar::{Setup, Sidecar};
use crate::support::{
    CutMode, PgCluster, RedisServer, StopMode, TcpProxy, unique_name, wait_until,
};

/// One table; each row's insert position is recorded by the row itself.
const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, \
                      lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn());";

/// Every change of a row invalidates its one key.
const RULES: &str = "[[rule]]\nname = \"item\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(40);

/// The wal_sender_timeout of the cluster in the Redis cut tests; the cut lasts longer.
const WAL_SENDER_TIMEOUT: Duration = Duration::from_secs(2);

/// A test's own cluster, database, Redis server and sidecar configuration.
struct Rig {
    /// The test's own cluster, so it can be restarted without touching other tests.
    pg: PgCluster,
    /// The database in `pg`.
    db: String,
    /// Its URL, for further configurations on the same database.
    db_url: String,
    /// The test's own Redis server (the sidecar may reach it through a proxy).
    redis: RedisServer,
    /// The sidecar's configuration.
    setup: Setup,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Whether a walsender streams from it.
    active: bool,
    /// That walsender's process id.
    pid: Option<i32>,
    /// The acknowledged position.
    confirmed: Lsn,
}

impl Rig {
    /// A database with the schema in `pg`, and a configuration pointing at `redis` directly.
    fn new(pg: PgCluster, redis: RedisServer) -> Rig {
        let url = redis.url();
        Rig::with_redis_url(pg, redis, &url)
    }

    /// Like [`Rig::new`], but the sidecar talks to Redis at `redis_url` (a proxy).
    fn with_redis_url(pg: PgCluster, redis: RedisServer, redis_url: &str) -> Rig {
        let db = unique_name("faults");
        let db_url = pg.create_database(&db);
        pg.psql(&db, SCHEMA);
        let setup = Setup::new(&db_url, redis_url, RULES);
        Rig {
            pg,
            db,
            db_url,
            redis,
            setup,
        }
    }

    /// Runs SQL in the test's database.
    fn sql(&self, sql: &str) -> String {
        self.pg.psql(&self.db, sql)
    }

    /// Caches `item:<id>` for every id.
    fn cache(&self, ids: RangeInclusive<u32>) {
        self.redis.set_keys(ids.map(|id| format!("item:{id}")));
    }

    /// Inserts one row per id, each in its own transaction, in id order.
    fn commit_each(&self, ids: RangeInclusive<u32>) {
        self.sql(&format!(
            "DO $$ BEGIN FOR i IN {}..{} LOOP \
             INSERT INTO items (id) VALUES (i); COMMIT; END LOOP; END $$;",
            ids.start(),
            ids.end()
        ));
    }

    /// Waits until every key of `all` is deleted and `/readyz` answers 200; returns the time
    /// since `since` (the end of the fault).
    fn recovered(&self, sidecar: &Sidecar, all: &RangeInclusive<u32>, since: Instant) -> Duration {
        wait_until(
            DEADLINE,
            "the backlog is deleted and /readyz is 200",
            || {
                sidecar.assert_alive();
                self.left(all).is_empty() && readyz(sidecar).is_some_and(|(s, _)| s == 200)
            },
        );
        since.elapsed()
    }

    /// Reports the fault: every key of `all` was an invalidation expected.
    fn report(&self, fault: &str, runs: usize, all: &RangeInclusive<u32>, recovery: Duration) {
        let expected = all.clone().count();
        report(
            fault,
            runs,
            expected,
            expected - self.left(all).len(),
            recovery,
        );
    }

    /// The ids in `ids` whose key is still cached.
    fn left(&self, ids: &RangeInclusive<u32>) -> Vec<u32> {
        let mut left: Vec<u32> = self
            .redis
            .scan_keys("item:*")
            .iter()
            .filter_map(|key| key.strip_prefix("item:")?.parse().ok())
            .filter(|id| ids.contains(id))
            .collect();
        left.sort_unstable();
        left
    }

    /// Waits until no key of `ids` is cached.
    fn wait_gone(&self, ids: &RangeInclusive<u32>, sidecar: &Sidecar) {
        wait_until(DEADLINE, &format!("item:{ids:?} are deleted"), || {
            sidecar.assert_alive();
            self.left(ids).is_empty()
        });
    }

    /// The slot of the configuration, if it exists.
    fn slot(&self) -> Option<Slot> {
        let row = self.pg.psql(
            "postgres",
            &format!(
                "SELECT active, coalesce(active_pid::text, ''), \
                 coalesce(confirmed_flush_lsn::text, '0/0') \
                 FROM pg_replication_slots WHERE slot_name = '{}'",
                self.setup.slot
            ),
        );
        let mut fields = row.trim().split('|');
        let active = fields.next().filter(|f| !f.is_empty())? == "t";
        let pid = fields.next().and_then(|f| f.parse().ok());
        let confirmed = fields.next()?.parse().expect("confirmed_flush_lsn");
        Some(Slot {
            active,
            pid,
            confirmed,
        })
    }

    /// The slot, which must exist.
    fn the_slot(&self) -> Slot {
        self.slot().expect("the replication slot exists")
    }

    /// Every row's recorded insert position, by id.
    fn row_lsns(&self) -> BTreeMap<u32, Lsn> {
        self.sql("SELECT id, lsn FROM items")
            .lines()
            .map(|line| {
                let (id, lsn) = line.split_once('|').expect("id|lsn");
                (id.parse().expect("id"), lsn.parse().expect("lsn"))
            })
            .collect()
    }

    /// Asserts that the slot has acknowledged no commit whose key is still cached: for every
    /// committed row `k` whose key is present, the confirmed position is below row `k + 1`,
    /// which lies after commit `k`. Read in this order (ack, then Redis, then rows) a failure is
    /// never a false alarm, even while a sidecar runs and a writer writes.
    fn assert_ack_covers_only_deleted(&self) {
        let Some(slot) = self.slot() else { return };
        let present = self.left(&(1..=u32::MAX));
        let lsns = self.row_lsns();
        for id in present {
            if let (Some(_), Some(next)) = (lsns.get(&id), lsns.get(&(id + 1))) {
                assert!(
                    *next > slot.confirmed,
                    "the slot acknowledged {} but item:{id} (committed before row {} at {next}) \
                     is still cached",
                    slot.confirmed,
                    id + 1
                );
            }
        }
    }
}

/// `/readyz`: the status and the body, or `None` if nothing answers.
fn readyz(sidecar: &Sidecar) -> Option<(u16, String)> {
    sidecar.get("/readyz")
}

/// Runs `check` repeatedly for `span`, so a condition is shown to hold throughout a fault.
fn hold(span: Duration, mut check: impl FnMut()) {
    let start = Instant::now();
    while start.elapsed() < span {
        check();
        std::thread::sleep(Duration::from_millis(50));
    }
    check();
}

/// Prints the figures of one fault for the closing note and asserts nothing is missing.
fn report(fault: &str, runs: usize, expected: usize, done: usize, recovery: Duration) {
    eprintln!(
        "fault-report | {fault} | runs {runs} | expected {expected} | done {done} | \
         recovery {:.2} s",
        recovery.as_secs_f64()
    );
    assert_eq!(done, expected, "{fault}: invalidations missing");
}

/// Cuts the network between the sidecar and Redis for longer than the walsender's timeout, with
/// commits made before and during the cut, then restores it.
fn redis_cut(mode: CutMode, fault: &str) {
    const N: u32 = 400;
    const HALF: u32 = N / 2;
    let pg = PgCluster::start_with(&[("wal_sender_timeout", "2s")]);
    assert_eq!(pg.psql("postgres", "SHOW wal_sender_timeout"), "2s");
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let rig = Rig::with_redis_url(pg, redis, &format!("redis://127.0.0.1:{}/0", proxy.port()));
    let all = 1..=N;
    let during = HALF + 1..=N;
    rig.cache(1..=N);
    let sidecar = rig.setup.start();
    rig.commit_each(1..=HALF);
    rig.wait_gone(&(1..=HALF), &sidecar);
    let streaming = rig.the_slot();
    assert!(streaming.active, "{streaming:?}");

    proxy.cut(mode);
    let cut = Instant::now();
    rig.commit_each(during.clone());
    let lsns = rig.row_lsns();
    // Commit HALF + 1 ends before row HALF + 2 began: the ack must stay below that row.
    let bound = lsns[&(HALF + 2)];
    wait_until(DEADLINE, "/readyz reports redis down", || {
        sidecar.assert_alive();
        matches!(readyz(&sidecar), Some((503, body)) if body.contains("redis"))
    });
    let span = (WAL_SENDER_TIMEOUT * 5 / 2).saturating_sub(cut.elapsed());
    hold(span, || {
        sidecar.assert_alive();
        let slot = rig.the_slot();
        assert!(
            slot.active && slot.pid == streaming.pid,
            "the replication connection did not survive the cut: {slot:?}, was {streaming:?}\n{}",
            sidecar.log()
        );
        assert!(
            slot.confirmed < bound,
            "acknowledged {} during the cut, past commit {} (row {} at {bound})",
            slot.confirmed,
            HALF + 1,
            HALF + 2
        );
        let (status, body) = readyz(&sidecar).expect("/readyz answers");
        assert!(status == 503 && body.contains("redis"), "{status} {body}");
    });
    let walsenders = rig.pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'invalidator'",
    );
    assert_eq!(walsenders, "1", "the walsender is gone");
    assert_eq!(rig.left(&during).len(), HALF as usize, "deleted while cut");
    rig.assert_ack_covers_only_deleted();
    let cut_for = cut.elapsed();

    proxy.restore();
    let restored = Instant::now();
    let recovery = rig.recovered(&sidecar, &all, restored);
    wait_until(DEADLINE, "the slot acknowledges the last commit", || {
        rig.the_slot().confirmed > lsns[&N]
    });
    assert_eq!(
        rig.the_slot().pid,
        streaming.pid,
        "the replication connection was replaced"
    );
    eprintln!("{fault}: cut for {:.1} s", cut_for.as_secs_f64());
    rig.report(fault, 1, &all, recovery);
}

#[test]
fn redis_refusing_connections_holds_the_ack_and_keeps_replication_alive() {
    redis_cut(CutMode::Refuse, "redis refused (proxy)");
}

#[test]
fn redis_blackholed_holds_the_ack_and_keeps_replication_alive() {
    redis_cut(CutMode::Blackhole, "redis blackholed (proxy)");
}

#[test]
fn redis_killed_and_restarted_loses_nothing() {
    const N: u32 = 400;
    const HALF: u32 = N / 2;
    // Persistence, so the keys cached before the kill are there again after the restart.
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let rig = Rig::new(PgCluster::start(), redis);
    let all = 1..=N;
    rig.cache(1..=N);
    rig.redis.set_keys(["canary"]);
    let sidecar = rig.setup.start();
    rig.commit_each(1..=HALF);
    rig.wait_gone(&(1..=HALF), &sidecar);
    let streaming = rig.the_slot();

    rig.redis.kill();
    let killed = Instant::now();
    rig.commit_each(HALF + 1..=N);
    let lsns = rig.row_lsns();
    let bound = lsns[&(HALF + 2)];
    wait_until(DEADLINE, "/readyz reports redis down", || {
        sidecar.assert_alive();
        matches!(readyz(&sidecar), Some((503, body)) if body.contains("redis"))
    });
    hold(
        Duration::from_secs(3).saturating_sub(killed.elapsed()),
        || {
            let slot = rig.the_slot();
            assert!(slot.active && slot.pid == streaming.pid, "{slot:?}");
            assert!(
                slot.confirmed < bound,
                "acknowledged {} while redis was down",
                slot.confirmed
            );
        },
    );

    rig.redis.start_again();
    let restarted = Instant::now();
    assert!(
        rig.redis.exists("canary"),
        "redis lost its data: the test proves nothing"
    );
    let recovery = rig.recovered(&sidecar, &all, restarted);
    rig.assert_ack_covers_only_deleted();
    rig.report("redis kill -9 + restart", 1, &all, recovery);
}

/// Commits before, around and after a Postgres fault that `fault` injects and ends; `fault`
/// returns when the fault is over (the server accepts connections again).
fn postgres_fault(name: &str, fault: impl FnOnce(&Rig, &Sidecar)) {
    const N: u32 = 600;
    let rig = Rig::new(PgCluster::start(), RedisServer::start());
    let all = 1..=N;
    rig.cache(1..=N);
    let sidecar = rig.setup.start();
    rig.commit_each(1..=200);
    rig.wait_gone(&(1..=200), &sidecar);
    let before = rig.the_slot();
    // In flight when the fault strikes: read, queued, deleted or not yet.
    rig.commit_each(201..=400);
    fault(&rig, &sidecar);
    let ended = Instant::now();
    rig.commit_each(401..=N);
    let recovery = rig.recovered(&sidecar, &all, ended);
    let after = rig.the_slot();
    assert!(
        after.active && after.pid != before.pid,
        "no new walsender: {after:?}, was {before:?}"
    );
    let lsns = rig.row_lsns();
    wait_until(DEADLINE, "the slot acknowledges the last commit", || {
        rig.the_slot().confirmed > lsns[&N]
    });
    let reconnects = sidecar.log().matches("replication interrupted").count();
    eprintln!("{name}: {reconnects} failed attempt(s) logged before streaming resumed");
    rig.report(name, 1, &all, recovery);
}

/// Stops the cluster in `mode`, waits until the sidecar notices, and starts it again.
fn restart(rig: &Rig, sidecar: &Sidecar, mode: StopMode) {
    rig.pg.stop(mode);
    let down = Instant::now();
    while readyz(sidecar).map(|r| r.0) != Some(503) {
        sidecar.assert_alive();
        assert!(
            down.elapsed() < DEADLINE,
            "/readyz never reported postgres down; log:\n{}",
            sidecar.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rig.pg.start_again();
}

#[test]
fn postgres_fast_restart_loses_nothing() {
    postgres_fault("postgres restart (fast)", |rig, sidecar| {
        restart(rig, sidecar, StopMode::Fast)
    });
}

#[test]
fn postgres_immediate_restart_loses_nothing() {
    postgres_fault("postgres restart (immediate)", |rig, sidecar| {
        restart(rig, sidecar, StopMode::Immediate)
    });
}

#[test]
fn a_terminated_walsender_reconnects_promptly_every_time_and_loses_nothing() {
    const ROUNDS: u32 = 8;
    const PER: u32 = 100;
    // The longest reconnect allowed: a liveness bound, far above the first backoff step (0.1 s
    // plus jitter) and below the seventh (6.4 s), which a backoff never reset would reach.
    const RECONNECT: Duration = Duration::from_secs(5);
    const N: u32 = ROUNDS * 2 * PER;
    let rig = Rig::new(PgCluster::start(), RedisServer::start());
    rig.cache(1..=N);
    let sidecar = rig.setup.start();
    let mut worst = Duration::ZERO;
    for round in 0..ROUNDS {
        let first = round * 2 * PER + 1;
        // In flight when the walsender goes: read, queued, deleted or not yet.
        rig.commit_each(first..=first + PER - 1);
        let pid = rig.the_slot().pid.expect("an active walsender");
        let done = rig
            .pg
            .psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
        assert_eq!(done, "t");
        let terminated = Instant::now();
        rig.commit_each(first + PER..=first + 2 * PER - 1);
        wait_until(DEADLINE, "a new walsender streams", || {
            rig.slot()
                .is_some_and(|s| s.active && s.pid.is_some() && s.pid != Some(pid))
        });
        let reconnect = terminated.elapsed();
        rig.wait_gone(&(1..=first + 2 * PER - 1), &sidecar);
        let recovery = terminated.elapsed();
        eprintln!(
            "termination {}: streaming again after {:.2} s, backlog deleted after {:.2} s",
            round + 1,
            reconnect.as_secs_f64(),
            recovery.as_secs_f64()
        );
        assert!(
            reconnect < RECONNECT,
            "termination {}: no reconnect within {RECONNECT:?}; log:\n{}",
            round + 1,
            sidecar.log()
        );
        worst = worst.max(recovery);
    }
    let all = 1..=N;
    rig.report(
        "pg_terminate_backend(walsender)",
        ROUNDS as usize,
        &all,
        worst,
    );
}

/// Sets the flag when dropped, also while unwinding from a panic.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A small xorshift generator: random instants without a dependency; the seed is printed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(nanos | 1);
        eprintln!("random instants from FAULTS_SEED={seed}");
        Rng(seed)
    }

    /// A number in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn kill_9_at_random_instants_during_a_stream_of_commits_loses_nothing() {
    const ROUNDS: usize = 8;
    const CHUNK: u32 = 200;
    let rig = Rig::new(PgCluster::start(), RedisServer::start());
    let mut rng = Rng::seeded();
    // The slot must exist before the first commit: what precedes it is never streamed.
    let (status, out) = rig.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let stop = AtomicBool::new(false);
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            // Cache, then commit, chunk after chunk, until the last kill.
            let mut next = 1;
            while !stop.load(Ordering::SeqCst) {
                rig.cache(next..=next + CHUNK - 1);
                rig.commit_each(next..=next + CHUNK - 1);
                next += CHUNK;
            }
            next - 1
        });
        // Stops the writer however this thread leaves the scope, so a failure cannot hang it.
        let _stop = StopOnDrop(&stop);
        for round in 1..=ROUNDS {
            let mut sidecar = rig.setup.spawn();
            // Anywhere from startup through setup to streaming and deleting.
            let at = Duration::from_millis(rng.below(1500));
            std::thread::sleep(at);
            sidecar.kill9();
            eprintln!(
                "round {round}: killed {} ms after spawn; {} keys cached",
                at.as_millis(),
                rig.left(&(1..=u32::MAX)).len()
            );
            rig.assert_ack_covers_only_deleted();
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer")
    });
    let all = 1..=written;
    let sidecar = rig.setup.spawn();
    let restarted = Instant::now();
    rig.wait_gone(&all, &sidecar);
    let recovery = restarted.elapsed();
    rig.report("kill -9 at random instants", ROUNDS, &all, recovery);
}

#[test]
fn sigterm_during_a_burst_exits_zero_having_acknowledged_only_what_was_deleted() {
    const N: u32 = 50_000;
    let rig = Rig::new(PgCluster::start(), RedisServer::start());
    let all = 1..=N;
    rig.cache(1..=N);
    let mut sidecar = rig.setup.start();
    let dbsize = || {
        redis::cmd("DBSIZE")
            .query::<u64>(&mut rig.redis.connection())
            .expect("DBSIZE")
    };
    let (status, stopping, left_at_term) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| rig.commit_each(1..=N));
        // Well into the burst: deleting, with most of it still to come.
        wait_until(DEADLINE, "the sidecar deletes part of the burst", || {
            sidecar.assert_alive();
            dbsize() <= u64::from(N - 2_000)
        });
        let left_at_term = dbsize();
        let term = Instant::now();
        let status = sidecar.terminate_within(Duration::from_secs(30));
        let stopping = term.elapsed();
        writer.join().expect("writer");
        (status, stopping, left_at_term)
    });
    let status =
        status.unwrap_or_else(|| panic!("no exit within 30 s of SIGTERM; log:\n{}", sidecar.log()));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        sidecar.log()
    );
    let left_after = dbsize();
    eprintln!(
        "SIGTERM with {left_at_term} of {N} keys cached; exit 0 after {:.2} s; {left_after} cached after",
        stopping.as_secs_f64()
    );
    rig.assert_ack_covers_only_deleted();
    assert!(!rig.the_slot().active, "the slot is still held");

    let sidecar = rig.setup.spawn();
    let restarted = Instant::now();
    wait_until(DEADLINE, "the rest of the burst is deleted", || {
        sidecar.assert_alive();
        dbsize() == 0
    });
    let recovery = restarted.elapsed();
    let lsns = rig.row_lsns();
    wait_until(DEADLINE, "the slot acknowledges the last commit", || {
        rig.the_slot().confirmed > lsns[&N]
    });
    rig.report("SIGTERM during a 50k-commit burst", 1, &all, recovery);
}

#[test]
fn a_second_instance_waits_as_standby_and_takes_over_after_kill_9() {
    const N: u32 = 400;
    const HALF: u32 = N / 2;
    let rig = Rig::new(PgCluster::start(), RedisServer::start());
    let all = 1..=N;
    rig.cache(1..=N);
    let mut active = rig.setup.start();
    let twin = Setup::with_slot(&rig.db_url, &rig.redis.url(), RULES, &rig.setup.slot);
    let standby = twin.spawn();
    let is_standby = |sidecar: &Sidecar| {
        sidecar.assert_alive();
        matches!(readyz(sidecar), Some((503, body)) if body.starts_with("standby"))
    };
    wait_until(DEADLINE, "the second instance is a standby", || {
        is_standby(&standby)
    });
    let first = rig.the_slot();
    rig.commit_each(1..=HALF);
    rig.wait_gone(&(1..=HALF), &active);
    // Several retries of the standby come and go; the first instance keeps the slot.
    hold(Duration::from_secs(3), || {
        assert!(is_standby(&standby), "{:?}", readyz(&standby));
        assert_eq!(readyz(&active).map(|r| r.0), Some(200));
        assert_eq!(rig.the_slot().pid, first.pid, "the slot changed hands");
    });

    active.kill9();
    let killed = Instant::now();
    rig.commit_each(HALF + 1..=N);
    wait_until(
        DEADLINE,
        "the standby took over and deleted the rest",
        || {
            standby.assert_alive();
            rig.left(&all).is_empty() && readyz(&standby).is_some_and(|(s, _)| s == 200)
        },
    );
    let recovery = killed.elapsed();
    rig.assert_ack_covers_only_deleted();
    rig.report("standby takeover after kill -9", 1, &all, recovery);
}
