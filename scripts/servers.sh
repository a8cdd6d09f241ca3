# Private Postgres (wal_level=logical) and Redis servers in a temporary directory, for the demo
# and the benchmark. Source it; it sets $work, $pg_port, $redis_port and removes everything at
# exit. Nothing here touches the machine's own servers.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# initdb refuses to run as root: run the server as the postgres user when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# PG_BINDIR picks another server (its initdb and pg_ctl), e.g. one the tests fetched for
# TEST_PG_VERSION under target/postgres/<version>/package/native/bin.
bindir=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$bindir" ] || ! command -v redis-server >/dev/null; then
  echo "needs PostgreSQL and Redis: apt-get install -y postgresql redis-server" >&2
  exit 1
fi

work=$(mktemp -d /tmp/invalidator.XXXXXX)
pg_port=$(free_port)
redis_port=$(free_port)
on_exit=()
cleanup() {
  for cmd in "${on_exit[@]}"; do eval "$cmd" || true; done
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  as_pg "$bindir/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work" "$work/pg"
as_pg "$bindir/initdb" -D "$work/pg" -A trust -U postgres --no-sync >/dev/null
# synchronous_commit stays on: the walsender sends only flushed WAL (with it off, every consumer waits for the WAL writer).
as_pg "$bindir/pg_ctl" -D "$work/pg" -l "$work/pg/log" -w start -o \
  "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work/pg -c wal_level=logical -c fsync=off" >/dev/null
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$work" --logfile "$work/redis.log" >/dev/null

# Prints an invalidator configuration for database $1, slot and publication $2, HTTP port $3,
# against the private servers.
bench_config() {
  cat <<TOML
[postgres]
url = "postgres://postgres@127.0.0.1:$pg_port/$1"
slot = "$2"
publication = "$2"
[redis]
url = "redis://127.0.0.1:$redis_port/0"
[http]
listen = "127.0.0.1:$3"
[log]
level = "warn"
TOML
}

# Writes the benchmarks' rules beside their configuration: two keys per row of table items.
bench_rules() {
  mkdir -p "$work/rules"
  cat >"$work/rules/items.toml" <<'TOML'
[[rule]]
table = "items"
keys = ["item:{id}", "item:{id}:detail"]
TOML
}
