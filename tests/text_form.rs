//! Keys do not depend on who writes: the values a key is rendered from have one text form
//! (UTC ISO timestamps, ISO dates, `postgres` intervals, shortest exact floats, hex bytea),
//! whatever the writing session, the writer's role or the sidecar's role set, in both modes.

use crate::sidecar::{Fixture, Mode, Setup, in_both_modes};
use crate::support::{PgCluster, unique_name};

const SCHEMA: &str = "
CREATE TABLE moments (id int PRIMARY KEY, at timestamptz, day date, span interval,
                      ratio float8, blob bytea);
ALTER TABLE moments REPLICA IDENTITY FULL;
";

const RULES: &str = r#"
[[rule]]
name = "moments"
table = "moments"
keys = ["at:{at}", "day:{day}", "span:{span}", "ratio:{ratio}", "blob:{blob}"]
"#;

/// The keys of the row [`ROW`] inserts, in the pinned text form.
const KEYS: [&str; 5] = [
    "at:2024-01-02 03:04:05+00",
    "day:2024-01-02",
    "span:1 day 02:00:00",
    "ratio:0.30000000000000004",
    r"blob:\x0102",
];

/// One row whose every value prints differently under [`OTHER_SETTINGS`].
const ROW: &str = r"INSERT INTO moments VALUES (1, '2024-01-02 03:04:05+00', '2024-01-02',
    '1 day 2 hours', 0.30000000000000004, '\x0102')";

/// Settings under which each of the row's values prints otherwise: `01/01/2024 22:04:05 EST`,
/// `02/01/2024`, `P1DT2H`, `0.3`, `\001\002`.
const OTHER_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "America/New_York"),
    ("DateStyle", "SQL, DMY"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "0"),
    ("bytea_output", "escape"),
];

/// `SET` statements for [`OTHER_SETTINGS`].
fn set_other_settings() -> String {
    OTHER_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';\n"))
        .collect()
}

in_both_modes! {
    /// A writer whose session uses another time zone, date style, interval style, float
    /// precision and bytea format invalidates the same keys as any other writer.
    fn keys_do_not_depend_on_the_writers_session_settings(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let _sidecar = f.setup.start();
        f.cache(&KEYS);
        f.sql(&format!("{}{ROW}", set_other_settings()));
        f.wait_deleted(&KEYS);
        f.cache(&KEYS);
        f.sql(&format!("{}DELETE FROM moments WHERE id = 1", set_other_settings()));
        f.wait_deleted(&KEYS);
    }

    /// `ALTER ROLE ... SET` of the writer and of the sidecar's own role change nothing either:
    /// not the keys `run` deletes, nor those `explain --where` shows.
    fn keys_do_not_depend_on_the_roles_settings(mode: Mode) {
        let f = Fixture::new(SCHEMA, RULES);
        let (writer, sidecar_role) = (unique_name("writer"), unique_name("sidecar"));
        let mut sql = format!(
            "CREATE ROLE {writer} LOGIN; GRANT ALL ON moments TO {writer};
             CREATE ROLE {sidecar_role} LOGIN SUPERUSER PASSWORD 'pw';\n"
        );
        for role in [&writer, &sidecar_role] {
            for (name, value) in OTHER_SETTINGS {
                sql.push_str(&format!("ALTER ROLE {role} SET {name} = '{value}';\n"));
            }
        }
        f.sql(&sql);
        let cluster = PgCluster::shared();
        let url = cluster.url_as(&sidecar_role, "pw", &f.db);
        // The fixture's slot name, so that the fixture drops the slot at the end.
        let setup = Setup::with_slot(&url, &f.redis.url(), RULES, &f.setup.slot);
        if mode == Mode::Notify {
            setup.notify_mode();
            let (status, out) = setup.command(&["setup"]);
            assert!(status.success(), "{out}");
        }
        let _sidecar = setup.start();
        f.cache(&KEYS);
        cluster.psql_as(&writer, &f.db, ROW);
        f.wait_deleted(&KEYS);

        let (status, out) = setup.command(&[
            "explain", "--table", "moments", "--op", "delete", "--where", "id = 1",
        ]);
        assert!(status.success(), "{out}");
        for key in KEYS {
            let quoted = serde_json::to_string(key).unwrap();
            assert!(out.contains(&quoted), "explain does not show {quoted}:\n{out}");
        }

        f.cache(&KEYS);
        cluster.psql_as(&writer, &f.db, "DELETE FROM moments WHERE id = 1");
        f.wait_deleted(&KEYS);
    }
}
