#!/usr/bin/env bash
# Make sure `cargo` and `rustc` on PATH are at least the rust-version of dp/native/Cargo.toml: pip
# builds flowmap_dp._native with them. When one is missing, or is Debian's and too old, install
# Debian's newer toolchain (dp/native/debian-packages.txt). A too old toolchain of another origin
# (rustup's, in ~/.cargo/bin) is left to its owner. Fast when all is well: two --version calls.
set -euo pipefail
cd "$(dirname "$0")/.."

need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' dp/native/Cargo.toml)
[ -n "$need" ] || { echo "install-rust: dp/native/Cargo.toml states no rust-version" >&2; exit 1; }

version() { "$1" --version 2>/dev/null | awk '{print $2}'; }  # "cargo 1.96.0 (...)" -> 1.96.0
new_enough() { [ -n "$1" ] && [ "$(printf '%s\n' "$need" "$1" | sort -V | head -n1)" = "$need" ]; }
ready() { new_enough "$(version cargo)" && new_enough "$(version rustc)"; }
found() { local v; v=$(version "$1" || true); echo "$1 ${v:-missing}"; }

ready && exit 0
for tool in cargo rustc; do
  where=$(command -v "$tool" || true)
  if [ -n "$where" ] && [ "$where" != "/usr/bin/$tool" ] && ! new_enough "$(version "$tool")"; then
    echo "install-rust: $where is $(found "$tool"); flowmap's extension needs $need or later:" \
         "update it (rustup update stable), or take it off PATH to use Debian's" >&2
    exit 1
  fi
done
hack/install-debian-packages.sh dp/native/debian-packages.txt
if ! ready; then
  echo "install-rust: $(found cargo), $(found rustc) on PATH; flowmap's extension needs" \
       "$need or later: apt-get install --only-upgrade $(grep -v '^#' dp/native/debian-packages.txt | xargs)" \
       "(bookworm-security has the newest)" >&2
  exit 1
fi
