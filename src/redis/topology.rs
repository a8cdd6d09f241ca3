//! What a Redis Cluster node says of itself and of the others in `CLUSTER NODES`: its own line
//! (`myself`: slots, migrating and importing markers, configuration epoch), and the primaries it
//! knows. Pure code, no I/O.

/// One node's line about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Myself {
    /// The line without the two fields that change on their own (ping sent, pong received):
    /// id, address, flags, primary, configuration epoch, link state, slots and markers. Two
    /// reads that give the same line saw the same role, epoch and slots.
    pub(super) stable: String,
    /// The slot ranges it serves, inclusive at both ends.
    pub(super) slots: Vec<(u16, u16)>,
    /// The slots it shows as migrating (`[slot->-id]`: `true`, keys leave from here) or
    /// importing (`[slot-<-id]`: `false`).
    pub(super) markers: Vec<(u16, bool)>,
}

impl Myself {
    /// The line of `CLUSTER NODES` text flagged `myself`, if there is one.
    pub(super) fn of(cluster_nodes: &str) -> Option<Myself> {
        let line = cluster_nodes
            .lines()
            .find(|line| flags(line).any(|f| f == "myself"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let stable = fields
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 4 && *i != 5)
            .map(|(_, f)| *f)
            .collect::<Vec<_>>()
            .join(" ");
        let (mut slots, mut markers) = (Vec::new(), Vec::new());
        for field in fields.iter().skip(8) {
            if let Some(inner) = field.strip_prefix('[').and_then(|f| f.strip_suffix(']')) {
                let marker = if let Some((slot, _)) = inner.split_once("->-") {
                    slot.parse().ok().map(|s| (s, true))
                } else {
                    let slot = inner.split_once("-<-").map(|(slot, _)| slot);
                    slot.and_then(|s| s.parse().ok()).map(|s| (s, false))
                };
                markers.extend(marker);
                continue;
            }
            let range = match field.split_once('-') {
                Some((start, end)) => start.parse().ok().zip(end.parse().ok()),
                None => field.parse().ok().map(|s| (s, s)),
            };
            slots.extend(range);
        }
        Some(Myself {
            stable,
            slots,
            markers,
        })
    }

    /// Whether it serves `slot`.
    pub(super) fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(start, end)| (start..=end).contains(&slot))
    }
}

/// The primaries `CLUSTER NODES` text names, by address (an empty host is `seed_host`), sorted:
/// every line flagged `master`, except one that serves no slot and is failed, without an address
/// or still in its handshake (a primary that lost its slots to a failover stays listed so until
/// it is forgotten). A primary without slots is kept otherwise: a slot can be imported into it.
pub(super) fn primaries(cluster_nodes: &str, seed_host: &str) -> Vec<(String, u16)> {
    let mut found: Vec<(String, u16)> = cluster_nodes
        .lines()
        .filter(|line| flags(line).any(|f| f == "master"))
        .filter(|line| {
            let gone = flags(line).any(|f| matches!(f, "fail" | "noaddr" | "handshake"));
            !gone || line.split_whitespace().nth(8).is_some()
        })
        .filter_map(|line| {
            let address = line.split_whitespace().nth(1)?;
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let host = if host.is_empty() { seed_host } else { host };
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The flags of one `CLUSTER NODES` line (its third field).
fn flags(line: &str) -> impl Iterator<Item = &str> {
    line.split_whitespace().nth(2).unwrap_or("").split(',')
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2] [7-<-c3]
b2 127.0.0.1:7001@17001 master - 0 1700000000 2 connected 5461-10922 16000
c3 :7002@17002,host master - 0 0 3 connected
d4 127.0.0.1:7003@17003 master,fail - 0 0 4 disconnected
e5 127.0.0.1:7004@17004 slave a1 0 0 1 connected
";

    #[test]
    fn myself_has_its_slots_markers_and_a_line_without_the_ping_times() {
        let me = Myself::of(NODES).expect("a myself line");
        assert_eq!(me.slots, [(0, 5460)]);
        assert_eq!(me.markers, [(5461, true), (7, false)]);
        assert_eq!(
            me.stable,
            "a1 127.0.0.1:7000@17000 myself,master - 1 connected 0-5460 [5461->-b2] [7-<-c3]"
        );
        assert!(me.owns(0) && me.owns(5460) && !me.owns(5461));
        let other = NODES.replace("myself,master - 0 0", "myself,master - 5 9");
        assert_eq!(Myself::of(&other), Some(me));
        assert!(Myself::of("x y master - 0 0 1 connected 0-1").is_none());
    }

    #[test]
    fn primaries_include_those_without_slots_but_not_failed_ones_without_slots() {
        assert_eq!(
            primaries(NODES, "seed"),
            [
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001),
                ("seed".to_owned(), 7002),
            ]
        );
    }
}
