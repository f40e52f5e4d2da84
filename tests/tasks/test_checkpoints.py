"""Student checkpoint format: save, rebuild from student.json, strict loading, train state."""

from __future__ import annotations

import pytest
import torch

from samclip.tasks import storage
from samclip.tasks.checkpoints import (
    load_student,
    load_train_state,
    read_student_meta,
    save_student_checkpoint,
    student_meta,
)

OPTIONS = {"clip_head_depth": 1, "pooling": "max", "mlp_hidden_layers": 1}


@pytest.fixture(scope="module")
def student():
    from samclip.model.architectures import build_student_random

    torch.manual_seed(0)
    return build_student_random("tiny", 32, **OPTIONS)


def test_round_trip_restores_weights(tmp_path, student):
    folder = str(tmp_path / "ckpt")
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS), config_yaml="seed: 0\n")

    loaded = load_student(folder)
    original = student.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert (tmp_path / "ckpt" / "config.yaml").read_text() == "seed: 0\n"
    assert read_student_meta(folder)["options"] == OPTIONS


def test_loaded_student_computes_same_embedding(tmp_path, student):
    folder = str(tmp_path / "ckpt")
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS))
    loaded = load_student(folder).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.clip_embedding(images), student.eval().clip_embedding(images))


def test_train_state_loads_weights_only(tmp_path, student):
    optimizer = torch.optim.AdamW(student.clip_head.parameters(), lr=1e-3)
    student.clip_embedding(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {"step": 3, "epoch": 1, "optimizer": optimizer.state_dict(), "best": float("inf")}
    folder = str(tmp_path / "ckpt")
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS), train_state=state)

    loaded = load_train_state(folder)
    assert loaded["step"] == 3
    assert loaded["best"] == float("inf")
    fresh = torch.optim.AdamW(student.clip_head.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    student.zero_grad(set_to_none=True)


def test_missing_train_state_raises(tmp_path, student):
    folder = str(tmp_path / "ckpt")
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        load_train_state(folder)


def test_not_a_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a student checkpoint"):
        load_student(str(tmp_path))


def test_wrong_architecture_names_keys(tmp_path, student):
    folder = str(tmp_path / "ckpt")
    meta = student_meta("tiny", 32, **{**OPTIONS, "clip_head_depth": 2})
    save_student_checkpoint(folder, student, meta)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_student(folder)


def test_meta_without_arch_rejected(tmp_path, student):
    with pytest.raises(ValueError, match="arch"):
        save_student_checkpoint(str(tmp_path), student, {"embed_dim": 32})


def test_files_committed_without_temporaries(tmp_path, student):
    folder = str(tmp_path / "ckpt")
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS), train_state={"step": 0})
    names = sorted(uri.rsplit("/", 1)[-1] for uri in storage.list_files(folder))
    assert names == ["model.safetensors", "student.json", "train_state.pt"]


def test_rng_states_round_trip_through_checkpoint(tmp_path, student):
    import random

    import numpy as np

    from samclip.tasks.train_state import capture_rng_states, restore_rng_states

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    folder = str(tmp_path / "ckpt")
    state = {"step": 1, "rng_states": [capture_rng_states()]}
    save_student_checkpoint(folder, student, student_meta("tiny", 32, **OPTIONS), train_state=state)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    restore_rng_states(load_train_state(folder)["rng_states"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
