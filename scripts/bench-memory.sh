#!/usr/bin/env bash
# Peak RSS of `invalidator run` (release build) while it invalidates ONE transaction that inserts
# ROWS rows (two keys a row: item:{id}, item:{id}:detail), measured as VmHWM from /proc. Two runs
# on the same WAL shape: the default pipeline.max_transaction_keys (the transaction falls back to
# the patterns of its tables' rules), and a limit above the transaction's keys (every key held).
# Each run starts a fresh process and slot, with ROWS keys cached in Redis that must all be gone
# once the slot has confirmed the commit, and one unrelated key that must stay.
# Usage: scripts/bench-memory.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}

cargo build --release --quiet
bin=$PWD/target/release/invalidator
. scripts/servers.sh

psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d bench "$@"; }
redis_() { redis-cli -p "$redis_port" "$@"; }
now() { date +%s.%N; }
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c 'CREATE DATABASE bench'
psql_ -c "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)"
bench_rules

# One run: $1 is max_transaction_keys, or "default".
measure() {
  local limit=$1 http_port pid t0 end_lsn seconds peak fallbacks left slot
  http_port=$(free_port)
  # A fresh slot and publication per run, so no run reads another's WAL.
  runs=$((runs + 1))
  slot=bench_memory_$runs
  {
    bench_config bench "$slot" "$http_port"
    if [ "$limit" != default ]; then printf '[pipeline]\nmax_transaction_keys = %s\n' "$limit"; fi
  } >"$work/invalidator.toml"
  psql_ -c "TRUNCATE items"
  seq 1 "$rows" | awk '{print "SET item:" $1 " x"}' | redis_ --pipe >/dev/null
  redis_ set other:1 x >/dev/null

  "$bin" run --config "$work/invalidator.toml" 2>>"$work/invalidator.log" &
  pid=$!
  on_exit+=("kill -9 $pid 2>/dev/null")
  until curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null; do
    kill -0 "$pid" || { cat "$work/invalidator.log" >&2; exit 1; }
    sleep 0.1
  done

  t0=$(now)
  psql_ -c "INSERT INTO items SELECT i, 0 FROM generate_series(1, $rows) i"
  end_lsn=$(psql_ -c 'SELECT pg_current_wal_lsn()')
  until [ "$(psql_ -c "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name = '$slot'")" = t ]; do
    sleep 0.05
  done
  seconds=$(echo "$(now) - $t0" | bc)
  peak=$(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
  fallbacks=$(curl -s "http://127.0.0.1:$http_port/metrics" | awk '$1 == "invalidator_transaction_fallbacks_total" {print $2}')
  kill -TERM "$pid"; wait "$pid"

  # Confirmed means deleted: every cached item key is gone, the unrelated key stays.
  left=$(redis_ --scan --pattern 'item:*' | wc -l)
  [ "$left" = 0 ] || { echo "$left item keys survived the transaction" >&2; exit 1; }
  [ "$(redis_ exists other:1)" = 1 ] || { echo "other:1 was deleted" >&2; exit 1; }
  psql_ -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null

  printf '%-22s %14s %10s %12.1f\n' "$limit" "$peak" "$fallbacks" "$seconds"
}

runs=0
echo "rows=$rows keys=$((2 * rows)) (one transaction) cores=$(nproc) $(psql_ -c 'SHOW server_version') $(redis-server --version | cut -d' ' -f3)"
printf '%-22s %14s %10s %12s\n' max_transaction_keys peak-RSS-MiB fallbacks seconds
measure default
measure $((4 * rows))
