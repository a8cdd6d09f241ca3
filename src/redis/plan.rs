//! How a set of glob patterns becomes SCAN passes: pure code, no I/O.
//!
//! Every SCAN pass walks the whole keyspace, whatever its MATCH (Redis filters after it has
//! fetched each key), so the cost of resolving patterns is the number of passes. Two ways cut it:
//! - coalescing drops a pattern when a wider `prefix*` pattern of the same batch covers it;
//! - above [`SHARED_PASS_THRESHOLD`] patterns, one shared pass returns the keys under the common
//!   literal prefix and the client filters them with a Redis-faithful matcher.
//!
//! The shared walk's patterns come and go one join at a time, so its filter is a [`JoinedPass`]
//! that patterns are added to and removed from, never rebuilt from all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A Redis-faithful glob matcher: `matcher(pattern, subject)`.
pub type GlobMatcher = fn(&[u8], &[u8]) -> bool;

/// Above this many patterns (after coalescing) in one batch, they share one SCAN pass.
///
/// A per-pattern pass costs the server one walk of the keyspace but sends back only the matches;
/// the shared pass walks once but sends every key under the common prefix, and each one costs the
/// server about as much as several MATCH comparisons to reply and the client some matching. Up to
/// about eight patterns the extra walks are the cheaper side; past that one walk wins, and it wins
/// big for the batches that matter (a bulk update renders hundreds of `entity:{id}:*` patterns).
pub const SHARED_PASS_THRESHOLD: usize = 8;

/// The bytes that make a glob pattern more than literal text.
const GLOB_BYTES: &[u8] = b"*?[\\";

/// One walk over the keyspace with SCAN.
#[derive(Clone, Debug)]
pub struct ScanPass {
    /// The MATCH argument, or `None` to have SCAN return every key.
    match_arg: Option<Vec<u8>>,
    /// Decides which returned keys to delete; `None` when MATCH alone decides.
    filter: Option<KeyFilter>,
}

impl ScanPass {
    /// The MATCH argument to send, if any.
    pub fn match_arg(&self) -> Option<&[u8]> {
        self.match_arg.as_deref()
    }

    /// Whether a key that SCAN returned in this pass is to be deleted.
    pub fn wants(&self, key: &[u8]) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|filter| filter.matches(key))
    }
}

/// The client-side filter of a shared pass: any of several patterns.
#[derive(Clone, Debug)]
struct KeyFilter {
    /// Literal prefixes of the `prefix*` patterns, sorted, none a prefix of another (see
    /// [`prefix_free`]), so the only one that can begin a key is the greatest one not above it: a
    /// binary search, whatever the number of patterns.
    prefixes: Vec<Vec<u8>>,
    /// The other patterns, matched one by one.
    globs: Vec<Vec<u8>>,
    /// The matcher for `globs`.
    matcher: GlobMatcher,
}

impl KeyFilter {
    /// Whether `key` matches any of the patterns.
    fn matches(&self, key: &[u8]) -> bool {
        let below = self
            .prefixes
            .partition_point(|prefix| prefix.as_slice() <= key);
        below
            .checked_sub(1)
            .is_some_and(|i| key.starts_with(&self.prefixes[i]))
            || self.globs.iter().any(|glob| (self.matcher)(glob, key))
    }
}

/// Sorts `prefixes` and drops every one that another begins: the shorter covers the longer.
///
/// In a prefix-free sorted list, a prefix `P` of a key `K` is the greatest entry `<= K`: any `Q`
/// with `P < Q <= K` would have to begin with `P`.
fn prefix_free(mut prefixes: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    prefixes.sort_unstable();
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        if !kept.last().is_some_and(|last| prefix.starts_with(last)) {
            kept.push(prefix);
        }
    }
    kept
}

/// Returns the patterns left once every pattern that a wider `prefix*` pattern of the set covers
/// is dropped, sorted so passes run in a stable order.
///
/// `P = L*` where `L` holds no glob byte covers any other pattern `Q` that begins with `L`: glob
/// matching consumes `L` literally, so every key that `Q` matches begins with `L`. Nothing subtler
/// is attempted; a pattern kept in vain costs one pass, a pattern dropped in error a missed key.
pub fn coalesce(patterns: &HashSet<String>) -> Vec<&str> {
    let prefixes: HashSet<&[u8]> = patterns
        .iter()
        .filter_map(|pattern| prefix_wildcard(pattern.as_bytes()))
        .collect();
    let mut kept: Vec<&str> = patterns
        .iter()
        .map(String::as_str)
        .filter(|pattern| !covered(pattern.as_bytes(), &prefixes))
        .collect();
    kept.sort_unstable();
    kept
}

