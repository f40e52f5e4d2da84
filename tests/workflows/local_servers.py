"""Helpers for tests that start real servers in subprocesses, always on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

# A value no run could produce by chance; tests plant it as a credential and grep for it.
PLANTED_SECRET = "samclip-planted-secret-7f3a9c1e5b"
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIA" + PLANTED_SECRET,
    "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
    "AWS_SESSION_TOKEN": "token-" + PLANTED_SECRET,
    "HF_TOKEN": "hf-" + PLANTED_SECRET,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll ``url`` until it returns 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process this test started, and its process group when it leads one."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
        process.wait(timeout=timeout)


def files_containing(folder: Path, needle: str) -> list[str]:
    """List the files under ``folder`` whose bytes contain ``needle`` (SQLite files included)."""
    hits = []
    encoded = needle.encode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if encoded in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits
