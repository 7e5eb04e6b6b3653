#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests.
#
# PostgreSQL: the tests use NOPS_TEST_DATABASE_URL. When it is unset, the local server at
# postgres://postgres@127.0.0.1:5432/test is used if it answers. Under CI=true a PostgreSQL
# server that cannot be reached fails the run; it is never silently skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

default_pg="postgres://postgres@127.0.0.1:5432/test"

# True when host:port of a service URL accepts a TCP connection.
reachable() {
    local url=$1 hostport host port
    hostport=$(printf '%s' "$url" | sed -E 's#^[a-z]+://([^@/]*@)?([^/?]+).*#\2#')
    host=${hostport%:*}
    port=${hostport##*:}
    [ "$port" = "$hostport" ] && port=5432
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

if [ -z "${NOPS_TEST_DATABASE_URL:-}" ] && reachable "$default_pg"; then
    export NOPS_TEST_DATABASE_URL=$default_pg
fi
if [ -n "${NOPS_TEST_DATABASE_URL:-}" ] && ! reachable "$NOPS_TEST_DATABASE_URL"; then
    # The machine's own server may have stopped: try to start it once.
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
        sleep 2
    fi
    if ! reachable "$NOPS_TEST_DATABASE_URL"; then
        echo "test: PostgreSQL at NOPS_TEST_DATABASE_URL is unreachable" >&2
        exit 1
    fi
fi
if [ -z "${NOPS_TEST_DATABASE_URL:-}" ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "test: CI=true and no PostgreSQL: set NOPS_TEST_DATABASE_URL" >&2
        exit 1
    fi
    echo "test: no PostgreSQL found; running the SQLite half only (set NOPS_TEST_DATABASE_URL for all)" >&2
fi

# NATS: the bus tests use NOPS_TEST_NATS_URL; when it is unset, the local server at
# nats://127.0.0.1:4222 is used if it answers. Under CI=true an unreachable one fails the run.
default_nats="nats://127.0.0.1:4222"
if [ -z "${NOPS_TEST_NATS_URL:-}" ] && reachable "$default_nats"; then
    export NOPS_TEST_NATS_URL=$default_nats
fi
if [ -n "${NOPS_TEST_NATS_URL:-}" ] && ! reachable "$NOPS_TEST_NATS_URL"; then
    echo "test: NATS at NOPS_TEST_NATS_URL is unreachable" >&2
    exit 1
fi
if [ -z "${NOPS_TEST_NATS_URL:-}" ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "test: CI=true and no NATS: set NOPS_TEST_NATS_URL" >&2
        exit 1
    fi
    echo "test: no NATS found; the NATS bus tests are skipped (set NOPS_TEST_NATS_URL for all)" >&2
fi

scripts/build-plugins.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
