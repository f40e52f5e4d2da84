"""The testbed inside the pipeline: settings, scene writing, and training a teacher once as a Ray Train job."""

from __future__ import annotations

import pytest

from samclip.config import load_config
from samclip.tasks import testbed
from samclip.testbed.train_clip import MODEL_NAME

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _config(tmp_path, *overrides):
    return load_config("shapes", [f"storage.root={tmp_path}", "testbed.count=8", *overrides])


def test_shapes_profile_points_at_the_testbed(tmp_path):
    config = _config(tmp_path)
    scenes = str(tmp_path / "testbed" / "scenes")
    assert config.data.source == f"{scenes}/images"
    assert config.evaluate.classification == f"{scenes}/labels_val.csv"
    assert config.evaluate.instances == f"{scenes}/coco/instances_val.json"
    assert testbed.scenes_folder(config) == scenes
    assert config.teachers.clip.model == MODEL_NAME
    assert not config.teachers.sam.create_random


def test_unknown_trainer_setting_names_the_field(tmp_path):
    config = _config(tmp_path, "testbed.sam.max_stesp=5")
    with pytest.raises(ValueError, match=r"testbed.sam has unknown keys \['max_stesp'\]"):
        testbed.teacher_settings(config, "sam")


def test_object_store_scene_folder_is_rejected(tmp_path):
    config = _config(tmp_path, "testbed.folder=s3://bucket/scenes")
    with pytest.raises(ValueError, match="testbed.folder 's3://bucket/scenes' is not a local path"):
        testbed.scenes_folder(config)


def test_scenes_are_written_with_the_evaluation_files(tmp_path):
    config = _config(tmp_path)
    summary = testbed.write_scenes(config)
    root = tmp_path / "testbed" / "scenes"
    assert summary["counts"]["scenes"] == 8
    for name in ("labels_val.csv", "coco/instances_val.json", "voc/classes.txt", "images/scene_000007.png"):
        assert (root / name).is_file(), name


def test_clip_teacher_reused_after_training(tmp_path, ray_cluster):
    clip = f"testbed.clip={{train_scenes: 16, eval_scenes: 8, scene_size: 48, batch_size: 8, max_steps: 2, eval_every: 2, warmup_steps: 1, model_config: {TINY_CLIP}}}"
    config = _config(tmp_path, clip)
    record = testbed.train_teacher(config, "clip")

    assert record["result"]["steps"] == 2
    weights = tmp_path / "testbed" / "teachers" / f"{MODEL_NAME}.bin"
    assert weights.is_file()
    assert (tmp_path / "testbed" / "teachers" / f"{MODEL_NAME}.json").is_file()
    from samclip.model.clip_teacher import load_clip_teacher

    teacher = load_clip_teacher(MODEL_NAME, weights, weights.with_suffix(".json"))
    assert teacher.embed_dim == 32

    modified = weights.stat().st_mtime_ns
    again = testbed.train_teacher(config, "clip")
    assert again == record
    assert weights.stat().st_mtime_ns == modified

    other = _config(tmp_path, clip.replace("max_steps: 2", "max_steps: 1"))
    assert testbed.cached_teacher(other, "clip") is None


@pytest.mark.parametrize("seed", [1000, 1001, 2000, 2001])
def test_scene_seed_shared_with_a_teacher_is_rejected(tmp_path, seed):
    config = _config(tmp_path, f"testbed.seed={seed}")
    with pytest.raises(ValueError, match=f"testbed.seed {seed} is one of the clip teacher's scene seeds"):
        testbed.teacher_settings(config, "clip")


def test_interrupted_scene_folder_is_written_again(tmp_path):
    config = _config(tmp_path)
    folder = tmp_path / "testbed" / "scenes" / "images"
    folder.mkdir(parents=True)
    (folder / "scene_000000.png").write_bytes(b"cut short")  # a write stopped before testbed.json
    summary = testbed.write_scenes(config)
    assert summary["counts"]["scenes"] == 8
    assert (folder / "scene_000000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
