#!/usr/bin/env bash
# The quick start: ExoDrive's schema and rules, a booking written with psql, and the Redis keys
# that write invalidated. Starts a private Postgres (wal_level=logical) and a private Redis in a
# temporary directory, so it never touches your own servers or data, and removes them at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "building invalidator"
cargo build --release --quiet
bin=$PWD/target/release/invalidator

. scripts/servers.sh
http_port=$(free_port)
echo "  private Postgres on port $pg_port (wal_level=logical), Redis on port $redis_port"
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d exodrive "$@"; }
redis_() { redis-cli -p "$redis_port" "$@"; }

say "applying migrations/ to database exodrive"
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c 'CREATE DATABASE exodrive'
for f in migrations/*.sql; do psql_ -f "$f"; echo "  $f"; done

say "invalidator setup, check, then run"
export INVALIDATOR_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/exodrive"
export INVALIDATOR_REDIS_URL="redis://127.0.0.1:$redis_port/0"
export INVALIDATOR_HTTP_LISTEN="127.0.0.1:$http_port"
# setup creates the publication and the slot; check then finds nothing missing.
INVALIDATOR_LOG_LEVEL=warn "$bin" setup --config invalidator.toml 2>&1 | sed 's/^/  /'
"$bin" check --config invalidator.toml | sed 's/^/  /'
"$bin" run --config invalidator.toml 2>"$work/invalidator.log" &
sidecar=$!
on_exit+=("kill $sidecar 2>/dev/null")
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null || { cat "$work/invalidator.log"; exit 1; }
echo "  invalidator run: /readyz says $(curl -s "http://127.0.0.1:$http_port/readyz")"

say "a customer and two cars; the application caches some keys"
customer=$(psql_ -Atc "INSERT INTO customers (email, name, user_id) VALUES ('ada@example.com', 'Ada', gen_random_uuid()) RETURNING id")
car=$(psql_ -Atc "INSERT INTO cars (make, model, year, daily_rate, location_id) VALUES ('Porsche', '911', 2024, 499, 'miami') RETURNING id")
other=$(psql_ -Atc "INSERT INTO cars (make, model, year, daily_rate, location_id) VALUES ('Ferrari', 'Roma', 2023, 899, 'miami') RETURNING id")
sleep 0.5 # let the inserts above do their own invalidating before the cache is filled
keys=(
  "availability:$car:2026-12-01:2026-12-05"
  "availability:$car:2026-12-10:2026-12-12"
  "customer:$customer:bookings"
  "dashboard:metrics:2026-11-26"
  "bookings:active:2026-12-01"
  "availability:$other:2026-12-01:2026-12-05"
  "car:$car"
  "fleet:all"
)
for k in "${keys[@]}"; do redis_ set "$k" cached >/dev/null; done

say "psql: INSERT INTO bookings (car $car, customer $customer)"
psql_ -c "INSERT INTO bookings (customer_id, car_id, start_date, end_date, total_amount, overall_status)
          VALUES ('$customer', '$car', '2026-12-01', '2026-12-05', 1996, 'confirmed')"
for _ in $(seq 50); do
  [ "$(redis_ exists "customer:$customer:bookings")" = 0 ] && break
  sleep 0.1
done

say "cache keys after the booking"
for k in "${keys[@]}"; do
  if [ "$(redis_ exists "$k")" = 1 ]; then state="kept   "; else state="deleted"; fi
  printf '  %s  %s\n' "$state" "$k"
done

say "metrics"
curl -s "http://127.0.0.1:$http_port/metrics" | grep -E '^invalidator_(changes_total|keys_deleted_total|patterns_total|confirmed_lsn)' | sed 's/^/  /'

say "SIGTERM: finish, acknowledge, exit"
kill -TERM "$sidecar"
wait "$sidecar" && echo "  invalidator exited with status 0"
