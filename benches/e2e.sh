#!/usr/bin/env bash
# End-to-end routing and dispatch: 1,000 simulated agents in a second process (benches/src/
# fleet.rs) register, heartbeat and answer pushed attempts while a driver submits tasks
# open-loop and waits for each result: register → heartbeat → route → dispatch → complete.
#
# In the same run, the same driver against a bare echo endpoint (no kernel) gives the
# baseline: what the HTTP round trips alone cost on this machine.
#
# Environment: E2E_AGENTS (default 1000), E2E_RATES (default "250 500 1000"), E2E_SECONDS
# (default 20), E2E_DATABASE_URL (default: a fresh SQLite file; a postgres:// URL runs the
# kernel on PostgreSQL; the database should be empty), E2E_PROFILE_DIR (when set: during each
# rate's kernel run, `perf record` of the kernel for 8 s and `top` of all three processes go
# there, as perf-<rate>.data and top-<rate>.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

agents=${E2E_AGENTS:-1000}
rates=${E2E_RATES:-"250 500 1000"}
seconds=${E2E_SECONDS:-20}

cargo build --release --locked -p nops -p nops-bench >&2
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port=7441
env_db=()
if [[ -n "${E2E_DATABASE_URL:-}" ]]; then env_db=(NOPS_DATABASE_URL="$E2E_DATABASE_URL"); fi
# One tenant at 1,000 tasks/s makes ~2,200 requests/s (submit, wait, heartbeats), past the
# default per-tenant budget of 1,000/s: rate limits are off so the figure is dispatch's own.
env "${env_db[@]}" NOPS_RATE_LIMITS_ENABLED=false NOPS_LOG=warn NOPS_DATA_DIR="$work/kernel" NOPS_LISTEN="127.0.0.1:$port" \
    "$bin/nops" serve >"$work/kernel.out" 2>"$work/kernel.err" &
kernel_pid=$!
pids+=("$kernel_pid")
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
key=$(grep -o 'nops_[A-Za-z0-9]\{38\}' "$work/kernel.err" | head -n1)
if [[ -z "$key" ]]; then
    echo "e2e: no bootstrap key (is the database empty?)" >&2
    cat "$work/kernel.err" >&2
    exit 1
fi

echo "## End to end, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $agents agents, ${seconds}s per rate"
echo
echo "| rate (tasks/s) | path | succeeded/s | p50 ms | p95 ms | p99 ms | max ms | outcomes |"
echo "|---|---|---|---|---|---|---|---|"
run=0
for rate in $rates; do
    run=$((run + 1))
    base=$("$bin/fleet" --kernel "http://127.0.0.1:$port" --key "$key" --agents 1 --rate "$rate" \
        --seconds "$seconds" --baseline --run "base$run")
    if [[ -n "${E2E_PROFILE_DIR:-}" ]]; then
        mkdir -p "$E2E_PROFILE_DIR"
        # Past registration and warm-up: the measured load only.
        (sleep 6
         top -b -n 3 -d 2 -w 200 >"$E2E_PROFILE_DIR/top-$rate.txt" &
         perf record -q -F 499 -g -p "$kernel_pid" -o "$E2E_PROFILE_DIR/perf-$rate.data" -- sleep 8 \
             >/dev/null 2>&1 || true
         wait) &
        profiler=$!
    fi
    kern=$("$bin/fleet" --kernel "http://127.0.0.1:$port" --key "$key" --agents "$agents" --rate "$rate" \
        --seconds "$seconds" --run "fleet$run")
    if [[ -n "${E2E_PROFILE_DIR:-}" ]]; then wait "$profiler" || true; fi
    for row in "$base" "$kern"; do
        python3 - "$rate" "$row" <<'EOF'
import json, sys
rate, r = sys.argv[1], json.loads(sys.argv[2])
outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
print(f"| {rate} | {r['mode']} | {r['succeeded_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {outcomes} |")
EOF
    done
done