/// Plans the SCAN passes for coalesced `patterns`: one per pattern up to the threshold, else one
/// shared pass filtered on the client with `matcher`.
pub fn passes(patterns: &[&str], matcher: GlobMatcher) -> Vec<ScanPass> {
    if patterns.len() <= SHARED_PASS_THRESHOLD {
        return patterns
            .iter()
            .map(|pattern| ScanPass {
                match_arg: Some(pattern.as_bytes().to_vec()),
                filter: None,
            })
            .collect();
    }
    vec![shared_pass(patterns, matcher)]
}

/// One pass for all of `patterns` (coalesced or not), filtered on the client with `matcher`;
/// a lone pattern is its own MATCH, so the server sends back only its matches.
pub fn shared_pass(patterns: &[&str], matcher: GlobMatcher) -> ScanPass {
    let match_arg = match patterns {
        [one] => Some(one.as_bytes().to_vec()),
        _ => {
            let common = common_prefix(patterns.iter().map(|p| literal_prefix(p.as_bytes())));
            // Every pattern begins with `common` literally, so `common*` returns a superset of
            // the matches; an empty prefix would make MATCH `*`, which only costs comparisons.
            (!common.is_empty()).then(|| [common, b"*"].concat())
        }
    };
    let mut prefixes = Vec::new();
    let mut globs = Vec::new();
    for pattern in patterns {
        match prefix_wildcard(pattern.as_bytes()) {
            Some(prefix) => prefixes.push(prefix.to_vec()),
            None => globs.push(pattern.as_bytes().to_vec()),
        }
    }
    ScanPass {
        match_arg,
        filter: Some(KeyFilter {
            prefixes: prefix_free(prefixes),
            globs,
            matcher,
        }),
    }
}

/// The pass of a walk that patterns join and leave: wants what [`shared_pass`] of the patterns
/// joined now would want, with the same MATCH argument, at a cost per join or completion of a
/// few hash and tree operations, whatever the number of patterns.
#[derive(Debug)]
pub struct JoinedPass {
    /// Every joined pattern, with how many joiners hold it.
    patterns: HashMap<Vec<u8>, usize>,
    /// The literal prefixes of the joined patterns, with how many patterns have each: their
    /// common prefix is that of the least and the greatest.
    literals: BTreeMap<Vec<u8>, usize>,
    /// Literal prefixes of the `prefix*` patterns; one may begin another.
    prefixes: HashSet<Vec<u8>>,
    /// The lengths of `prefixes`, with how many have each (see [`JoinedPass::wants`]).
    lengths: BTreeMap<usize, usize>,
    /// The other patterns, matched one by one.
    globs: BTreeSet<Vec<u8>>,
    /// The matcher for `globs`.
    matcher: GlobMatcher,
}

impl JoinedPass {
    /// A pass that no pattern has joined: it wants nothing.
    pub fn new(matcher: GlobMatcher) -> JoinedPass {
        JoinedPass {
            patterns: HashMap::new(),
            literals: BTreeMap::new(),
            prefixes: HashSet::new(),
            lengths: BTreeMap::new(),
            globs: BTreeSet::new(),
            matcher,
        }
    }

    /// Adds one joiner's `pattern`.
    pub fn join(&mut self, pattern: &[u8]) {
        let held = self.patterns.entry(pattern.to_vec()).or_insert(0);
        *held += 1;
        if *held > 1 {
            return;
        }
        *self
            .literals
            .entry(literal_prefix(pattern).to_vec())
            .or_insert(0) += 1;
        match prefix_wildcard(pattern) {
            Some(prefix) => {
                self.prefixes.insert(prefix.to_vec());
                *self.lengths.entry(prefix.len()).or_insert(0) += 1;
            }
            None => {
                self.globs.insert(pattern.to_vec());
            }
        }
    }

    /// Removes one joiner's `pattern` (added before with [`JoinedPass::join`]).
    pub fn leave(&mut self, pattern: &[u8]) {
        let Some(held) = self.patterns.get_mut(pattern) else {
            return;
        };
        *held -= 1;
        if *held > 0 {
            return;
        }
        self.patterns.remove(pattern);
        let literal = literal_prefix(pattern);
        if let Some(count) = self.literals.get_mut(literal) {
            *count -= 1;
            if *count == 0 {
                self.literals.remove(literal);
            }
        }
        match prefix_wildcard(pattern) {
            Some(prefix) => {
                self.prefixes.remove(prefix);
                if let Some(count) = self.lengths.get_mut(&prefix.len()) {
                    *count -= 1;
                    if *count == 0 {
                        self.lengths.remove(&prefix.len());
                    }
                }
            }
            None => {
                self.globs.remove(pattern);
            }
        }
    }

