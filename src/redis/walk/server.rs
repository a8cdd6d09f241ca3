//! What a walk asks of a server: which process it is and how it orders its SCAN cursors, who
//! owns each slot of a cluster, and the keys of a slot that moved.

use super::super::connection::{Handle, Node};
use super::super::slot;

/// How a server's SCAN cursors are ordered, so a walk knows when its second lap has passed the
/// cursor a pattern joined at: the pages of the second lap end elsewhere than those of the
/// first, because the walk deletes keys and others write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// One hash table walked in reverse binary order of the bucket index (Redis; in cluster
    /// mode before 7.4): the position of a cursor is its bits reversed.
    Reversed,
    /// One table per slot (Redis 7.4 and later in cluster mode): the low 14 bits of the cursor
    /// are the slot, walked upwards, and the rest is that table's reverse binary cursor.
    SlotThenReversed,
    /// Not known (another server): only the very cursor it joined at counts, or the end of
    /// the next lap.
    Exact,
}

impl Order {
    /// The order of a server from its `INFO server` text; `cluster` for a cluster primary.
    pub(super) fn of(info: &str, cluster: bool) -> Order {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim_end().strip_prefix(name))
                .map(str::to_owned)
        };
        if field("server_name:").is_some_and(|name| name != "redis")
            || field("valkey_version:").is_some()
        {
            return Order::Exact;
        }
        let Some(version) = field("redis_version:") else {
            return Order::Exact;
        };
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if cluster && (major, minor) >= (7, 4) {
            Order::SlotThenReversed
        } else {
            Order::Reversed
        }
    }

    /// The place of `cursor` in a lap; `None` when it does not parse.
    pub(super) fn position(self, cursor: &str) -> Option<(u64, u64)> {
        let value: u64 = cursor.parse().ok()?;
        match self {
            Order::Reversed => Some((0, value.reverse_bits())),
            Order::SlotThenReversed => Some((value & 0x3FFF, (value >> 14).reverse_bits())),
            Order::Exact => None,
        }
    }

    /// Whether a lap about to send `cursor` has covered every bucket before `start`.
    pub(super) fn reached(self, cursor: &str, start: &str) -> bool {
        match (self.position(cursor), self.position(start)) {
            (Some(now), Some(then)) => now >= then,
            _ => cursor == start,
        }
    }
}

/// Which primary owns each slot, by address.
#[derive(PartialEq, Eq)]
pub(super) struct Owners {
    /// The owner of each slot, `None` when no primary serves it.
    pub(super) by_slot: Vec<Option<(String, u16)>>,
}

impl Owners {
    /// The owners in `nodes`.
    pub(super) fn of(nodes: &[Node]) -> Owners {
        let mut by_slot = vec![None; usize::from(slot::SLOTS)];
        for node in nodes {
            if let Node::Primary { host, port, slots } = node {
                for &(start, end) in slots {
                    for s in start..=end.min(slot::SLOTS - 1) {
                        by_slot[usize::from(s)] = Some((host.clone(), *port));
                    }
                }
            }
        }
        Owners { by_slot }
    }
}

/// A failed request and what it was.
pub(super) type Failure = (&'static str, ::redis::RedisError);

/// The server process a walk talks to.
pub(super) struct Server {
    /// Its `run_id`: another process has another one.
    pub(super) run_id: String,
    /// How it orders its cursors.
    pub(super) order: Order,
}

/// Reads `INFO server` of `node`.
pub(super) async fn server(handle: &mut Handle, node: &Node) -> Result<Server, Failure> {
    let mut info = ::redis::cmd("INFO");
    info.arg("server");
    let text: String = query(handle, node, info, "INFO server").await?;
    let run_id = text
        .lines()
        .find_map(|line| line.trim_end().strip_prefix("run_id:"))
        .map(str::to_owned)
        .ok_or((
            "INFO server",
            ::redis::RedisError::from((::redis::ErrorKind::Parse, "INFO server has no run_id")),
        ))?;
    let order = Order::of(&text, matches!(node, Node::Primary { .. }));
    Ok(Server { run_id, order })
}

/// Every key of `slot` on `node`.
pub(super) async fn keys_in_slot(
    handle: &mut Handle,
    node: &Node,
    slot: u16,
) -> Result<Vec<Vec<u8>>, Failure> {
    let mut count = ::redis::cmd("CLUSTER");
    count.arg("COUNTKEYSINSLOT").arg(slot);
    let n: u64 = query(handle, node, count, "CLUSTER COUNTKEYSINSLOT").await?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut get = ::redis::cmd("CLUSTER");
    get.arg("GETKEYSINSLOT").arg(slot).arg(n);
    query(handle, node, get, "CLUSTER GETKEYSINSLOT").await
}

/// Runs `command` on `node` and reads its reply as `T`; `action` names it in errors.
pub(super) async fn query<T: ::redis::FromRedisValue>(
    handle: &mut Handle,
    node: &Node,
    command: ::redis::Cmd,
    action: &'static str,
) -> Result<T, Failure> {
    let reply = handle
        .on_node(node, command)
        .await
        .map_err(|e| (action, e))?;
    ::redis::from_redis_value(reply).map_err(|e| (action, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_order_follows_the_server_and_its_version() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nrun_id:abc\r\n");
        assert_eq!(Order::of(&info("7.0.15"), true), Order::Reversed);
        assert_eq!(Order::of(&info("7.4.1"), false), Order::Reversed);
        assert_eq!(Order::of(&info("7.4.1"), true), Order::SlotThenReversed);
        assert_eq!(Order::of(&info("8.0.2"), true), Order::SlotThenReversed);
        let valkey = "redis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.1.0\r\n";
        assert_eq!(Order::of(valkey, false), Order::Exact);
        assert_eq!(Order::of("run_id:x", false), Order::Exact);
    }
}
