"""The paper's claims checked against ground truth on the shapes testbed: rows, verdicts, results file.

Every model is scored on the testbed's held-out split with the dataset evaluations of
``eval_suite`` (``cls/top1``: zero-shot classification of the largest object's class;
``seg/miou``: zero-shot semantic segmentation from CLIP patch features; ``textseg/miou``: the
same classes segmented through both heads; ``sam/box_miou_vs_truth``: masks from ground-truth box
prompts). The comparison flow supplies the trained models' rows; this module adds the two
teachers:

- the CLIP teacher is wrapped by ``ClipTeacherAsStudent`` so that the very same protocols score
  its image embedding (classification) and its projected patch tokens (segmentation);
- the SAM teacher's box-prompted masks are scored by ``eval_suite.evaluate_instances`` (its
  ``sam/teacher_box_miou_vs_truth``); it has no text encoder, so it has no class scores.

``check_claims`` then states each claim of the paper as a comparison of these numbers and says
whether it reproduced. "Keeps" and "reaches" mean at least 95% (``KEEP``); every other
threshold is stated in its claim's text.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samclip.config import PipelineConfig
from samclip.model.images import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from samclip.tasks import storage

logger = logging.getLogger(__name__)

CLS = "cls/top1"
SEG = "seg/miou"
TEXTSEG = "textseg/miou"
BOX = "sam/box_miou_vs_truth"
TEACHER_BOX = "sam/teacher_box_miou_vs_truth"
COLUMNS = (CLS, SEG, TEXTSEG, BOX)
KEEP = 0.95  # "keeps at least 95%" in claims 3 and 4


class ClipTeacherAsStudent(torch.nn.Module):
    """An open_clip teacher behind the student's CLIP interface, for the same evaluation protocols.

    Inputs arrive as the student's: (B, 3, S, S) normalised with SAM's pixel statistics. They are
    mapped back to pixels, resized to the teacher's input side and normalised with its own mean
    and std. For a vision transformer, ``clip_patch_embeddings`` returns the patch tokens after
    the final layer norm, projected into the joint space with the class token's matrix. For a
    ResNet tower it returns MaskCLIP features (see the method).
    """

    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher = teacher
        visual = teacher.model.visual
        is_vit = hasattr(visual, "transformer") and getattr(visual, "proj", None) is not None
        if not (is_vit or hasattr(visual, "attnpool")):
            raise ValueError(
                f"the CLIP teacher {teacher.model_name} is neither open_clip's VisionTransformer with a "
                "projection nor its ModifiedResNet; dense features are read from those two only"
            )
        self.register_buffer("sam_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(teacher.preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(teacher.preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def _teacher_input(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        pixels = (images * self.sam_std + self.sam_mean) / 255.0
        side = self.teacher.image_size
        if resize and (pixels.shape[-1] != side or pixels.shape[-2] != side):
            pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        return (pixels.clamp(0.0, 1.0) - self.clip_mean) / self.clip_std

    @torch.no_grad()
    def clip_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images into (B, D), as the teacher's ``encode_image`` does."""
        return self.teacher.encode_image(self._teacher_input(images))

    @torch.no_grad()
    def clip_patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, h, w, D) dense features in the joint space.

        A vision transformer gives its projected patch tokens at its own input size. A
        ModifiedResNet gives its last feature map (stride 32) at the input's resolution, passed
        through the attention pool's value and output projections, skipping the attention itself,
        as MaskCLIP (Zhou et al. 2022) reads dense features from CLIP.
        """
        visual = self.teacher.model.visual
        if hasattr(visual, "attnpool"):
            # Convolutions take any input side, and the value path skips the attention pool's
            # position embedding, so the features come at the requested resolution.
            features = self._teacher_input(images, resize=False)
            features = visual.stem(features)
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                features = layer(features)  # (B, C, h, w)
            tokens = features.permute(0, 2, 3, 1)  # (B, h, w, C)
            pool = visual.attnpool
            return pool.c_proj(pool.v_proj(tokens))
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            _, tokens = visual(self._teacher_input(images))  # (B, h * w, width) after ln_post
        finally:
            visual.output_tokens = previous
        projected = tokens @ visual.proj  # (B, h * w, D)
        side = int(round(projected.shape[1] ** 0.5))
        return projected.reshape(projected.shape[0], side, side, -1)


def teacher_rows(config: PipelineConfig, model_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score the CLIP teacher on the classification and segmentation sets; take the SAM teacher's box IoU."""
    from samclip.tasks import eval_datasets as layouts
    from samclip.tasks import eval_protocols as protocols
    from samclip.tasks.eval_suite import class_templates, evaluate_classification, read_classification, segmentation_classes
    from samclip.model.metrics import confusion_matrix, mean_iou
    from samclip.model.zero_shot import build_text_classifier
    from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from

    settings = config.evaluate
    if not (settings.classification and settings.segmentation):
        raise ValueError("the claims need evaluate.classification and evaluate.segmentation (the shapes profile sets both)")
    teacher = load_clip_teacher_from(ensure_teachers(config)).eval()
    adapter = ClipTeacherAsStudent(teacher).eval()
    templates = class_templates(config)

    clip_metrics = evaluate_classification(
        adapter, teacher, read_classification(settings.classification), templates, teacher.image_size, settings.max_images
    )
    dataset = layouts.read_voc(settings.segmentation, settings.segmentation_split, images_uri=settings.segmentation_images)
    scored, background = segmentation_classes(dataset.class_names, settings.background_threshold)
    classifier = build_text_classifier(teacher, [dataset.class_names[i] for i in scored], templates)
    confusion = np.zeros((len(dataset.class_names), len(dataset.class_names) + 1), np.int64)
    items = dataset.items[: settings.max_images] if settings.max_images else dataset.items
    for image_uri, mask_uri in items:
        image, truth = layouts.load_image(image_uri), layouts.load_class_mask(mask_uri)
        labels = protocols.semantic_segmentation(
            adapter, image, classifier, scored, settings.dataset_seg_resolution, settings.background_threshold, background
        )
        confusion += confusion_matrix(labels, truth, len(dataset.class_names), dataset.ignore_index)
    clip_metrics[SEG] = mean_iou(confusion)

    sam_box = next((row["metrics"][TEACHER_BOX] for row in model_rows if TEACHER_BOX in row["metrics"]), None)
    if sam_box is None:
        raise ValueError("no comparison row has the SAM teacher's box IoU; set evaluate.instances")
    return [
        {"model": "CLIP teacher", "kind": "clip-teacher", "metrics": clip_metrics},
        {"model": "SAM teacher", "kind": "sam-teacher", "metrics": {BOX: float(sam_box)}},
    ]


