#!/usr/bin/env bash
# Time to drain N row updates already in the WAL: invalidator (decode, plan, UNLINK in Redis,
# acknowledge) against pg_recvlogical (receive and write pgoutput to /dev/null), on the same WAL,
# side by side, in one run. Usage: scripts/bench-drain.sh [ROWS] [ROWS_PER_TRANSACTION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-100000}
per_txn=${2:-100}
rounds=${3:-3}

cargo build --release --quiet
bin=$PWD/target/release/invalidator
. scripts/servers.sh
http_port=$(free_port)

psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d bench "$@"; }
now() { date +%s.%N; }
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c 'CREATE DATABASE bench'
psql_ -c "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
          ALTER TABLE items REPLICA IDENTITY FULL;
          INSERT INTO items SELECT i, 0, 'item ' || i FROM generate_series(1, $rows) i;
          CREATE PUBLICATION bench_invalidator FOR TABLE items;"
bench_rules
bench_config bench bench_invalidator "$http_port" >"$work/invalidator.toml"

drain_recvlogical() {
  local t0; t0=$(now)
  pg_recvlogical -h 127.0.0.1 -p "$pg_port" -U postgres -d bench --slot bench_recvlogical --start \
    -o proto_version=1 -o publication_names=bench_invalidator --endpos "$end_lsn" --no-loop -f /dev/null
  echo "$(now) - $t0" | bc
}
drain_invalidator() {
  local t0 pid; t0=$(now)
  "$bin" run --config "$work/invalidator.toml" 2>>"$work/invalidator.log" &
  pid=$!
  until [ "$(psql_ -c "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name = 'bench_invalidator'")" = t ]; do
    sleep 0.01
  done
  echo "$(now) - $t0" | bc
  kill -TERM "$pid"; wait "$pid"
}

echo "rows=$rows rows_per_transaction=$per_txn rounds=$rounds cores=$(nproc) $(psql_ -c 'SHOW server_version') $(redis-server --version | cut -d' ' -f3)"
printf '%-6s %-14s %10s %12s %12s\n' round consumer seconds rows/s WAL-MB
for round in $(seq "$rounds"); do
  psql_ -c "SELECT pg_create_logical_replication_slot('bench_invalidator', 'pgoutput');
            SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput');" >/dev/null
  # Keys that exist, so every UNLINK deletes something.
  seq 1 "$rows" | awk '{print "SET item:" $1 " x"}' | redis-cli -p "$redis_port" --pipe >/dev/null
  start_lsn=$(psql_ -c 'SELECT pg_current_wal_lsn()')
  psql_ -c "DO \$\$ BEGIN
              FOR lo IN 1..$rows BY $per_txn LOOP
                UPDATE items SET v = v + 1 WHERE id BETWEEN lo AND lo + $per_txn - 1;
                COMMIT;
              END LOOP;
            END \$\$;"
  end_lsn=$(psql_ -c 'SELECT pg_current_wal_lsn()')
  wal_mb=$(psql_ -c "SELECT round(('$end_lsn'::pg_lsn - '$start_lsn'::pg_lsn) / 1048576.0, 1)")

  # Both read the same WAL; the order alternates so neither always gets the warmer cache.
  if [ $((round % 2)) = 1 ]; then recv=$(drain_recvlogical); inv=$(drain_invalidator)
  else inv=$(drain_invalidator); recv=$(drain_recvlogical); fi
  left=$(redis-cli -p "$redis_port" dbsize)
  [ "$left" = 0 ] || { echo "invalidator left $left keys behind" >&2; exit 1; }

  printf '%-6s %-14s %10.2f %12.0f %12s\n' "$round" pg_recvlogical "$recv" "$(echo "$rows / $recv" | bc -l)" "$wal_mb"
  printf '%-6s %-14s %10.2f %12.0f %12s\n' "$round" invalidator "$inv" "$(echo "$rows / $inv" | bc -l)" "$wal_mb"
  psql_ -c "SELECT pg_drop_replication_slot('bench_invalidator'); SELECT pg_drop_replication_slot('bench_recvlogical');" >/dev/null
done
