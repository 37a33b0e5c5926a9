#!/usr/bin/env bash
# Runs the long app-in-another-process tests (tests/it/app_process.rs, the
# #[ignore]d torture_* ones by default) ROUNDS times and prints pass/fail per
# round, with each round's output kept in target/torture/round-N.log.
#
#   bench/torture_loop.sh [ROUNDS]          # default 20
#
# Environment:
#   TORTURE_FILTER   test name filter (default: torture_)
#   TORTURE_ARGS     extra arguments for the test binary (default: --ignored)
#   CARGO_PROFILE    "release" to build the tests and walsync with --release
#   WALSYNC_TEST_BULK_SECS, WALSYNC_TEST_STEADY_SECS, WALSYNC_TEST_S3_ENDPOINT
#                    passed on to the tests (see tests/it/app_process.rs)
set -uo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${1:-20}
FILTER=${TORTURE_FILTER:-torture_}
read -r -a EXTRA <<<"${TORTURE_ARGS:---ignored}"
PROFILE_ARGS=()
if [ "${CARGO_PROFILE:-}" = release ]; then
    PROFILE_ARGS=(--release)
fi
LOGS=${CARGO_TARGET_DIR:-target}/torture
mkdir -p "$LOGS"

echo "building the app_process tests..."
if ! cargo test "${PROFILE_ARGS[@]}" --test it --no-run >"$LOGS/build.log" 2>&1; then
    echo "build failed; see $LOGS/build.log" >&2
    tail -20 "$LOGS/build.log" >&2
    exit 2
fi

passed=0
failed=0
for round in $(seq 1 "$ROUNDS"); do
    log=$LOGS/round-$round.log
    start=$(date +%s)
    if cargo test "${PROFILE_ARGS[@]}" --test it -- "app_process::$FILTER" "${EXTRA[@]}" \
        --test-threads=1 >"$log" 2>&1; then
        passed=$((passed + 1))
        verdict=PASS
    else
        failed=$((failed + 1))
        verdict=FAIL
    fi
    summary=$(grep -E '^test result:' "$log" | tail -1)
    printf 'round %3d/%d: %s (%ss) %s\n' "$round" "$ROUNDS" "$verdict" "$(($(date +%s) - start))" "$summary"
    if [ "$verdict" = FAIL ]; then
        grep -E '^test .* FAILED$|panicked at' "$log" | head -5 | sed 's/^/    /'
        grep -A3 -E 'panicked at' "$log" | grep -vE 'panicked at|^--$' | head -6 | cut -c1-300 | sed 's/^/    /'
    fi
done
echo "torture: $passed passed, $failed failed of $ROUNDS rounds (logs in $LOGS)"
[ "$failed" -eq 0 ]
