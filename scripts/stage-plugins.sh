#!/usr/bin/env bash
# Stages the reference plugins into a plugins directory (default ./.nops/plugins) that
# `nops serve --plugins-dir` hot-loads: for every plugins/<crate>/plugin.toml, copies the built
# component to <name>.wasm and its configuration document (looked up beside the manifest, then
# in policies/), and writes the manifest with its BLAKE2b-256 digests filled in.
# Run scripts/build-plugins.sh first. PLUGINS_BUILT_DIR stages components built elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.nops/plugins}
built=${PLUGINS_BUILT_DIR:-target/wasm/wasm32-wasip2/release}
mkdir -p "$dest"

digest() {
    echo "blake2b256:$(b2sum -l 256 "$1" | cut -d' ' -f1)"
}

for manifest in plugins/*/plugin.toml; do
    crate_dir=$(dirname "$manifest")
    crate=$(basename "$crate_dir")
    wasm="$built/${crate//-/_}.wasm"
    if [ ! -f "$wasm" ]; then
        echo "stage-plugins: $wasm is missing; run scripts/build-plugins.sh" >&2
        exit 1
    fi
    name=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest")
    config=$(sed -n 's/^config = "\(.*\)"$/\1/p' "$manifest")
    staged="$dest/$name"
    config_line=""
    if [ -n "$config" ]; then
        source_config="$crate_dir/$config"
        [ -f "$source_config" ] || source_config="policies/$config"
        cp "$source_config" "$dest/$config"
        config_line="config_digest = \"$(digest "$dest/$config")\""
    fi
    cp "$wasm" "$staged.wasm.tmp"
    # The manifest last, so the directory scanner sees a complete set.
    sed -e "s|^digest = \".*\"$|digest = \"$(digest "$staged.wasm.tmp")\"|" \
        -e "s|^config = \"\(.*\)\"$|config = \"\1\"\n$config_line|" \
        "$manifest" > "$staged.toml.tmp"
    mv "$staged.wasm.tmp" "$staged.wasm"
    mv "$staged.toml.tmp" "$staged.toml"
done
echo "stage-plugins: staged $(ls "$dest"/*.toml | wc -l) plugins into $dest"
