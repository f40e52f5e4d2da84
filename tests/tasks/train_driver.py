"""A training-stage driver run as its own process, so that a test can kill it by its pid.

Usage: python train_driver.py CONFIG_JSON DATA_JSON STAGE RUN_NAME RESULT_JSON

It joins the Ray cluster at RAY_ADDRESS (or starts its own local Ray on loopback), runs
``run_stage`` and writes the StageResult as JSON to RESULT_JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)
from samclip.config import PipelineConfig
from samclip.tasks.train import run_stage
from samclip.tasks.train_data import StageData


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    config_path, data_path, stage, run_name, result_path = sys.argv[1:6]
    with open(config_path, encoding="utf-8") as handle:
        config = PipelineConfig.model_validate(json.load(handle))
    with open(data_path, encoding="utf-8") as handle:
        data = StageData(**json.load(handle))
    result = run_stage(config, int(stage), data, None, run_name)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(asdict(result), handle)


if __name__ == "__main__":
    main()
