#!/usr/bin/env bash
# Runs every cargo-fuzz target of transport-xen, rpc, manager and services briefly; fails if any target finds a
# crash.
#
#   scripts/fuzz-smoke.sh                  # each target for $FUZZ_SECONDS (default 20) seconds
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh # longer
#   scripts/fuzz-smoke.sh ring_orders rpc_message  # only the named targets (of either crate)
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz if missing.
# Each fuzz crate (transport-xen/fuzz, rpc/fuzz, manager/fuzz) keeps its corpora in corpus/<target>/ and its
# crashes in artifacts/<target>/ (gitignored, except rpc/fuzz's hand-made corpus/*/seed-*).
# All build into one target directory, target/fuzz, so the dependencies they share are built
# once (the second crate's build drops from ~3.3 to ~1.9 min on 2 cores). See docs/fuzzing.md.
set -euo pipefail

seconds="${FUZZ_SECONDS:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dirs=("$root/transport-xen/fuzz" "$root/rpc/fuzz" "$root/manager/fuzz" "$root/services/fuzz")
target_dir="$root/target/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz (about a minute)" >&2
    cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz-smoke: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi

# Every target as "<fuzz dir>/<target>" (target names are unique across the fuzz crates).
all=()
for dir in "${fuzz_dirs[@]}"; do
    mapfile -t names < <(cd "$dir" && cargo +nightly fuzz list)
    for name in "${names[@]}"; do
        all+=("$dir/$name")
    done
done
if [ "$#" -gt 0 ]; then
    targets=()
    for want in "$@"; do
        found=""
        for t in "${all[@]}"; do
            if [ "${t##*/}" = "$want" ]; then
                found="$t"
            fi
        done
        if [ -z "$found" ]; then
            echo "fuzz-smoke: no target $want in ${fuzz_dirs[*]}" >&2
            exit 1
        fi
        targets+=("$found")
    done
else
    targets=("${all[@]}")
fi

failed=()
for t in "${targets[@]}"; do
    dir="${t%/*}"
    target="${t##*/}"
    echo "fuzz-smoke: $target (${dir#"$root"/}) for ${seconds}s" >&2
    # -max_total_time bounds the fuzzing; the build before it is not counted.
    if ! (cd "$dir" && cargo +nightly fuzz run --target-dir "$target_dir" "$target" -- -max_total_time="$seconds" -print_final_stats=1); then
        failed+=("$target (crash inputs in $dir/artifacts/$target/)")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'fuzz-smoke: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets ran ${seconds}s each without a crash" >&2
