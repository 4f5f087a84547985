#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: every tests/test_*.py as one Bazel
# py_test under pytest (offline Bazel from Debian's bazel-bootstrap; see WORKSPACE and
# tools/bazel/README.md), then prints the total of test cases passed / failed / skipped.
# Extra arguments go to `bazel test` (e.g. --test_output=all, --test_filter=...).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
bash scripts/setup.sh --test
start=${SECONDS}
status=0
bash scripts/bazel_test.sh "$@" || status=$?
.venv/bin/python scripts/summarize_junit.py bazel-testlogs/tests || true
echo "test.sh: bazel test finished in $(( SECONDS - start )) s with status ${status}"
exit "${status}"
