"""Training stages: what trains in each stage, one step's gradients, and real Ray Train runs."""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import pytest
import torch

from samclip.config import StageConfig, load_config
from samclip.tasks import storage
from samclip.tasks.train_steps import (
    ClipBatch,
    SamBatch,
    WarmupCosine,
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    clip_loss_terms,
    freeze_for_stage,
    group_learning_rates,
    mask_iou,
    optimizer_step,
    sam_loss_terms,
    trainable_parameters,
)

EMBED_DIM = 32


# ---------------------------------------------------------------- tiny models and batches


@pytest.fixture(scope="module")
def teacher():
    from samclip.model.sam_teacher import build_sam

    torch.manual_seed(0)
    sam = build_sam("tiny")
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    return sam.eval()


@pytest.fixture()
def student(teacher):
    from samclip.model.architectures import build_student

    torch.manual_seed(1)
    model = build_student("tiny", teacher, EMBED_DIM, clip_head_depth=1, mlp_hidden_layers=1)
    # move the student off the teacher, so that the SAM loss has a gradient
    with torch.no_grad():
        for parameter in model.mask_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.train()


@pytest.fixture(scope="module")
def batches(teacher):
    from samclip.model.prompts import sample_prompts

    generator = torch.Generator().manual_seed(2)
    clip_batch = ClipBatch(
        images=torch.randn(2, 3, 64, 64, generator=generator),
        targets=torch.randn(2, EMBED_DIM, generator=generator),
    )
    sam_images = torch.randn(1, 3, 256, 256, generator=generator)
    with torch.no_grad():
        embeddings = teacher.image_encoder(sam_images)
    sam_batch = SamBatch(images=sam_images, valid_hw=[(256, 200)], teacher_embeddings=embeddings)
    prompts = sample_prompts(1, 2, sam_batch.valid_hw, generator)
    return clip_batch, sam_batch, prompts


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- stage semantics, no Ray


@pytest.mark.parametrize("stage", [1, 3])
def test_head_stages_train_only_clip_head(student, stage):
    freeze_for_stage(student, stage)
    for name, parameter in student.named_parameters():
        assert parameter.requires_grad == name.startswith("clip_head."), name


def test_stage2_trains_backbone_and_both_heads(student):
    count = freeze_for_stage(student, 2)
    assert count == sum(p.numel() for p in student.parameters())
    groups = trainable_parameters(student, 2)
    assert set(groups) == {"clip_head", "backbone", "sam_head"}
    sam_head = {id(p) for p in [*student.prompt_encoder.parameters(), *student.mask_decoder.parameters()]}
    assert {id(p) for p in groups["sam_head"]} == sam_head


def test_stage2_learning_rates_use_ratio(student):
    cfg = StageConfig(lr=4e-5, lr_ratio=0.1)
    optimizer = build_optimizer(student, 2, cfg)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["clip_head"] == pytest.approx(4e-5)
    assert lrs["backbone"] == pytest.approx(4e-6)
    assert lrs["sam_head"] == pytest.approx(4e-6)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_stage1_optimizer_holds_only_head(student):
    optimizer = build_optimizer(student, 1, StageConfig(lr=8e-4))
    assert [group["name"] for group in optimizer.param_groups] == ["clip_head"]
    assert group_learning_rates(1, StageConfig(lr=8e-4)) == {"clip_head": 8e-4}


def test_invalid_stage_rejected(student):
    with pytest.raises(ValueError, match="invalid stage 5"):
        trainable_parameters(student, 5)


def test_stage2_gradient_is_sum_of_branches(student, teacher, batches):
    clip_batch, sam_batch, prompts = batches
    cfg = StageConfig(sam_loss_weight=10.0)
    freeze_for_stage(student, 2)

    clip_loss_terms(student, clip_batch)["clip_cosine"].backward()
    clip_only = _grads(student)
    student.zero_grad(set_to_none=True)
    (cfg.sam_loss_weight * sam_loss_terms(student, teacher, sam_batch, prompts, cfg)["sam"]).backward()
    sam_only = _grads(student)
    student.zero_grad(set_to_none=True)

    terms = accumulate_gradients(student, 2, cfg, clip_batch, sam_batch, prompts, teacher)
    both = _grads(student)
    assert set(terms) >= {"clip_cosine", "sam_focal", "sam_dice", "sam", "loss"}
    assert terms["loss"] == pytest.approx(terms["clip_cosine"] + 10.0 * terms["sam"])
    assert set(both) == set(clip_only) | set(sam_only)
    assert any(name.startswith("clip_head.") for name in clip_only)
    assert any(name.startswith("mask_decoder.") for name in sam_only)
    assert not any(name.startswith("clip_head.") for name in sam_only)
    for name, grad in both.items():
        expected = clip_only.get(name, torch.zeros_like(grad)) + sam_only.get(name, torch.zeros_like(grad))
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7), name


