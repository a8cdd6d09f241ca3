//! Several Redis targets (`[[redis.targets]]`): every change is deleted on each, a target that
//! is down holds the acknowledgement back while the others go on, and nothing is lost on either.
//!
//! As in `faults.rs`, each row records `pg_current_wal_insert_lsn()` and is committed in its own
//! transaction, so commit `k` ends before row `k + 1` begins: a slot whose confirmed position
//! reaches row `k + 1` has acknowledged commit `k`.

use std::ops::RangeInclusive;
use std::time::Duration;

use invalidator::change::Lsn;

use crate::sidecar::{Setup, Sidecar, binary};
use crate::support::{PgCluster, RedisServer, unique_name, wait_until};

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, \
                      lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn());";

const RULES: &str = "[[rule]]\nname = \"item\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

const DEADLINE: Duration = Duration::from_secs(40);

/// A database in the shared cluster, the `[redis] url` server, a second target `eu`, and a
/// configuration naming both.
struct Rig {
    /// The database.
    db: String,
    /// The `[redis] url` target (`default`).
    main: RedisServer,
    /// The `[[redis.targets]]` target `eu`, persisted so a kill and restart keeps its keys.
    eu: RedisServer,
    /// The sidecar's configuration.
    setup: Setup,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_eu_args(&["--appendonly", "yes", "--appendfsync", "always"], None)
    }

    /// A rig whose `eu` server gets `args`, and whose configuration reaches it at `eu_url`
    /// (default: its plain URL).
    fn with_eu_args(args: &[&str], eu_url: Option<&dyn Fn(u16) -> String>) -> Rig {
        let cluster = PgCluster::shared();
        let db = unique_name("targets");
        let url = cluster.create_database(&db);
        cluster.psql(&db, SCHEMA);
        let main = RedisServer::start();
        let eu = RedisServer::start_with(args);
        let eu_url = eu_url.map_or_else(|| eu.url(), |url| url(eu.port()));
        let setup = Setup::new(&url, &main.url(), RULES);
        let mut config = std::fs::read_to_string(setup.config()).unwrap();
        config.push_str(&format!(
            "\n[[redis.targets]]\nname = \"eu\"\nurl = \"{eu_url}\"\n"
        ));
        std::fs::write(setup.config(), config).unwrap();
        Rig {
            db,
            main,
            eu,
            setup,
        }
    }

    fn sql(&self, sql: &str) -> String {
        PgCluster::shared().psql(&self.db, sql)
    }

    /// Caches `item:<id>` on both targets.
    fn cache(&self, ids: RangeInclusive<u32>) {
        let keys: Vec<String> = ids.map(|id| format!("item:{id}")).collect();
        self.main.set_keys(&keys);
        self.eu.set_keys(&keys);
    }

    /// Inserts one row per id, each in its own transaction.
    fn commit_each(&self, ids: RangeInclusive<u32>) {
        self.sql(&format!(
            "DO $$ BEGIN FOR i IN {}..{} LOOP \
             INSERT INTO items (id) VALUES (i); COMMIT; END LOOP; END $$;",
            ids.start(),
            ids.end()
        ));
    }

    /// The ids of `ids` still cached on `redis`.
    fn left(redis: &RedisServer, ids: &RangeInclusive<u32>) -> Vec<u32> {
        let mut left: Vec<u32> = redis
            .scan_keys("item:*")
            .iter()
            .filter_map(|key| key.strip_prefix("item:")?.parse().ok())
            .filter(|id| ids.contains(id))
            .collect();
        left.sort_unstable();
        left
    }

    /// Waits until no key of `ids` is cached on `redis`.
    fn wait_gone(&self, redis: &RedisServer, ids: &RangeInclusive<u32>, sidecar: &Sidecar) {
        wait_until(DEADLINE, &format!("item:{ids:?} are deleted"), || {
            sidecar.assert_alive();
            Rig::left(redis, ids).is_empty()
        });
    }

    /// The slot's confirmed position.
    fn confirmed(&self) -> Lsn {
        let row = PgCluster::shared().psql(
            "postgres",
            &format!(
                "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots \
                 WHERE slot_name = '{}'",
                self.setup.slot
            ),
        );
        row.trim().parse().expect("confirmed_flush_lsn")
    }

    /// The recorded insert position of row `id`.
    fn row_lsn(&self, id: u32) -> Lsn {
        self.sql(&format!("SELECT lsn FROM items WHERE id = {id}"))
            .trim()
            .parse()
            .expect("lsn")
    }
}

/// Waits until a restarted server has loaded its data again (it answers `LOADING` meanwhile)
/// and still holds the `canary` key: otherwise the test would prove nothing.
fn wait_loaded(redis: &RedisServer) {
    wait_until(DEADLINE, "redis has loaded its data (canary)", || {
        let Ok(mut con) = redis
            .client()
            .get_connection_with_timeout(Duration::from_secs(5))
        else {
            return false;
        };
        redis::cmd("EXISTS")
            .arg("canary")
            .query::<bool>(&mut con)
            .is_ok_and(|exists| exists)
    });
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = PgCluster::shared().try_psql(
            "postgres",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}' AND NOT active",
                self.setup.slot
            ),
        );
    }
}

