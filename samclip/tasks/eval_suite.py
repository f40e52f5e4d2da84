"""Evaluate a student on datasets in standard layouts; write JSON, Markdown, overlays; log to MLflow.

Which datasets run is set in ``evaluate`` of the config (``classification``, ``segmentation``,
``instances``); see ``eval_datasets`` for the layouts and ``eval_protocols`` for the protocols.
Metrics:
- ``cls/top1``, ``cls/top5``: zero-shot classification, class names x prompt templates;
- ``seg/miou``, ``seg/iou/{class}``, ``seg/pixel_accuracy``: CLIP head only, 448 px input;
- ``textseg/miou``, ``textseg/iou/{class}``, ``textseg/pixel_accuracy``: both heads, the same
  classes, background rule and confusion matrix as ``seg/*``;
- ``sam/box_miou_vs_truth``, ``sam/teacher_box_miou_vs_truth``, ``sam/box_miou_vs_teacher``:
  SAM retention with ground-truth box prompts. This reports mean mask IoU, not COCO mask AP:
  pycocotools is not a dependency, and AP needs scored detections while box prompting gives
  exactly one mask per ground-truth instance.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from samclip.config import PipelineConfig
from samclip.model.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy, topk_accuracy
from samclip.tasks import eval_datasets as layouts
from samclip.tasks import eval_protocols as protocols
from samclip.tasks import storage

logger = logging.getLogger(__name__)

BACKGROUND_NAMES = ("background", "_background_")


@dataclass
class DatasetEvalResult:
    metrics: dict[str, float]
    report_json_uri: str
    report_md_uri: str
    overlay_uris: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mlflow_run_id: str | None = None


def class_templates(config: PipelineConfig) -> tuple[str, ...]:
    """Return the prompt templates: the configured list, or OpenAI's 80, or one simple template."""
    from samclip.model.zero_shot import OPENAI_TEMPLATES, SIMPLE_TEMPLATES

    if config.evaluate.template_list:
        return tuple(config.evaluate.template_list)
    return OPENAI_TEMPLATES if config.evaluate.templates == "openai" else SIMPLE_TEMPLATES


def read_classification(uri: str) -> layouts.ClassificationSet:
    """Read a table (.parquet, .csv) or else an ImageFolder tree."""
    if uri.lower().endswith((".parquet", ".csv")):
        return layouts.read_label_table(uri)
    return layouts.read_image_folder(uri)


def evaluate_classification(
    model, clip_teacher, dataset: layouts.ClassificationSet, templates, resolution: int, limit: int | None = None
) -> dict[str, float]:
    from samclip.model.zero_shot import build_text_classifier

    items = dataset.items[:limit] if limit else dataset.items
    classifier = build_text_classifier(clip_teacher, dataset.class_names, templates)
    images = [layouts.load_image(uri) for uri, _ in items]
    logits = protocols.classification_logits(model, images, classifier, resolution)
    accuracy = topk_accuracy(logits, torch.tensor([label for _, label in items]), (1, 5))
    return {"cls/top1": accuracy[1], "cls/top5": accuracy[5], "cls/images": float(len(items)), "cls/classes": float(len(dataset.class_names))}


def segmentation_classes(class_names: list[str], threshold: float | None) -> tuple[list[int], int]:
    """Return the classes the text classifier scores and the background index (-1 if none).

    With a threshold, a class named "background" is not prompted: low-confidence pixels get it.
    Without one, every class, the background too, is a text prompt.
    """
    background = next((i for i, name in enumerate(class_names) if name.lower() in BACKGROUND_NAMES), -1)
    scored = [i for i in range(len(class_names)) if threshold is None or i != background]
    return scored, background


