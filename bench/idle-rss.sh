#!/usr/bin/env bash
# Figure 4's idle memory split into anonymous and file-backed pages: one
# Switchboard binary, N idle plain connections each joined to a room of its
# own (as figure 4), the server's RssAnon and RssFile (/proc/PID/status)
# sampled every 0.5 s while they are held. VmRSS, which figure 4 reads,
# counts both; RssFile is code and other mapped files, not connections.
#
#   bench/idle-rss.sh BIN LABEL      # prints one line
#
# Environment: LT_BIN (default this tree's target/release/switchboard-loadtest),
# CLIENTS (default 10000), TLS=1 (wss, with the server's development CA). The server runs on CPU 0, the generator on CPU 1;
# the server is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1
LABEL=$2
LT=${LT_BIN:-$(pwd)/target/release/switchboard-loadtest}
N=${CLIENTS:-10000}
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d /tmp/switchboard-idle-rss.XXXXXX)
taskset -c 0 "$BIN" serve --listen 127.0.0.1:0 --plain-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --data-dir "$dir" --tls-cert "$dir/server.pem" --tls-key "$dir/server.key" \
    --max-connections 20000 >"$dir/log" 2>"$dir/err" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
ws=""
scheme=$([ "${TLS:-0}" = 1 ] && echo wss || echo ws)
for _ in $(seq 1 200); do
    ws=$(grep -o "$scheme://[0-9.:]*/ws" "$dir/log" | head -1 || true)
    [ -n "$ws" ] && break
    sleep 0.05
done
[ -n "$ws" ] || { echo "the server did not start; see $dir/err" >&2; exit 1; }
sleep 1
rss() { awk '/^RssAnon|^RssFile/ {printf "%s ", $2} END {print ""}' "/proc/$pid/status"; }
read -r anon0 file0 < <(rss)
taskset -c 1 "$LT" idle --url "$ws" --clients "$N" --rooms "$N" --ramp-up 2000 --warmup 3 \
    --duration 3 --server-pid "$pid" --ca "$dir/ca.pem" --source-ips 127.0.0.2-127.0.0.60 --quiet >"$dir/lt.txt" 2>&1 &
lt=$!
anon=0
file=0
while kill -0 $lt 2>/dev/null; do
    read -r a f < <(rss)
    [ "$a" -gt "$anon" ] && anon=$a
    [ "$f" -gt "$file" ] && file=$f
    sleep 0.5
done
wait $lt || true
echo "$LABEL: RssAnon +$(((anon - anon0) * 1024 / N)) B/conn, RssFile +$(((file - file0) * 1024 / N)) B/conn;" \
    "$(grep -o 'server RSS.*' "$dir/lt.txt" || echo 'no RSS line')"
