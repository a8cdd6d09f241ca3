//! Keeps the guarded-fill library loaded while `run` runs.
//!
//! `setup` loads the Redis Functions library on every target, but a Redis that keeps nothing on
//! disk loses it with every restart, as it loses its keys (which is harmless for a cache); and
//! `FUNCTION FLUSH` removes it. Until it is back every `FCALL invalidator_get` fails, and with
//! it every read of an application on the guarded fill. So `run` looks every few seconds and
//! loads it again where it is missing; it never replaces an older or newer version (that is
//! `setup`'s decision) and stops looking at a target that refuses the load for good (an ACL
//! without `FUNCTION`, a server without Functions), after saying so once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Classify;
use crate::redis::library::{self, State};
use crate::redis::{DeleteError, Deleter, DeleterOptions};

/// How often each target is asked.
const INTERVAL: Duration = Duration::from_secs(5);

/// Looks after the library on every URL in `urls` until `stop` fires.
pub(super) async fn keep_loaded(
    urls: Vec<String>,
    options: DeleterOptions,
    stop: CancellationToken,
) {
    let mut targets: Vec<(String, Option<Deleter>)> =
        urls.into_iter().map(|url| (url, None)).collect();
    loop {
        let mut kept = Vec::with_capacity(targets.len());
        for (url, deleter) in targets {
            match look_after(&url, deleter, &options).await {
                Ok(deleter) => kept.push((url, Some(deleter))),
                Err(e) if e.is_transient() => kept.push((url, None)),
                Err(e) => tracing::warn!(target_url = %crate::redact::redact(&url),
                    error = %crate::telemetry::chain(&e),
                    "cannot keep the Redis Functions library {} loaded here; no longer \
                     checking this target", library::NAME),
            }
        }
        targets = kept;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// Loads the library on the Redis at `url` if some primary lacks it and none has a newer one;
/// the connection to use next time.
async fn look_after(
    url: &str,
    deleter: Option<Deleter>,
    options: &DeleterOptions,
) -> Result<Deleter, DeleteError> {
    let mut deleter = match deleter {
        Some(deleter) => deleter,
        None => Deleter::connect_with(url, options.clone()).await?,
    };
    let nodes = deleter.library_states().await?;
    let missing: Vec<&str> = nodes
        .iter()
        .filter(|n| n.state == State::Missing)
        .map(|n| n.node.as_str())
        .collect();
    if missing.is_empty() || nodes.iter().any(|n| matches!(n.state, State::Newer(_))) {
        return Ok(deleter);
    }
    deleter.load_library().await?;
    tracing::warn!(target_url = %deleter.target(), missing = %missing.join(","),
        "the Redis Functions library {} was missing (a restart that kept nothing, FUNCTION \
         FLUSH, or no `invalidator setup` yet); loaded it", library::NAME);
    Ok(deleter)
}
