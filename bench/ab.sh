#!/usr/bin/env bash
# Before/after: bench/run.sh's Switchboard figures for two server builds in
# one sitting, the builds alternating run by run (before, after, before, …)
# so that both meet the same machine, then one table of both with each
# figure's median and its run-to-run spread (min–max) per build.
#
#   BEFORE_BIN=/path/to/old/switchboard bench/ab.sh [FIGURE...]   # default: 1 2 4 6
#
# Environment: BEFORE_BIN (required), AFTER_BIN (default this tree's
# target/release/switchboard), REPEAT (alternations, default 3), OUT
# (results dir; OUT/before-N and OUT/after-N hold each run.sh run), and what
# bench/run.sh reads (LT_BIN, QUIET_WAIT, IDLE_SIZES, …). SKIP_BUILD=1 is
# passed on: build both binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
: "${BEFORE_BIN:?BEFORE_BIN names the switchboard binary of the before build}"
AFTER_BIN=${AFTER_BIN:-$ROOT/target/release/switchboard}
REPEAT=${REPEAT:-3}
OUT=${OUT:-$(mktemp -d /tmp/switchboard-ab.XXXXXX)}
FIGURES=${*:-1 2 4 6}
mkdir -p "$OUT"
echo "results in $OUT" >&2
for i in $(seq 1 "$REPEAT"); do
    for build in before after; do
        bin=$([ $build = before ] && echo "$BEFORE_BIN" || echo "$AFTER_BIN")
        read -r l1 l5 l15 _ </proc/loadavg
        echo "== pass $i: $build, $bin; load average $l1 $l5 $l15" >&2
        OUT="$OUT/$build-$i" SB_BIN="$bin" SERVERS=switchboard SKIP_BUILD=1 REPEAT=1 \
            bench/run.sh $FIGURES >"$OUT/$build-$i.table" 2>"$OUT/$build-$i.log" || true
    done
done
python3 bench/ab.py "$OUT" | tee "$OUT/ab-summary.txt"
