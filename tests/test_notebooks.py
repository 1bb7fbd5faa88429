"""Every notebook in notebooks/ runs top to bottom without a cell error.

Each is executed with nbclient in a fresh 'python3' kernel, with notebooks/ as the working
directory (as a person opening it would have), and must leave notebooks/ untouched: the
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


def _notebooks_status() -> str:
  """`git status` of notebooks/, ignored files included ('' outside a git checkout).

  The working directory, where a notebook's relative paths land; the rest of the tree is left
  out so that concurrent work elsewhere (a sweep writing runs/) cannot fail the test.
  """
  result = subprocess.run(
      ['git', 'status', '--porcelain', '--ignored', '--untracked-files=all', '--', 'notebooks'],
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
  before = _notebooks_status()
  client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f'{path.name} failed:\n{error}', pytrace=False)
  assert _notebooks_status() == before, f'{path.name} wrote into notebooks/'
