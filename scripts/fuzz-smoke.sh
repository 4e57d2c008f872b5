#!/usr/bin/env bash
# Runs every cargo-fuzz target of transport-xen briefly; fails if any target finds a crash.
#
#   scripts/fuzz-smoke.sh                  # each target for $FUZZ_SECONDS (default 20) seconds
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh # longer
#   scripts/fuzz-smoke.sh ring_orders      # only the named targets
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz if missing.
# Corpora grow in transport-xen/fuzz/corpus/<target>/ and crashes land in
# transport-xen/fuzz/artifacts/<target>/ (both gitignored). See docs/fuzzing.md.
set -euo pipefail

seconds="${FUZZ_SECONDS:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/transport-xen/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz (about a minute)" >&2
    cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz-smoke: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi

cd "$fuzz_dir"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
    echo "fuzz-smoke: $target for ${seconds}s" >&2
    # -max_total_time bounds the fuzzing; the build before it is not counted.
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-smoke: FAILED: ${failed[*]} (crash inputs in $fuzz_dir/artifacts/)" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets ran ${seconds}s each without a crash" >&2
