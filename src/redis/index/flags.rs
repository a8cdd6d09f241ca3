//! `notify-keyspace-events`: which of its flags the index needs, and the value that adds them to
//! whatever the server already has.

/// The flags the index needs: keyspace channels (`K`) with the `new` event (`n`), which makes it
/// complete, and the generic (`g`), expired (`x`) and evicted (`e`) events, which remove keys
/// again so the index does not grow without bound.
const NEEDED: [char; 5] = ['K', 'n', 'g', 'x', 'e'];

/// The classes `A` stands for in every Redis from 7.0 on (`n`, `m`, `K` and `E` are never
/// part of it).
const ALIAS_A: &str = "g$lshzxetd";

/// Whether the flag string `flags` turns on `flag`, directly or through the `A` alias.
fn has(flags: &str, flag: char) -> bool {
    flags.contains(flag) || (flags.contains('A') && ALIAS_A.contains(flag))
}

/// The flags of [`NEEDED`] that `flags` lacks, in that order.
pub(super) fn missing(flags: &str) -> String {
    NEEDED.iter().filter(|&&f| !has(flags, f)).collect()
}

/// The value to set so that the server has every needed flag and keeps those it had: `None`
/// when it has them all already.
pub(super) fn merged(flags: &str) -> Option<String> {
    let missing = missing(flags);
    (!missing.is_empty()).then(|| format!("{flags}{missing}"))
}

/// Whether `CONFIG GET` can show the `new` flag in `flags`: Redis prints `A` alone when every
/// class of it is on, and leaves `n` out then although it is not part of `A`.
pub(super) fn shows_new(flags: &str) -> bool {
    !flags.contains('A')
}

/// Whether the barrier proves the index complete: keyspace channels (`K`) with the `new` event,
/// read from `flags` where they can show it, else from the barrier's probe key (`probe`: whether
/// its creation was seen; `None` when the barrier had no probe). The removing events only keep
/// the index small, so losing them is no reason to distrust it.
pub(super) fn proves(flags: &str, probe: Option<bool>) -> bool {
    let new = if shows_new(flags) {
        has(flags, 'n')
    } else {
        probe == Some(true)
    };
    has(flags, 'K') && new
}

/// The value of `notify-keyspace-events` in a `CONFIG GET` reply: a flat array of name and
/// value (RESP2) or a map (RESP3).
pub(super) fn from_reply(reply: &::redis::Value) -> Option<String> {
    let pairs: std::collections::HashMap<String, String> =
        ::redis::from_redis_value_ref(reply).ok()?;
    pairs.get("notify-keyspace-events").cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_set_gets_every_needed_flag() {
        assert_eq!(merged(""), Some("Kngxe".to_owned()));
        assert!(!proves("", None));
    }

    #[test]
    fn the_flags_already_set_are_kept_and_only_the_missing_added() {
        // Keyevent channels for some other consumer, and the list class.
        assert_eq!(merged("lE"), Some("lEKngxe".to_owned()));
        assert_eq!(merged("gxeK"), Some("gxeKn".to_owned()));
        assert_eq!(merged("Kgxen"), None);
        assert_eq!(merged("$lshzxeKEn"), Some("$lshzxeKEng".to_owned()));
    }

    #[test]
    fn the_a_alias_covers_g_x_and_e_but_not_k_or_n() {
        assert_eq!(missing("A"), "Kn");
        assert_eq!(merged("AKE"), Some("AKEn".to_owned()));
        // Redis reads `AKn` back as `AK`: n is set again, it cannot be seen.
        assert_eq!(merged("AK"), Some("AKn".to_owned()));
        assert!(!shows_new("AK") && shows_new("gxeKn"));
    }

    #[test]
    fn k_and_n_prove_the_index_n_from_the_probe_where_the_flags_hide_it() {
        assert!(proves("gxeKn", None));
        assert!(proves("Kn", Some(false)));
        assert!(!proves("Kgxe", None));
        assert!(!proves("Egxen", None));
        assert!(proves("AK", Some(true)));
        assert!(!proves("AK", Some(false)));
        assert!(!proves("AK", None));
        assert!(!proves("AE", Some(true)));
    }

    #[test]
    fn the_value_is_read_from_either_reply_shape() {
        use ::redis::Value;
        let name = || Value::BulkString(b"notify-keyspace-events".to_vec());
        let value = || Value::BulkString(b"AKE".to_vec());
        assert_eq!(
            from_reply(&Value::Array(vec![name(), value()])).as_deref(),
            Some("AKE")
        );
        assert_eq!(
            from_reply(&Value::Map(vec![(name(), value())])).as_deref(),
            Some("AKE")
        );
        assert_eq!(from_reply(&Value::Array(vec![])), None);
    }
}
