#!/usr/bin/env bash
# Fuzz one target of the dp's compiled core (dp/native/fuzz: `decode` or `walk`) with libFuzzer
# for a while; exits non-zero on a crash, whose input is kept under FUZZ_DIR/artifacts.
#
#   hack/fuzz-dp.sh decode|walk [SECONDS (60)] [libFuzzer options...]
#
# Needs rustup's nightly toolchain (the sanitizer flags are nightly-only), so it is not part of
# `make test`; installs cargo-fuzz when it is missing. The build, the corpus and the crashes live
# in FUZZ_DIR (default ~/.cache/flowmap/fuzz), not in the tree: the flowmap image is rebuilt when
# any file under dp/ changes. The corpus starts from dp/native/fuzz/seeds.py when .venv has
# flowmap installed.
set -euo pipefail

cd "$(dirname "$0")/.."
usage="usage: hack/fuzz-dp.sh decode|walk [seconds] [libFuzzer options...]"
target=${1:-}
seconds=${2:-60}
case $target in decode | walk) ;; *) echo "$usage" >&2; exit 2 ;; esac
case $seconds in '' | *[!0-9]*) echo "$usage" >&2; exit 2 ;; esac
shift $(($# < 2 ? $# : 2))
FUZZ_DIR=${FUZZ_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap/fuzz}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz-dp: needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz

corpus=$FUZZ_DIR/corpus/$target
artifacts=$FUZZ_DIR/artifacts/$target
mkdir -p "$corpus" "$artifacts"
seeds=()
if [ -x .venv/bin/python ] && .venv/bin/python dp/native/fuzz/seeds.py "$FUZZ_DIR/seeds"; then
  seeds=("$FUZZ_DIR/seeds/$target")  # read only: libFuzzer adds what it finds to the first folder
fi

(cd dp/native/fuzz && cargo +nightly fuzz build --target-dir "$FUZZ_DIR/target" "$target")
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
echo "fuzz-dp: $target for ${seconds}s; corpus $corpus, crashes in $artifacts" >&2
exec "$FUZZ_DIR/target/$triple/release/$target" -max_total_time="$seconds" -artifact_prefix="$artifacts/" "$@" \
  "$corpus" "${seeds[@]}"
