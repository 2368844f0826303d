#!/usr/bin/env bash
# Figure 5's connection storm, Switchboard against the tokio-tungstenite
# reference, alternating run by run (switchboard, tokio, switchboard, …) so
# that both meet the same machine, then the median and the range of each:
# connections per second and server CPU µs per connection.
#
#   bench/connect-pairs.sh tls|plain [PAIRS]          # default: tls 12
#
# Switchboard joins in the upgrade URL (`--join-in-url`: `welcome` and
# `joined` are written, one round trip in all); the reference only upgrades.
# Server on CPU 0, generator on CPU 1, as in bench/run.sh. Environment:
# SB_BIN, REF_BIN, LT_BIN (default this tree's release binaries), OUT
# (results dir). Build first: cargo build --release --workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-tls}
PAIRS=${2:-12}
SB=${SB_BIN:-target/release/switchboard}
REF=${REF_BIN:-target/release/tokio-broadcast}
LT=${LT_BIN:-target/release/switchboard-loadtest}
OUT=${OUT:-$(mktemp -d /tmp/switchboard-pairs.XXXXXX)}
N=$([ "$MODE" = plain ] && echo 20000 || echo 8000)
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
echo "results in $OUT" >&2

NATS=""
# shellcheck source=bench/lib.sh
source bench/lib.sh
ensure_certs

for i in $(seq 1 "$PAIRS"); do
    for srv in switchboard tokio; do
        start_server $srv
        url=$([ "$MODE" = plain ] && echo "$WS" || echo "$WSS")
        extra=$([ $srv = switchboard ] && echo "--join-in-url" || echo "--raw")
        taskset -c 1 "$LT" connect $extra --url "$url" --ca "$OUT/certs/ca.pem" --clients "$N" \
            --concurrency 64 --duration 60 --source-ips 127.0.0.2-127.0.0.60 \
            --server-pid "$PID" --quiet >"$OUT/$srv-$i.txt" 2>&1 || true
        stop_server
    done
done

python3 - "$OUT" "$PAIRS" "$N" <<'EOF'
import re, statistics, sys
out, pairs, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows, each = {}, {}
for srv in ("switchboard", "tokio"):
    rates, cpus, gens = [], [], []
    for i in range(1, pairs + 1):
        t = open(f"{out}/{srv}-{i}.txt").read()
        rates.append(float(re.search(r"([\d.]+) per second", t).group(1)))
        cpus.append(float(re.search(r"server pid \d+:\s+([\d.]+) CPU-s", t).group(1)) * 1e6 / n)
        gens.append(int(re.search(r"load generator: [\d.]+ CPU-s \((\d+)%", t).group(1)))
    rows[srv] = (statistics.median(rates), statistics.median(cpus))
    each[srv] = (rates, cpus)
    print(f"{srv:12} connections/s median {rows[srv][0]:8.0f} ({min(rates):.0f}-{max(rates):.0f})"
          f"   server µs/connection median {rows[srv][1]:5.0f} ({min(cpus):.0f}-{max(cpus):.0f})"
          f"   generator {min(gens)}-{max(gens)} % of its core")
r, c = rows["switchboard"][0] / rows["tokio"][0], rows["tokio"][1] / rows["switchboard"][1]
print(f"switchboard / tokio: {r:.2f} by rate, {c:.2f} by server CPU per connection (as a rate)")
(sr, sc), (tr, tc) = each["switchboard"], each["tokio"]
pair_rates = [a / b for a, b in zip(sr, tr)]
pair_cpus = [b / a for a, b in zip(sc, tc)]
print(f"pairs: median of the pairs' ratios {statistics.median(pair_rates):.2f} by rate, "
      f"{statistics.median(pair_cpus):.2f} by server CPU; "
      f"{sum(x >= 0.95 for x in pair_rates)} of {pairs} pairs at >= 0.95 by rate")
EOF
