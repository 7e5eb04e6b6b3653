#!/usr/bin/env bash
# Builds the reference plugins (plugins/) and the misbehaving test plugins (tests/plugins/)
# as WebAssembly components for wasm32-wasip2, into target/wasm/wasm32-wasip2/release/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
export CARGO_TARGET_DIR="$PWD/target/wasm"
(cd plugins && cargo build --release --locked --target wasm32-wasip2)
(cd tests/plugins && cargo build --release --locked --target wasm32-wasip2)

# The JavaScript scorer (plugins/scorer-weighted-js): its build tool, pinned by the plugin's
# package-lock.json, is installed into the plugin's node_modules on first use (or when the lock
# changes); after that the build needs no network.
js=plugins/scorer-weighted-js
if ! command -v npm >/dev/null 2>&1; then
    echo "build-plugins: npm not found; install Node.js 18 or later with npm to build $js" >&2
    exit 1
fi
if [ ! -f "$js/node_modules/.package-lock.json" ] || [ "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]; then
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
fi
mkdir -p "$CARGO_TARGET_DIR/wasm32-wasip2/release"
(cd "$js" && npm run --silent build >/dev/null)
