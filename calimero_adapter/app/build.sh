#!/usr/bin/env bash
# Builds the MediChain ledger app to res/medichain_ledger.wasm.
#
#   ./build.sh            release build for wasm32-unknown-unknown (wasm-opt -Oz if installed)
#   ./build.sh --check    only check the toolchain (cargo + the wasm32 target), build nothing
#
# When `cargo mero` (Calimero's app toolchain) is installed it is used instead of
# plain cargo, because it also embeds the app's ABI in the wasm; set
# MEDICHAIN_PLAIN_CARGO=1 to force the plain build.
#
# Exit codes: 0 built, 2 cargo missing, 3 wasm32 target missing,
#             4 dependencies unreachable (the crate registry or the calimero-network/core
#               git repository), 1 any other build failure.
set -euo pipefail

APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET_TRIPLE="wasm32-unknown-unknown"
WASM_NAME="medichain_ledger.wasm"
OUT="$APP_DIR/res/$WASM_NAME"

die() {
    local code="$1"
    shift
    printf 'build.sh: error: %s\n' "$1" >&2
    shift
    if [ "$#" -gt 0 ]; then
        printf '  %s\n' "$@" >&2
    fi
    exit "$code"
}

# 1. cargo
if ! command -v cargo >/dev/null 2>&1; then
    die 2 "cargo not found on PATH." \
        "Install a Rust toolchain (rustup is the usual way), then add the target:" \
        "  rustup target add $TARGET_TRIPLE"
fi

# 2. the wasm32 target: look in the sysroot of the rustc cargo will use, which
# works with and without rustup.
RUSTC="${RUSTC:-rustc}"
have_target() {
    local sysroot
    sysroot="$("$RUSTC" --print sysroot 2>/dev/null)" || return 1
    [ -d "$sysroot/lib/rustlib/$TARGET_TRIPLE/lib" ]
}
if ! have_target; then
    if command -v rustup >/dev/null 2>&1; then
        echo "build.sh: the $TARGET_TRIPLE target is not installed; trying: rustup target add $TARGET_TRIPLE"
        RUST_BACKTRACE=0 rustup target add "$TARGET_TRIPLE" >&2 || true
    fi
    have_target || die 3 \
        "the Rust target $TARGET_TRIPLE is not installed for $("$RUSTC" --version 2>/dev/null || echo rustc)." \
        "Install it with: rustup target add $TARGET_TRIPLE" \
        "(that download needs network access; without rustup, install your distribution's" \
        "wasm32 standard library for this rustc)."
fi

if [ "${1:-}" = "--check" ]; then
    echo "build.sh: toolchain OK: $(cargo --version), target $TARGET_TRIPLE installed"
    exit 0
fi

cd "$APP_DIR"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

# 3. dependencies: fetch first, so an unreachable registry or git host gets its own message.
if ! cargo fetch --target "$TARGET_TRIPLE" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    if grep -qiE 'failed to (get|fetch|load source|download|update)|unable to update|could not resolve|network|spurious|timed out|connection|offline|failed to query replaced source' "$LOG"; then
        die 4 "could not download the dependencies: the crate registry or the" \
            "calimero-network/core git repository (pinned in Cargo.toml) is unreachable from here." \
            "Build on a machine with network access, or vendor the dependencies there" \
            "(cargo vendor, plus the [source] lines it prints in .cargo/config.toml) and copy them here."
    fi
    die 1 "cargo fetch failed (see above)."
fi

mkdir -p res

# 4. build
if [ "${MEDICHAIN_PLAIN_CARGO:-0}" != "1" ] && cargo mero --version >/dev/null 2>&1; then
    echo "build.sh: building with cargo mero (embeds the ABI)"
    cargo mero build
    [ -f "$OUT" ] || die 1 "cargo mero build did not produce $OUT"
else
    echo "build.sh: building with cargo build --release --target $TARGET_TRIPLE"
    cargo build --release --target "$TARGET_TRIPLE"
    CARGO_TARGET="${CARGO_TARGET_DIR:-$APP_DIR/target}"
    cp "$CARGO_TARGET/$TARGET_TRIPLE/release/$WASM_NAME" "$OUT"
    if command -v wasm-opt >/dev/null 2>&1; then
        wasm-opt -Oz "$OUT" -o "$OUT"
    else
        echo "build.sh: wasm-opt not found; skipping size optimisation (optional)."
    fi
fi

echo "build.sh: built $OUT ($(wc -c <"$OUT") bytes)"
