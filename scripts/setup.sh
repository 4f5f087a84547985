#!/usr/bin/env bash
# Sets up everything pdcnno_jax needs on a fresh Debian/Ubuntu machine, idempotently:
#   * Debian packages: python3-venv, and dataset-fashion-mnist (Fashion-MNIST as IDX files);
#   * a virtualenv in .venv with requirements.txt (+ requirements-test.txt with --test);
#   * the package itself, editable.
# Usage: scripts/setup.sh [--test]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

apt_packages=(python3-venv dataset-fashion-mnist)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "${pkg}" > /dev/null 2>&1 || missing+=("${pkg}")
done
if (( ${#missing[@]} )); then
  sudo=()
  [[ "$(id -u)" -ne 0 ]] && sudo=(sudo)
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" > /dev/null
fi

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $(${python} --version)"
  "${python}" -m venv .venv
fi
# Skip pip when .venv already holds these exact requirement files (a test install also
# covers the plain one).
requirements() { cat requirements.txt; (( $1 )) && cat requirements-test.txt; return 0; }
installed() { [[ -f ".venv/.requirements-$1" ]] && diff -q <(requirements "$1") ".venv/.requirements-$1" > /dev/null; }
if ! installed "${want_test}" && ! installed 1; then
  echo "setup: installing Python requirements into .venv (first run: a few minutes)"
  reqs=(-r requirements.txt)
  (( want_test )) && reqs+=(-r requirements-test.txt)
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${reqs[@]}"
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, tensorflow_datasets" \
    || { echo "setup: the Python requirements did not import; see pip's output above." >&2; exit 1; }
  requirements "${want_test}" > ".venv/.requirements-${want_test}"
fi
