//! A guard process that cleans up a server once the test binary is gone.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// A `sh` process that waits for a process to exit and then runs a cleanup script; dropping the
/// watchdog ends it without running the script (the owner cleans up itself).
pub struct Watchdog {
    /// The `sh` process that polls and then cleans up.
    child: Child,
}

impl Watchdog {
    /// Starts a watchdog that runs `cleanup` (a `sh` script) once this test process has exited.
    pub fn spawn(cleanup: &str) -> Watchdog {
        Watchdog::spawn_for(std::process::id(), cleanup)
    }

    /// Starts a watchdog that runs `cleanup` once the process `pid` has exited.
    pub fn spawn_for(pid: u32, cleanup: &str) -> Watchdog {
        let script = format!("while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}");
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so a Ctrl-C aimed at `cargo test` does not kill the watchdog
            // before it has cleaned up.
            .process_group(0)
            .spawn()
            .expect("spawn the watchdog shell");
        Watchdog { child }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Errors mean it is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
