# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reproducing PDCNNO, MR-FPDCNN and delay synchronization with pdcnno_jax
#
# This notebook runs one paper's grid of experiments (`python -m pdcnno_jax.reproduce`),
# then shows its figures and the verdict of each claim. Verdicts are computed from the
# numbers by the rule printed in the report, never written by hand.
#
# * `SCALE = 'smoke'`: generated data, one epoch: the pipeline in minutes, not the papers.
# * `SCALE = 'full'`: Fashion-MNIST, 3 seeds: hours on a 2-core CPU (see
#   `pdcnno_jax/reproduce/grids.py`). In Colab the data downloads through TFDS
#   (`config.data.download`); offline it comes from the IDX import.
#
# Parameters can also come from the environment (`REPRODUCE_PAPER`, `REPRODUCE_SCALE`,
# `REPRODUCE_METHODS`, `REPRODUCE_MAX_SEEDS`, `REPRODUCE_WORKDIR`), which is how the tests run
# a tiny sub-grid of the smoke scale.

# %% tags=["parameters"]
import os

PAPER = os.environ.get('REPRODUCE_PAPER', 'mr_fpdcnn')  # pdcnno | mr_fpdcnn | delay_sync | all
SCALE = os.environ.get('REPRODUCE_SCALE', 'smoke')  # smoke | full
METHODS = [m for m in os.environ.get('REPRODUCE_METHODS', '').split(',') if m]  # [] = all
MAX_SEEDS = int(os.environ.get('REPRODUCE_MAX_SEEDS', '0'))  # 0 = every seed of the grid
WORKDIR = os.environ.get('REPRODUCE_WORKDIR', f'workdirs/reproduce_{PAPER}_{SCALE}')
REPO_URL = os.environ.get('REPRODUCE_REPO_URL', '')  # Colab: the repository to clone.

# %% [markdown]
# ## Install
#
# In Colab the repository is cloned and installed with its requirements; elsewhere the
# notebook uses the checkout it lives in.

# %%
import subprocess
import sys

IN_COLAB = 'google.colab' in sys.modules
if IN_COLAB:
  if not REPO_URL:
    raise ValueError('Set REPO_URL to the git URL of pdcnno_jax to install it in Colab.')
  if not os.path.isdir('pdcnno_jax_repo'):
    subprocess.run(['git', 'clone', '--depth=1', REPO_URL, 'pdcnno_jax_repo'], check=True)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', 'pdcnno_jax_repo'],
                 check=True)
  REPO = os.path.abspath('pdcnno_jax_repo')
else:
  REPO = os.path.abspath(os.path.join(os.getcwd(), '..') if os.path.basename(os.getcwd())
                         == 'notebooks' else os.getcwd())
os.chdir(REPO)
sys.path.insert(0, REPO)
os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
print('repository:', REPO)

# %% [markdown]
# ## Data
#
# Smoke scale generates its own tiny data set. Full scale needs Fashion-MNIST in
# `data/tfds`: downloaded by TFDS where a network exists, else imported from IDX files
# (`scripts/quickstart.sh` does this on Debian with `dataset-fashion-mnist`).

# %%
DATA_DIR = os.path.join(REPO, 'data', 'tfds')
if SCALE == 'full' and not os.path.isdir(os.path.join(DATA_DIR, 'fashion_mnist')):
  from pdcnno_jax import config_lib
  from pdcnno_jax.data import input_pipeline
  data_config = config_lib.load_config('configs/default.py').data
  data_config.data_dir = DATA_DIR
  if IN_COLAB:
    data_config.download = True  # TFDS downloads and prepares Fashion-MNIST.
    input_pipeline.load_dataset(data_config, seed=0)
  else:
    subprocess.run([sys.executable, '-m', 'pdcnno_jax.data.idx_import',
                    '--dataset=fashion_mnist', '--src=/usr/share/datasets/fashion-mnist',
                    f'--data_dir={DATA_DIR}'], check=True)

# %% [markdown]
# ## Run the grid
#
# Every cell is an ordinary experiment in `WORKDIR/cells/<hash>`; rerunning skips the
# completed ones.

# %%
from pdcnno_jax.reproduce import runner

out = runner.run(PAPER, SCALE, WORKDIR, data_dir=DATA_DIR, methods=METHODS,
                 max_seeds=MAX_SEEDS)
print(f'cells: {out["run"]} run, {out["skipped"]} skipped, {out["shared"]} shared, '
      f'{out["failed"]} failed, {out["wall_s"]:.0f} s')

# %% [markdown]
# ## Figures

# %%
from IPython import display

for name in out['figures']:
  display.display(display.Image(filename=os.path.join(WORKDIR, name)))

# %% [markdown]
# ## Verdicts

# %%
table = ['| claim | verdict |', '|---|---|'] + [
    f'| {claim} | {verdict} |' for claim, verdict in out['verdicts'].items()]
display.display(display.Markdown('\n'.join(table)))

# %% [markdown]
# The whole report, with each claim's statement, numbers and rule:

# %%
with open(os.path.join(WORKDIR, 'REPORT.md')) as f:
  display.display(display.Markdown(f.read()))
