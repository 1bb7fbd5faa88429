"""Every notebook in notebooks/ runs top to bottom without a cell error.

Each is executed with nbclient in a fresh 'python3' kernel, with notebooks/ as the working
directory (as a person opening it would have), and must leave the repository untouched: the
notebooks write only into temporary directories. Notebooks are stored without outputs.
"""
import pathlib
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
PATHS = sorted(NOTEBOOKS.glob('*.ipynb'))
TIMEOUT_S = 240  # per cell


def _repo_status() -> str:
  """`git status --porcelain` of the repository ('' outside a git checkout)."""
  result = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all', '.'],
                          cwd=NOTEBOOKS.parent, capture_output=True, text=True, check=False)
  return result.stdout if result.returncode == 0 else ''


def test_the_notebooks_are_found():
  assert 'equal_flops.ipynb' in {path.name for path in PATHS}


@pytest.mark.parametrize('path', PATHS, ids=[path.stem for path in PATHS])
def test_notebook_runs(path, monkeypatch):
  monkeypatch.delenv('MOE_JAX_RUN_DIR', raising=False)  # run_directory trains its own tiny run
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get('outputs') for cell in notebook.cells), (
      f'{path.name} is stored with outputs; clear them (Jupyter: Edit > Clear All Outputs).')
  before = _repo_status()
  client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f'{path.name} failed:\n{error}', pytrace=False)
  assert _repo_status() == before, f'{path.name} wrote into the repository'
