"""The notebooks are saved without outputs and run from top to bottom (their assert cells pass)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Notebook -> module it needs beyond the core package.
NEEDS = {"02_finetuning": "imgclf.finetune", "03_custom_data": "imgclf.datatools"}


def test_three_notebooks_saved_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == ["01_frozen_features_svm", "02_finetuning", "03_custom_data"]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{path.name} has outputs"
        assert any("assert " in "".join(c["source"]) for c in code), f"{path.name} checks nothing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    needed = NEEDS.get(path.stem)
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{path.name} needs {needed}, which is not in this checkout")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks write into tempfile.mkdtemp() folders
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    stderr = [o["text"] for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not [t for t in stderr if "Warning" in t], stderr  # e.g. tqdm's "IProgress not found" in every notebook
