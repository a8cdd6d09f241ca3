//! Private PostgreSQL clusters with logical replication enabled, of the version that
//! `TEST_PG_VERSION` picks (see [`super::pg_install`]).

use super::pg_install::install;
use super::{Watchdog, free_port, scratch_dir, sh_quote, wait_until};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How often `start` tries new ports before it gives up.
const START_ATTEMPTS: usize = 5;

/// Settings every cluster gets; tests add or override with [`PgCluster::start_with`].
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("fsync", "off"),
    // The walsender sends only flushed WAL; with this off every consumer waits for the WAL writer.
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("listen_addresses", "'127.0.0.1'"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("wal_sender_timeout", "'30s'"),
    ("max_connections", "100"),
    ("shared_buffers", "'32MB'"),
    ("log_min_messages", "info"),
];

/// How a cluster is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a checkpoint and shut down cleanly (`pg_ctl -m fast`).
    Fast,
    /// Quit at once like a crash; the next start runs recovery (`pg_ctl -m immediate`).
    Immediate,
}

impl StopMode {
    /// The `pg_ctl -m` argument for this mode.
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A PostgreSQL cluster in a temporary directory, owned by one test (or by the whole binary, see
/// [`PgCluster::shared`]); dropping it stops the server at once and removes the directory.
pub struct PgCluster {
    /// The directory that holds the data directory, the socket and the log.
    dir: PathBuf,
    /// The data directory (`-D`).
    data: PathBuf,
    /// Where `initdb`, `pg_ctl` and `postgres` live.
    server_bin: PathBuf,
    /// Where `psql` and `pg_basebackup` live (the machine's own, whatever the server).
    client_bin: PathBuf,
    /// The server's major version.
    major: u32,
    /// The TCP port on 127.0.0.1; kept across restarts.
    port: u16,
    /// Stops the server and removes `dir` if the test binary dies before `Drop` runs.
    _watchdog: Watchdog,
}

impl PgCluster {
    /// Creates and starts a new cluster with the base settings (logical WAL, no fsync).
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// Creates and starts a new cluster; `settings` are `postgresql.conf` lines (`name`, `value`
    /// as written in the file, strings quoted) that come after and so override the base settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        let cluster = PgCluster::empty();
        run_checked(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(cluster.server_bin.join("initdb"))
                .arg("-D")
                .arg(&cluster.data)
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .args(["-E", "UTF8", "--locale=C"]),
        );
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(cluster.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        // An include at the end lets the harness rewrite its own settings (the port) on retries.
        writeln!(conf, "\ninclude_if_exists = 'harness.conf'").expect("write postgresql.conf");
        cluster.launch(settings)
    }

    /// Makes a physical standby of this cluster that streams from it through the physical slot
    /// `slot` (created here), with `settings` added, and starts it. The data directory is copied
    /// while this cluster is stopped (a cold base backup: `pg_basebackup` is not there for every
    /// version the harness runs), without this cluster's replication slots, so the standby
    /// holds only what it synchronizes itself.
    pub fn start_standby(&self, slot: &str, settings: &[(&str, &str)]) -> PgCluster {
        self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_create_physical_replication_slot('{slot}', true)"),
        );
        self.stop(StopMode::Fast);
        let standby = PgCluster::empty();
        run_checked(
            Command::new("cp")
                .arg("-a")
                .arg(&self.data)
                .arg(&standby.data),
        );
        self.start_again();
        let slots = standby.data.join("pg_replslot");
        for entry in std::fs::read_dir(&slots).expect("read pg_replslot") {
            std::fs::remove_dir_all(entry.expect("pg_replslot entry").path())
                .expect("remove a copied slot");
        }
        std::fs::write(standby.data.join("standby.signal"), "").expect("write standby.signal");
        let conninfo = format!(
            "'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}'",
            self.port
        );
        let slot_name = format!("'{slot}'");
        let mut all = vec![
            ("primary_conninfo", conninfo.as_str()),
            ("primary_slot_name", slot_name.as_str()),
        ];
        all.extend_from_slice(settings);
        standby.launch(&all)
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        let out = self.pg_ctl(&["promote", "-w", "-t", "60"]);
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// A cluster whose data directory does not exist yet, in a fresh directory the postgres
    /// user owns, watched from now on.
    fn empty() -> PgCluster {
        let install = install();
        let dir = scratch_dir("pg");
        let data = dir.join("data");
        run_checked(Command::new("chown").arg("postgres:postgres").arg(&dir));
        let watchdog = Watchdog::spawn(&format!(
            "runuser -u postgres -- {} -D {} stop -m immediate >/dev/null 2>&1; rm -rf {}",
            sh_quote(&install.server_bin.join("pg_ctl").to_string_lossy()),
            sh_quote(&data.to_string_lossy()),
            sh_quote(&dir.to_string_lossy()),
        ));
        PgCluster {
            dir,
            data,
            server_bin: install.server_bin.clone(),
            client_bin: install.client_bin.clone(),
            major: install.major,
            port: 0,
            _watchdog: watchdog,
        }
    }

    /// Starts the server on a free port with the base settings and `settings`, trying other
    /// ports when another process took the one chosen.
    fn launch(mut self, settings: &[(&str, &str)]) -> PgCluster {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            self.write_settings(settings);
            let out = self.pg_ctl(&["start", "-w", "-t", "60"]);
            if out.status.success() {
                return self;
            }
            let log = self.log();
            let port_taken = log.contains("could not bind") || log.contains("already in use");
            if !port_taken || attempt == START_ATTEMPTS {
                panic!(
                    "postgres did not start: {}\n{}\nlog:\n{log}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The major version (13 ... 18) of the PostgreSQL every cluster of this run uses, without
    /// starting one.
    pub fn installed_major() -> u32 {
        install().major
    }

    /// A cluster shared by every test of this binary that only needs its own database (see
    /// [`PgCluster::create_database`]); never stop it. The watchdog removes it after the run.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// The server's major version (13 ... 18), for tests of what differs between versions.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The TCP port the server listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `postgres` superuser and database `db`, over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A URL for another role, with its password, and database `db`, over TCP.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// The directory of the server's Unix socket (also a valid `host` for libpq).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs `sql` (one or more statements) with psql as `postgres` in database `db` and returns
    /// the output (unaligned, tuples only, `|` between columns); panics if psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(out) => out,
            Err(err) => panic!("psql in {db} failed: {err}\nsql: {sql}"),
        }
    }

    /// Like [`PgCluster::psql`], but returns psql's error output instead of panicking.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.try_psql_as("postgres", db, sql)
    }

    /// Like [`PgCluster::psql`], as role `user` (over the Unix socket, where every role is
    /// trusted unless `set_hba` said otherwise): its `ALTER ROLE ... SET` settings apply.
    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> String {
        match self.try_psql_as(user, db, sql) {
            Ok(out) => out,
            Err(err) => panic!("psql as {user} in {db} failed: {err}\nsql: {sql}"),
        }
    }

    /// Like [`PgCluster::try_psql`], as role `user`.
    pub fn try_psql_as(&self, user: &str, db: &str, sql: &str) -> Result<String, String> {
        let mut child = self.spawn_psql(user, db);
        child
            .stdin
            .take()
            .expect("psql stdin is piped")
            .write_all(sql.as_bytes())
            .expect("write sql to psql");
        let out = child.wait_with_output().expect("wait for psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A psql session as `postgres` in `db` that reads statements as the test sends them, so
    /// that a transaction can stay open while the test does something else.
    pub fn session(&self, db: &str) -> PsqlSession {
        PsqlSession(self.spawn_psql("postgres", db))
    }

    /// Starts psql as `user` in `db`, reading SQL from its piped stdin.
    fn spawn_psql(&self, user: &str, db: &str) -> Child {
        // The Unix socket is used because `set_hba` always keeps it open for `postgres`.
        Command::new(self.client_bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql")
    }

    /// Stops the server; panics if it was not running.
    pub fn stop(&self, mode: StopMode) {
        let out = self.pg_ctl(&["stop", "-w", "-t", "60", "-m", mode.arg()]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again with the same data and port.
    pub fn start_again(&self) {
        let out = self.pg_ctl(&["start", "-w", "-t", "60"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Stops the server, sets the epoch of its next transaction id with `pg_resetwal -e` and
    /// starts it again: a cluster that has been through `epoch` wraparounds of the 32-bit xid.
    pub fn set_xid_epoch(&self, epoch: u32) {
        self.stop(StopMode::Fast);
        run_checked(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.server_bin.join("pg_resetwal"))
                .args(["-e", &epoch.to_string(), "-D"])
                .arg(&self.data),
        );
        self.start_again();
    }

    /// Stops the server in `mode` and starts it again.
    pub fn restart(&self, mode: StopMode) {
        self.stop(mode);
        self.start_again();
    }

    /// Takes a base backup of the running server (`pg_basebackup`, WAL included) into a
    /// directory of this cluster and returns it, for [`PgCluster::restore`]. Like every base
    /// backup it holds no replication slots.
    pub fn base_backup(&self) -> PathBuf {
        let backup = self.dir.join(format!("backup-{}", super::unique_name("b")));
        run_checked(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.client_bin.join("pg_basebackup"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-D"])
                .arg(&backup)
                .args(["-X", "stream", "--no-sync", "-c", "fast"]),
        );
        backup
    }

    /// Stops the server and starts `backup` (from [`PgCluster::base_backup`]) in its place, on
    /// the same port: a restore from a base backup, whose WAL ends where the backup ended.
    pub fn restore(&self, backup: &Path) {
        self.stop(StopMode::Fast);
        let replaced = self
            .dir
            .join(format!("replaced-{}", super::unique_name("d")));
        std::fs::rename(&self.data, &replaced).expect("move the data directory aside");
        std::fs::rename(backup, &self.data).expect("put the backup in its place");
        self.start_again();
    }

    /// Whether the server is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    /// The server log so far, for assertion messages and debugging.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join("postgres.log"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Replaces `pg_hba.conf` with `lines` and reloads, returning once the server has read it.
    ///
    /// A first line `local all postgres trust` is always kept, so the harness's own psql (over
    /// the Unix socket) still works; TCP connections follow `lines` only.
    pub fn set_hba(&self, lines: &[&str]) {
        let mut text = String::from("local all postgres trust\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(self.data.join("pg_hba.conf"), text).expect("write pg_hba.conf");
        self.reload();
    }

    /// Makes the server re-read its configuration files and waits until it has.
    pub fn reload(&self) {
        // The postmaster logs this line, then reloads before it accepts the next connection.
        const MARK: &str = "received SIGHUP, reloading configuration files";
        let before = self.log().matches(MARK).count();
        let out = self.pg_ctl(&["reload"]);
        assert!(out.status.success(), "pg_ctl reload failed");
        wait_until(Duration::from_secs(10), "postgres reloaded", || {
            self.log().matches(MARK).count() > before
        });
    }

    /// Writes `harness.conf`: the base settings, the port, the socket dir, then `extra`.
    fn write_settings(&self, extra: &[(&str, &str)]) {
        let mut text = String::new();
        let port = self.port.to_string();
        let socket_dir = format!("'{}'", self.dir.display());
        let own = [
            ("port", port.as_str()),
            ("unix_socket_directories", &socket_dir),
        ];
        for (name, value) in BASE_SETTINGS.iter().chain(&own).chain(extra) {
            text.push_str(&format!("{name} = {value}\n"));
        }
        std::fs::write(self.data.join("harness.conf"), text).expect("write harness.conf");
        run_checked(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(self.data.join("harness.conf")),
        );
    }

    /// Runs `pg_ctl` as the postgres user with `args`, logging to the cluster's log file.
    fn pg_ctl(&self, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.server_bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Errors mean it is already stopped; the directory goes either way.
        let _ = self.pg_ctl(&["stop", "-w", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` and panics with its output if it fails.
pub(super) fn run_checked(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A psql session fed statement by statement; see [`PgCluster::session`].
pub struct PsqlSession(Child);

impl PsqlSession {
    /// Sends `sql` (complete statements) and returns once psql has it; psql runs it in turn.
    pub fn send(&mut self, sql: &str) {
        let stdin = self.0.stdin.as_mut().expect("psql stdin is piped");
        stdin.write_all(sql.as_bytes()).expect("write sql to psql");
        stdin.flush().expect("flush sql to psql");
    }

    /// Ends the input and waits for psql; panics if a statement failed.
    pub fn finish(mut self) {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().expect("wait for psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
