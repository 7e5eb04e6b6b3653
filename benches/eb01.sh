#!/usr/bin/env bash
# EB01: the event bus measured for the edge, in one run on this machine (benches/src/eb01.rs).
#
#   1. durable ingest in batches of 1,000: embedded bus on SQLite and on PostgreSQL, the NATS
#      JetStream bus, raw async-nats JetStream and raw Redis Streams as references;
#   2. publish-to-deliver latency at a fixed rate (open loop), same backends;
#   3. crash recovery: `nops serve` killed with SIGKILL mid-stream and restarted.
#
# Services (each optional; a missing one is reported as skipped): PostgreSQL (EB01_PG_URL,
# default postgres://postgres@127.0.0.1:5432/test; a fresh database per run), NATS with
# JetStream (EB01_NATS_URL, default nats://127.0.0.1:4222), Redis (EB01_REDIS_URL, default
# redis://127.0.0.1:6379). Arguments go to eb01: --quick, --parts throughput,latency,crash,
# --backends embedded-sqlite,embedded-pg,nats,raw-nats,raw-redis, --help for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p nops -p nops-bench --bin nops --bin eb01 >&2
echo "<!-- eb01: $(date -u +%Y-%m-%dT%H:%M:%SZ); uptime:$(uptime) -->"
target/release/eb01 "$@"
echo "<!-- eb01 done: $(date -u +%Y-%m-%dT%H:%M:%SZ); uptime:$(uptime) -->"
