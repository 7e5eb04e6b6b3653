#!/usr/bin/env bash
# The cost of authentication and authorization per request, as a ratio to an unauthenticated
# handler measured in the same run (issue "identity and access").
#
# One kernel (release build, SQLite, rate limits off so they do not cap the figures) serves:
#   baseline   GET /health                      no credential, no policy: a static JSON answer
#   api key    GET /api/v1/whoami               API key (cached record) + scope + built-in ABAC
#   jwt hs256  GET /api/v1/whoami               HS256 JWT (development issuer) + scope + built-in ABAC
#   plugin     GET /api/v1/whoami               API key + the governing policy plugin `api-access`
#                                               (policy-abac with policies/tenant-isolation.json, wasm)
# whoami answers a small JSON document, like /health, so the rows differ only in the auth work.
# Rows alternate within each round; medians of BENCH_ROUNDS rounds of BENCH_SECONDS each.
#
# Environment: BENCH_SECONDS (default 10), BENCH_ROUNDS (default 3), BENCH_CONNECTIONS (default 32).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
connections=${BENCH_CONNECTIONS:-32}

if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: installing wrk (Debian package)" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
fi
scripts/build-plugins.sh >&2
cargo build --release --locked -p nops >&2
bin=target/release
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# The governing policy: the ABAC plugin with the shipped document, staged as `api-access`.
scripts/stage-plugins.sh "$work/staged" >&2
mkdir -p "$work/plugins"
cp "$work/staged/abac.wasm" "$work/plugins/api-access.wasm"
cp "$work/staged/tenant-isolation.json" "$work/plugins/"
sed 's/^name = "abac"$/name = "api-access"/' "$work/staged/abac.toml" >"$work/plugins/api-access.toml"

export NOPS_JWT_HS256_SECRET=bench-secret-bench-secret-bench-secret NOPS_JWT_ISSUER=bench NOPS_JWT_AUDIENCE=nops
port=7441
NOPS_LOG=warn NOPS_DATA_DIR="$work/data" NOPS_LISTEN="127.0.0.1:$port" NOPS_RATE_LIMITS_ENABLED=false \
    "$bin/nops" serve >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.1; done
key=$(grep -o 'nops_[A-Za-z0-9]\{38\}' "$work/err" | head -n1)
jwt=$("$bin/nops" token mint --secret-env NOPS_JWT_HS256_SECRET --issuer bench --audience nops \
    --subject bench-admin --role admin --scope '*' --ttl-s 3600)
curl -sf "http://127.0.0.1:$port/api/v1/whoami" -H "Authorization: Bearer $jwt" >/dev/null \
    || { echo "bench: the minted JWT is refused" >&2; exit 1; }

run() { # $1: path, $2: credential
    NOPS_PATH=$1 NOPS_CREDENTIAL=$2 wrk -t1 -c"$connections" -d"${seconds}s" -s benches/auth.lua \
        "http://127.0.0.1:$port" | grep '^RESULT'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*$1=([0-9]+).*/\1/"; }

: >"$work/baseline"; : >"$work/apikey"; : >"$work/jwt"; : >"$work/plugin"
for _ in $(seq "$rounds"); do
    run /health "" >>"$work/baseline"
    run /api/v1/whoami "$key" >>"$work/apikey"
    run /api/v1/whoami "$jwt" >>"$work/jwt"
done
# Now load the governing policy plugin and measure the same path through it, alternating
# with the baseline again.
"$bin/nops" plugins upload "$work/plugins/api-access.toml" --activate --url "http://127.0.0.1:$port" --api-key "$key" >/dev/null
: >"$work/baseline2"
for _ in $(seq "$rounds"); do
    run /health "" >>"$work/baseline2"
    run /api/v1/whoami "$key" >>"$work/plugin"
done
decided=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^nops_authz_decisions_total\{decision="allow",source="plugins"\}/ {print $2}')

row() { # $1: label, $2: file, $3: baseline file
    local rps p50 p99 bad base
    rps=$(field rps <"$2" | median); p50=$(field p50_us <"$2" | median); p99=$(field p99_us <"$2" | median)
    bad=$(field non2xx <"$2" | sort -n | tail -n1)
    base=$(field rps <"$3" | median)
    echo "| $1 | $rps | ${p50} µs | ${p99} µs | $(awk -v r="$rps" -v b="$base" 'BEGIN {printf "%.2f", r / b}') | $bad |"
}
echo "## Auth overhead run of $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores (wrk -t1 -c$connections, ${seconds}s x $rounds rounds, median)"
echo
echo "| path | requests/s | p50 | p99 | throughput vs baseline | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
row "baseline: GET /health, no auth" "$work/baseline" "$work/baseline"
row "API key + scope + built-in ABAC" "$work/apikey" "$work/baseline"
row "JWT HS256 + scope + built-in ABAC" "$work/jwt" "$work/baseline"
row "baseline again (second half)" "$work/baseline2" "$work/baseline2"
row "API key + scope + ABAC policy plugin (wasm)" "$work/plugin" "$work/baseline2"
echo
echo "decisions made by the plugin during the run: ${decided:-0}"