def evaluate_segmentation(
    config: PipelineConfig, model, clip_teacher, dataset: layouts.SegmentationSet, templates
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score the CLIP-head-only and the both-heads segmentation of each image; returns metrics and samples."""
    from samclip.model.zero_shot import build_text_classifier

    settings = config.evaluate
    threshold = settings.background_threshold
    scored, background = segmentation_classes(dataset.class_names, threshold)
    classifier = build_text_classifier(clip_teacher, [dataset.class_names[i] for i in scored], templates)
    num_classes = len(dataset.class_names)
    confusion = {"seg": np.zeros((num_classes, num_classes + 1), np.int64)}
    confusion["textseg"] = confusion["seg"].copy()
    generator = torch.Generator().manual_seed(config.seed)
    samples = []
    items = dataset.items[: settings.max_images] if settings.max_images else dataset.items
    for image_uri, mask_uri in items:
        image = layouts.load_image(image_uri)
        truth = layouts.load_class_mask(mask_uri)
        if truth.shape != image.shape[:2]:
            raise ValueError(f"mask {mask_uri} is {truth.shape}, but its image is {image.shape[:2]}")
        clip_only = protocols.semantic_segmentation(
            model, image, classifier, scored, settings.dataset_seg_resolution, threshold, background
        )
        both = protocols.text_prompted_segmentation(
            model, image, classifier, scored, generator, settings.text_points, threshold, background
        )
        confusion["seg"] += confusion_matrix(clip_only, truth, num_classes, dataset.ignore_index)
        confusion["textseg"] += confusion_matrix(both, truth, num_classes, dataset.ignore_index)
        samples.append({"uri": image_uri, "image": image, "truth": truth, "seg": clip_only, "textseg": both})
    metrics: dict[str, float] = {"seg/images": float(len(items))}
    for prefix, matrix in confusion.items():
        metrics[f"{prefix}/miou"] = mean_iou(matrix)
        metrics[f"{prefix}/pixel_accuracy"] = pixel_accuracy(matrix)
        for name, iou in zip(dataset.class_names, iou_per_class(matrix)):
            if np.isfinite(iou):
                metrics[f"{prefix}/iou/{name}"] = float(iou)
    return metrics, samples


def evaluate_instances(
    model, sam_teacher, dataset: layouts.InstanceSet, limit: int | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Prompt with every ground-truth box; mean mask IoU against the truth and the SAM teacher."""
    totals = {"student_vs_truth": [], "teacher_vs_truth": [], "student_vs_teacher": []}
    samples = []
    for record in dataset.images[:limit] if limit else dataset.images:
        image = layouts.load_image(record.uri)
        height, width = image.shape[:2]
        truth = torch.from_numpy(np.stack([layouts.instance_mask(i, height, width) for i in record.instances]))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (i.box_xywh for i in record.instances)])
        result = protocols.box_prompted_masks(model, sam_teacher, image, truth, boxes)
        for key in totals:
            totals[key].append(getattr(result, key))
        samples.append({"uri": record.uri, "image": image, "truth": truth, "result": result})
    merged = {key: torch.cat(values) for key, values in totals.items()}
    return {
        "sam/box_miou_vs_truth": float(merged["student_vs_truth"].mean()),
        "sam/teacher_box_miou_vs_truth": float(merged["teacher_vs_truth"].mean()),
        "sam/box_miou_vs_teacher": float(merged["student_vs_teacher"].mean()),
        "sam/instances": float(merged["student_vs_truth"].numel()),
    }, samples


def evaluate_datasets(
    config: PipelineConfig,
    checkpoint_uri: str | None = None,
    model=None,
    name: str = "datasets",
    output_uri: str | None = None,
) -> DatasetEvalResult:
    """Run every configured dataset evaluation on a checkpoint (or a loaded model) and write reports.

    Writes ``report.json``, ``report.md`` and ``overlay-*.png`` under ``output_uri`` (default
    ``{root}/evaluate/{name}``) and, with ``evaluate.mlflow``, logs them to one MLflow run.
    """
    from samclip.tasks.checkpoints import load_student
    from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from, load_sam_teacher

    started = time.monotonic()
    settings = config.evaluate
    if not settings.has_datasets:
        raise ValueError("no dataset to evaluate: set evaluate.classification, evaluate.segmentation or evaluate.instances")
    if model is None:
        if checkpoint_uri is None:
            raise ValueError("evaluate_datasets needs a checkpoint URI or a loaded model")
        model = load_student(checkpoint_uri)
    model.eval()
    torch.manual_seed(config.seed)
    teachers = ensure_teachers(config)
    clip_teacher = load_clip_teacher_from(teachers).eval()
    templates = class_templates(config)
    metrics: dict[str, float] = {}
    datasets: dict[str, Any] = {}
    overlays: list[tuple[str, bytes]] = []

    if settings.classification:
        dataset = read_classification(settings.classification)
        datasets["classification"] = {"uri": settings.classification, "classes": dataset.class_names}
        metrics.update(evaluate_classification(
            model, clip_teacher, dataset, templates, _clip_resolution(config), settings.max_images
        ))  # fmt: skip
    if settings.segmentation:
        dataset = layouts.read_voc(
            settings.segmentation, settings.segmentation_split, images_uri=settings.segmentation_images
        )
        datasets["segmentation"] = {"uri": settings.segmentation, "classes": dataset.class_names}
        seg_metrics, samples = evaluate_segmentation(config, model, clip_teacher, dataset, templates)
        metrics.update(seg_metrics)
        overlays += _segmentation_overlays(samples[: settings.overlays], dataset.class_names)
    if settings.instances:
        images_uri = settings.instance_images or storage.join(settings.instances.rsplit("/", 2)[0], "images")
        dataset = layouts.read_coco(settings.instances, images_uri)
        datasets["instances"] = {"uri": settings.instances, "images": images_uri, "categories": dataset.categories}
        inst_metrics, samples = evaluate_instances(model, load_sam_teacher(teachers).eval(), dataset, settings.max_images)
        metrics.update(inst_metrics)
        overlays += _instance_overlays(samples[: settings.overlays])

    output_uri = output_uri or config.uri("evaluate", name)
    overlay_uris = []
    for index, (label, png) in enumerate(overlays):
        uri = storage.join(output_uri, f"overlay-{index:02d}-{label}.png")
        storage.write_bytes(uri, png)
        overlay_uris.append(uri)
    report = {
        "name": name, "checkpoint_uri": checkpoint_uri, "datasets": datasets, "templates": len(templates),
        "background_threshold": settings.background_threshold, "metrics": metrics, "overlays": overlay_uris,
    }  # fmt: skip
    json_uri = storage.join(output_uri, "report.json")
    md_uri = storage.join(output_uri, "report.md")
    storage.write_json(json_uri, report)
    storage.write_text(md_uri, markdown_report(name, metrics, overlay_uris))
    run_id = log_to_mlflow(config, f"evaluate-{name}", metrics, [json_uri, md_uri, *overlay_uris]) if settings.mlflow else None
    seconds = time.monotonic() - started
    logger.info("dataset evaluation %s written to %s in %.1f s", name, output_uri, seconds)
    return DatasetEvalResult(metrics, json_uri, md_uri, overlay_uris, seconds, run_id)


