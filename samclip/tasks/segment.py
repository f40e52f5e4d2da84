"""Text-prompted segmentation of one image with a trained student, written to storage.

The model is a student checkpoint folder (local or any storage URI) or a registered model
``NAME@ALIAS`` with its MLflow tracking URI. The text encoder is the CLIP teacher's: given
explicitly (model name, weights file, optional JSON config), or else taken from the resolved run
config (``config.yaml``) stored with the checkpoint.

Outputs under ``output_uri``:
- ``overlay.png``: the photo with each class's pixels coloured and labelled with its name,
  and the sampled point prompts drawn as stars;
- ``labels.png``: an 8-bit label map, 0 for background and c + 1 for class c;
- ``masks.npz``: ``labels`` (H, W) int16 with -1 for background, ``masks`` (C, H, W) bool,
  ``class_names``, ``points`` (C, P, 2) and ``point_labels`` (C, P);
- ``segment.json``: the request and the share of pixels per class.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from samclip.tasks import storage

logger = logging.getLogger(__name__)

MAX_CLASSES = 255  # labels.png stores c + 1 in 8 bits


@dataclass(frozen=True)
class ClipTextEncoder:
    """Files of the CLIP teacher whose text encoder scores the prompts."""

    model_name: str
    weights_uri: str
    model_config_uri: str | None = None


@dataclass(frozen=True)
class SegmentOutputs:
    overlay_uri: str
    labels_uri: str
    masks_uri: str
    summary_uri: str
    class_shares: dict[str, float]  # share of image pixels per class, and "background"


def load_model_and_config(model: str, tracking_uri: str | None) -> tuple[torch.nn.Module, str | None]:
    """Load a student from ``NAME@ALIAS`` (with ``tracking_uri``) or a checkpoint folder URI.

    Returns the model in eval mode and the text of its ``config.yaml``, or None without one.
    """
    from samclip.tasks.checkpoints import CONFIG_FILE, load_student

    if tracking_uri is not None:
        from samclip.tasks.register import load_registered

        if "@" not in model:
            raise ValueError(f"model {model!r} is not NAME@ALIAS, which a tracking URI requires")
        name, alias = model.split("@", 1)
        student, meta = load_registered(name, alias, tracking_uri)
        folder = meta["path"]
    else:
        if not storage.exists(model):
            raise FileNotFoundError(
                f"student checkpoint {model} not found; pass a checkpoint folder or URI, or "
                "NAME@ALIAS together with a tracking URI"
            )
        student = load_student(model)
        folder = model
    config_uri = storage.join(folder, CONFIG_FILE)
    config_yaml = storage.read_bytes(config_uri).decode() if storage.exists(config_uri) else None
    return student.eval(), config_yaml


def _local(uri: str) -> str:
    from samclip.tasks.teachers import CACHE_ENV, local_copy

    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "samclip")
    return local_copy(uri, os.path.join(cache, "teachers"))


def load_text_teacher(encoder: ClipTextEncoder | None, config_yaml: str | None):
    """Load the CLIP teacher given explicitly, or the one named by the run config."""
    if encoder is not None:
        from samclip.model.clip_teacher import load_clip_teacher

        config_path = _local(encoder.model_config_uri) if encoder.model_config_uri else None
        return load_clip_teacher(encoder.model_name, _local(encoder.weights_uri), config_path)
    if config_yaml is None:
        raise ValueError(
            "the checkpoint has no config.yaml naming its CLIP teacher; pass the teacher's "
            "model name and weights (--clip-model, --clip-weights, and --clip-config for a "
            "custom architecture)"
        )
    import yaml

    from samclip.config import PipelineConfig
    from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from

    config = PipelineConfig.model_validate(yaml.safe_load(config_yaml))
    return load_clip_teacher_from(ensure_teachers(config))


def _palette(count: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or servers
    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(i % 20)[:3] for i in range(count)])


def render_segmentation(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    points: np.ndarray,
    point_labels: np.ndarray,
    title: str,
) -> bytes:
    """Draw the classes over the photo with their names and point prompts; return PNG bytes.

    Args:
        image: (H, W, 3) uint8 photo.
        labels: (H, W) int class per pixel, -1 for background.
        points: (C, P, 2) (x, y) point prompts in image pixels; point_labels (C, P) 1 where used.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = _palette(len(class_names))
    layer = np.zeros((*labels.shape, 4))
    for c in range(len(class_names)):
        layer[labels == c] = [*colours[c], 0.5]

    height, width = labels.shape
    figure, axis = plt.subplots(figsize=(8, 8 * height / width + 0.6))
    axis.imshow(image)
    axis.imshow(layer)
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            # the class pixel nearest to the class's centroid, which lies inside the class
            ys, xs = np.nonzero(mask)
            nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
            y, x = ys[nearest], xs[nearest]
            axis.text(x, y, name, ha="center", va="center", fontsize=10,
                      bbox={"facecolor": colours[c], "alpha": 0.8, "pad": 2})  # fmt: skip
        used = points[c][point_labels[c] == 1]
        axis.plot(used[:, 0], used[:, 1], linestyle="none", marker="*", ms=12,
                  color=colours[c], markeredgecolor="black")  # fmt: skip
    handles = [Patch(color=colours[c], label=name) for c, name in enumerate(class_names)]
    if (labels < 0).any():
        handles.append(Patch(facecolor="none", edgecolor="black", label="background"))
    axis.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.8)
    axis.set_title(title, fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def segment(
    image_uri: str,
    prompts: list[str],
    model: str,
    output_uri: str,
    tracking_uri: str | None = None,
    text_encoder: ClipTextEncoder | None = None,
    num_points: int = 3,
    background_threshold: float | None = None,
    templates: str = "simple",
    seed: int = 0,
) -> SegmentOutputs:
    """Segment the image at ``image_uri`` into the classes named by ``prompts``; write the outputs.

    Args:
        prompts: class names; each goes through the templates (``simple``: "a photo of a {c}.",
            ``openai``: OpenAI's 80 ImageNet templates) and the teacher's text encoder.
        num_points: point prompts sampled per class.
        background_threshold: mask probability below which a pixel is background; None labels
            every pixel with a class.
        seed: seed of the point sampling.
    """
    from samclip.model.images import decode_image
    from samclip.model.text_segmentation import segment_image_by_text
    from samclip.model.zero_shot import OPENAI_TEMPLATES, SIMPLE_TEMPLATES, build_text_classifier

    class_names = [prompt.strip() for prompt in prompts if prompt.strip()]
    if not class_names:
        raise ValueError("no text prompts given; pass at least one class name")
    if len(class_names) > MAX_CLASSES:
        raise ValueError(f"{len(class_names)} prompts given; at most {MAX_CLASSES} are supported")
    if templates not in ("simple", "openai"):
        raise ValueError(f"templates must be 'simple' or 'openai', got {templates!r}")

    student, config_yaml = load_model_and_config(model, tracking_uri)
    teacher = load_text_teacher(text_encoder, config_yaml)
    if teacher.embed_dim != student.embed_dim:
        raise ValueError(
            f"the CLIP teacher {teacher.model_name} embeds into {teacher.embed_dim} dimensions but "
            f"the student's CLIP head into {student.embed_dim}; use the teacher it was trained with"
        )
    image = decode_image(storage.read_bytes(image_uri))
    logger.info("segmenting %s (%dx%d) into %s", image_uri, image.shape[1], image.shape[0], class_names)

    with torch.inference_mode():
        chosen = OPENAI_TEMPLATES if templates == "openai" else SIMPLE_TEMPLATES
        classifier = build_text_classifier(teacher, class_names, chosen)
        result = segment_image_by_text(
            student, image, classifier, torch.Generator().manual_seed(seed), num_points,
            background_threshold,
        )  # fmt: skip

    labels = result.labels
    shares = {name: float((labels == c).mean()) for c, name in enumerate(class_names)}
    shares["background"] = float((labels < 0).mean())
    title = f"{os.path.basename(image_uri)}: " + ", ".join(class_names)

    # outputs
    storage.makedirs(output_uri)
    overlay_uri = storage.join(output_uri, "overlay.png")
    labels_uri = storage.join(output_uri, "labels.png")
    masks_uri = storage.join(output_uri, "masks.npz")
    summary_uri = storage.join(output_uri, "segment.json")
    overlay = render_segmentation(image, labels, class_names, result.points, result.point_labels, title)
    storage.write_bytes(overlay_uri, overlay)
    label_png = io.BytesIO()
    Image.fromarray((labels + 1).astype(np.uint8), mode="L").save(label_png, format="PNG")
    storage.write_bytes(labels_uri, label_png.getvalue())
    arrays = io.BytesIO()
    np.savez_compressed(
        arrays,
        labels=labels.astype(np.int16),
        masks=np.stack([labels == c for c in range(len(class_names))]),
        class_names=np.array(class_names),
        points=result.points.astype(np.float32),
        point_labels=result.point_labels,
    )
    storage.write_bytes(masks_uri, arrays.getvalue())
    summary = {
        "image_uri": image_uri,
        "model": model,
        "tracking_uri": tracking_uri,
        "class_names": class_names,
        "templates": templates,
        "num_points": num_points,
        "background_threshold": background_threshold,
        "seed": seed,
        "class_shares": shares,
    }
    storage.write_bytes(summary_uri, json.dumps(summary, indent=2).encode())
    logger.info("segmentation of %s written to %s", image_uri, output_uri)
    return SegmentOutputs(overlay_uri, labels_uri, masks_uri, summary_uri, shares)
