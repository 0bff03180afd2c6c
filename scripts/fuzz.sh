#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer): the targets in fuzz/fuzz_targets, see fuzz/README.md.
#
#   bash scripts/fuzz.sh                 # CI: each target for FUZZ_SECONDS (default 20)
#   bash scripts/fuzz.sh long            # each target for FUZZ_SECONDS (default 600)
#   bash scripts/fuzz.sh [long] TARGET…  # only these targets
#   bash scripts/fuzz.sh cmin [TARGET…]  # fold what local runs found into the committed
#                                        # corpus, minimised (then review and commit it)
#
# Built on the stable toolchain without a sanitizer (`-s none`): the code under test is safe
# Rust, and the targets check behaviour with assertions (overflow checks and debug assertions
# are on). 16 codegen units (FUZZ_CODEGEN_UNITS; cargo-fuzz's default is 1) build from scratch
# in about 5 minutes instead of 8 here, for some 5-15% fewer executions per second.
# Each run starts from the committed corpus (fuzz/corpus/<target>, read only) and keeps what
# it finds in fuzz/target/corpus/<target>. A crash fails the script; its input is
# saved in fuzz/artifacts/<target>/ and the command to reproduce it is printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=short
case "${1:-}" in
long | cmin)
    mode=$1
    shift
    ;;
esac
if [[ $mode == long ]]; then
    seconds=${FUZZ_SECONDS:-600}
else
    seconds=${FUZZ_SECONDS:-20}
fi
# The same flags for build and run, or `cargo fuzz run` rebuilds everything.
flags=(-s none --codegen-units "${FUZZ_CODEGEN_UNITS:-16}")
all=(sse_tap request policy mcp_args)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# One build for every target (they share the instrumented dependencies). From scratch it
# compiles the whole dependency tree with coverage instrumentation: several minutes.
build=()
[[ ${#targets[@]} -eq 1 ]] && build=("${targets[0]}")
build_log=fuzz/target/fuzz-build.log
mkdir -p fuzz/target
echo "fuzz: building ${targets[*]} (cargo fuzz build ${flags[*]})"
if ! cargo fuzz build "${flags[@]}" "${build[@]}" >"$build_log" 2>&1; then
    tail -n 40 "$build_log"
    echo "fuzz: build failed (full log: $build_log)"
    exit 1
fi

if [[ $mode == cmin ]]; then
    for t in "${targets[@]}"; do
        committed=fuzz/corpus/$t
        merged=fuzz/target/cmin/$t
        rm -rf "$merged"
        mkdir -p "$merged" "fuzz/target/corpus/$t"
        # Hand-written seeds and bug inputs stay; the rest is a set cover of the edges (hit
        # counts and comparisons left out, which keeps it to a few hundred files).
        find "$committed" -type f \( -name 'seed-*' -o -name 'regress-*' \) -exec cp {} "$merged" \;
        cargo fuzz run "${flags[@]}" "$t" "$merged" "$committed" "fuzz/target/corpus/$t" -- \
            -set_cover_merge=1 -use_counters=0 -use_cmp=0 >"fuzz/target/cmin-$t.log" 2>&1
        rm -rf "$committed"
        mv "$merged" "$committed"
        echo "fuzz: $t: $(find "$committed" -type f | wc -l) inputs in $committed"
    done
    exit 0
fi

failed=()
for t in "${targets[@]}"; do
    work=fuzz/target/corpus/$t
    log=fuzz/target/fuzz-$t.log
    mkdir -p "$work" "fuzz/artifacts/$t"
    rc=0
    cargo fuzz run "${flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=25 >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    if [[ $rc -ne 0 ]]; then
        failed+=("$t")
        # libFuzzer's progress lines and backtrace frames left out.
        grep -v -E '^#[0-9]+|^ +(at |[0-9]+: )' "$log" | tail -n 30
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "fuzz: $t FAILED after ${execs:-?} executions (log: $log)"
        if [[ -n $artifact ]]; then
            echo "fuzz: reproduce with: cargo fuzz run ${flags[*]} $t $artifact"
        fi
    else
        echo "fuzz: $t ok: ${execs:-?} executions in ${seconds}s (${rate:-?} exec/s)"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