def test_stage1_step_changes_only_head(student, batches):
    clip_batch, _, _ = batches
    cfg = StageConfig(lr=1e-2, warmup_steps=0)
    freeze_for_stage(student, 1)
    optimizer = build_optimizer(student, 1, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=4)
    before = copy.deepcopy(student.state_dict())

    terms = accumulate_gradients(student, 1, cfg, clip_batch)
    norm = optimizer_step(optimizer, scheduler, cfg)
    assert set(terms) == {"clip_cosine", "loss"}
    assert math.isfinite(norm)
    assert norm > 0
    after = student.state_dict()
    frozen = [name for name in after if not name.startswith("clip_head.")]
    assert all(torch.equal(after[name], before[name]) for name in frozen)
    assert any(not torch.equal(after[name], before[name]) for name in after if name.startswith("clip_head."))


def test_stage1_loss_decreases(student, batches):
    clip_batch, _, _ = batches
    cfg = StageConfig(lr=1e-2, warmup_steps=0, grad_clip=None)
    freeze_for_stage(student, 1)
    optimizer = build_optimizer(student, 1, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=100)
    losses = []
    for _ in range(5):
        losses.append(accumulate_gradients(student, 1, cfg, clip_batch)["loss"])
        optimizer_step(optimizer, scheduler, cfg)
    assert losses[-1] < losses[0]


def test_grad_clip_bounds_norm(student, batches):
    clip_batch, _, _ = batches
    cfg = StageConfig(grad_clip=1e-6)
    freeze_for_stage(student, 1)
    optimizer = build_optimizer(student, 1, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=1)
    accumulate_gradients(student, 1, cfg, clip_batch)
    params = [p for p in student.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert clipped <= 1e-6 * 1.01
    optimizer_step(optimizer, scheduler, cfg)


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup_steps=2, total_steps=6)
    factors = [schedule(step) for step in range(7)]
    assert factors[0] == pytest.approx(1 / 3)
    assert factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)
    assert factors[4] == pytest.approx(0.5)
    assert factors[6] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def test_mask_iou_counts_empty_as_match():
    student = torch.tensor([[[[1.0, -1.0]], [[-1.0, -1.0]]]])  # (B=1, K=2, 1, 2)
    teacher = torch.tensor([[[[1.0, 1.0]], [[-1.0, -1.0]]]])
    assert mask_iou(student, teacher).tolist() == [[0.5, 1.0]]


# ---------------------------------------------------------------- data for real runs


def write_stage_data(root: str, config, n_train: int = 4, n_val: int = 2, clip_dim: int = EMBED_DIM):
    """Write images, a manifest and teacher features for a tiny stage; returns StageData."""
    from samclip.tasks.train_synthetic import write_synthetic_stage_data

    return write_synthetic_stage_data(root, config, n_train, n_val, clip_dim)


