#!/usr/bin/env bash
# Services the integration tests talk to, on 127.0.0.1 only: a throwaway redis-server.
#   bash scripts/services.sh start   # installs redis-server if missing, starts it, prints its URL
#   bash scripts/services.sh stop    # stops it and removes its folder
# Nothing is exported: the tests read REC2PM_TEST_REDIS_URL, which the caller sets to the
# printed URL (redis://127.0.0.1:$REC2PM_REDIS_PORT/0).
set -euo pipefail
port="${REC2PM_REDIS_PORT:-6391}"
dir="${TMPDIR:-/tmp}/rec2pm-services-$port"
pidfile="$dir/redis.pid"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

start() {
  if ! command -v redis-server >/dev/null; then
    echo "services: installing redis-server" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null
  fi
  if running; then echo "redis://127.0.0.1:$port/0"; return 0; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "services: port $port on 127.0.0.1 is taken by another process; set REC2PM_REDIS_PORT" >&2
    return 1
  fi
  mkdir -p "$dir"
  # No persistence: the tests own this server and its data dies with it.
  redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --pidfile "$pidfile" --dir "$dir" \
    --logfile "$dir/redis.log" --save "" --appendonly no
  for _ in $(seq 50); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
      echo "redis://127.0.0.1:$port/0"; return 0
    fi
    sleep 0.1
  done
  echo "services: redis-server did not answer on 127.0.0.1:$port; log:" >&2
  cat "$dir/redis.log" >&2 || true
  stop  # a server that did not answer is not left running for the next start to reuse
  return 1
}

stop() {
  if running; then
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
