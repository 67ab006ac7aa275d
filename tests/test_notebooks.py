"""The notebooks run, end to end, on small data, so they never rot.

Each notebook is executed with nbclient in a temporary working directory, with small settings
passed through environment variables (the notebooks read them in their parameter cell), a
random backbone and no AVA. The kernel is started from a kernelspec written into the test's
temporary folder that names this interpreter (``sys.executable``), so the notebooks run with the
same environment as the tests whatever kernelspecs the machine has installed.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell
KERNEL_NAME = "mlsp-test-python"
CHECK_CELL = "import sys\nprint(sys.prefix)"  # appended: which Python environment ran the notebook


def kernel_manager(root: Path):
    """A kernel manager whose only kernelspec runs ipykernel on this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mlsp tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(root / "kernels")])
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(name: str, tmp_path: Path, monkeypatch, env: dict) -> Path:
    """Run notebooks/<name> in tmp_path/cwd with ``env``; return the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the kernel's temporary files stay here too
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    before = sorted(os.listdir(NOTEBOOKS))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout").strip()
    assert printed == sys.prefix, f"the kernel ran another Python environment ({printed}, not {sys.prefix})"
    assert sorted(os.listdir(NOTEBOOKS)) == before, "the notebook wrote into the repository's notebooks/"
    return cwd


def inside(path, root: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "ava_walkthrough.ipynb"])
def test_notebook_is_saved_clean(name):
    """Notebooks are committed without outputs: they are executed here, not stored executed."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: a cell is saved with outputs"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
    work = tmp_path / "work"
    execute("quickstart.ipynb", tmp_path, monkeypatch, {
        "MLSP_NB_IMAGES": 16, "MLSP_NB_EPOCHS": 2, "MLSP_NB_STEPS": 2, "MLSP_NB_MAX_SIDE": 200,
        "MLSP_NB_WEIGHTS": "random:0", "MLSP_NB_SINGLE3FC": 1, "MLSP_NB_WORK": work,
        "MLSP_NB_SALIENCY_SAMPLES": 2,
    })
    summary = json.loads((work / "summary.json").read_text())
    assert summary["random_backbone"] and summary["weights"] == "random:0"
    assert summary["images_in_store"] == 16
    run = Path(summary["run"])
    for path in (summary["store"], run, summary["scores_csv"], summary["model"]):
        assert inside(path, work), f"{path} is outside the notebook's WORK folder"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] >= 2 and math.isfinite(metrics["test"]["srcc"])
    assert metrics["test"]["srcc"] == pytest.approx(summary["test"]["srcc"])
    for plot in ("predictions.png", "loss.png"):
        assert (run / plot).stat().st_size > 1000
    assert (work / "runs" / "single3fc" / "metrics.json").is_file()

    import pandas as pd

    scores = pd.read_csv(summary["scores_csv"], dtype={"id": str})
    assert summary["n_scored"] == 4 and len(scores) == 4 + 1  # the new images, then the broken file
    assert scores["pred"].iloc[:4].between(1, 10).all()
    assert [e["path"] for e in summary["errors"]] == [scores["path"].iloc[4]]
    assert os.path.basename(scores["path"].iloc[4]) == "broken.jpg" and scores["error"].iloc[4]
    assert abs(summary["exported_pred"] - summary["score_pred"]) < 0.02
    assert inside(summary["report"], work) and "report-data" in Path(summary["report"]).read_text()
    import numpy as np

    assert np.load(summary["saliency"]).max() == pytest.approx(1.0)


@pytest.mark.slow
def test_ava_walkthrough_stand_in(tmp_path, monkeypatch):
    monkeypatch.delenv("AVA_DIR", raising=False)
    work = tmp_path / "work"
    execute("ava_walkthrough.ipynb", tmp_path, monkeypatch, {
        "MLSP_NB_IMAGES": 12, "MLSP_NB_EPOCHS": 2, "MLSP_NB_STEPS": 2, "MLSP_NB_MAX_SIDE": 200,
        "MLSP_NB_NET": "iv3", "MLSP_NB_WORK": work,
    })
    summary = json.loads((work / "summary.json").read_text())
    assert summary["stand_in"] is True and summary["weights"] == "random:0"
    assert inside(summary["ava_dir"], tmp_path / "tmp"), "the stand-in AVA folder is not a temporary one"
    for path in (summary["store"], summary["run"], summary["scores_csv"]):
        assert inside(path, work), f"{path} is outside the notebook's WORK folder"
    assert summary["ava_txt_lines"] == 12 + 3 and summary["images_in_store"] == 12
    # the size formula of the notebook is the store's actual size
    assert summary["store_bytes_expected"] == summary["store_bytes_actual"] == 12 * 8 * 25 * 10_048 * 2
    metrics = json.loads((Path(summary["run"]) / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["srcc"])
    assert summary["n_scored"] == 12
