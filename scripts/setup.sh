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
