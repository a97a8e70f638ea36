#!/usr/bin/env bash
# Builds the statically linked `vmm`, `guest-trimmer` and the e2e runner (they travel into guests, rigs and
# other hosts) into target/static/x86_64-unknown-linux-gnu/release/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/static \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p vmm -p guest-trimmer -p tests "$@"
echo "$(pwd)/target/static/x86_64-unknown-linux-gnu/release"
