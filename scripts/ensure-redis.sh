#!/usr/bin/env bash
# Make sure a Redis answers on $STRATA_REDIS_URL (default redis://127.0.0.1:6379/0), and that the
# redis-server binary exists (the test suite starts private servers of its own).
# Installs redis-server from Debian's packages when missing and we are root; starts a server with
# nothing kept on disk when none answers. Idempotent.
set -euo pipefail

url="${STRATA_REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379

"$(dirname "$0")/ensure-apt.sh" redis-server:redis-server redis-cli:redis-tools

if redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1; then
  exit 0
fi
case "$host" in
  127.*|localhost|::1) ;;
  *) echo "ensure-redis: no Redis answers at $host:$port and it is not local; start it there" >&2; exit 1 ;;
esac
echo "ensure-redis: starting redis-server on $host:$port"
mkdir -p .run
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --dir "$PWD/.run" --logfile "$PWD/.run/redis.log" --maxmemory 512mb --maxmemory-policy allkeys-lru
for _ in $(seq 50); do
  redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "ensure-redis: redis-server did not come up; see .run/redis.log" >&2
exit 1
