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

/// At most `MAX_WAITERS` requests wait at once; one more is told so with a 503 at once, while
/// `/metrics` and `/readyz` still answer; once the waiters are gone, `/wait` waits again.
#[test]
fn waiters_past_the_bound_are_turned_away_and_the_other_endpoints_still_answer() {
    use std::io::Write as _;
    use std::net::TcpStream;
    use std::time::Duration;

    use invalidator::telemetry::{MAX_WAITERS, WAIT_REQUESTS};

    let f = Fixture::with_mode(SCHEMA, RULES, crate::sidecar::Mode::Replication);
    let sidecar = f.setup.start();
    barrier(&f);
    // Positions never reached, each request on a connection of its own, held open.
    let held: Vec<TcpStream> = (0..MAX_WAITERS)
        .map(|_| {
            let mut stream =
                TcpStream::connect(("127.0.0.1", sidecar.http_port())).expect("connect");
            write!(
                stream,
                "GET /wait?lsn=FFFFFFFF/0&timeout_ms=60000 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .expect("send");
            stream
        })
        .collect();
    crate::support::wait_until(
        Duration::from_secs(20),
        "every held request is waiting",
        || sidecar.metric(WAIT_REQUESTS) == MAX_WAITERS as f64,
    );
    let (status, body) = sidecar
        .get("/wait?lsn=0/1&timeout_ms=4000")
        .expect("/wait answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("are waiting already"), "{body}");
    let (status, _) = sidecar.get("/readyz").expect("/readyz answers");
    assert_eq!(status, 200);
    drop(held);
    crate::support::wait_until(
        Duration::from_secs(20),
        "the dropped requests stop waiting",
        || sidecar.metric(WAIT_REQUESTS) == 0.0,
    );
    let (status, body) = sidecar
        .get("/wait?lsn=0/1&timeout_ms=4000")
        .expect("/wait answers");
    assert_eq!(status, 200, "{body}");
}
