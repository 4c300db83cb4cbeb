"""The notebooks in notebooks/ run top to bottom (nbclient, python3 kernel) and are committed clean.

Each runs in its own temporary working directory with a time limit per cell and per notebook; a
notebook writes only into ``out/`` under its working directory (``notebooks/out/``, ignored by git,
when run from the repository), so running one changes no tracked file. The files they promise
are then checked there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHARED = ROOT.parent / "shared"
OUT = "out"
"""The folder, under a notebook's working directory, that receives everything it writes."""
CELL_TIMEOUT_S = 120

nbformat = pytest.importorskip("nbformat")


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01-quickstart.ipynb", "02-what-if-sweep.ipynb", "03-bring-your-own-sglang-dump.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata


def test_notebook_outputs_are_ignored_by_git():
    ignored = (ROOT / "notebooks" / ".gitignore").read_text().splitlines()
    assert f"{OUT}/" in ignored


def _execute(path: Path, workdir: Path, monkeypatch) -> object:
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    # A kernelspec of this interpreter only: the user's own Jupyter folders are not searched
    # ("python" in the venv's python3 spec becomes sys.executable when the kernel starts).
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(workdir / ".jupyter-data"))
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if SHARED.is_dir():
        monkeypatch.setenv("PLACER_SHARED", str(SHARED))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    # Everything the notebook wrote is under out/ (the kernelspec folder is the test's own).
    assert {p.name for p in workdir.iterdir()} - {".jupyter-data"} == {OUT}
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o:
                out.append(o["data"].get("text/plain", ""))
    return "\n".join(out)


@pytest.mark.timeout(180)
def test_quickstart(tmp_path, monkeypatch):
    nb = _execute(ROOT / "notebooks" / "01-quickstart.ipynb", tmp_path, monkeypatch)
    from placer.io.placements import import_placement, read_placement_json

    out = tmp_path / OUT
    pf = read_placement_json(out / "placement.json")
    assert pf.method == "placer" and pf.topology.num_gpus == 4 and pf.placement.num_redundant == 4
    p2l = import_placement(out / "eplb.npz", "eplb", model=pf.model, topology=pf.topology)
    assert (p2l.physical_to_logical == pf.placement.physical_to_logical).all()
    assert not (out / "sglang.json").exists()
    text = _text(nb)
    assert "SGLang: sglang 0.5.23 cannot place mixtral-8x7b" in text and "contiguous" in text
    real = (SHARED / "data/hdmoe-mixtral-mtbench/experts_coding_mixtral.json").is_file()
    assert ("synthetic=False" in text) == real


@pytest.mark.timeout(180)
def test_what_if_sweep(tmp_path, monkeypatch):
    nb = _execute(ROOT / "notebooks" / "02-what-if-sweep.ipynb", tmp_path, monkeypatch)
    import pandas as pd

    table = pd.read_csv(tmp_path / OUT / "sweep" / "sweep.csv")
    assert sorted(set(table["gpus"])) == [4, 8]
    assert sorted(set(table["placement"])) == ["contiguous", "eplb"]
    page = (tmp_path / OUT / "sweep-report.html").read_text(encoding="utf-8")
    # the sweep solved its placements on the fly and wrote them beside each point's results
    assert 'id="plot-placement-0"' in page and 'id="report-methods"' in page
    assert 'id="plot-sweep-gpus"' in page  # 4 and 8 GPUs: the headline metrics against GPU count
    assert any("application/vnd.plotly.v1+json" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.timeout(180)
def test_bring_your_own_sglang_dump(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    _execute(ROOT / "notebooks" / "03-bring-your-own-sglang-dump.ipynb", tmp_path, monkeypatch)
    from placer.io.routing import gather_routing
    from placer.presets import get_model

    model = get_model("deepseek-v2-lite")
    dumps = sorted(str(p) for p in (tmp_path / OUT).glob("expert_distribution_recorder_*.pt"))
    assert len(dumps) == 3  # one stat dump, two per_pass rank files
    load = gather_routing(dumps[:1], model=model).stats.load
    assert load.shape == (model.num_moe_layers, model.num_experts) and load.sum() > 0
    rows = json.loads((tmp_path / OUT / "sglang.json").read_text())["physical_to_logical_map"]
    assert len(rows) == model.num_hidden_layers and len(rows[0]) == model.num_experts + 8
