#!/usr/bin/env bash
# One-time set-up shared by `make run`, `make test` and `make bench`: checks the toolchain the
# workspace pins and fetches dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust 1.95 with rustup (https://rustup.rs)" >&2
    exit 1
fi
required="1.95"
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$required" "$have" | sort -V | head -n1)" != "$required" ]; then
    echo "setup: rustc $have is older than the workspace's rust-version $required" >&2
    exit 1
fi
cargo fetch --locked >/dev/null

# Python tools for the tests (requirements-dev.txt) in .venv; reinstalled only when the
# requirements change (the stamp holds their hash).
if command -v python3 >/dev/null 2>&1; then
    stamp=.venv/.requirements-dev.sha256
    want=$(sha256sum requirements-dev.txt | awk '{print $1}')
    if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
        echo "$want" >"$stamp"
    fi
else
    echo "setup: python3 not found; the tests that need requirements-dev.txt will skip (and fail under CI=true)" >&2
fi

# promtool (from Debian's `prometheus` package) checks the rules in deploy/prometheus/ in the
# tests; without it that test skips, and fails under CI=true.
if ! command -v promtool >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; } ||
            echo "setup: installing promtool (apt-get install prometheus) failed" >&2
    else
        echo "setup: promtool not found; install the prometheus package (e.g. sudo apt-get install prometheus)" >&2
    fi
fi
