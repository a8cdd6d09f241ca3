#!/usr/bin/env bash
# What notify mode's triggers cost the application: throughput of single-row UPDATE commits
# (pgbench, one transaction per row) without the triggers, with them (the outbox only grows), and
# with them while `invalidator run` drains the outbox (deleting keys in Redis), in one run, side by
# side. Usage: scripts/bench-triggers.sh [SECONDS] [ROWS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
rows=${2:-100000}
rounds=${3:-3}

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

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

echo "single-row UPDATE commits, ${seconds} s per run, median of $rounds rounds (without and with alternating), rows=$rows, cores=$(nproc), $(psql_ -c 'SHOW server_version' | cut -d' ' -f1), synchronous_commit=on, fsync=off"
"$bin" setup --config "$work/invalidator.toml" >/dev/null
# Warm up (discarded): the first run on a freshly loaded table sets hint bits and is slower.
psql_ -c 'ALTER TABLE items DISABLE TRIGGER USER'
tps 1 >/dev/null
declare -A without with drained
for round in $(seq "$rounds"); do
  for c in 1 4; do
    psql_ -c 'ALTER TABLE items DISABLE TRIGGER USER'
    without[$c]+="$(tps "$c") "
    psql_ -c 'ALTER TABLE items ENABLE TRIGGER USER'
    with[$c]+="$(tps "$c") "
  done
done
"$bin" run --config "$work/invalidator.toml" 2>>"$work/invalidator.log" &
run_pid=$!
on_exit+=("kill $run_pid")
for c in 1 4; do drained[$c]=$(tps "$c"); done
outbox=$(psql_ -c 'SELECT count(*) FROM invalidator.outbox')

printf '%-8s %28s %28s %8s %24s %8s\n' clients "tps without (runs)" "tps with (runs)" ratio "tps with, run draining" ratio
for c in 1 4; do
  w=$(echo "${without[$c]}" | tr ' ' '\n' | grep . | median)
  t=$(echo "${with[$c]}" | tr ' ' '\n' | grep . | median)
  printf '%-8s %28s %28s %8.2f %24s %8.2f\n' "$c" "$w (${without[$c]% })" "$t (${with[$c]% })" \
    "$(echo "$t / $w" | bc -l)" "${drained[$c]}" "$(echo "${drained[$c]} / $w" | bc -l)"
done
echo "outbox rows left when the last run ended: $outbox"