def _row(rows: list[dict[str, Any]], kind: str) -> dict[str, float]:
    for row in rows:
        if row["kind"] == kind:
            return row["metrics"]
    raise ValueError(f"no row of kind {kind!r}; the comparison must include it")


def check_claims(rows: list[dict[str, Any]], chance: float) -> list[dict[str, Any]]:
    """Check the paper's five claims as comparisons of the rows' metrics and mark each reproduced or not."""
    clip_teacher, sam_teacher = _row(rows, "clip-teacher"), _row(rows, "sam-teacher")
    probed, naive, merged = _row(rows, "reference"), _row(rows, "naive"), _row(rows, "samclip")
    wise = [row for row in rows if row["kind"] == "wise-ft"]

    claims = []

    def claim(number: int, text: str, holds: bool, evidence: str) -> None:
        claims.append({"claim": number, "text": text, "reproduced": bool(holds), "evidence": evidence})

    claim(
        1,
        f"The CLIP teacher classifies well (top-1 at least twice chance, {2 * chance:.2f}) but segments poorly "
        "from its patch features (mIoU below SAM-CLIP's through both heads); the SAM teacher's masks are good "
        "(box-prompted IoU above the CLIP teacher's segmentation mIoU) but carry no class.",
        clip_teacher[CLS] >= 2 * chance and clip_teacher[SEG] < merged[TEXTSEG] and sam_teacher[BOX] > clip_teacher[SEG],
        f"CLIP teacher top-1 {clip_teacher[CLS]:.3f}, patch mIoU {clip_teacher[SEG]:.3f}; SAM-CLIP both-heads mIoU "
        f"{merged[TEXTSEG]:.3f}; SAM teacher box IoU {sam_teacher[BOX]:.3f}, no text encoder",
    )
    claim(
        2,
        "Naive distillation gains classification (top-1 above the SAM backbone with a probed head) but loses "
        "mask quality (box IoU below the SAM teacher's).",
        naive[CLS] > probed[CLS] and naive[BOX] < sam_teacher[BOX],
        f"naive top-1 {naive[CLS]:.3f} vs probed {probed[CLS]:.3f}; naive box IoU {naive[BOX]:.3f} vs SAM "
        f"teacher {sam_teacher[BOX]:.3f}",
    )
    claim(
        3,
        f"SAM-CLIP keeps at least {KEEP:.0%} of the SAM teacher's box IoU and reaches at least {KEEP:.0%} of "
        "naive distillation's top-1.",
        merged[BOX] >= KEEP * sam_teacher[BOX] and merged[CLS] >= KEEP * naive[CLS],
        f"box IoU {merged[BOX]:.3f} = {merged[BOX] / max(sam_teacher[BOX], 1e-9):.1%} of the SAM teacher's; top-1 "
        f"{merged[CLS]:.3f} = {merged[CLS] / max(naive[CLS], 1e-9):.1%} of naive distillation's",
    )
    both = [
        row["model"] for row in wise
        if row["metrics"][BOX] >= KEEP * sam_teacher[BOX] and row["metrics"][CLS] >= KEEP * naive[CLS]
    ]  # fmt: skip
    claim(
        4,
        f"No Wise-FT alpha reaches both ({KEEP:.0%} of the SAM teacher's box IoU and of naive distillation's top-1).",
        bool(wise) and not both,
        "; ".join(
            f"{row['model']}: box {row['metrics'][BOX] / max(sam_teacher[BOX], 1e-9):.1%}, top-1 "
            f"{row['metrics'][CLS] / max(naive[CLS], 1e-9):.1%}"
            for row in wise
        ) + (f" (reach both: {', '.join(both)})" if both else ""),
    )
    claim(
        5,
        "Segmentation through both heads beats segmentation from the CLIP head alone (SAM-CLIP mIoU).",
        merged[TEXTSEG] > merged[SEG],
        f"both heads {merged[TEXTSEG]:.3f} vs CLIP head alone {merged[SEG]:.3f}",
    )
    return claims


