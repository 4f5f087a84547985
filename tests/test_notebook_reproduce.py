"""notebooks/reproduce: the .ipynb matches its jupytext source, and it runs a tiny smoke grid."""

import os
import pathlib

import jupytext
import nbclient
import nbformat

_NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


def _cells(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_ipynb_is_in_sync_with_its_jupytext_source():
  source = jupytext.read(_NOTEBOOKS / 'reproduce.py')
  paired = nbformat.read(_NOTEBOOKS / 'reproduce.ipynb', as_version=4)
  assert _cells(paired) == _cells(source), (
      'notebooks/reproduce.ipynb is stale: run `jupytext --sync notebooks/reproduce.py`.')


def test_notebook_runs_a_smoke_sub_grid(tmp_path, monkeypatch):
  workdir = tmp_path / 'reproduce'
  monkeypatch.setenv('REPRODUCE_PAPER', 'mr_fpdcnn')
  monkeypatch.setenv('REPRODUCE_SCALE', 'smoke')
  monkeypatch.setenv('REPRODUCE_METHODS', 'dense_sgd,balancers')
  monkeypatch.setenv('REPRODUCE_MAX_SEEDS', '1')
  monkeypatch.setenv('REPRODUCE_WORKDIR', str(workdir))
  notebook = jupytext.read(_NOTEBOOKS / 'reproduce.py')
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(_NOTEBOOKS)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # The three figures of MR-FPDCNN.
  markdown = ''.join(o['data']['text/markdown'] for o in outputs
                     if 'text/markdown' in o.get('data', {}))
  for claim in ('M1', 'M2', 'M3', 'M4'):
    assert f'| {claim} |' in markdown
  assert os.path.exists(workdir / 'results.csv')
