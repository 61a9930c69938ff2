#!/bin/sh
# Issue 5's replication benchmark: sync writes and reads at both sites of `stretch up` at
# 1, 5 and 10 ms RTT between the sites, beside one `stretch serve` site on the same disk,
# all with `stretch bench` in one run. Prints one Markdown table with the targets:
#   sync write QD1 p50 <= RTT + single-site p50 + 0.2 ms
#   sync write QD32 IOPS >= 0.8 x min(32 / (RTT + single-site latency), single-site IOPS)
#   reads at either site within 10% of single-site
#
# Usage: bench/replication.sh [STRETCH_BINARY]   (default target/release/stretch)
# Knobs: STRETCH_BENCH_DURATION (per cell, default 10s), STRETCH_BENCH_DIR (volumes; default
# a fresh directory under /var/tmp, removed on exit: each run writes about 1.8 GB),
# STRETCH_BENCH_OUT (reports; default bench-out/replication),
# STRETCH_BENCH_RTTS (default "1ms 5ms 10ms").
# Every process it starts is stopped on exit; every wait is bounded.
set -eu

BIN=${1:-target/release/stretch}
DUR=${STRETCH_BENCH_DURATION:-10s}
OUT=${STRETCH_BENCH_OUT:-bench-out/replication}
RTTS=${STRETCH_BENCH_RTTS:-"1ms 5ms 10ms"}
SIZE=1GiB
RANGE=256MiB
. "$(dirname "$0")/lib.sh"

bench() { # OUTDIR ARGS...
    o=$1; shift
    "$BIN" bench "$@" --rw randwrite,randread --qd 1,32 --duration "$DUR" \
        --range "$RANGE" --prefill --quiet --out "$OUT/$o" > "$OUT/$o.md"
}

echo "single site (stretch serve) ..." >&2
"$BIN" volume create vol0 --size "$SIZE" --data-dir "$DIR/single" > /dev/null
"$BIN" serve --data-dir "$DIR/single" --listen 127.0.0.1:0 > "$DIR/single.out" 2> "$DIR/single.err" &
PIDS="$PIDS $!"
wait_line "$DIR/single.out" "nbd://"
URI=$(grep -m1 '^nbd://' "$DIR/single.out")
bench single --target "single=$URI"
kill "$!" 2>/dev/null || true

for rtt in $RTTS; do
    echo "two sites at $rtt RTT (stretch up) ..." >&2
    "$BIN" up --rtt "$rtt" --size "$SIZE" --data-dir "$DIR/up-$rtt" \
        --listen 127.0.0.1:0 --listen-b 127.0.0.2:0 --link-admin 127.0.0.1:0 \
        > "$DIR/up-$rtt.out" 2> "$DIR/up-$rtt.err" &
    pid=$!
    PIDS="$PIDS $pid"
    wait_line "$DIR/up-$rtt.out" "  site B"
    A=$(sed -n 's/^  site A  //p' "$DIR/up-$rtt.out")
    B=$(sed -n 's/^  site B  //p' "$DIR/up-$rtt.out")
    bench "rtt-$rtt" --target "A=$A" --target "B=$B"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done

python3 - "$OUT" $RTTS <<'EOF'
import json, sys, re
out, rtts = sys.argv[1], sys.argv[2:]
def cases(name):
    return json.load(open(f"{out}/{name}/report.json"))["cases"]
def cell(cs, target, rw, qd):
    for c in cs:
        if c["target"] == target and c["rw"] == rw and c["queue_depth"] == qd:
            return c
    raise SystemExit(f"no {target} {rw} qd{qd} cell")
def ms(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)ms", s)
    return float(m.group(1))
single = cases("single")
w1 = cell(single, "single", "randwrite", 1)
w32 = cell(single, "single", "randwrite", 32)
r1 = cell(single, "single", "randread", 1)
r32 = cell(single, "single", "randread", 32)
lat_ms = w1["latency_us"]["p50"] / 1000
print(f"single site: write QD1 p50 {lat_ms:.3f} ms, write QD32 {w32['iops']:.0f} IOPS, "
      f"read QD1 {r1['iops']:.0f} IOPS, read QD32 {r32['iops']:.0f} IOPS\n")
print("| RTT | site | write QD1 p50 (ms) | limit (ms) | write QD32 IOPS | target IOPS | read QD1 / single | read QD32 / single | verdict |")
print("|---|---|---|---|---|---|---|---|---|")
for rtt in rtts:
    cs = cases(f"rtt-{rtt}")
    for site in ["A", "B"]:
        p50 = cell(cs, site, "randwrite", 1)["latency_us"]["p50"] / 1000
        limit = ms(rtt) + lat_ms + 0.2
        iops = cell(cs, site, "randwrite", 32)["iops"]
        target = 0.8 * min(32 / ((ms(rtt) + lat_ms) / 1000), w32["iops"])
        rr1 = cell(cs, site, "randread", 1)["iops"] / r1["iops"]
        rr32 = cell(cs, site, "randread", 32)["iops"] / r32["iops"]
        ok = p50 <= limit and iops >= target and rr1 >= 0.9 and rr32 >= 0.9
        print(f"| {rtt} | {site} | {p50:.3f} | {limit:.3f} | {iops:.0f} | {target:.0f} | {rr1:.2f} | {rr32:.2f} | {'met' if ok else 'MISSED'} |")
EOF
