"""Every notebook in notebooks/ runs top to bottom (random:test weights, CPU) and is stored without outputs.

The notebook tools are test dependencies (`pip install -e ".[test]"`): missing, these tests fail, they
do not skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment: random weights, CPU, the repository importable."""
    monkeypatch.setenv("VL2_MODEL", "random:test")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "sharding.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_brings_ipywidgets(path):
    """Without ipywidgets, tqdm's notebook bars (huggingface_hub's download) print a TqdmWarning."""
    install = nbformat.read(path, as_version=4).cells[1].source
    assert 'find_spec("vl2_jax") is None' in install and "!pip install -q ipywidgets" in install
    assert 'find_spec("ipywidgets") is None' in install


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    # A first cell of our own checks that the kernel is this interpreter (the venv with vl2_jax installed).
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    # And a last one draws a progress bar as huggingface_hub's download does (tqdm.auto), warnings as errors.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import warnings\nfrom tqdm.auto import tqdm\nwarnings.simplefilter('error')\nfor _ in tqdm(range(2)):\n    pass"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    printed = [o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any("Warning" in text for text in printed), "a cell printed a warning"