    /// The MATCH argument to send, if any: a lone pattern itself, else the joined patterns'
    /// common literal prefix followed by `*` (see [`shared_pass`]).
    pub fn match_arg(&self) -> Option<Vec<u8>> {
        if self.patterns.len() == 1 {
            return self.patterns.keys().next().cloned();
        }
        let (first, last) = (
            self.literals.keys().next()?,
            self.literals.keys().next_back()?,
        );
        // In sorted order the common prefix of all is that of the two ends.
        let common = common_prefix([first.as_slice(), last.as_slice()].into_iter());
        (!common.is_empty()).then(|| [common, b"*"].concat())
    }

    /// Whether a key that SCAN returned is to be deleted.
    ///
    /// A prefix begins the key only if it is the key's first bytes of its own length, so the
    /// key's beginning of each length a prefix has is looked up: a hash lookup per distinct
    /// length (a handful where templates render ids into one shape), instead of a search of
    /// sorted prefixes whose comparisons grow with their number. It runs for every key of every
    /// page, which made it most of the walk's own time under a stream of joins.
    pub fn wants(&self, key: &[u8]) -> bool {
        let prefixed = self
            .lengths
            .range(..=key.len())
            .any(|(&len, _)| self.prefixes.contains(&key[..len]));
        prefixed || self.globs.iter().any(|glob| (self.matcher)(glob, key))
    }
}

/// For a pattern of the form `L*` with no glob byte in `L`, returns `L`.
fn prefix_wildcard(pattern: &[u8]) -> Option<&[u8]> {
    let prefix = pattern.strip_suffix(b"*")?;
    (!prefix.iter().any(|b| GLOB_BYTES.contains(b))).then_some(prefix)
}

/// Whether a `prefix*` pattern other than `pattern` itself covers `pattern`.
fn covered(pattern: &[u8], prefixes: &HashSet<&[u8]>) -> bool {
    let own = prefix_wildcard(pattern);
    // A covering prefix has no glob byte, so it lies within the pattern's literal prefix.
    (0..=literal_prefix(pattern).len()).any(|len| {
        let candidate = &pattern[..len];
        Some(candidate) != own && prefixes.contains(candidate)
    })
}

/// The bytes of `pattern` before its first glob byte.
fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = pattern
        .iter()
        .position(|b| GLOB_BYTES.contains(b))
        .unwrap_or(pattern.len());
    &pattern[..end]
}