def _clip_resolution(config: PipelineConfig) -> int:
    train = config.train
    return train.stage3.clip_resolution if train.run_stage3 else train.stage2.clip_resolution


def markdown_report(name: str, metrics: dict[str, float], overlays: list[str]) -> str:
    lines = [f"# Dataset evaluation: {name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())]
    if overlays:
        lines += ["", "## Overlays", ""] + [f"![overlay]({uri.rsplit('/', 1)[-1]})" for uri in overlays]
    return "\n".join(lines) + "\n"


def _segmentation_overlays(samples: list[dict[str, Any]], class_names: list[str]) -> list[tuple[str, bytes]]:
    from samclip.tasks.overlays import render_label_panels

    return [
        (
            f"seg-{_stem(sample['uri'])}",
            render_label_panels(
                sample["image"],
                [("ground truth", sample["truth"]), ("CLIP head, 448 px", sample["seg"]), ("both heads", sample["textseg"])],
                class_names,
            ),
        )
        for sample in samples
    ]


def _instance_overlays(samples: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    from samclip.tasks.overlays import render_label_panels

    def as_labels(masks: torch.Tensor) -> np.ndarray:
        labels = np.full(masks.shape[1:], -1, np.int64)
        for k, mask in enumerate(masks.numpy()):
            labels[mask] = k
        return labels

    pictures = []
    for sample in samples:
        result = sample["result"]
        names = [f"instance {k}" for k in range(len(sample["truth"]))]
        panels = [
            ("ground truth", as_labels(sample["truth"])),
            (f"SAM head, box prompts (IoU {float(result.student_vs_truth.mean()):.2f})", as_labels(result.student_masks)),
            (f"SAM teacher (IoU {float(result.teacher_vs_truth.mean()):.2f})", as_labels(result.teacher_masks)),
        ]
        pictures.append((f"boxes-{_stem(sample['uri'])}", render_label_panels(sample["image"], panels, names)))
    return pictures


def _stem(uri: str) -> str:
    return os.path.splitext(uri.rsplit("/", 1)[-1])[0][:40]


def log_to_mlflow(config: PipelineConfig, run_name: str, metrics: dict[str, float], artifact_uris: list[str]) -> str:
    """Log metrics and files to one MLflow run in the registry's experiment; returns the run id."""
    from mlflow import MlflowClient

    from samclip.tasks.register import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(config))
    experiment = client.get_experiment_by_name(config.registry.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location = config.resolve_uri(config.registry.artifact_root)
        if "://" not in location:
            location = "file://" + os.path.abspath(location)
        experiment_id = client.create_experiment(config.registry.experiment, artifact_location=location)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    for key, value in metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, key.replace("/", "."), float(value))
    client.log_param(run_id, "profile", config.profile)
    with tempfile.TemporaryDirectory() as folder:
        for uri in artifact_uris:
            local = os.path.join(folder, uri.rsplit("/", 1)[-1])
            with open(local, "wb") as handle:
                handle.write(storage.read_bytes(uri))
            client.log_artifact(run_id, local, "evaluation")
    client.set_terminated(run_id)
    return run_id
