//! Private `redis-server` processes.

use super::{
    Watchdog, free_port, make_certificates, make_client_certificate, scratch_dir, sh_quote,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How often `start` tries new ports before it gives up.
const START_ATTEMPTS: usize = 5;

/// How long a server may take to answer its first PING.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `redis-server` on a free loopback port, owned by one test (or the whole binary, see
/// [`RedisServer::shared`]); dropping it kills the server and removes its directory.
pub struct RedisServer {
    /// Holds the log, the pid file the watchdog reads, and TLS material.
    dir: PathBuf,
    /// The port on 127.0.0.1 (the TLS port for a TLS server); kept across restarts.
    port: u16,
    /// The cluster bus port of a cluster node; kept across restarts. Redis would take the port
    /// plus 10000 otherwise, which lies in the kernel's ephemeral range (see [`free_port`]),
    /// where outgoing connections hold ports: every start attempt of a node once failed so.
    bus_port: u16,
    /// Arguments after the harness's own, such as `--requirepass`.
    extra_args: Vec<String>,
    /// The CA certificate (PEM) that signed the server certificate, for a TLS server.
    tls_ca: Option<Vec<u8>>,
    /// Whether the TLS server demands a client certificate signed by its CA.
    tls_auth_clients: bool,
    /// The running process, if any; a mutex so tests can kill and restart through `&self`.
    child: Mutex<Option<Child>>,
    /// Kills the server and removes `dir` if the test binary dies before `Drop` runs.
    _watchdog: Watchdog,
}

impl RedisServer {
    /// Starts a plain server without persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with `args` appended to the harness's (later ones win in redis-server),
    /// for example `["--requirepass", "secret"]`.
    pub fn start_with(args: &[&str]) -> RedisServer {
        RedisServer::launch(args.iter().map(|a| a.to_string()).collect(), false)
    }

    /// Starts a server that speaks only TLS, with a certificate for 127.0.0.1 signed by a fresh
    /// CA; [`RedisServer::tls_ca_pem`] returns that CA and [`RedisServer::url`] a `rediss://` URL.
    pub fn start_tls() -> RedisServer {
        RedisServer::launch(Vec::new(), true)
    }

    /// Like [`RedisServer::start_tls`], with `--tls-auth-clients yes`: clients must present a
    /// certificate signed by the same CA; [`RedisServer::client_cert_files`] has one.
    pub fn start_tls_with_client_auth() -> RedisServer {
        RedisServer::launch_with(Vec::new(), true, true)
    }

    /// The client certificate and key (PEM files) of a server from
    /// [`RedisServer::start_tls_with_client_auth`], and the CA file.
    pub fn client_cert_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.dir.join("client.crt"),
            self.dir.join("client.key"),
            self.dir.join("ca.crt"),
        )
    }

    /// A server shared by every test of this binary that only needs its own key prefix (see
    /// [`super::unique_name`]); never kill it or flush it. The watchdog removes it after the run.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(RedisServer::start)
    }

    /// Creates the directory and watchdog, then starts on free ports until one works.
    fn launch(extra_args: Vec<String>, tls: bool) -> RedisServer {
        RedisServer::launch_with(extra_args, tls, false)
    }

    /// [`RedisServer::launch`], optionally demanding client certificates.
    fn launch_with(extra_args: Vec<String>, tls: bool, tls_auth_clients: bool) -> RedisServer {
        let dir = scratch_dir("redis");
        let pidfile = dir.join("server.pid");
        let watchdog = Watchdog::spawn(&format!(
            "[ -f {pid} ] && kill -9 $(cat {pid}); rm -rf {dir}",
            pid = sh_quote(&pidfile.to_string_lossy()),
            dir = sh_quote(&dir.to_string_lossy()),
        ));
        let tls_ca = tls.then(|| make_certificates(&dir));
        if tls_auth_clients {
            make_client_certificate(&dir);
        }
        let mut server = RedisServer {
            dir,
            port: 0,
            bus_port: 0,
            extra_args,
            tls_ca,
            tls_auth_clients,
            child: Mutex::new(None),
            _watchdog: watchdog,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            server.bus_port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(log) if attempt == START_ATTEMPTS => panic!("redis did not start:\n{log}"),
                Err(_) => continue,
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's URL (`redis://`, or `rediss://` for a TLS server), database 0, no password.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// The CA certificate (PEM) that signed a TLS server's certificate.
    pub fn tls_ca_pem(&self) -> Option<&[u8]> {
        self.tls_ca.as_deref()
    }

    /// A client for this server (trusting its CA when it speaks TLS), for test assertions.
    pub fn client(&self) -> redis::Client {
        let client_tls = self.tls_auth_clients.then(|| {
            let (cert, key, _) = self.client_cert_files();
            redis::ClientTlsConfig {
                client_cert: std::fs::read(cert).expect("read client.crt"),
                client_key: std::fs::read(key).expect("read client.key"),
            }
        });
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(self.url()),
        }
        .expect("build a redis client")
    }

    /// A blocking connection (without a password: for servers started with `--requirepass`,
    /// build a client from a URL that carries it).
    pub fn connection(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis")
    }

    /// Sets each of `keys` to "1".
    pub fn set_keys<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) {
        let mut con = self.connection();
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(key.as_ref()).arg("1").ignore();
        }
        pipe.exec(&mut con).expect("SET test keys");
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: impl AsRef<[u8]>) -> bool {
        redis::cmd("EXISTS")
            .arg(key.as_ref())
            .query::<bool>(&mut self.connection())
            .expect("EXISTS")
    }

    /// All keys matching `pattern`, sorted, found with SCAN (lossy UTF-8; see `scan_raw_keys`).
    pub fn scan_keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .scan_raw_keys(pattern)
            .iter()
            .map(|key| String::from_utf8_lossy(key).into_owned())
            .collect();
        keys.sort();
        keys
    }

    /// All keys matching `pattern` as bytes, sorted and distinct, found with SCAN.
    pub fn scan_raw_keys(&self, pattern: &str) -> Vec<Vec<u8>> {
        let mut con = self.connection();
        let mut keys: Vec<Vec<u8>> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter::<Vec<u8>>(&mut con)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN page");
        keys.sort();
        keys.dedup();
        keys
    }

    /// One section of `INFO`.
    pub fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query::<String>(&mut self.connection())
            .unwrap_or_default()
    }

    /// Whether a client waits on the server for an answer (a command held by `CLIENT PAUSE`).
    pub fn has_blocked_client(&self) -> bool {
        self.info("clients").lines().any(|l| {
            l.strip_prefix("blocked_clients:")
                .is_some_and(|n| n.trim() != "0")
        })
    }

    /// The `INFO commandstats` section, to check which commands a client sent.
    pub fn command_stats(&self) -> String {
        redis::cmd("INFO")
            .arg("commandstats")
            .query::<String>(&mut self.connection())
            .expect("INFO commandstats")
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits until it is gone.
    pub fn kill(&self) {
        let mut child = self.lock_child();
        if let Some(mut running) = child.take() {
            // An error means it already died, which is what we want.
            let _ = running.kill();
            let _ = running.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("server.pid"));
    }

    /// Creates the user `sidecar` (password `pw`) with the ACL `rules` (`~*`, `&*`, `+@all`,
    /// ...) and returns the URL that logs in as it, database 0.
    pub fn acl_user(&self, rules: &[&str]) -> String {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("sidecar")
            .arg("on")
            .arg(">pw")
            .arg(rules)
            .exec(&mut self.connection())
            .expect("ACL SETUSER");
        format!("redis://sidecar:pw@127.0.0.1:{}/0", self.port())
    }

    /// Starts the killed server again on the same port (empty: nothing was persisted).
    pub fn start_again(&self) {
        if let Err(log) = self.spawn() {
            panic!("redis did not start again on port {}:\n{log}", self.port);
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.lock_child()
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join("redis.log"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Locks the child slot, ignoring poisoning (a panicking test must still be able to clean up).
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns redis-server on `self.port` and waits until it is ready; on failure returns the log.
    fn spawn(&self) -> Result<(), String> {
        let mut slot = self.lock_child();
        // A restart appends to the same log: only what this process writes counts.
        let log_start = self.log().len();
        let dir = self.dir.to_string_lossy().into_owned();
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir", &dir, "--logfile", "redis.log"]);
        match &self.tls_ca {
            Some(_) => cmd
                .args(["--port", "0", "--tls-port", &port])
                .args([
                    "--tls-cert-file",
                    "server.crt",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients"])
                .arg(if self.tls_auth_clients { "yes" } else { "no" }),
            None => cmd.args(["--port", &port]),
        };
        if self.extra_args.iter().any(|arg| arg == "--cluster-enabled") {
            cmd.args(["--cluster-port", &self.bus_port.to_string()]);
        }
        let mut child = cmd
            .args(&self.extra_args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        std::fs::write(self.dir.join("server.pid"), child.id().to_string())
            .expect("write the pid file");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !matches!(child.try_wait(), Ok(None)) {
                // It exited, most likely because the port was taken: the caller may retry.
                let _ = std::fs::remove_file(self.dir.join("server.pid"));
                return Err(self.log());
            }
            if self.ready(log_start) {
                break;
            }
            if Instant::now() >= deadline {
                // No stray server may outlive a failed start.
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(self.dir.join("server.pid"));
                panic!(
                    "redis-server was not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
        Ok(())
    }

    /// Whether our server accepts clients: its own log, past `log_start`, says so (a reply alone
    /// could come from a stranger that holds the port), and, without TLS, a PING is answered by
    /// anything but `-LOADING`.
    fn ready(&self, log_start: usize) -> bool {
        let log = self.log();
        if !log
            .get(log_start..)
            .is_some_and(|new| new.contains("Ready to accept connections"))
        {
            return false;
        }
        if self.tls_ca.is_some() {
            return true;
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        // A server with a password answers -NOAUTH, and is ready all the same.
        let mut reply = [0u8; 8];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply[..1]).is_ok()
            && (reply[0] == b'+'
                || (reply[0] == b'-'
                    && stream.read_exact(&mut reply[1..]).is_ok()
                    && !reply[1..].starts_with(b"LOADING")))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of private [`RedisServer`]s: primaries, and optionally replicas.
pub struct RedisCluster {
    /// Every node; `redis-cli --cluster create` makes the first `primaries` ones primaries.
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` servers in cluster mode, joins them with `redis-cli --cluster create`
    /// and waits until every node reports the cluster healthy.
    pub fn start(primaries: usize) -> RedisCluster {
        RedisCluster::start_with_replicas(primaries, 0)
    }

    /// Starts `primaries` primaries with `replicas` replicas each (`--cluster-replicas`), waits
    /// for `cluster_state:ok` on every node and for every replica to be in sync. The node
    /// timeout is 1 s, so a killed primary's replica takes over within a few seconds.
    pub fn start_with_replicas(primaries: usize, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let replicas_arg = replicas.to_string();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", &replicas_arg, "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        super::wait_until(Duration::from_secs(30), "the cluster is ok", || {
            cluster.nodes.iter().all(|node| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut node.connection())
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        });
        super::wait_until(Duration::from_secs(30), "every replica is in sync", || {
            let synced = cluster
                .nodes
                .iter()
                .filter(|node| {
                    node.info("replication").contains("role:slave")
                        && node.info("replication").contains("master_link_status:up")
                        && !node
                            .info("replication")
                            .contains("master_sync_in_progress:1")
                })
                .count();
            synced == primaries * replicas
        });
        cluster
    }

    /// The running nodes that are primaries now (by `INFO replication`).
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|node| node.is_running() && node.info("replication").contains("role:master"))
            .collect()
    }

    /// Kills `primary` with SIGKILL and waits until one of its replicas has taken over and the
    /// cluster is ok again on every running node.
    pub fn kill_primary_and_wait_failover(&self, primary: &RedisServer) {
        let replicas: Vec<&RedisServer> = self
            .nodes
            .iter()
            .filter(|node| {
                node.is_running()
                    && node
                        .info("replication")
                        .contains(&format!("master_port:{}", primary.port()))
            })
            .collect();
        assert!(
            !replicas.is_empty(),
            "port {} has no replica",
            primary.port()
        );
        primary.kill();
        super::wait_until(Duration::from_secs(30), "a replica is promoted", || {
            replicas
                .iter()
                .any(|replica| replica.info("replication").contains("role:master"))
        });
        super::wait_until(Duration::from_secs(30), "the cluster is ok again", || {
            self.nodes.iter().filter(|n| n.is_running()).all(|node| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut node.connection())
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        });
    }

    /// Waits until every primary's replica has what the primary has (`WAIT 1`), so a failover
    /// loses nothing written before.
    pub fn wait_replicated(&self) {
        for primary in self.primaries() {
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(5000)
                .query(&mut primary.connection())
                .expect("WAIT");
            assert_eq!(acked, 1, "port {}: no replica confirmed", primary.port());
        }
    }

    /// Whether `key` exists, asked of the primary that owns it.
    pub fn exists(&self, key: impl AsRef<[u8]>) -> bool {
        let mut con = self
            .client()
            .get_connection()
            .expect("connect to the cluster");
        redis::cmd("EXISTS")
            .arg(key.as_ref())
            .query::<bool>(&mut con)
            .expect("EXISTS in the cluster")
    }

    /// The keys matching `pattern` on every primary, sorted.
    pub fn scan_keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .primaries()
            .iter()
            .flat_map(|n| n.scan_keys(pattern))
            .collect();
        keys.sort();
        keys
    }

    /// The URL of the first node, a seed for cluster clients.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes, to inspect or kill one.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// A cluster client, for test assertions.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::new(
            self.nodes
                .iter()
                .filter(|n| n.is_running())
                .map(RedisServer::url)
                .collect::<Vec<_>>(),
        )
        .expect("build a cluster client")
    }

    /// Sets each of `keys` to "1", each on the node that owns its slot.
    pub fn set_keys<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) {
        let mut con = self
            .client()
            .get_connection()
            .expect("connect to the cluster");
        for key in keys {
            redis::cmd("SET")
                .arg(key.as_ref())
                .arg("1")
                .exec(&mut con)
                .expect("SET in the cluster");
        }
    }

    /// Sets `slots:{v}:{n}` for v in 1..=vehicles and n in 1..=per_vehicle, each on the primary
    /// that owns its slot, in pipelines of one primary's keys (fast enough for a million keys).
    pub fn load_slots_keys(&self, vehicles: u32, per_vehicle: u32) {
        let primaries = self.primaries();
        let owners: Vec<Vec<(u16, u16)>> = primaries
            .iter()
            .map(|node| {
                let id: String = redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query(&mut node.connection())
                    .expect("CLUSTER MYID");
                let shards: Vec<redis::Value> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query(&mut node.connection())
                    .expect("CLUSTER SLOTS");
                shards
                    .into_iter()
                    .filter_map(|range| {
                        let fields: Vec<redis::Value> = redis::from_redis_value(range).ok()?;
                        let node: Vec<redis::Value> =
                            redis::from_redis_value_ref(&fields[2]).ok()?;
                        let owner: String = redis::from_redis_value_ref(&node[2]).ok()?;
                        (owner == id).then(|| {
                            (
                                redis::from_redis_value_ref(&fields[0]).expect("start"),
                                redis::from_redis_value_ref(&fields[1]).expect("end"),
                            )
                        })
                    })
                    .collect()
            })
            .collect();
        let mut cons: Vec<redis::Connection> = primaries.iter().map(|n| n.connection()).collect();
        let mut pipes: Vec<redis::Pipeline> = primaries.iter().map(|_| redis::pipe()).collect();
        let mut queued = 0;
        for v in 1..=vehicles {
            for n in 1..=per_vehicle {
                let key = format!("slots:{v}:{n}");
                let slot = invalidator::redis::slot::key_slot(key.as_bytes());
                let owner = owners
                    .iter()
                    .position(|ranges| ranges.iter().any(|&(s, e)| (s..=e).contains(&slot)))
                    .expect("every slot has a primary");
                pipes[owner].cmd("SET").arg(key).arg("1").ignore();
                queued += 1;
                if queued % 30_000 == 0 {
                    flush(&mut pipes, &mut cons);
                }
            }
        }
        flush(&mut pipes, &mut cons);
    }

    /// All keys of all primaries, sorted.
    pub fn all_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .primaries()
            .iter()
            .flat_map(|n| n.scan_keys("*"))
            .collect();
        keys.sort();
        keys
    }

    /// The node id of `node`.
    pub fn node_id(node: &RedisServer) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut node.connection())
            .expect("CLUSTER MYID")
    }

    /// The primary that serves `slot`, by the `CLUSTER NODES` line each primary has of itself.
    pub fn owner_of(&self, slot: u16) -> &RedisServer {
        self.primaries()
            .into_iter()
            .find(|node| {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut node.connection())
                    .expect("CLUSTER NODES");
                let myself = text.lines().find(|l| l.contains("myself")).unwrap_or("");
                myself.split(' ').skip(8).any(|range| {
                    let (start, end) = range.split_once('-').unwrap_or((range, range));
                    let (start, end) = (start.parse::<u16>(), end.parse::<u16>());
                    matches!((start, end), (Ok(s), Ok(e)) if (s..=e).contains(&slot))
                })
            })
            .expect("a primary serves the slot")
    }

    /// The primary that serves `slot` and another one, to move it to.
    pub fn owner_and_another(&self, slot: u16) -> (&RedisServer, &RedisServer) {
        let from = self.owner_of(slot);
        let to = self
            .primaries()
            .into_iter()
            .find(|node| node.port() != from.port());
        (from, to.expect("another primary"))
    }

    /// Moves `slot` from `from` to `to` as `redis-cli --cluster reshard` does: importing and
    /// migrating states, MIGRATE of its keys in batches, then the new owner announced everywhere.
    pub fn migrate_slot(&self, slot: u16, from: &RedisServer, to: &RedisServer) {
        self.begin_migration(slot, from, to);
        while self.migrate_keys(slot, from, to, 200) > 0 {}
        self.end_migration(slot, to);
    }

    /// Marks `slot` importing on `to` and migrating on `from`.
    pub fn begin_migration(&self, slot: u16, from: &RedisServer, to: &RedisServer) {
        let (from_id, to_id) = (Self::node_id(from), Self::node_id(to));
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .exec(&mut to.connection())
            .expect("IMPORTING");
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .exec(&mut from.connection())
            .expect("MIGRATING");
    }

    /// MIGRATEs up to `count` keys of `slot` from `from` to `to`; returns how many moved.
    pub fn migrate_keys(
        &self,
        slot: u16,
        from: &RedisServer,
        to: &RedisServer,
        count: usize,
    ) -> usize {
        let mut src = from.connection();
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(count)
            .query(&mut src)
            .expect("GETKEYSINSLOT");
        if !keys.is_empty() {
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to.port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut src)
                .expect("MIGRATE");
        }
        keys.len()
    }

    /// Announces `to` as the owner of `slot` on every primary, which ends its migration.
    pub fn end_migration(&self, slot: u16, to: &RedisServer) {
        let to_id = Self::node_id(to);
        for node in self.primaries() {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .exec(&mut node.connection())
                .expect("SETSLOT NODE");
        }
    }

    /// How many nodes hold at least one key, to check that test keys spread over the cluster.
    pub fn nodes_with_keys(&self) -> usize {
        self.primaries()
            .iter()
            .filter(|n| !n.scan_keys("*").is_empty())
            .count()
    }
}

/// Sends each primary's queued commands and empties its pipeline. A pipeline with nothing
/// queued (the last round may have just been sent) is not sent: the client fails on it.
fn flush(pipes: &mut [redis::Pipeline], cons: &mut [redis::Connection]) {
    for (pipe, con) in pipes.iter_mut().zip(cons) {
        if !pipe.is_empty() {
            pipe.exec(con).expect("SET on a primary");
            pipe.clear();
        }
    }
}
