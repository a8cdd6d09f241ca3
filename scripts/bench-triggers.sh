#!/usr/bin/env bash
# What notify mode's triggers cost the application: throughput of single-row UPDATE commits
# (pgbench, one transaction per row) without the triggers, with them (the outbox only grows), and
# with them while `invalidator run` drains the outbox (deleting keys in Redis), in one run, side by
# side. Usage: scripts/bench-triggers.sh [SECONDS] [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rows=${2:-100000}

cargo build --release --quiet
bin=$PWD/target/release/invalidator
. scripts/servers.sh
http_port=$(free_port)

psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d bench "$@"; }
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c 'CREATE DATABASE bench'
psql_ -c "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
          INSERT INTO items SELECT i, 0, 'item ' || i FROM generate_series(1, $rows) i;"
bench_rules
bench_config bench unused "$http_port" | sed 's/^\[postgres\]$/[postgres]\nmode = "notify"/' \
  >"$work/invalidator.toml"
cat >"$work/update.sql" <<SQL
\set id random(1, $rows)
UPDATE items SET v = v + 1 WHERE id = :id;
SQL

# Prints the tps of one pgbench run with $1 clients, after a VACUUM so runs start alike.
tps() {
  psql_ -c 'VACUUM ANALYZE items' -c 'TRUNCATE invalidator.outbox' 2>/dev/null || psql_ -c 'VACUUM ANALYZE items'
  "$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U postgres -n -c "$1" -j "$1" -T "$seconds" \
    -f "$work/update.sql" bench 2>/dev/null | awk '/^tps = / {printf "%.0f", $3}'
}

echo "single-row UPDATE commits, ${seconds} s per run, rows=$rows, cores=$(nproc), $(psql_ -c 'SHOW server_version' | cut -d' ' -f1), synchronous_commit=on, fsync=off"
declare -A without with drained
for c in 1 4; do without[$c]=$(tps "$c"); done
"$bin" setup --config "$work/invalidator.toml" >/dev/null
for c in 1 4; do with[$c]=$(tps "$c"); done
"$bin" run --config "$work/invalidator.toml" 2>>"$work/invalidator.log" &
run_pid=$!
on_exit+=("kill $run_pid")
for c in 1 4; do drained[$c]=$(tps "$c"); done
outbox=$(psql_ -c 'SELECT count(*) FROM invalidator.outbox')

printf '%-8s %14s %14s %8s %22s %8s\n' clients "tps without" "tps with" ratio "tps with, run draining" ratio
for c in 1 4; do
  printf '%-8s %14s %14s %8.2f %22s %8.2f\n' "$c" "${without[$c]}" "${with[$c]}" \
    "$(echo "${with[$c]} / ${without[$c]}" | bc -l)" "${drained[$c]}" \
    "$(echo "${drained[$c]} / ${without[$c]}" | bc -l)"
done
echo "outbox rows left when the last run ended: $outbox"