def plot_claims(rows: list[dict[str, Any]], title: str) -> bytes:
    """Plot classification (x) against box-prompted mask IoU (y); the teachers are reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from samclip.tasks.compare import draw_models, figure_png

    figure, axis = plt.subplots(figsize=(8, 5.5))
    clip_teacher, sam_teacher = _row(rows, "clip-teacher"), _row(rows, "sam-teacher")
    axis.axvline(clip_teacher[CLS], color="tab:blue", ls=":", lw=1.2, label=f"CLIP teacher top-1 {clip_teacher[CLS]:.3f}")
    axis.axhline(sam_teacher[BOX], color="tab:red", ls=":", lw=1.2, label=f"SAM teacher box IoU {sam_teacher[BOX]:.3f}")
    axis.axhline(KEEP * sam_teacher[BOX], color="tab:red", ls="--", lw=0.8, alpha=0.6, label=f"{KEEP:.0%} of the SAM teacher")
    models = [row for row in rows if BOX in row["metrics"] and CLS in row["metrics"]]
    draw_models(axis, models, CLS, BOX)
    axis.set_xlabel(f"zero-shot classification, {CLS} (ground truth)")
    axis.set_ylabel(f"box-prompted mask IoU, {BOX} (ground truth)")
    return figure_png(figure, axis, title)


def teacher_training_note(records: dict[str, dict[str, Any] | None]) -> str:
    """Describe each teacher's held-out scores at the end of its training, from its record."""
    parts = []
    clip = records.get("clip")
    if clip:
        result, settings = clip["result"], clip["key"]["settings"]
        reached = "reached" if result["reached_targets"] else "NOT reached"
        parts.append(
            f"CLIP after {result['steps']} steps: shape {result['class_accuracy']:.3f} and colour "
            f"{result['colour_accuracy']:.3f} on single-object scenes (targets "
            f"{settings['target_class_accuracy']:.2f} / {settings['target_colour_accuracy']:.2f}, {reached}); "
            f"on scenes of 1 to 3 objects, by the largest object, shape "
            f"{result['scene_class_accuracy']:.3f} and colour {result['scene_colour_accuracy']:.3f}"
        )
    sam = records.get("sam")
    if sam:
        result, settings = sam["result"], sam["key"]["settings"]
        reached = "reached" if result["reached_target"] else "NOT reached"
        parts.append(
            f"SAM after {result['steps']} steps: box-prompted mask IoU {result['box_iou']:.3f} (target "
            f"{settings['target_box_iou']:.2f}, {reached}), point-prompted {result['point_iou']:.3f}"
        )
    if not parts:
        return "The teachers' training records were not found."
    return "Teachers, held-out scenes of their own seeds at the end of training: " + "; ".join(parts) + "."


def claims_markdown(
    rows: list[dict[str, Any]], claims: list[dict[str, Any]], timings: dict[str, float], plot_name: str, notes: list[str]
) -> str:
    """Render the results file: the table, the plot, each claim's verdict and the wall time of each part."""
    lines = ["# SAM-CLIP on the shapes testbed: the paper's claims against ground truth", ""]
    lines += notes + [""]
    lines += ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row['metrics'][c]:.3f}" if c in row["metrics"] else "n/a" for c in COLUMNS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", f"![trade-off]({plot_name})", "", "## Claims", ""]
    for item in claims:
        verdict = "reproduced" if item["reproduced"] else "NOT reproduced"
        lines.append(f"{item['claim']}. **{verdict}**: {item['text']} ({item['evidence']})")
    lines += ["", "## Wall time", "", "| part | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def write_claims(
    config: PipelineConfig,
    rows: list[dict[str, Any]],
    claims: list[dict[str, Any]],
    timings: dict[str, float],
    output_uri: str,
    notes: list[str],
) -> dict[str, str]:
    """Write claims.md, claims.json and claims.png under output_uri; returns their URIs."""
    uris = {name: storage.join(output_uri, f"claims.{name}") for name in ("md", "json", "png")}
    storage.write_bytes(uris["png"], plot_claims(rows, f"SAM-CLIP and baselines on the shapes testbed ({config.profile})"))
    storage.write_json(uris["json"], {"rows": rows, "claims": claims, "timings": timings, "notes": notes})
    storage.write_text(uris["md"], claims_markdown(rows, claims, timings, "claims.png", notes))
    return uris
