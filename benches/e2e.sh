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
# there, as perf-<rate>.data and top-<rate>.txt), E2E_BIN_DIR (run the `nops` and `fleet`
# binaries in that directory instead of building them: A/B runs of two builds),
# E2E_SEPARATE_WAIT (when set: each task is submitted, then waited for with a second request,
# instead of one `POST /api/v1/tasks?wait_ms=…`), E2E_SCORER (the scorer plugin routing uses,
# default `scorer-weighted`, the reference one, staged from target/wasm as `make run` does, or
# from E2E_WASM_DIR; `builtin` runs without a scorer plugin: the built-in power of two choices). Under the table, for each rate, the tasks
# slower than 10 ms by when they were submitted (the fleet's busiest 100 ms windows): a few
# stalls show as a few crowded windows, a uniform tail as many thin ones.
set -euo pipefail
cd "$(dirname "$0")/.."

agents=${E2E_AGENTS:-1000}
rates=${E2E_RATES:-"250 500 1000"}
seconds=${E2E_SECONDS:-20}

if [[ -n "${E2E_BIN_DIR:-}" ]]; then
    bin=$E2E_BIN_DIR
else
    cargo build --release --locked -p nops -p nops-bench >&2
    bin=target/release
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

scorer=${E2E_SCORER:-scorer-weighted}
scorer_args=()
if [[ "$scorer" != builtin ]]; then
    if [[ -z "${E2E_WASM_DIR:-}" ]]; then scripts/build-plugins.sh >&2; fi
    PLUGINS_BUILT_DIR=${E2E_WASM_DIR:-} scripts/stage-plugins.sh "$work/plugins" >/dev/null
    scorer_args=(--plugins-dir "$work/plugins" --routing-scorer "$scorer")
fi

port=7441
env_db=()
if [[ -n "${E2E_DATABASE_URL:-}" ]]; then env_db=(NOPS_DATABASE_URL="$E2E_DATABASE_URL"); fi
# One tenant at 1,000 tasks/s makes ~2,200 requests/s (submit, wait, heartbeats), past the
# default per-tenant budget of 1,000/s: rate limits are off so the figure is dispatch's own.
env "${env_db[@]}" NOPS_RATE_LIMITS_ENABLED=false NOPS_LOG=warn NOPS_DATA_DIR="$work/kernel" NOPS_LISTEN="127.0.0.1:$port" \
    "$bin/nops" serve "${scorer_args[@]}" >"$work/kernel.out" 2>"$work/kernel.err" &
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

if [[ "$scorer" != builtin ]]; then
    # The directory scanner loads and activates the staged plugins shortly after start.
    active=""
    for _ in $(seq 100); do
        active=$(curl -sf -H "Authorization: Bearer $key" "http://127.0.0.1:$port/api/v1/plugins/$scorer" |
            python3 -c 'import json,sys; d = json.load(sys.stdin); print((d.get("state") or d).get("active") or "")' 2>/dev/null || true)
        [[ -n "$active" ]] && break
        sleep 0.1
    done
    if [[ -z "$active" ]]; then
        echo "e2e: the scorer plugin \`$scorer\` did not become active" >&2
        cat "$work/kernel.err" >&2
        exit 1
    fi
fi

# What answered the route decisions: the scorer's successful calls, and the decisions it did
# not answer by reason (`no_scorer` without a scorer plugin).
routing_counts() {
    curl -sf "http://127.0.0.1:$port/metrics" | awk -v scorer="default/$scorer" '
        /^nops_plugin_calls_total/ && index($0, "\"" scorer "\"") && /outcome="ok"/ { ok += $NF }
        /^nops_route_fallbacks_total/ { sub(/^nops_route_fallbacks_total/, ""); fallbacks = fallbacks " " $0 }
        END { printf "scorer calls answered: %d; fallbacks:%s", ok, (fallbacks == "" ? " none" : fallbacks) }'
}

# User + system CPU of the kernel process so far, in clock ticks.
kernel_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$kernel_pid/stat"; }

echo "## End to end, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $agents agents, ${seconds}s per rate"
echo
echo "| rate (tasks/s) | path | succeeded/s | p50 ms | p95 ms | p99 ms | max ms | submit p50 / p99 ms | kernel CPU µs/task | outcomes |"
echo "|---|---|---|---|---|---|---|---|---|---|"
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
         perf record -q ${E2E_PERF_OPTS:--F 499 -g} -p "$kernel_pid" -o "$E2E_PROFILE_DIR/perf-$rate.data" -- sleep 8 \
             >/dev/null 2>&1 || true
         wait) &
        profiler=$!
    fi
    cpu_before=$(kernel_cpu_ticks)
    kern=$("$bin/fleet" --kernel "http://127.0.0.1:$port" --key "$key" --agents "$agents" --rate "$rate" \
        --seconds "$seconds" --run "fleet$run" ${E2E_SEPARATE_WAIT:+--separate-wait})
    cpu_ticks=$(( $(kernel_cpu_ticks) - cpu_before ))
    if [[ -n "${E2E_PROFILE_DIR:-}" ]]; then wait "$profiler" || true; fi
    for row in "$base" "$kern"; do
        python3 - "$rate" "$row" "$cpu_ticks" "$(getconf CLK_TCK)" "$work/slow.md" <<'EOF'
import json, sys
rate, r, ticks, hz = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# When the slow tasks were submitted: a few stalls, or a uniform tail.
if r["mode"] == "kernel" and r.get("slow_windows"):
    bursts = ", ".join(f"{w['at_s']:.1f} s ({w['tasks']}, max {w['max_ms']:.0f} ms)" for w in r["slow_windows"])
    with open(sys.argv[5], "a") as slow:
        slow.write(f"- {rate} tasks/s: {r['slow_tasks']} tasks over {r['slow_task_ms']} ms; busiest 100 ms windows: {bursts}\n")
# Everything the kernel process spent (user + system) during the fleet's run, registrations
# and warm-up included, per task submitted.
submitted = r.get("submitted") or r["rate_per_s"] * (r["measured_s"] + 3)
cpu = "—" if r["mode"] == "baseline" else f"{ticks / hz * 1e6 / submitted:.0f}"
outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
submit = "—" if r.get("submit_p99_ms") is None else f"{r['submit_p50_ms']:.2f} / {r['submit_p99_ms']:.2f}"
print(f"| {rate} | {r['mode']} | {r['succeeded_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {submit} | {cpu} | {outcomes} |")
EOF
    done
done
echo
echo "Routing: ${scorer/#builtin/the built-in power of two choices (no scorer plugin)}${active:+ $active}; over all runs, $(routing_counts || true)"
if [[ -s "$work/slow.md" ]]; then
    echo
    echo "Slow tasks by when they were submitted (seconds into the measured window):"
    cat "$work/slow.md"
fi
