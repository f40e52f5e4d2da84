"""samclip.model stays pure torch: no pipeline, storage or tracking library may be imported."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import samclip.model

FORBIDDEN = ("ray", "prefect", "fsspec", "s3fs", "boto", "boto3", "botocore", "pyarrow", "mlflow")


def model_modules() -> list[str]:
    folder = Path(samclip.model.__file__).parent
    return sorted(f"samclip.model.{info.name}" for info in pkgutil.iter_modules([str(folder)]))


def test_every_module_listed():
    names = model_modules()
    for expected in ("images", "sam_teacher", "clip_teacher", "clip_head", "architectures",
                     "student", "prompts", "losses", "zero_shot"):  # fmt: skip
        assert f"samclip.model.{expected}" in names


def test_model_imports_no_pipeline_libraries():
    script = (
        "import importlib, json, sys\n"
        f"for name in {model_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in forbidden)\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"samclip.model imported {loaded}"
