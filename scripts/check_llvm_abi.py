#!/usr/bin/env python3
"""Checks that a system LLVM can stand in for tracel's LLVM bundle under burn's `cuda` feature.

cubecl-llvm and pliron-llvm call LLVM's C API through llvm-sys, whose declarations follow the
LLVM release it is named after (llvm-sys 231 = LLVM 23). scripts/offline-llvm.sh links an older
system LLVM instead (Debian's 22). This script lists every LLVM-C function those crates name,
and fails unless each one (a) is defined in the system LLVM's static libraries and (b) where the
system headers declare it, takes as many parameters as llvm-sys says. The versions come from
Cargo.lock, the sources from cargo's registry (run `cargo fetch` first).

Usage: scripts/check_llvm_abi.py [path/to/llvm-config]
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLVM_CONFIG = sys.argv[1] if len(sys.argv) > 1 else "/usr/lib/llvm-22/bin/llvm-config"


def locked_version(name):
    lock = open(os.path.join(ROOT, "Cargo.lock")).read()
    m = re.search(r'\[\[package\]\]\nname = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
    if not m:
        sys.exit(f"check_llvm_abi: {name} is not in Cargo.lock")
    return m.group(1)


def source_dir(name):
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    hits = glob.glob(f"{home}/registry/src/*/{name}-{locked_version(name)}")
    if not hits:
        sys.exit(f"check_llvm_abi: no source for {name} in {home}/registry; run `cargo fetch`")
    return hits[0]


def arity(text, open_paren):
    """Number of parameters in the parenthesised list starting at text[open_paren]."""
    depth, i, body = 0, open_paren, ""
    while True:
        c = text[i]
        if c == "(":
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif c == ")":
            depth -= 1
            if depth == 0:
                break
        body += c
        i += 1
    body = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", body, flags=re.S)).strip().rstrip(",")
    if body in ("", "void"):
        return 0
    depth, n = 0, 1
    for c in body:
        if c in "(<[":
            depth += 1
        elif c in ")>]":
            depth -= 1
        elif c == "," and depth == 0:
            n += 1
    return n


def main():
    used = set()
    for crate in ("cubecl-llvm", "pliron-llvm"):
        for f in glob.glob(source_dir(crate) + "/src/**/*.rs", recursive=True):
            used |= set(re.findall(r"\bLLVM[A-Z]\w*\b", open(f).read()))
    declared = {}
    for f in glob.glob(source_dir("llvm-sys") + "/src/**/*.rs", recursive=True):
        text = open(f).read()
        for m in re.finditer(r"pub fn (LLVM\w+)\s*\(", text):
            declared[m.group(1)] = arity(text, m.end() - 1)
    calls = sorted(n for n in used if n in declared)

    def config(arg):
        return subprocess.run([LLVM_CONFIG, arg], check=True, capture_output=True, text=True).stdout.strip()

    libdir, includedir, version = config("--libdir"), config("--includedir"), config("--version")
    defined = set()
    for lib in glob.glob(libdir + "/libLLVM*.a"):
        out = subprocess.run(["nm", "-g", "--defined-only", lib], capture_output=True, text=True).stdout
        defined |= {w[2] for w in (line.split() for line in out.splitlines()) if len(w) == 3}
    headers = {}
    for f in glob.glob(includedir + "/llvm-c/**/*.h", recursive=True):
        text = re.sub(r"/\*.*?\*/", "", open(f).read(), flags=re.S)
        for m in re.finditer(r"[\w\*]\s+\**\s*(LLVM\w+)\s*\(", text):
            headers.setdefault(m.group(1), arity(text, m.end() - 1))
    missing = [n for n in calls if n not in defined]
    mismatched = [(n, declared[n], headers[n]) for n in calls if n in headers and headers[n] != declared[n]]
    print(
        f"LLVM {version}: {len(calls)} LLVM-C functions called by cubecl-llvm/pliron-llvm, "
        f"{len(calls) - len(missing)} defined, {sum(n in headers for n in calls)} checked against the headers"
    )
    if missing:
        print("not defined in this LLVM:", ", ".join(missing))
    for n, ours, theirs in mismatched:
        print(f"{n}: llvm-sys declares {ours} parameters, LLVM {version} {theirs}")
    sys.exit(1 if missing or mismatched else 0)


if __name__ == "__main__":
    main()
