"""One logging setup for the command line and the workers: ``time | level | name | message``."""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"

# Libraries that log a line per request or per tick at INFO; their warnings still show.
NOISY_LOGGERS = ("werkzeug", "urllib3", "botocore", "s3fs", "aiobotocore", "httpx", "alembic", "filelock")


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; ``SAMCLIP_LOG_LEVEL`` overrides the default INFO."""
    level = level or os.environ.get("SAMCLIP_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_samclip", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._samclip = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
