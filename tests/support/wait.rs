//! Waiting on conditions with a deadline, so tests never sleep blindly.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long to pause between two checks of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `f` until it returns true, and panics naming `what` if that has not happened within
/// `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The async twin of [`wait_until`], for conditions that need `.await`; it yields to the runtime
/// between checks instead of blocking the thread.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
