#!/usr/bin/env bash
# Builds and runs the firmware on QEMU's mps3-an547 (Cortex-M55 with Helium). The target triple
# is the an505's (thumbv8m.main-none-eabihf: Debian's rustc has no thumbv8.1m target), built for
# the Cortex-M55 (`-C target-cpu=cortex-m55`, which turns on MVE; build.rs then links
# memory-an547.x) into its own target folder, since the an505 build of the same triple uses other
# flags. Arguments go to cargo (e.g. --features defmt). Same toolchain as the other boards
# (README.md, "Build and run").
set -euo pipefail
cd "$(dirname "$0")"
export RUSTFLAGS="-C target-cpu=cortex-m55"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../target/arm}-m55"
# Replaces the an505 runner of .cargo/config.toml (an environment variable would be appended to it).
runner='"timeout 600 qemu-system-arm -machine mps3-an547 -cpu cortex-m55 -nographic -semihosting-config enable=on,target=native -icount shift=0 -kernel"'
exec "${CARGO:-cargo}" run -Zbuild-std=core --release --target thumbv8m.main-none-eabihf \
  --config "target.thumbv8m.main-none-eabihf.runner=$runner" "$@"
