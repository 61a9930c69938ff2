#!/bin/sh
# The ack policies side by side (DESIGN.md §5): 4K random writes at QD1 and QD32 at site A
# of `stretch up` for each policy, at one RTT between the sites, in one run. Prints one
# Markdown table: p50/p99 latency at QD1 and IOPS at QD32 per policy.
#
# Usage: bench/policies.sh [STRETCH_BINARY]   (default target/release/stretch)
# Knobs: STRETCH_BENCH_DURATION (per cell, default 10s), STRETCH_BENCH_RTT (default 5ms),
# STRETCH_BENCH_POLICIES (default "sync sync-received async adaptive"), STRETCH_BENCH_DIR (volumes;
# default a fresh directory under /var/tmp, removed on exit), STRETCH_BENCH_OUT (default bench-out/policies).
# Every process it starts is stopped on exit; every wait is bounded.
set -eu

BIN=${1:-target/release/stretch}
DUR=${STRETCH_BENCH_DURATION:-10s}
RTT=${STRETCH_BENCH_RTT:-5ms}
POLICIES=${STRETCH_BENCH_POLICIES:-"sync sync-received async adaptive"}
OUT=${STRETCH_BENCH_OUT:-bench-out/policies}
. "$(dirname "$0")/lib.sh"

for policy in $POLICIES; do
    echo "two sites at $RTT RTT, policy $policy (stretch up) ..." >&2
    "$BIN" up --rtt "$RTT" --size 1GiB --policy "$policy" --data-dir "$DIR/$policy" \
        --listen 127.0.0.1:0 --listen-b 127.0.0.2:0 --link-admin 127.0.0.1:0 \
        > "$DIR/$policy.out" 2> "$DIR/$policy.err" &
    pid=$!
    PIDS="$PIDS $pid"
    wait_line "$DIR/$policy.out" "  site B"
    A=$(sed -n 's/^  site A  //p' "$DIR/$policy.out")
    "$BIN" bench --target "$policy=$A" --rw randwrite --qd 1,32 --duration "$DUR" \
        --range 256MiB --prefill --quiet --out "$OUT/$policy" > "$OUT/$policy.md"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done

python3 - "$OUT" "$RTT" $POLICIES <<'PY'
import json, sys
out, rtt, policies = sys.argv[1], sys.argv[2], sys.argv[3:]
def cell(policy, qd):
    for c in json.load(open(f"{out}/{policy}/report.json"))["cases"]:
        if c["rw"] == "randwrite" and c["queue_depth"] == qd:
            return c
    raise SystemExit(f"no {policy} qd{qd} cell")
print(f"4K random writes at site A, {rtt} RTT between the sites\n")
print("| policy | QD1 p50 (ms) | QD1 p99 (ms) | QD32 IOPS |")
print("|---|---|---|---|")
for p in policies:
    q1, q32 = cell(p, 1), cell(p, 32)
    print(f"| {p} | {q1['latency_us']['p50'] / 1000:.3f} | {q1['latency_us']['p99'] / 1000:.3f} | {q32['iops']:.0f} |")
PY
