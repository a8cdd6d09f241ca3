//! The README's client snippets of the guarded read path (ioredis, redis-py, the redis crate),
//! run against a real Redis with the library loaded. Each snippet is a file in
//! `tests/snippets/`, and the README must hold it verbatim. Node's ioredis and Python's redis
//! come from `.clients/` (installed there by `.ci/run`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::RedisServer;

/// What every snippet's scenario returns: a fill, a hit, a fill refused because the key was
/// deleted during the load (nothing cached), a fill, the cached value, and a fill after waiting
/// for another reader's lease to expire.
const EXPECTED: [&str; 7] = ["v1", "v1", "old", "0", "new", "new", "w"];

/// The snippet file `name` in `tests/snippets/`, which the README holds verbatim.
fn snippet(name: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/tests/snippets/{name}")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(
        readme.contains(&text),
        "README.md does not hold tests/snippets/{name} verbatim"
    );
    text
}

/// The project-local client packages for `language` (`node`, `python`).
fn clients(language: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".clients")
        .join(language);
    assert!(
        dir.exists(),
        "{} is missing: run .ci/run (it installs the client packages)",
        dir.display()
    );
    dir
}

/// A Redis server with the library loaded.
async fn redis() -> RedisServer {
    let redis = RedisServer::start();
    let mut deleter = invalidator::redis::Deleter::connect(&redis.url())
        .await
        .unwrap();
    deleter.load_library().await.unwrap();
    redis
}

/// Runs `command` and parses the JSON list it prints.
fn run(command: &mut Command) -> Vec<String> {
    let out = command.output().expect("run the snippet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test]
async fn the_ioredis_snippet_fills_hits_and_refuses_a_stale_fill() {
    let redis = redis().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("guarded_read.mjs"),
        snippet("guarded_read.mjs"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        clients("node").join("node_modules"),
        dir.path().join("node_modules"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.mjs"),
        r#"import Redis from "ioredis";
import { cached } from "./guarded_read.mjs";
const redis = new Redis(Number(process.env.REDIS_PORT));
const out = [];
out.push(await cached(redis, "k", async () => "v1"));
out.push(await cached(redis, "k", async () => "v2"));
await redis.unlink("k");
out.push(await cached(redis, "k", async () => { await redis.unlink("k"); return "old"; }));
out.push(String(await redis.exists("k")));
out.push(await cached(redis, "k", async () => "new"));
out.push(await redis.get("k"));
await redis.fcall("invalidator_get", 1, "k2", 100);
out.push(await cached(redis, "k2", async () => "w"));
console.log(JSON.stringify(out));
await redis.quit();
"#,
    )
    .unwrap();
    let result = run(Command::new("node")
        .arg("main.mjs")
        .current_dir(dir.path())
        .env("REDIS_PORT", redis.port().to_string()));
    assert_eq!(result, EXPECTED);
}

#[tokio::test]
async fn the_redis_py_snippet_fills_hits_and_refuses_a_stale_fill() {
    let redis = redis().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("guarded_read.py"),
        snippet("guarded_read.py"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.py"),
        r#"import json, os
import redis
from guarded_read import cached

r = redis.Redis(port=int(os.environ["REDIS_PORT"]))
out = [cached(r, "k", lambda: "v1"), cached(r, "k", lambda: "v2")]
r.unlink("k")
def stale():
    r.unlink("k")
    return "old"
out.append(cached(r, "k", stale))
out.append(str(r.exists("k")))
out.append(cached(r, "k", lambda: "new"))
out.append(r.get("k").decode())
r.fcall("invalidator_get", 1, "k2", 100)
out.append(cached(r, "k2", lambda: "w"))
print(json.dumps(out))
"#,
    )
    .unwrap();
    let path = format!("{}:{}", clients("python").display(), dir.path().display());
    let result = run(Command::new("python3")
        .arg("main.py")
        .current_dir(dir.path())
        .env("PYTHONPATH", path)
        .env("REDIS_PORT", redis.port().to_string()));
    assert_eq!(result, EXPECTED);
}

include!("snippets/guarded_read.rs");

#[tokio::test]
async fn the_redis_crate_snippet_fills_hits_and_refuses_a_stale_fill() {
    snippet("guarded_read.rs");
    let redis = redis().await;
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut out = vec![
        cached(&mut con, "k", || async { "v1".to_owned() })
            .await
            .unwrap(),
        cached(&mut con, "k", || async { "v2".to_owned() })
            .await
            .unwrap(),
    ];
    let _: i64 = redis::cmd("UNLINK")
        .arg("k")
        .query_async(&mut con)
        .await
        .unwrap();
    let other = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stale = || {
        let mut other = other.clone();
        async move {
            let _: i64 = redis::cmd("UNLINK")
                .arg("k")
                .query_async(&mut other)
                .await
                .unwrap();
            "old".to_owned()
        }
    };
    out.push(cached(&mut con, "k", stale).await.unwrap());
    out.push(if redis.exists("k") { "1" } else { "0" }.to_owned());
    out.push(
        cached(&mut con, "k", || async { "new".to_owned() })
            .await
            .unwrap(),
    );
    let value: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .unwrap();
    out.push(value);
    let _: redis::Value = redis::cmd("FCALL")
        .arg("invalidator_get")
        .arg(1)
        .arg("k2")
        .arg(100)
        .query_async(&mut con)
        .await
        .unwrap();
    out.push(
        cached(&mut con, "k2", || async { "w".to_owned() })
            .await
            .unwrap(),
    );
    assert_eq!(out, EXPECTED);
}