/// The longest common prefix of `items` (empty for none).
fn common_prefix<'a>(mut items: impl Iterator<Item = &'a [u8]>) -> &'a [u8] {
    let Some(mut common) = items.next() else {
        return &[];
    };
    for item in items {
        let same = common.iter().zip(item).take_while(|(a, b)| a == b).count();
        common = &common[..same];
    }
    common
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A stub matcher that understands only `*`, enough to test the planning around it.
    fn star_only(pattern: &[u8], subject: &[u8]) -> bool {
        match pattern.split_first() {
            None => subject.is_empty(),
            Some((b'*', rest)) => (0..=subject.len()).any(|i| star_only(rest, &subject[i..])),
            Some((c, rest)) => subject.first() == Some(c) && star_only(rest, &subject[1..]),
        }
    }

    fn set(patterns: &[&str]) -> HashSet<String> {
        patterns.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_prefix_wildcard_covers_patterns_that_begin_with_its_prefix() {
        let patterns = set(&[
            "user:*",
            "user:1:*",
            "user:?",
            "user:[ab]*",
            "users*",
            "order:*",
        ]);
        assert_eq!(coalesce(&patterns), ["order:*", "user:*", "users*"]);
    }

    #[test]
    fn a_lone_star_covers_everything() {
        assert_eq!(coalesce(&set(&["*", "a*", r"b\*", "[x]"])), ["*"]);
    }

    #[test]
    fn escaped_or_wildcard_prefixes_cover_nothing() {
        let patterns = set(&[r"user:\*", r"user:\*:x", "a?*", "a?b", "[ab]*", "[ab]c"]);
        assert_eq!(coalesce(&patterns).len(), patterns.len());
    }

    #[test]
    fn a_pattern_does_not_cover_itself() {
        assert_eq!(coalesce(&set(&["a:*", "a:**"])), ["a:*"]);
        assert_eq!(coalesce(&set(&["a:*"])), ["a:*"]);
    }

    #[test]
    fn few_patterns_get_one_pass_each_with_match() {
        let passes = passes(&["a:*", "b:?"], star_only);
        let args: Vec<_> = passes
            .iter()
            .map(|p| p.match_arg().unwrap_or(b""))
            .collect();
        assert_eq!(args, [&b"a:*"[..], b"b:?"]);
        assert!(passes.iter().all(|p| p.wants(b"anything")));
    }

    #[test]
    fn many_patterns_share_one_pass_under_their_common_prefix() {
        let patterns: Vec<String> = (0..20).map(|i| format!("car:{i}:*")).collect();
        let mut refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        refs.push("car:*:x");
        let passes = passes(&refs, star_only);
        assert_eq!(passes.len(), 1);
        assert_eq!(passes[0].match_arg(), Some(&b"car:*"[..]));
        assert!(passes[0].wants(b"car:7:avail"));
        assert!(passes[0].wants(b"car:99:x"));
        assert!(!passes[0].wants(b"car:99:y"));
        assert!(!passes[0].wants(b"car:"));
    }

    #[test]
    fn the_prefix_index_finds_the_one_prefix_that_begins_a_key() {
        let mut patterns: Vec<String> = (0..200).map(|i| format!("slots:{i}:*")).collect();
        // Not coalesced on purpose: the index must cope with prefixes that begin others.
        patterns.extend(["slots:1*".to_owned(), "s*".to_owned(), "t:x*".to_owned()]);
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let pass = &passes(&refs, star_only)[0];
        for key in [
            &b"slots:150:2026"[..],
            b"slots:1",
            b"sx",
            b"s",
            b"t:x",
            b"t:xyz",
        ] {
            assert!(pass.wants(key), "{}", String::from_utf8_lossy(key));
        }
        for key in [&b"t:"[..], b"t:y", b"", b"a", b"u"] {
            assert!(!pass.wants(key), "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn prefix_free_keeps_the_shortest_of_each_chain() {
        let prefixes = ["ab", "a", "abc", "b", "ba", "c:1:", "c:10:"];
        let kept = prefix_free(prefixes.iter().map(|p| p.as_bytes().to_vec()).collect());
        assert_eq!(kept, [&b"a"[..], b"b", b"c:10:", b"c:1:"]);
    }

    #[test]
    fn a_shared_pass_without_common_prefix_scans_everything() {
        let patterns: Vec<String> = (0..10).map(|i| format!("{i}x*")).collect();
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let passes = passes(&refs, star_only);
        assert_eq!(passes[0].match_arg(), None);
        assert!(passes[0].wants(b"3x"));
        assert!(!passes[0].wants(b"x3"));
    }

    /// A pattern, or a key, over few bytes, so that prefixes begin one another often.
    fn short(bytes: &'static str, max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(bytes.as_bytes()), 0..=max)
    }

    proptest! {
        #[test]
        fn a_joined_pass_wants_what_a_pass_built_from_its_patterns_wants(
            steps in proptest::collection::vec((any::<bool>(), short("ab:*?", 5), any::<usize>()), 1..60),
            keys in proptest::collection::vec(short("ab:", 6), 1..40),
        ) {
            let mut joined = JoinedPass::new(crate::glob::matches);
            // The joiners' patterns, one entry per join, as the walk holds them.
            let mut held: Vec<Vec<u8>> = Vec::new();
            for (join, pattern, pick) in steps {
                if join || held.is_empty() {
                    joined.join(&pattern);
                    held.push(pattern);
                } else {
                    let gone = held.swap_remove(pick % held.len());
                    joined.leave(&gone);
                }
                let distinct: BTreeSet<&[u8]> = held.iter().map(Vec::as_slice).collect();
                let texts: Vec<String> = distinct
                    .iter()
                    .map(|p| String::from_utf8(p.to_vec()).expect("ascii"))
                    .collect();
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let built = shared_pass(&refs, crate::glob::matches);
                let match_arg = joined.match_arg();
                prop_assert_eq!(match_arg.as_deref(), built.match_arg());
                for key in &keys {
                    prop_assert_eq!(joined.wants(key), built.wants(key), "key {:?}", key);
                }
            }
        }
    }

    #[test]
    fn the_common_prefix_stops_at_the_first_glob_byte() {
        let patterns: Vec<String> = (0..10).map(|i| format!(r"k\*{i}")).collect();
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        assert_eq!(passes(&refs, star_only)[0].match_arg(), Some(&b"k*"[..]));
    }
}
