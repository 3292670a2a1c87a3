#!/usr/bin/env bash
# Runs every test: all of ctest in the normal build, then unit tests and fuzz corpora in the
# ASan+UBSan build. Prints one closing line "N passed, N failed" over both runs and exits non-zero
# if anything failed.
set -uo pipefail
build=${1:-build}
asan_build=${2:-build-asan}
jobs=$(nproc)
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

run_ctest() {  # name, ctest args...
  local name=$1
  shift
  echo "=== $name: ctest $*"
  ctest "$@" --output-on-failure 2>&1 | tee "$log_dir/$name.log"
}

# ctest's own summary: "100% tests passed, 0 tests failed out of 40"
count() {  # log -> "passed failed"
  local line total failed
  line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$1" | tail -1)
  if [[ -z "$line" ]]; then
    echo "0 1"  # ctest did not get as far as a summary: count it as a failure
    return
  fi
  failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  total=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
  echo "$((total - failed)) $failed"
}

# Integration tests boot guests and start daemons; two at a time is what two cores carry.
run_ctest main --test-dir "$build" -j "$jobs" --timeout 900
run_ctest asan --test-dir "$asan_build" -L 'unit|fuzz' -j "$jobs" --timeout 600

passed=0
failed=0
for name in main asan; do
  read -r p f < <(count "$log_dir/$name.log")
  echo "$name: $p passed, $f failed"
  passed=$((passed + p))
  failed=$((failed + f))
done
echo "$passed passed, $failed failed"
((failed == 0))
