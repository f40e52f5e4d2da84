"""The paper's comparison: the naive-distillation stage, the table and plot, and a tiny real run."""

from __future__ import annotations

import json

import pytest
import torch

from samclip.tasks import storage
from samclip.tasks.train_steps import ClipBatch, accumulate_gradients, build_optimizer, freeze_for_stage

from test_train import EMBED_DIM, tiny_config, write_stage_data  # noqa: E402


@pytest.fixture(scope="module")
def student():
    from samclip.model.architectures import build_student
    from samclip.model.sam_teacher import build_sam

    torch.manual_seed(0)
    return build_student("tiny", build_sam("tiny"), EMBED_DIM, clip_head_depth=1, mlp_hidden_layers=1)


def test_naive_stage_freezes_sam_head(student):
    from samclip.model.baselines import NAIVE_TRAINABLE, setup_naive_distillation
    from samclip.tasks.train_steps import NAIVE_DISTILLATION_STAGE

    freeze_for_stage(student, NAIVE_DISTILLATION_STAGE)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == set(setup_naive_distillation(student).trainable)
    assert all(name.split(".", 1)[0] in NAIVE_TRAINABLE for name in trainable)

    freeze_for_stage(student, NAIVE_DISTILLATION_STAGE)
    optimizer = build_optimizer(student, NAIVE_DISTILLATION_STAGE, tiny_config("/tmp/unused").train.stage2)
    assert [group["name"] for group in optimizer.param_groups] == ["clip_head", "backbone"]
    batch = ClipBatch(images=torch.randn(2, 3, 64, 64), targets=torch.randn(2, EMBED_DIM))
    terms = accumulate_gradients(student, NAIVE_DISTILLATION_STAGE, tiny_config("/tmp/unused").train.stage2, batch)
    assert set(terms) == {"clip_cosine", "loss"}  # L_CLIP only
    assert student.image_encoder.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in student.mask_decoder.parameters())


def test_comparison_table_and_plot(tmp_path):
    from samclip.tasks.compare import CLIP_ABILITY, SAM_ABILITY, write_comparison

    def row(model, kind, clip, sam):
        return {"model": model, "kind": kind, "report": "", "metrics": {CLIP_ABILITY: clip, SAM_ABILITY: sam}}

    rows = [
        row("SAM teacher + probed head", "reference", 0.5, 1.0), row("naive distillation", "naive", 0.9, 0.3),
        row("Wise-FT alpha=0.5", "wise-ft", 0.7, 0.6), row("SAM-CLIP", "samclip", 0.85, 0.9),
    ]  # fmt: skip
    md_uri, json_uri, plot_uri = write_comparison(rows, str(tmp_path), "test")
    table = storage.read_bytes(md_uri).decode()
    assert "| SAM-CLIP | 0.8500 | 0.9000 |" in table
    assert len(json.loads(storage.read_bytes(json_uri))) == 4
    assert storage.read_bytes(plot_uri)[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tiny_comparison_runs(ray_cluster, tmp_path):
    from samclip.model.architectures import build_student
    from samclip.tasks.checkpoints import save_student_checkpoint, student_meta
    from samclip.tasks.compare import CLIP_ABILITY, SAM_ABILITY, run_comparison
    from samclip.tasks.teachers import ensure_teachers, load_sam_teacher

    root = str(tmp_path)
    config = tiny_config(
        root, "train.cpus_per_worker=0.5", "train.stage2.max_steps=1", "compare.wise_ft_alphas=[0.5]",
        "evaluate.overlays=0", "evaluate.templates=simple", "train.log_to_mlflow=false",
    )  # fmt: skip
    data = write_stage_data(root, config)
    torch.manual_seed(0)
    student = build_student("tiny", load_sam_teacher(ensure_teachers(config)), EMBED_DIM, clip_head_depth=1)
    stage1 = storage.join(root, "stage1-ckpt")
    save_student_checkpoint(stage1, student, student_meta("tiny", EMBED_DIM, clip_head_depth=1, pooling="max", mlp_hidden_layers=2))

    features = {"clip": data.clip_features_dir, "sam": data.sam_features_dir}
    result = run_comparison(config, data, stage1, features)
    assert [row["model"] for row in result.rows] == [
        "SAM teacher + probed head", "naive distillation", "Wise-FT alpha=0.5", "SAM-CLIP",
    ]  # fmt: skip
    for row in result.rows:
        assert -1.0 <= row["metrics"][CLIP_ABILITY] <= 1.0
        assert 0.0 <= row["metrics"][SAM_ABILITY] <= 1.0
    # the reference keeps SAM's weights: its masks match the teacher's up to the float16 features
    assert result.rows[0]["metrics"][SAM_ABILITY] > 0.95
    assert "| SAM-CLIP |" in storage.read_bytes(result.table_md_uri).decode()
    assert storage.read_bytes(result.plot_uri)[:4] == b"\x89PNG"
