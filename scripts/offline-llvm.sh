#!/usr/bin/env bash
# Lets `cargo build --features cuda` build without network: burn's CUDA backend compiles kernels
# through LLVM (cubecl-cuda -> cubecl-llvm -> llvm-sys), and the build script of
# tracel-llvm-bundler would otherwise download tracel's LLVM 23 bundle from GitHub. Its build
# script skips the download when the bundle directory already holds the sentinel file, and
# cubecl-llvm then asks that directory's `bin/llvm-config` how to compile and link. So we present
# a system LLVM (Debian's llvm-22-dev, which includes the NVPTX back end) at that path.
#
# Usage:  eval "$(scripts/offline-llvm.sh)"   # prints `export XDG_DATA_HOME=...`
#         cargo build --release -p glmae-train --features cuda
#
# LLVM_CONFIG picks another llvm-config; GLMAE_LLVM_HOME picks where the bundle directory lives
# (default target/llvm-offline, so nothing outside the checkout changes).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
llvm_config="${LLVM_CONFIG:-/usr/lib/llvm-22/bin/llvm-config}"
home="${GLMAE_LLVM_HOME:-$root/target/llvm-offline}"
# Must match tracel-llvm-bundler's TRACEL_LLVM_FULL_VERSION (Cargo.lock pins 23.1.0-4).
bundle="$home/tracel/tracel-llvm-23.1.0-4"

if [ ! -x "$llvm_config" ]; then
    echo "offline-llvm: $llvm_config not found; install it with: apt-get install llvm-22-dev" >&2
    exit 1
fi
for target in NVPTX; do
    if ! "$llvm_config" --targets-built | tr ' ' '\n' | grep -qx "$target"; then
        echo "offline-llvm: $llvm_config was built without the $target back end" >&2
        exit 1
    fi
done
# Every library llvm-config lists must be there to link statically (Debian splits Polly out).
libdir="$("$llvm_config" --libdir)"
for lib in $("$llvm_config" --link-static --libnames); do
    if [ ! -e "$libdir/$lib" ]; then
        echo "offline-llvm: $libdir/$lib is missing; install llvm-22-dev and libpolly-22-dev" >&2
        exit 1
    fi
done

prefix="$("$llvm_config" --prefix)"
# Debian's llvm-config names some system libraries by path (/usr/lib/.../libz3.so), which the
# bundler would pass on as `-llibz3`: rewrite those to `-lz3`. Everything else is passed through,
# and llvm-config still finds its real prefix because it is run by its own path.
wrapper="#!/bin/sh
case \" \$* \" in
    *\" --system-libs \"*) \"$llvm_config\" \"\$@\" | sed 's|[^ ]*/lib\\([^ /]*\\)\\.so[.0-9]*|-l\\1|g' ;;
    *) exec \"$llvm_config\" \"\$@\" ;;
esac"
# The bundler's build script reruns whenever the sentinel file changes, and everything that links
# LLVM rebuilds after it: leave an identical bundle untouched.
if [ ! -f "$bundle/.tracel-llvm-installed" ] || [ "$(cat "$bundle/bin/llvm-config" 2>/dev/null)" != "$wrapper" ] \
    || [ "$(readlink "$bundle/lib")" != "$prefix/lib" ]; then
    rm -rf "$bundle"
    mkdir -p "$bundle/bin"
    for dir in lib include; do
        ln -sfn "$prefix/$dir" "$bundle/$dir"
    done
    printf '%s\n' "$wrapper" > "$bundle/bin/llvm-config"
    chmod +x "$bundle/bin/llvm-config"
    touch "$bundle/.tracel-llvm-installed"
fi
echo "offline-llvm: $bundle -> $prefix (LLVM $("$llvm_config" --version))" >&2
echo "export XDG_DATA_HOME=$home"
