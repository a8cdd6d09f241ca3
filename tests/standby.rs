//! A second instance for the same slot (notify mode: the same outbox) waits as a standby:
//! quietly, asking the server whether the holder is gone, and takes over within about a second
//! of the first instance stopping.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Mode, Setup, in_both_modes};
use crate::support::{PgCluster, wait_until};

/// A second configuration competing with `f`'s: same database, Redis, slot and mode, its own
/// HTTP port.
fn twin(f: &Fixture, mode: Mode) -> Setup {
    let url = PgCluster::shared().url(&f.db);
    let twin = Setup::with_slot(&url, &f.redis.url(), RULES, &f.setup.slot);
    if mode == Mode::Notify {
        twin.notify_mode();
    }
    twin
}

/// Lines of `log` that contain `what`.
fn lines_with(log: &str, what: &str) -> usize {
    log.lines().filter(|line| line.contains(what)).count()
}

in_both_modes! {
    fn a_standby_logs_its_state_once_and_postgres_logs_no_slot_active_errors(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let mut first = f.setup.start();
        let twin = twin(&f, mode);
        let second = twin.spawn();
        wait_until(Duration::from_secs(30), "the second is a standby", || {
            second.assert_alive();
            second
                .get("/readyz")
                .is_some_and(|(status, body)| status == 503 && body.contains("standby"))
        });
        // Several of the old one-second polls would have come and gone.
        std::thread::sleep(Duration::from_secs(4));
        second.assert_alive();
        let log = second.log();
        assert_eq!(lines_with(&log, "waiting as a standby"), 1, "{log}");
        assert_eq!(lines_with(&log, ": connected"), 0, "{log}");
        let active = format!("replication slot \"{}\" is active", f.setup.slot);
        let server = PgCluster::shared().log();
        assert_eq!(lines_with(&server, &active), 0, "postgres logged {active:?}");

        // The first stops; the standby takes over at its next poll and logs it once.
        first.terminate();
        second.wait_ready();
        f.cache(&["item:1"]);
        f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0)");
        f.wait_deleted(&["item:1"]);
        let log = second.log();
        assert_eq!(lines_with(&log, "taking over"), 1, "{log}");
    }
}
