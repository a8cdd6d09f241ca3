//! Rules name any schema, table and column, quoted as SQL quotes them.

use crate::sidecar::{Fixture, in_both_modes};

const SCHEMA: &str = r#"
CREATE SCHEMA "my.schema";
CREATE TABLE "my.schema"."Order Items" (id int PRIMARY KEY, "first name" text, "a|b{c}" text);
ALTER TABLE "my.schema"."Order Items" REPLICA IDENTITY FULL;
CREATE TABLE "my.schema"."order items" (id int PRIMARY KEY);
"#;

const RULES: &str = r#"
[[rule]]
name = "odd"
table = '"my.schema"."Order Items"'
on = ["insert", "update", "delete"]
changed = ['"first name"', '"a|b{c}"']
keys = ['item:{id}', 'name:{"first name"|lower}', 'tag:{{{"a|b{c}"}}}']
"#;

in_both_modes! {
    fn a_rule_on_quoted_identifiers_invalidates(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let (status, out) = f.setup.command(&["check"]);
        assert!(status.success(), "{out}");
        let (status, out) = f.setup.command(&[
            "explain", "--table", r#""my.schema"."Order Items""#, "--op", "insert",
            "--new", r#"{"id": 1, "first name": "Ada", "a|b{c}": "x"}"#,
        ]);
        assert!(status.success(), "{out}");
        assert!(out.contains(r#""tag:{x}""#) && out.contains(r#""name:ada""#), "{out}");
        let _sidecar = f.setup.start();

        f.cache(&["item:1", "name:ada", "tag:{x}", "item:2"]);
        f.sql(r#"INSERT INTO "my.schema"."Order Items" VALUES (1, 'Ada', 'x')"#);
        f.wait_deleted(&["item:1", "name:ada", "tag:{x}"]);

        f.cache(&["item:1", "name:ada", "name:grace", "tag:{x}"]);
        f.sql(r#"UPDATE "my.schema"."Order Items" SET "first name" = 'Grace' WHERE id = 1"#);
        f.wait_deleted(&["item:1", "name:ada", "name:grace", "tag:{x}"]);

        // The name matches exactly: the table that differs only in case has no rule.
        f.cache(&["item:1", "item:3"]);
        f.sql(r#"INSERT INTO "my.schema"."order items" VALUES (3)"#);
        f.sql(r#"DELETE FROM "my.schema"."Order Items" WHERE id = 1"#);
        f.wait_deleted(&["item:1"]);
        f.assert_kept(&["item:2", "item:3"]);
    }
}
