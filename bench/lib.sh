# Shared by the benchmark scripts (sourced, not run): a scratch directory removed on exit
# unless the caller named one, every started process stopped on exit, and a bounded wait for
# a daemon's output line.
#
# Before sourcing: BIN (the stretch binary), OUT (reports), and optionally
# STRETCH_BENCH_DIR. After: DIR (volumes), PIDS (append every started process), wait_line.

OWN_DIR=""
if [ -n "${STRETCH_BENCH_DIR:-}" ]; then
    DIR=$STRETCH_BENCH_DIR
else
    DIR=$(mktemp -d /var/tmp/stretch-bench.XXXXXX)
    OWN_DIR=$DIR
fi

[ -x "$BIN" ] || { echo "no stretch binary at $BIN (cargo build --release first)" >&2; exit 2; }
mkdir -p "$OUT"
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$OWN_DIR" ]; then rm -rf "$OWN_DIR"; fi
}
trap cleanup EXIT INT TERM

# Waits (at most 60 s) until FILE contains a line starting with PREFIX.
wait_line() {
    i=0
    while ! grep -q "^$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 600 ] || { echo "timed out waiting for '$2' in $1" >&2; exit 1; }
        sleep 0.1
    done
}
