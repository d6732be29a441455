"""The quickstart notebook runs top to bottom (its code cells, in a fresh process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    # The notebook's last expression of each cell is only displayed; check the results here.
    code += (
        "\n\nassert report['metrics']['accuracy'] > 0.5, report['metrics']"
        "\nassert out['class_name'].numpy()[0].decode() in "
        "open(path / 'assets.extra' / 'label_names.txt').read().split()\n"
    )
    (tmp_path / "pipelines").mkdir()
    shutil.copy(REPO / "pipelines" / "demo.yaml", tmp_path / "pipelines")
    script = tmp_path / "notebook.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "runs" / "notebook" / "models" / "mmtf_notebook" / "1" / "saved_model.pb").exists()