def tiny_config(root: str, *overrides: str):
    return load_config(
        "smoke",
        [
            f"storage.root={root}",
            "student.clip_head_depth=1",
            "train.stage1.clip_batch_size=2",
            "train.stage1.clip_resolution=64",
            "train.stage2.clip_batch_size=2",
            "train.stage2.sam_batch_size=1",
            "train.stage2.masks_per_image=2",
            "train.stage2.clip_resolution=64",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    config = tiny_config(root)
    return config, write_stage_data(root, config)


# ---------------------------------------------------------------- real Ray Train runs


def test_stage1_run_writes_loadable_checkpoint(ray_cluster, stage_setup):
    from samclip.tasks.checkpoints import load_student, load_train_state
    from samclip.tasks.train import run_stage

    config, data = stage_setup
    stage_cfg = config.train.stage1.model_copy(update={"epochs": 2, "max_steps": 3})
    started = time.perf_counter()
    result = run_stage(config, 1, data, None, "stage1-test", stage_config=stage_cfg)
    print(f"stage 1, 3 steps through Ray Train: {time.perf_counter() - started:.1f} s")

    assert storage.exists(storage.join(result.checkpoint_uri, "model.safetensors"))
    model = load_student(result.checkpoint_uri)
    assert model.embed_dim == EMBED_DIM
    state = load_train_state(result.checkpoint_uri)
    assert state["step"] == 3
    assert result.metrics["step"] == 3
    for key in ("train/clip_cosine", "val/clip_cosine", "val/sam", "val/sam_iou", "lr/clip_head"):
        assert math.isfinite(result.metrics[key]), key
    # stage 1 leaves the backbone and SAM head as the teacher's: the masks still agree
    assert result.metrics["val/sam_iou"] > 0.9
    assert storage.exists(result.metrics_jsonl_uri)
    assert storage.read_bytes(result.loss_curve_png_uri)[:4] == b"\x89PNG"


def test_stage1_two_workers_agree(ray_cluster, stage_setup):
    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train import run_stage

    config, data = stage_setup
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"workers": 2, "cpus_per_worker": 0.5})}
    )
    stage_cfg = config.train.stage1.model_copy(update={"epochs": 2, "max_steps": None})
    result = run_stage(config, 1, data, None, "stage1-two-workers", stage_config=stage_cfg)

    # 4 train images over 2 workers in batches of 2: one step per epoch
    assert load_train_state(result.checkpoint_uri)["step"] == 2
    assert math.isfinite(result.metrics["val/clip_cosine"])
    assert result.metrics["val/sam_iou"] > 0.9


def test_stage1_rerun_reuses_result(ray_cluster, stage_setup):
    from samclip.tasks.train import run_stage

    config, data = stage_setup
    stage_cfg = config.train.stage1.model_copy(update={"epochs": 2, "max_steps": 3})
    first = run_stage(config, 1, data, None, "stage1-test", stage_config=stage_cfg)
    started = time.perf_counter()
    again = run_stage(config, 1, data, None, "stage1-test", stage_config=stage_cfg)
    assert time.perf_counter() - started < 5
    assert again.checkpoint_uri == first.checkpoint_uri


def test_stage2_resumes_from_own_checkpoint(ray_cluster, stage_setup):
    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train import RESULT_FILE, run_stage
    from samclip.tasks.train_metrics import read_metrics_jsonl

    config, data = stage_setup
    first_cfg = config.train.stage2.model_copy(update={"max_steps": 1})
    first = run_stage(config, 2, data, None, "stage2-resume", stage_config=first_cfg)
    assert load_train_state(first.checkpoint_uri)["step"] == 1
    for key in ("train/sam", "train/sam_focal", "train/sam_dice", "lr/backbone", "lr/sam_head", "val/score"):
        assert key in first.metrics, key

    # as if the driver had died after the run's last checkpoint: no result.json
    os.remove(storage.join(storage.local_path(config.uri("train")), "stage2-resume", RESULT_FILE))
    second_cfg = config.train.stage2.model_copy(update={"max_steps": 2})
    second = run_stage(config, 2, data, None, "stage2-resume", stage_config=second_cfg)
    assert load_train_state(second.checkpoint_uri)["step"] == 2
    steps = [line["step"] for line in read_metrics_jsonl(second.metrics_jsonl_uri) if line["kind"] == "train"]
    assert steps == [1, 2]


# ---------------------------------------------------------------- more stage semantics


@pytest.mark.parametrize("stage", [1, 3])
def test_head_stage_gradients_reach_only_head(student, batches, stage):
    clip_batch, _, _ = batches
    freeze_for_stage(student, stage)
    accumulate_gradients(student, stage, StageConfig(), clip_batch)
    with_grad = {name for name, p in student.named_parameters() if p.grad is not None}
    assert with_grad
    assert all(name.startswith("clip_head.") for name in with_grad)
    student.zero_grad(set_to_none=True)


def test_stage2_gradients_reach_every_group(student, teacher, batches):
    clip_batch, sam_batch, prompts = batches
    freeze_for_stage(student, 2)
    accumulate_gradients(student, 2, StageConfig(), clip_batch, sam_batch, prompts, teacher)
    for group, params in trainable_parameters(student, 2).items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
    student.zero_grad(set_to_none=True)


def test_scheduler_lrs_keep_group_ratio(student):
    cfg = StageConfig(lr=4e-5, lr_ratio=0.1, warmup_steps=2)
    optimizer = build_optimizer(student, 2, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=6)
    for _ in range(4):
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert lrs["backbone"] == pytest.approx(0.1 * lrs["clip_head"])
        assert lrs["sam_head"] == pytest.approx(0.1 * lrs["clip_head"])
        optimizer.step()
        scheduler.step()


