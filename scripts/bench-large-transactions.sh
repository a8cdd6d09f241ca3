#!/usr/bin/env bash
# Commit to confirmed for ONE transaction of ROWS inserted rows (two keys a row, all cached in
# Redis), and what the server spilled to disk decoding it (pg_stat_replication_slots: the
# walsender decodes a transaction only once it commits, and spills it past
# logical_decoding_work_mem, 64MB by default), with protocol 1 and, on 14+, streamed (protocol
# 2, `streaming 'on'`: the server sends a transaction past logical_decoding_work_mem in blocks
# as it decodes it, and the sidecar collects its keys before the commit). Each size and mode
# runs RUNS times (default 3) on a fresh slot and process; prints every run and the median.
# MODES="1 2" (default) picks the modes: 1 is protocol 1, 2 streaming.
# Usage: scripts/bench-large-transactions.sh [ROWS...]   (default 100000 1000000)
# PG_BINDIR=target/postgres/<version>/package/native/bin runs it on another server version.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-100000 1000000}")
read -r -a sizes <<<"${sizes[*]}"
runs=${RUNS:-3}
read -r -a modes <<<"${MODES:-1 2}"

cargo build --release --quiet
bin=$PWD/target/release/invalidator
. scripts/servers.sh

psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d bench "$@"; }
redis_() { redis-cli -p "$redis_port" "$@"; }
now() { date +%s.%N; }
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c 'CREATE DATABASE bench'
psql_ -c "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)"
bench_rules

# One run of $1 rows, run number $2, mode $3 (1 or 2): prints seconds and the slot's spill and
# stream counters.
measure() {
  local rows=$1 slot=bench_large_$2 mode=$3 http_port pid t0 end_lsn seconds left spill stream
  http_port=$(free_port)
  bench_config bench "$slot" "$http_port" >"$work/invalidator.toml"
  psql_ -c "TRUNCATE items"
  seq 1 "$rows" | awk '{print "SET item:" $1 " x"}' | redis_ --pipe >/dev/null
  INVALIDATOR_POSTGRES_STREAM_LARGE_TRANSACTIONS=$([ "$mode" = 2 ] && echo true || echo false) \
    "$bin" run --config "$work/invalidator.toml" 2>>"$work/invalidator.log" &
  pid=$!
  on_exit+=("kill -9 $pid 2>/dev/null")
  until curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null; do
    kill -0 "$pid" || { cat "$work/invalidator.log" >&2; exit 1; }
    sleep 0.1
  done
  psql_ -c "INSERT INTO items SELECT i, 0 FROM generate_series(1, $rows) i" >/dev/null
  # The clock starts once the transaction has committed.
  t0=$(now)
  end_lsn=$(psql_ -c 'SELECT pg_current_wal_lsn()')
  until [ "$(psql_ -c "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name = '$slot'")" = t ]; do
    sleep 0.02
  done
  seconds=$(echo "$(now) - $t0" | bc)
  spill=$(psql_ -c "SELECT spill_txns || ' ' || spill_count || ' ' || pg_size_pretty(spill_bytes) FROM pg_stat_replication_slots WHERE slot_name = '$slot'")
  stream=$(psql_ -c "SELECT stream_txns || ' ' || stream_count || ' ' || pg_size_pretty(stream_bytes) FROM pg_stat_replication_slots WHERE slot_name = '$slot'")
  kill -TERM "$pid"; wait "$pid"
  left=$(redis_ --scan --pattern 'item:*' | wc -l)
  [ "$left" = 0 ] || { echo "$left item keys survived the transaction" >&2; exit 1; }
  psql_ -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null
  printf '%6s %10s %8.2f   %-22s %s\n' "$mode" "$rows" "$seconds" "$spill" "$stream"
  echo "$seconds" >>"$work/times-$mode-$rows"
}

echo "$(psql_ -c 'SHOW server_version') cores=$(nproc) logical_decoding_work_mem=$(psql_ -c 'SHOW logical_decoding_work_mem')"
printf '%6s %10s %8s   %-22s %s\n' mode rows seconds 'spill: txns count bytes' 'streamed: txns count bytes'
n=0
for mode in "${modes[@]}"; do
  for rows in "${sizes[@]}"; do
    for _ in $(seq "$runs"); do n=$((n + 1)); measure "$rows" "$n" "$mode"; done
    printf '%6s %10s median %s s\n' "$mode" "$rows" "$(sort -n "$work/times-$mode-$rows" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
  done
done
