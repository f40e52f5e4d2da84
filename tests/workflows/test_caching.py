"""Step caching: keys from canonical inputs, no key for unhashable inputs, reuse on flow retry."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
from prefect import flow, task

from samclip.config import load_config
from samclip.workflows import steps
from samclip.workflows.caching import STEP_CACHE, input_digest


@dataclass(frozen=True)
class _Data:
    manifest_uri: str


def test_digest_changes_with_config():
    first = input_digest({"config": load_config("smoke", ["train.stage1.lr=0.1"])})
    second = input_digest({"config": load_config("smoke", ["train.stage1.lr=0.2"])})
    assert first != second
    assert first == input_digest({"config": load_config("smoke", ["train.stage1.lr=0.1"])})


def test_digest_changes_with_dataclass_input():
    assert input_digest({"data": _Data("a")}) != input_digest({"data": _Data("b")})


def test_digest_none_for_unhashable_input():
    assert input_digest({"lock": threading.Lock()}) is None
    assert input_digest({"nested": {"handle": object()}}) is None


def test_compute_steps_are_cached_and_tagged():
    for step in (steps.precompute_features, steps.train_stage, steps.sweep_stage2):
        assert step.cache_policy is STEP_CACHE
        assert step.persist_result is True
        assert steps.ACCELERATOR_TAG in step.tags
        assert not step.retries  # compute steps never retry blindly
    assert steps.prepare_teachers.retries == 3


CALLS: dict[str, int] = {}


@task(cache_policy=STEP_CACHE, persist_result=True)
def _expensive(data: _Data) -> str:
    CALLS["expensive"] = CALLS.get("expensive", 0) + 1
    return data.manifest_uri.upper()


@task(cache_policy=STEP_CACHE, persist_result=True)
def _unhashable(lock) -> int:
    CALLS["unhashable"] = CALLS.get("unhashable", 0) + 1
    return 1


@task
def _late(fail_first: bool) -> None:
    CALLS["late"] = CALLS.get("late", 0) + 1
    if fail_first and CALLS["late"] == 1:
        raise RuntimeError("planted late failure")


@flow(retries=1, retry_delay_seconds=0, persist_result=True)
def _retried_flow(value: str, fail_first: bool) -> str:
    result = _expensive(_Data(value))
    _unhashable(threading.Lock())
    _late(fail_first)
    return result


def test_flow_retry_skips_completed_steps(prefect_harness):
    CALLS.clear()
    assert _retried_flow("manifest", fail_first=True) == "MANIFEST"
    assert CALLS["late"] == 2  # the flow ran twice
    assert CALLS["expensive"] == 1  # the completed step came from the cache
    assert CALLS["unhashable"] == 2  # an unhashable input is never served from the cache


def test_new_flow_run_recomputes(prefect_harness):
    CALLS.clear()
    _retried_flow("manifest", fail_first=False)
    _retried_flow("manifest", fail_first=False)
    # the cache lives within one root flow run: a new run re-checks storage itself
    assert CALLS["expensive"] == 2
