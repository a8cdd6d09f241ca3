//! `GET /wait?lsn=...&timeout_ms=...`: read-your-writes. An application commits, asks Postgres
//! for `pg_current_wal_lsn()`, and waits on it: once `/wait` answers 200, the keys of its commit
//! are gone; a position not reached yet times out with 504; a query that is not that is a 400.

use crate::e2e::{RULES, SCHEMA, barrier};
use crate::sidecar::{Fixture, in_both_modes};

in_both_modes! {
    fn wait_answers_once_the_commit_before_the_position_is_invalidated(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        f.sql("INSERT INTO items VALUES (1, 'a', 'c', 1)");
        let sidecar = f.setup.start();
        barrier(&f);
        for round in 0..5 {
            f.cache(&["item:1"]);
            // The commit and the position in one session, as an application does it.
            let lsn = f.sql(&format!(
                "UPDATE items SET price = {round} WHERE id = 1; SELECT pg_current_wal_lsn()"
            ));
            let lsn = lsn.trim().lines().last().expect("an LSN").trim().to_owned();
            let (status, body) = sidecar
                .get(&format!("/wait?lsn={lsn}&timeout_ms=4000"))
                .expect("/wait answers");
            assert_eq!(status, 200, "{body}");
            assert!(!f.redis.exists("item:1"), "round {round}: /wait answered before the delete");
        }
        // Also for a write no rule watches: the position is passed all the same.
        let lsn = f.sql("INSERT INTO unwatched VALUES (1, 'x'); SELECT pg_current_wal_lsn()");
        let lsn = lsn.trim().lines().last().unwrap().trim().to_owned();
        let (status, body) = sidecar.get(&format!("/wait?lsn={lsn}&timeout_ms=4000")).unwrap();
        assert_eq!(status, 200, "{body}");

        let (status, body) = sidecar.get("/wait?lsn=FFFFFFFF/0&timeout_ms=50").unwrap();
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("not yet invalidated up to FFFFFFFF/0"), "{body}");
        for (query, says) in [
            ("lsn=nope&timeout_ms=10", "invalid LSN"),
            ("lsn=0/1", "timeout_ms is missing"),
            ("timeout_ms=10", "lsn is missing"),
            ("lsn=0/1&timeout_ms=-1", "timeout_ms: expected milliseconds"),
            ("lsn=0/1&timeout_ms=999999999", "timeout_ms: expected milliseconds"),
            ("lsn=0/1&timeout_ms=10&x=1", "unknown parameter"),
        ] {
            let (status, body) = sidecar.get(&format!("/wait?{query}")).unwrap();
            assert_eq!((status, body.contains(says)), (400, true), "{query}: {body}");
        }
        // An encoded slash is the same position.
        let (status, body) = sidecar.get("/wait?lsn=0%2F1&timeout_ms=4000").unwrap();
        assert_eq!(status, 200, "{body}");
    }
}