#[test]
fn every_change_is_deleted_on_every_target() {
    let rig = Rig::new();
    rig.cache(1..=50);
    rig.main.set_keys(["kept"]);
    rig.eu.set_keys(["kept"]);
    let sidecar = rig.setup.start();
    rig.commit_each(1..=50);
    rig.wait_gone(&rig.main, &(1..=50), &sidecar);
    rig.wait_gone(&rig.eu, &(1..=50), &sidecar);
    assert!(rig.main.exists("kept") && rig.eu.exists("kept"));
    // Per-target series, labelled with the target's name.
    wait_until(DEADLINE, "per-target metrics count the deletes", || {
        sidecar.metric("invalidator_keys_deleted_total{target=\"default\"}") >= 50.0
            && sidecar.metric("invalidator_keys_deleted_total{target=\"eu\"}") >= 50.0
    });
    let (status, body) = sidecar.get("/readyz").expect("/readyz answers");
    assert_eq!(status, 200, "{body}");
}

/// Kills `eu` during a stream of writes: `default` keeps deleting, the acknowledgement stays
/// below the first commit `eu` has not confirmed, `/readyz` names `eu`; after its restart both
/// have every key deleted.
#[test]
fn a_target_down_holds_the_ack_while_the_others_go_on_and_nothing_is_lost() {
    // Fewer than a queue's worth, so the healthy target is sure to receive all of them.
    const BEFORE: u32 = 40;
    const N: u32 = 80;
    let rig = Rig::new();
    rig.cache(1..=N);
    rig.eu.set_keys(["canary"]);
    let sidecar = rig.setup.start();
    rig.commit_each(1..=BEFORE);
    rig.wait_gone(&rig.main, &(1..=BEFORE), &sidecar);
    rig.wait_gone(&rig.eu, &(1..=BEFORE), &sidecar);

    rig.eu.kill();
    let during = BEFORE + 1..=N;
    rig.commit_each(during.clone());
    rig.wait_gone(&rig.main, &during, &sidecar);
    wait_until(DEADLINE, "/readyz names the target that is down", || {
        sidecar.assert_alive();
        matches!(sidecar.get("/readyz"), Some((503, body)) if body.contains("redis eu: "))
    });
    // Commit BEFORE + 1 ends before row BEFORE + 2 began: eu has not confirmed it.
    let bound = rig.row_lsn(BEFORE + 2);
    let confirmed = rig.confirmed();
    assert!(
        confirmed < bound,
        "acknowledged {confirmed} while eu was down, past commit {} (row {} at {bound})",
        BEFORE + 1,
        BEFORE + 2
    );

    rig.eu.start_again();
    wait_loaded(&rig.eu);
    assert_eq!(
        Rig::left(&rig.eu, &during).len(),
        during.clone().count(),
        "eu deleted keys while it was down"
    );
    rig.wait_gone(&rig.eu, &(1..=N), &sidecar);
    let last = rig.row_lsn(N);
    wait_until(DEADLINE, "the last commit is acknowledged", || {
        rig.confirmed() > last
    });
    wait_until(DEADLINE, "/readyz is 200 again", || {
        matches!(sidecar.get("/readyz"), Some((200, _)))
    });
    assert!(Rig::left(&rig.main, &(1..=N)).is_empty());
}

/// kill -9 of the sidecar while `eu` is down: after a restart with both up, every key is
/// deleted on both.
#[test]
fn kill_9_while_a_target_is_down_loses_nothing_after_restart() {
    const BEFORE: u32 = 20;
    const N: u32 = 60;
    let rig = Rig::new();
    rig.cache(1..=N);
    rig.eu.set_keys(["canary"]);
    let mut sidecar = rig.setup.start();
    rig.commit_each(1..=BEFORE);
    rig.wait_gone(&rig.eu, &(1..=BEFORE), &sidecar);

    rig.eu.kill();
    let during = BEFORE + 1..=N;
    rig.commit_each(during.clone());
    rig.wait_gone(&rig.main, &during, &sidecar);
    sidecar.kill9();

    rig.eu.start_again();
    wait_loaded(&rig.eu);
    // The healthy target's keys are cached again meanwhile; the replay deletes them again.
    rig.main
        .set_keys(during.clone().map(|id| format!("item:{id}")));
    let sidecar = rig.setup.start();
    rig.wait_gone(&rig.eu, &(1..=N), &sidecar);
    rig.wait_gone(&rig.main, &(1..=N), &sidecar);
}

/// A target with an ACL user and a wrong password in its URL: `run` stops with exit 1 naming
/// the target's URL without the password, and never shows the password.
#[test]
fn a_wrong_password_of_one_target_stops_run_without_showing_it() {
    let acl = ["--user", "app", "on", ">eu-secret", "~*", "+@all"];
    let wrong = |port: u16| format!("redis://app:eu-wrong-secret@127.0.0.1:{port}/0");
    let rig = Rig::with_eu_args(&acl, Some(&wrong));
    let out_dir = tempfile::tempdir().unwrap();
    let log = out_dir.path().join("log");
    let mut child = std::process::Command::new(binary())
        .arg("run")
        .arg("--config")
        .arg(rig.setup.config())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(out_dir.path().join("err")).unwrap())
        .spawn()
        .expect("spawn invalidator run");
    let mut status = None;
    wait_until(DEADLINE, "run stops", || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let out = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(out_dir.path().join("err")).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("app:***@127.0.0.1"), "{out}");
    assert!(!out.contains("eu-wrong-secret"), "{out}");
}
