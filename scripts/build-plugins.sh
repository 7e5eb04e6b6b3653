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
