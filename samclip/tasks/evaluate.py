"""Evaluate a merged model: CLIP ability gained and SAM ability kept.

Metrics (held-out images of the manifest):
- ``clip/cosine_to_teacher``: mean cosine similarity of the CLIP head's pooled embedding with the
  CLIP teacher's image embedding.
- ``cls/*``: zero-shot classification over the manifest's class labels (class names × prompt
  templates through the teacher's text encoder): top-1 against the label for the student and for
  the teacher, and top-1 agreement of the student with the teacher.
- ``seg/*``: zero-shot segmentation from the CLIP head's patch embeddings, upscaled bilinearly:
  the share of pixels assigned the image's label, and the share assigned the teacher's class for
  the image.
- ``sam/miou_vs_teacher``: mean IoU of the SAM head's masks with the frozen SAM teacher's masks
  for the same prompts.

With the smoke profile's random teachers, the label-based numbers are near chance by design and
the agreement numbers are the ones that measure the method.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from samclip.config import PipelineConfig
from samclip.tasks import storage

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    report_json_uri: str
    report_md_uri: str
    overlay_uris: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalImage:
    hash: str
    uri: str
    label: str | None
    image: np.ndarray


def _eval_images(manifest_uri: str) -> list[EvalImage]:
    from samclip.model.images import decode_image

    table = storage.read_parquet(manifest_uri).to_pylist()
    rows = [r for r in table if r["split"] == "val"] or table
    rows.sort(key=lambda r: r["hash"])
    return [EvalImage(r["hash"], r["uri"], r.get("label"), decode_image(storage.read_bytes(r["uri"]))) for r in rows]


def _class_names(manifest_uri: str) -> list[str]:
    labels = storage.read_parquet(manifest_uri, columns=["label"]).column("label").to_pylist()
    return sorted({label for label in labels if label})


def _clip_resolution(config: PipelineConfig) -> int:
    train = config.train
    return train.stage3.clip_resolution if train.run_stage3 else train.stage2.clip_resolution


@torch.inference_mode()
def compute_metrics(
    config: PipelineConfig,
    model,
    clip_teacher,
    sam_teacher,
    images: list[EvalImage],
    class_names: list[str],
    clip_features: dict[str, np.ndarray],
    sam_features: dict[str, np.ndarray],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Compute every metric; returns the metrics and per-image details for the overlays."""
    from samclip.model.images import sam_input, student_clip_input
    from samclip.model.prompts import sample_prompts
    from samclip.model.student import decode_masks
    from samclip.model.zero_shot import (
        OPENAI_TEMPLATES,
        SIMPLE_TEMPLATES,
        build_text_classifier,
        classify,
        segment_logits,
    )

    model.eval()
    metrics: dict[str, float] = {}
    details: list[dict[str, Any]] = []

    # clip: pooled embeddings against the teacher's precomputed embeddings
    clip_inputs = torch.stack([student_clip_input(item.image, _clip_resolution(config)) for item in images])
    student_emb = model.clip_embedding(clip_inputs)
    teacher_emb = torch.stack([torch.from_numpy(clip_features[item.hash].astype(np.float32)) for item in images])
    cosine = torch.nn.functional.cosine_similarity(student_emb, teacher_emb, dim=-1)
    metrics["clip/cosine_to_teacher"] = float(cosine.mean())

    # zero-shot classification and segmentation over the manifest's labels
    labelled = [i for i, item in enumerate(images) if item.label in class_names]
    class_map_by_image: dict[int, np.ndarray] = {}
    if class_names:
        templates = OPENAI_TEMPLATES if config.evaluate.templates == "openai" else SIMPLE_TEMPLATES
        classifier = build_text_classifier(clip_teacher, class_names, templates)
        student_logits = classify(student_emb, classifier)
        teacher_logits = classify(teacher_emb, classifier)
        student_top1 = student_logits.argmax(-1)
        teacher_top1 = teacher_logits.argmax(-1)
        metrics["cls/top1_agreement_with_teacher"] = float((student_top1 == teacher_top1).float().mean())
        if labelled:
            targets = torch.tensor([class_names.index(images[i].label) for i in labelled])
            metrics["cls/student_top1"] = float((student_top1[labelled] == targets).float().mean())
            metrics["cls/teacher_top1"] = float((teacher_top1[labelled] == targets).float().mean())
            top5 = min(5, len(class_names))
            hits = (student_logits[labelled].topk(top5, dim=-1).indices == targets[:, None]).any(-1)
            metrics[f"cls/student_top{top5}"] = float(hits.float().mean())

        size = config.evaluate.seg_resolution
        agree_label, agree_teacher = [], []
        for i, item in enumerate(images):
            patches = model.clip_patch_embeddings(student_clip_input(item.image, size)[None])
            side = min(item.image.shape[:2])
            class_map = segment_logits(patches, classifier, (side, side))[0].argmax(0).numpy()
            class_map_by_image[i] = class_map
            agree_teacher.append(float((class_map == int(teacher_top1[i])).mean()))
            if i in labelled:
                agree_label.append(float((class_map == class_names.index(item.label)).mean()))
        metrics["seg/pixel_share_teacher_class"] = float(np.mean(agree_teacher))
        if agree_label:
            metrics["seg/pixel_share_label"] = float(np.mean(agree_label))

    # sam: the student's masks against the frozen teacher decoder's masks for the same prompts
    size = model.arch.sam_resolution
    ious = []
    generator = torch.Generator().manual_seed(config.seed)
    for i, item in enumerate(images):
        pixels, valid_hw = sam_input(item.image, size)
        prompts = sample_prompts(1, config.evaluate.prompts_per_image, [valid_hw], generator)
        student_pred = model.predict_masks(model.image_embeddings(pixels[None]), prompts)
        teacher_embedding = torch.from_numpy(sam_features[item.hash].astype(np.float32))[None]
        teacher_pred = decode_masks(sam_teacher.prompt_encoder, sam_teacher.mask_decoder, teacher_embedding, prompts)
        student_masks = student_pred.logits[0] > 0
        teacher_masks = teacher_pred.logits[0] > 0
        intersection = (student_masks & teacher_masks).flatten(1).sum(-1).float()
        union = (student_masks | teacher_masks).flatten(1).sum(-1).float()
        # Two empty masks agree perfectly.
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        ious.append(iou)
        details.append(
            {
                "index": i,
                "prompts": prompts,
                "valid_hw": valid_hw,
                "student_masks": student_masks,
                "teacher_masks": teacher_masks,
                "class_map": class_map_by_image.get(i),
            }
        )
    metrics["sam/miou_vs_teacher"] = float(torch.cat(ious).mean())

    metrics["objective/clip"] = metrics["clip/cosine_to_teacher"]
    metrics["objective/sam"] = metrics["sam/miou_vs_teacher"]
    metrics["eval/images"] = float(len(images))
    return metrics, details


