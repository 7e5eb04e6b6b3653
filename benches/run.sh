#!/usr/bin/env bash
# Runs the foundation benchmarks on this machine and prints a Markdown report.
#
#   1. Heartbeat ingest over keep-alive HTTP, driven by wrk from a second process, against
#      the kernel on SQLite and against a bare axum handler returning 200, alternating, in the
#      same run. The ratio kernel/bare is the figure.
#   2. A registry of 100,000 agents: kernel RSS growth per agent, and the latency of
#      capability queries with a version requirement.
#
# Environment: BENCH_SECONDS (per wrk run, default 10), BENCH_ROUNDS (default 3),
# BENCH_CONNECTIONS (default 64), BENCH_AGENTS (default 100000), BENCH_PG_URL (also run the
# registry figures on PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
connections=${BENCH_CONNECTIONS:-64}
agents=${BENCH_AGENTS:-100000}

if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: installing wrk (Debian package)" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --locked -p nops -p nops-bench >&2
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

start_kernel() { # $1: data dir, $2: port
    NOPS_LOG=warn NOPS_DATA_DIR="$1" NOPS_LISTEN="127.0.0.1:$2" "$bin/nops" serve >"$1.out" 2>"$1.err" &
    pids+=($!)
    kernel_pid=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$2/ready" >/dev/null 2>&1 && break
        sleep 0.1
    done
    key=$(grep -o 'nops_[A-Za-z0-9]\{38\}' "$1.err" | head -n1)
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*$1=([0-9]+).*/\1/"; }

echo "## Run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uname -r)"
echo

# --- 1. heartbeat ingest ------------------------------------------------------------------
start_kernel "$work/hb" 7431
export NOPS_KEY=$key NOPS_IDS=$work/hb.ids
"$bin/registry-bench" --key "$key" --base http://127.0.0.1:7431 seed --agents 1000 --ids-out "$NOPS_IDS" >&2
"$bin/bare-server" --listen 127.0.0.1:7432 2>/dev/null &
pids+=($!)
sleep 0.5
wrk_run() { # $1: port
    wrk -t1 -c"$connections" -d"${seconds}s" -s benches/heartbeat.lua "http://127.0.0.1:$1" | grep '^RESULT'
}
: >"$work/kernel.txt"; : >"$work/bare.txt"
for r in $(seq "$rounds"); do
    wrk_run 7432 >>"$work/bare.txt"
    wrk_run 7431 >>"$work/kernel.txt"
done
k_rps=$(field rps <"$work/kernel.txt" | median); b_rps=$(field rps <"$work/bare.txt" | median)
k_p50=$(field p50_us <"$work/kernel.txt" | median); b_p50=$(field p50_us <"$work/bare.txt" | median)
k_p99=$(field p99_us <"$work/kernel.txt" | median); b_p99=$(field p99_us <"$work/bare.txt" | median)
k_bad=$(awk '{print $5, $6}' "$work/kernel.txt" | tr "\n" " ")
flushed=$(curl -s http://127.0.0.1:7431/metrics | awk '/^nops_heartbeats_flushed_total/ {print $2}')
accepted=$(curl -s http://127.0.0.1:7431/metrics | awk '/^nops_heartbeats_total/ {print $2}')
echo "### Heartbeat ingest (wrk -t1 -c$connections, ${seconds}s x $rounds rounds, median)"
echo
echo "| target | requests/s | p50 | p99 |"
echo "|---|---:|---:|---:|"
echo "| bare axum handler (baseline) | $b_rps | ${b_p50} µs | ${b_p99} µs |"
echo "| nops heartbeat, SQLite | $k_rps | ${k_p50} µs | ${k_p99} µs |"
echo
echo "ratio kernel/bare: $(awk -v k="$k_rps" -v b="$b_rps" 'BEGIN {printf "%.2f", k / b}')"
echo "kernel errors per round: $k_bad"
echo "heartbeats accepted: $accepted; states written to SQLite: $flushed (coalescing $(awk -v a="$accepted" -v f="$flushed" 'BEGIN {printf "%.0f", a / (f > 0 ? f : 1)}')x)"
echo

# --- 2. registry of N agents --------------------------------------------------------------
scale_run() { # $1: label, $2: port, $3: database URL (empty: SQLite in the data dir)
    local dir="$work/scale-$2"
    if [ -n "$3" ]; then
        NOPS_DATABASE_URL="$3" start_kernel "$dir" "$2"
    else
        start_kernel "$dir" "$2"
    fi
    local rss0 rss1 rss2 rss3
    rss0=$(rss_kib "$kernel_pid")
    "$bin/registry-bench" --key "$key" --base "http://127.0.0.1:$2" seed --agents "$agents" --concurrency 64 --ids-out "$dir.ids" >"$dir.seed"
    rss1=$(rss_kib "$kernel_pid")
    "$bin/registry-bench" --key "$key" --base "http://127.0.0.1:$2" heartbeat-all --ids "$dir.ids" --concurrency 64 >"$dir.hball"
    sleep 1
    rss2=$(rss_kib "$kernel_pid")
    "$bin/registry-bench" --key "$key" --base "http://127.0.0.1:$2" query --queries 2000 >"$dir.query"
    rss3=$(rss_kib "$kernel_pid")
    echo "### Registry of $agents agents ($1)"
    echo
    echo "- $(cat "$dir.seed")"
    echo "- $(cat "$dir.hball")"
    echo "- kernel RSS: $((rss0 / 1024)) MiB at start, $((rss1 / 1024)) MiB after registration, $((rss2 / 1024)) MiB after one heartbeat each, $((rss3 / 1024)) MiB after the queries"
    echo "- RSS growth per agent (registered + heartbeat state): $(( (rss2 - rss0) * 1024 / agents )) bytes"
    if [ -z "$3" ]; then
        echo "- database on disk: $(( $(du -cb "$dir"/nops.db* | tail -n1 | cut -f1) / 1024 / 1024 )) MiB"
    fi
    echo "- $(cat "$dir.query")"
    echo
    kill "$kernel_pid"
}

scale_run SQLite 7433 ""

# PostgreSQL, when BENCH_PG_URL names a server (e.g. postgres://postgres@127.0.0.1:5432/test):
# a fresh database is created for the run and dropped after it.
if [ -n "${BENCH_PG_URL:-}" ]; then
    pg_db="nops_bench_$(date +%s)"
    psql -q "$BENCH_PG_URL" -c "CREATE DATABASE $pg_db" >/dev/null
    scale_run PostgreSQL 7434 "${BENCH_PG_URL%/*}/$pg_db"
    sleep 1
    psql -q "$BENCH_PG_URL" -c "DROP DATABASE $pg_db WITH (FORCE)" >/dev/null
fi

# --- 3. event bus (EB01): throughput, publish-to-deliver latency, crash recovery -----------
benches/eb01.sh
