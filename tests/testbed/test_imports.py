"""The scene generator and writer stay pure numpy and PIL: no torch, Ray or Prefect."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "ray", "prefect", "fsspec", "pyarrow", "mlflow", "open_clip")
MODULES = ("samclip.testbed.scenes", "samclip.testbed.writer")


def test_generator_imports_no_heavy_libraries():
    script = (
        "import importlib, json, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the testbed generator imported {loaded}"