def _mask_to_image(mask_logits: torch.Tensor, size: int, valid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Map (K, h, w) low-resolution mask logits in the padded SAM frame to (K, H, W) bool masks."""
    logits = torch.nn.functional.interpolate(mask_logits[None].float(), (size, size), mode="bilinear", align_corners=False)
    logits = logits[..., : valid_hw[0], : valid_hw[1]]  # drop the padding
    logits = torch.nn.functional.interpolate(logits, image_hw, mode="bilinear", align_corners=False)
    return (logits[0] > 0).numpy()


def _prompt_geometry(prompts, scale: float) -> tuple[list, list]:
    """Return per-prompt boxes and positive points in image pixels for drawing."""
    boxes: list = []
    points: list = []
    count = prompts.point_labels.shape[1] if prompts.points is not None else prompts.boxes.shape[1]
    for k in range(count):
        box = None
        if prompts.boxes is not None:
            candidate = prompts.boxes[0, k]
            if bool((candidate[2:] > candidate[:2]).all()):
                box = (candidate / scale).tolist()
        point = None
        if prompts.points is not None:
            positive = prompts.point_labels[0, k] == 1
            if bool(positive.any()):
                point = (prompts.points[0, k][positive][0] / scale).tolist()
        boxes.append(box)
        points.append(point)
    return boxes, points


def _markdown_report(name: str, metrics: dict[str, float], overlays: list[str], random_teachers: bool) -> str:
    lines = [f"# Evaluation: {name}", ""]
    if random_teachers:
        lines += [
            "The teachers of this profile have deterministic random weights, so label-based numbers",
            "are near chance by design; the agreement numbers measure the method.",
            "",
        ]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())]
    if overlays:
        lines += ["", "## Overlays", ""]
        lines += [f"![overlay]({uri.rsplit('/', 1)[-1]})" for uri in overlays]
    return "\n".join(lines) + "\n"


def evaluate(
    config: PipelineConfig,
    checkpoint_uri: str | None,
    manifest_uri: str,
    features: dict[str, str],
    name: str = "final",
    model=None,
    output_uri: str | None = None,
) -> EvalResult:
    """Evaluate a student checkpoint (or an already loaded ``model``) and write the reports.

    Writes ``report.json``, ``report.md`` and ``overlay-*.png`` under ``output_uri``
    (default ``{root}/evaluate/{name}``).
    """
    from samclip.tasks.checkpoints import load_student
    from samclip.tasks.features import read_features
    from samclip.tasks.overlays import render_overlay
    from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from, load_sam_teacher

    started = time.monotonic()
    torch.manual_seed(config.seed)
    if model is None:
        if checkpoint_uri is None:
            raise ValueError("evaluate needs a checkpoint URI or a loaded model")
        model = load_student(checkpoint_uri)
    teachers = ensure_teachers(config)
    clip_teacher = load_clip_teacher_from(teachers).eval()
    sam_teacher = load_sam_teacher(teachers).eval()

    images = _eval_images(manifest_uri)
    hashes = [item.hash for item in images]
    clip_features = read_features(features["clip"], hashes)
    sam_features = read_features(features["sam"], hashes)
    missing = [h for h in hashes if h not in clip_features or h not in sam_features]
    if missing:
        raise ValueError(
            f"{len(missing)} evaluation images have no precomputed features (first: {missing[0]}); "
            "run the precompute flow for this manifest first"
        )
    class_names = _class_names(manifest_uri)
    logger.info("evaluating %s on %d images, %d classes", name, len(images), len(class_names))
    metrics, details = compute_metrics(
        config, model, clip_teacher, sam_teacher, images, class_names, clip_features, sam_features
    )

    output_uri = output_uri or config.uri("evaluate", name)
    overlays = []
    size = model.arch.sam_resolution
    for detail in details[: config.evaluate.overlays]:
        item = images[detail["index"]]
        image_hw = item.image.shape[:2]
        scale = size / max(image_hw)
        boxes, points = _prompt_geometry(detail["prompts"], scale)
        class_map = detail["class_map"]
        if class_map is None:
            class_map = np.zeros(image_hw, dtype=np.int64)
        else:
            class_map = _center_to_image(class_map, image_hw)
        png = render_overlay(
            item.image,
            class_map,
            class_names or ["(no labels)"],
            _mask_to_image(detail["student_masks"].float() * 2 - 1, size, detail["valid_hw"], image_hw),
            _mask_to_image(detail["teacher_masks"].float() * 2 - 1, size, detail["valid_hw"], image_hw),
            boxes,
            points,
            f"{item.label or 'unlabelled'} ({item.hash[:8]})",
        )
        uri = storage.join(output_uri, f"overlay-{detail['index']:02d}-{item.hash[:8]}.png")
        storage.write_bytes(uri, png)
        overlays.append(uri)

    random_teachers = config.teachers.random
    report = {
        "name": name,
        "checkpoint_uri": checkpoint_uri,
        "manifest_uri": manifest_uri,
        "features": features,
        "class_names": class_names,
        "random_teachers": random_teachers,
        "metrics": metrics,
        "overlays": overlays,
    }
    json_uri = storage.join(output_uri, "report.json")
    md_uri = storage.join(output_uri, "report.md")
    storage.write_json(json_uri, report)
    storage.write_text(md_uri, _markdown_report(name, metrics, overlays, random_teachers))
    seconds = time.monotonic() - started
    logger.info("evaluation %s written to %s in %.1f s", name, output_uri, seconds)
    return EvalResult(metrics, json_uri, md_uri, overlays, seconds)


def _center_to_image(class_map: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Place a class map of the centre square crop into a full-size map (edges: nearest class)."""
    height, width = image_hw
    side = class_map.shape[0]
    top, left = (height - side) // 2, (width - side) // 2
    rows = np.clip(np.arange(height) - top, 0, side - 1)
    cols = np.clip(np.arange(width) - left, 0, side - 1)
    return class_map[np.ix_(rows, cols)]
