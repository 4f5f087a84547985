#!/usr/bin/env bash
# Runs the test suite with Bazel, offline: one Bazel test per tests/test_*.py.
#
# Usage: scripts/bazel_test.sh [extra `bazel test` flags...]
#   e.g. scripts/bazel_test.sh --test_filter=shapes --test_output=all
#
# Installs Debian's `bazel-bootstrap` (Bazel 4.2) with apt-get if `bazel` is
# missing. The tests run with the project's virtualenv, <repo>/.venv (create
# it first, e.g. with scripts/test.sh), or with $PDCNNO_PYTHON if set.
#
# Environment:
#   PDCNNO_PYTHON          Python interpreter with the project's requirements.
#   BAZEL_TEST_TARGETS     Targets to test (default: the whole suite).
#   BAZEL_OUTPUT_USER_ROOT Where Bazel keeps its output base (default: Bazel's,
#                          ~/.cache/bazel).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

if ! command -v bazel > /dev/null 2>&1; then
  echo "bazel_test.sh: bazel not found; installing Debian's bazel-bootstrap." >&2
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
    bazel-bootstrap > /dev/null
fi

python="${PDCNNO_PYTHON:-${repo_root}/.venv/bin/python}"
if [[ ! -x "${python}" ]]; then
  echo "bazel_test.sh: no Python interpreter at ${python}." >&2
  echo "Create the virtualenv first (scripts/test.sh does), or set" \
    "PDCNNO_PYTHON to a python with requirements-test.txt installed." >&2
  exit 1
fi

startup_flags=()
if [[ -n "${BAZEL_OUTPUT_USER_ROOT:-}" ]]; then
  startup_flags+=("--output_user_root=${BAZEL_OUTPUT_USER_ROOT}")
fi

read -r -a targets <<< "${BAZEL_TEST_TARGETS:-//tests/... //tools/bazel/...}"

# --repo_env: the interpreter is read by @local_config_python, which re-runs
# whenever it changes. Further flags come from .bazelrc.
exec bazel "${startup_flags[@]}" test \
  --repo_env=PDCNNO_PYTHON="${python}" \
  "$@" -- "${targets[@]}"
