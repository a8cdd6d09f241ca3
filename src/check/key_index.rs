//! `check` with `[redis] key_index`: whether each Redis gives the key index the keyspace events
//! it needs, or every pattern will be walked there.

use super::{Finding, Kind, Severity};
use crate::redis::{KeyIndexCheck, library};

/// A warning for each reachable target (each primary of a cluster) where the key index cannot
/// work: `notify-keyspace-events` lacks what it needs and this user may not set it, or this user
/// may not subscribe to the index's channels, or (where the flags show `A`) write its probe
/// key. Nothing where the flags are set or `run` can set them, and the rest is allowed.
pub(super) async fn findings(targets: &mut [library::Target]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for target in targets {
        let name = target.target.clone();
        let Some(deleter) = target.deleter() else {
            continue;
        };
        match deleter.key_index_check().await {
            Ok(checks) => {
                for (primary, found) in checks {
                    let name = match primary {
                        Some(primary) => format!("{name} (primary {primary})"),
                        None => name.clone(),
                    };
                    findings.extend(finding(&name, Ok(found)));
                }
            }
            Err(err) => findings.extend(finding(&name, Err(crate::telemetry::chain(&err)))),
        }
    }
    findings
}

/// The finding for what `target` answered, if it needs one.
fn finding(target: &str, found: Result<KeyIndexCheck, String>) -> Option<Finding> {
    let walked = "the key index ([redis] key_index) is unavailable there and every pattern is \
                  resolved by a SCAN walk of the whole keyspace";
    let (message, fix) = match found {
        Ok(KeyIndexCheck::Set | KeyIndexCheck::Settable { .. }) => return None,
        Ok(KeyIndexCheck::Refused { now, reason }) => {
            let flags = now.as_deref().map_or_else(
                || "cannot be read".to_owned(),
                |now| format!("is {now:?}, without all of Kgxen,"),
            );
            (
                format!(
                    "redis {target}: notify-keyspace-events {flags} and cannot be set ({reason}): {walked}"
                ),
                "grant this user CONFIG GET and CONFIG SET (ACL +config|get +config|set), or set \
                 notify-keyspace-events to include Kgxen in the server's configuration"
                    .to_owned(),
            )
        }
        Ok(KeyIndexCheck::NoChannels { reason }) => (
            format!(
                "redis {target}: this user may not subscribe to the key index's channels ({reason}): {walked}"
            ),
            // An ACL grants a subscription pattern only literally, and the index's barrier and
            // probe patterns are new at every start: only every channel will do.
            "grant this user every channel (ACL allchannels, or &*)".to_owned(),
        ),
        Ok(KeyIndexCheck::NoProbe { reason }) => (
            format!(
                "redis {target}: the key index cannot write its probe key ({reason}): {walked}"
            ),
            "allow this user to write the keys invalidator:key-index:* (ACL \
             ~invalidator:key-index:*), or set notify-keyspace-events to the classes it needs \
             instead of A (Kgxen suffices for the index)"
                .to_owned(),
        ),
        Err(reason) => (
            format!(
                "redis {target}: the key index's notify-keyspace-events could not be checked: \
                     {reason}"
            ),
            "run check again once it answers".to_owned(),
        ),
    };
    Some(Finding::general(
        Severity::Warning,
        Kind::KeyIndex,
        None,
        message,
        fix,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_server_that_cannot_give_the_events_is_a_finding() {
        assert_eq!(finding("r", Ok(KeyIndexCheck::Set)), None);
        let settable = KeyIndexCheck::Settable {
            now: String::new(),
            wanted: "Kngxe".to_owned(),
        };
        assert_eq!(finding("r", Ok(settable)), None);
        let refused = KeyIndexCheck::Refused {
            now: Some("Ex".to_owned()),
            reason: "CONFIG SET: NOPERM".to_owned(),
        };
        let found = finding("redis://r", Ok(refused)).expect("a finding");
        assert_eq!(
            (found.severity, found.kind),
            (Severity::Warning, Kind::KeyIndex)
        );
        assert!(found.message.contains("\"Ex\""), "{}", found.message);
        assert!(found.message.contains("NOPERM"), "{}", found.message);
        assert!(
            found
                .fix
                .as_deref()
                .is_some_and(|fix| fix.contains("Kgxen"))
        );
        let no_channels = KeyIndexCheck::NoChannels {
            reason: "SUBSCRIBE: NOPERM".to_owned(),
        };
        let found = finding("redis://r", Ok(no_channels)).expect("a finding");
        assert!(found.message.contains("NOPERM"), "{}", found.message);
        assert!(
            found
                .fix
                .as_deref()
                .is_some_and(|fix| fix.contains("allchannels"))
        );
        let no_probe = KeyIndexCheck::NoProbe {
            reason: "writing the barrier's probe key: NOPERM".to_owned(),
        };
        let found = finding("redis://r", Ok(no_probe)).expect("a finding");
        assert!(found.message.contains("probe key"), "{}", found.message);
        assert!(
            found
                .fix
                .as_deref()
                .is_some_and(|fix| fix.contains("~invalidator:key-index:*"))
        );
    }
}
