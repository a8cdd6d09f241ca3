//! A PgBouncer in transaction mode in front of a test cluster, as a user might put one (or
//! Supabase's pooler) between invalidator and Postgres.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Watchdog, free_port, scratch_dir, sh_quote, wait_until};

/// A running `pgbouncer` (`pool_mode = transaction`, trust auth) forwarding to 127.0.0.1:`port`.
pub struct PgBouncer {
    /// The port it listens on at 127.0.0.1.
    port: u16,
    /// Its process (run as `postgres`: PgBouncer refuses to run as root).
    child: Child,
    /// Config, log and pid file.
    dir: PathBuf,
    /// Cleans up if the test binary dies first.
    _watchdog: Watchdog,
}

impl PgBouncer {
    /// Starts PgBouncer in front of the server on `target_port`.
    pub fn start(target_port: u16) -> PgBouncer {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("pgbouncer is not installed: apt-get install pgbouncer");
        let dir = scratch_dir("pgbouncer");
        let port = free_port();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={target_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", binary])
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let watchdog = Watchdog::spawn(&format!(
            "kill $(cat {dir}/pgbouncer.pid) 2>/dev/null; rm -rf {dir}",
            dir = sh_quote(&dir.display().to_string())
        ));
        wait_until(Duration::from_secs(10), "pgbouncer listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        PgBouncer {
            port,
            child,
            dir,
            _watchdog: watchdog,
        }
    }

    /// A URL for the `postgres` superuser and database `db` through the pooler.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser's child is pgbouncer itself: killing runuser alone would leave it running.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
