#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) each, on the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets cargo-fuzz use its -Z flags there). Corpora grow in fuzz/corpus/
# (seeded from fuzz/seeds/); crashes land in fuzz/artifacts/<target>/. Prints executions per
# target; with FUZZ_RECORD=1 also writes bench-results/fuzz.{json,md}. Exits 1 if any target
# found a crash. Long runs: fuzz/run.sh 3600, or one target:
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run http_request corpus/http_request seeds/http_request
# Set FUZZ_SANITIZER=none where the address sanitizer's runtime is missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=$(cargo fuzz list)
cargo fuzz build -O --sanitizer "$sanitizer"
mkdir -p corpus logs
results=()
failed=0
for target in $targets; do
    mkdir -p "corpus/$target"
    log="logs/$target.log"
    status=0
    cargo fuzz run -O --sanitizer "$sanitizer" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)
    execs=${execs:-0}
    if [ "$status" -ne 0 ]; then
        failed=1
        echo "fuzz: $target FAILED after $execs executions (see fuzz/$log, fuzz/artifacts/$target/)"
        grep -m5 -E 'panicked|ERROR|SUMMARY' "$log" || true
    else
        echo "fuzz: $target ok, $execs executions in ${seconds} s"
    fi
    results+=("$target $execs $status")
done
if [ "${FUZZ_RECORD:-0}" = 1 ]; then
    out=../bench-results
    {
        echo "{"
        echo "  \"seconds_per_target\": $seconds,"
        echo "  \"sanitizer\": \"$sanitizer\","
        echo "  \"toolchain\": \"$(rustc --version)\","
        echo "  \"targets\": ["
        n=${#results[@]}
        for i in "${!results[@]}"; do
            read -r t e s <<<"${results[$i]}"
            sep=","; [ "$i" -eq $((n - 1)) ] && sep=""
            echo "    {\"target\": \"$t\", \"executions\": $e, \"crashed\": $([ "$s" -eq 0 ] && echo false || echo true)}$sep"
        done
        echo "  ]"
        echo "}"
    } >"$out/fuzz.json"
    {
        echo "# Fuzzing: \`fuzz/run.sh $seconds\` ($sanitizer sanitizer, $(rustc --version))"
        echo
        echo "| target | executions in ${seconds} s | crash |"
        echo "|---|---|---|"
        for r in "${results[@]}"; do
            read -r t e s <<<"$r"
            echo "| $t | $e | $([ "$s" -eq 0 ] && echo no || echo YES) |"
        done
    } >"$out/fuzz.md"
fi
exit "$failed"
