//! ExoDrive, the first user: its migrations and its rules from this repository, end to end.

use crate::sidecar::{Cache, Fixture, Mode, Topology, in_both_modes_and_on_a_cluster};

/// A database with `migrations/` applied and the sidecar configured with `rules/`, reading
/// changes as `mode` says and deleting from a Redis of the given topology.
fn exodrive(mode: Mode, topology: Topology) -> Fixture {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files: Vec<_> = std::fs::read_dir(format!("{root}/migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let schema: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let f = Fixture::with_cache(&schema, "", Cache::start(topology));
    let rules = f.setup.dir.path().join("rules");
    std::fs::remove_file(rules.join("rules.toml")).unwrap();
    for entry in std::fs::read_dir(format!("{root}/rules")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, rules.join(path.file_name().unwrap())).unwrap();
    }
    f.use_mode(mode);
    f
}

/// Inserts a row and returns its generated id.
fn insert(f: &Fixture, sql: &str) -> String {
    f.sql(&format!("{sql} RETURNING id")).trim().to_owned()
}

fn car(f: &Fixture, location: &str) -> String {
    insert(
        f,
        &format!(
            "INSERT INTO cars (make, model, year, daily_rate, location_id) \
             VALUES ('Porsche', '911', 2024, 499, '{location}')"
        ),
    )
}

fn customer(f: &Fixture, email: &str) -> String {
    insert(
        f,
        &format!(
            "INSERT INTO customers (email, name, user_id) VALUES ('{email}', 'Ada', gen_random_uuid())"
        ),
    )
}

in_both_modes_and_on_a_cluster! {
    fn should_invalidate_related_caches_on_booking_creation(mode: Mode, topology: Topology) {
        let f = exodrive(mode, topology);
        let _sidecar = f.setup.start();
        let (car, other) = (car(&f, "miami"), car(&f, "miami"));
        let customer = customer(&f, "ada@example.com");
        // The inserts of the cars invalidate `car:{other}` too: cache only once they are
        // acknowledged, or a late delete of them would pass for an over-eager one.
        f.wait_confirmed_while_running(mode);
        // Warm the cache, as the application's getCarAvailability and friends would.
        let stale = [
            format!("availability:{car}:2026-12-01:2026-12-05"),
            format!("availability:{car}:2026-12-10:2026-12-12"),
            format!("customer:{customer}:bookings"),
            "dashboard:metrics:2026-11-26".to_owned(),
            "bookings:active:2026-12-01".to_owned(),
        ];
        let unrelated = [
            format!("availability:{other}:2026-12-01:2026-12-05"),
            format!("car:{other}"),
        ];
        f.redis.set_keys(stale.iter().chain(&unrelated));
        assert!(
            !f.redis
                .scan_keys(&format!("availability:{car}:*"))
                .is_empty()
        );

        let booking = insert(
            &f,
            &format!(
                "INSERT INTO bookings (customer_id, car_id, start_date, end_date, total_amount) \
                 VALUES ('{customer}', '{car}', '2026-12-01', '2026-12-05', 1996)"
            ),
        );
        let stale: Vec<&str> = stale.iter().map(String::as_str).collect();
        f.wait_deleted(&stale);
        assert!(
            f.redis
                .scan_keys(&format!("availability:{car}:*"))
                .is_empty()
        );
        let unrelated: Vec<&str> = unrelated.iter().map(String::as_str).collect();
        f.assert_kept(&unrelated);

        // booking:{id} and booking:{id}:* go on every later change of the booking.
        let details = [
            format!("booking:{booking}"),
            format!("booking:{booking}:details"),
        ];
        f.redis.set_keys(details.iter());
        f.sql(&format!(
            "UPDATE bookings SET notes = 'late pickup' WHERE id = '{booking}'"
        ));
        let details: Vec<&str> = details.iter().map(String::as_str).collect();
        f.wait_deleted(&details);
    }

    fn a_booking_moved_to_another_car_invalidates_both_cars(mode: Mode, topology: Topology) {
        let f = exodrive(mode, topology);
        let _sidecar = f.setup.start();
        let (from, to, bystander) = (car(&f, "miami"), car(&f, "miami"), car(&f, "miami"));
        let customer = customer(&f, "grace@example.com");
        let booking = insert(
            &f,
            &format!(
                "INSERT INTO bookings (customer_id, car_id, start_date, end_date, total_amount) \
                 VALUES ('{customer}', '{from}', '2026-12-01', '2026-12-05', 1996)"
            ),
        );
        let moved = [
            format!("availability:{from}:2026-12-01:2026-12-05"),
            format!("availability:{to}:2026-12-01:2026-12-05"),
        ];
        let kept = format!("availability:{bystander}:2026-12-01:2026-12-05");
        // Let the insert's own invalidation pass before caching.
        f.redis.set_keys([format!("booking:{booking}")]);
        f.sql(&format!(
            "UPDATE bookings SET notes = 'x' WHERE id = '{booking}'"
        ));
        f.wait_deleted(&[&format!("booking:{booking}")]);

        f.redis.set_keys(moved.iter().chain([&kept]));
        f.sql(&format!(
            "UPDATE bookings SET car_id = '{to}' WHERE id = '{booking}'"
        ));
        let moved: Vec<&str> = moved.iter().map(String::as_str).collect();
        f.wait_deleted(&moved);
        f.assert_kept(&[&kept]);
    }
}

#[test]
fn the_repository_rules_pass_check_against_the_migrated_schema() {
    let f = exodrive(Mode::Replication, Topology::Single);
    // Before the first `setup` (or `run`), check warns that the publication does not exist yet.
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = f.setup.command(&["check"]);
    assert!(status.success(), "{out}");
    assert!(
        !out.contains("warning"),
        "every rule table has REPLICA IDENTITY FULL: {out}"
    );
}
