#!/usr/bin/env bash
# The default experiment from scratch: set up, import Fashion-MNIST offline, train LeNet-5.
# Prints the test accuracy (>= 89% expected) and leaves everything in workdirs/default.
# Extra arguments go to pdcnno_jax.main (e.g. --config.num_epochs=2).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [[ ! -d data/tfds/fashion_mnist ]] || ! ls data/tfds/fashion_mnist/*/dataset_info.json > /dev/null 2>&1; then
  echo "quickstart: importing Fashion-MNIST from /usr/share/datasets/fashion-mnist"
  .venv/bin/python -m pdcnno_jax.data.idx_import --dataset=fashion_mnist \
    --src=/usr/share/datasets/fashion-mnist --data_dir=data/tfds
fi
exec .venv/bin/python -m pdcnno_jax.main --config=configs/default.py \
  --workdir="${WORKDIR:-workdirs/default}" "$@"