def test_paper_profile_matches_paper():
    config = load_config("paper-vit-b")
    train = config.train
    # the batch sizes are per worker: workers x per-worker batch gives the paper's global batches
    assert train.workers * train.stage1.clip_batch_size == 2048
    assert train.workers * train.stage2.clip_batch_size == 2048
    assert train.workers * train.stage2.sam_batch_size == 32
    assert train.stage2.masks_per_image == 32
    assert (train.stage1.lr, train.stage2.lr, train.stage2.lr_ratio) == (8e-4, 4e-5, 0.1)
    assert train.stage2.sam_loss_weight == 10.0
    assert (train.stage1.epochs, train.stage2.epochs, train.stage3.epochs) == (20, 20, 3)
    assert train.stage2.early_stopping_patience is not None
    assert train.stage3.clip_resolution == 1024 > train.stage1.clip_resolution
    assert train.precision == "auto"
    assert train.use_gpu


# ---------------------------------------------------------------- the streaming data index


def test_index_holds_no_features_and_lookup_reads_shards(tmp_path):
    import pyarrow as pa

    from samclip.tasks.features import write_feature_shard
    from samclip.tasks.train_data import FeatureLookup, StageData, build_stage_tables

    hashes = [f"{index:064x}" for index in range(6)]
    rows = [
        {"hash": key, "uri": f"/images/{index}.png", "split": "train" if index < 4 else "val"}
        for index, key in enumerate(hashes)
    ]
    manifest = str(tmp_path / "manifest.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows), manifest)
    features = np.arange(6 * 3, dtype=np.float16).reshape(6, 3)
    clip_dir = str(tmp_path / "clip")
    write_feature_shard(clip_dir, hashes[:3], features[:3], "float16")
    write_feature_shard(clip_dir, hashes[3:], features[3:], "float16")

    tables = build_stage_tables(StageData(manifest, clip_dir), stage=1)
    assert tables.train.column_names == ["hash", "uri", "clip_shard", "sam_shard", "position"]
    assert tables.train.column("position").to_pylist() == [0, 1, 2, 3]
    assert tables.val.column("position").to_pylist() == [0, 1]
    assert len(tables.clip_spec.shards) == 2
    assert tables.counts == {"train": 4, "train_sam": 0, "val": 2, "val_sam": 0}

    lookup = FeatureLookup(tables.clip_spec, cached_shards=1)
    batch = tables.train.to_pydict()
    got = lookup.get(np.asarray(batch["hash"]), np.asarray(batch["clip_shard"]))
    expected = np.stack([features[hashes.index(key)] for key in batch["hash"]]).astype(np.float32)
    assert torch.equal(got, torch.from_numpy(expected))
    assert lookup.shard_reads == 2
    with pytest.raises(KeyError, match="no feature"):
        lookup.get(np.asarray(hashes[:1]), np.asarray([-1]))


def test_index_rejects_missing_clip_features(tmp_path):
    import pyarrow as pa

    from samclip.tasks.features import write_feature_shard
    from samclip.tasks.train_data import StageData, build_stage_tables

    rows = [{"hash": f"{index:064x}", "uri": "/x.png", "split": "train"} for index in range(2)]
    manifest = str(tmp_path / "manifest.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows), manifest)
    clip_dir = str(tmp_path / "clip")
    write_feature_shard(clip_dir, [rows[0]["hash"]], np.zeros((1, 3), np.float16), "float16")
    with pytest.raises(KeyError, match="1 of 2 manifest hashes"):
        build_stage_tables(StageData(manifest, clip_dir), stage=1)


def test_finished_run_with_other_teacher_features_is_rejected(tmp_path):
    from samclip.tasks.train import _check_same_inputs
    from samclip.tasks.train_data import StageData

    run_uri = str(tmp_path / "stage1-abc")
    first = StageData(manifest_uri="m.parquet", clip_features_dir="clip/aaa", sam_features_dir="sam/bbb")
    _check_same_inputs(run_uri, "stage1-abc", first, None)
    _check_same_inputs(run_uri, "stage1-abc", first, None)  # the same inputs pass

    replaced = StageData(manifest_uri="m.parquet", clip_features_dir="clip/aaa", sam_features_dir="sam/ccc")
    with pytest.raises(ValueError, match=r"run stage1-abc .*sam_features_dir was sam/bbb, now sam/ccc.*remove that run folder"):
        _check_same_inputs(run_uri, "stage1-abc", replaced, None)
