"""A precompute driver run as its own process, so that a test can kill it by its pid.

Usage: python precompute_driver.py CONFIG_JSON MANIFEST_URI

It starts its own local Ray (on loopback, as ``init_ray`` always does) and runs precompute.
"""

from __future__ import annotations

import json
import logging
import sys

import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)
from samclip.config import PipelineConfig
from samclip.tasks.precompute import precompute
from samclip.tasks.teachers import ensure_teachers


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    config_path, manifest_uri = sys.argv[1], sys.argv[2]
    with open(config_path, encoding="utf-8") as handle:
        config = PipelineConfig.model_validate(json.load(handle))
    result = precompute(config, manifest_uri, ensure_teachers(config))
    print(json.dumps({"computed": result.computed, "reused": result.reused}), flush=True)


if __name__ == "__main__":
    main()
