"""Train a tiny CLIP teacher on testbed scenes and their captions, in plain torch.

The model is open_clip's own CLIP, built from a small config registered with
``open_clip.add_model_config``, and the loss is ``open_clip.loss.ClipLoss`` (symmetric InfoNCE
with a learned temperature). Training scenes and held-out scenes come from two different
testbed seeds. Every epoch re-captions each training scene with a fresh phrasing, so the model
learns the objects rather than one sentence.

Zero-shot accuracy is measured in two ways, by shape class (5 classes, chance 20%) and by
colour (5 colours, chance 20%), on two held-out sets:

- single-object scenes (seed ``eval_seed + 1``), where the label is unambiguous. The targets
  apply to these: training stops when both accuracies reach theirs, or after ``max_steps``.
- ordinary scenes of one to three objects (seed ``eval_seed``), against the label of the
  largest object, the label the pipeline's evaluation uses. These are reported, not targeted:
  captions name every object, so a model that identifies which classes are present but not which is
  largest scores only the mean of 1 / (distinct classes in the scene), 0.71 on the default 300
  held-out scenes.

The class classifier averages "a {colour} {class}" over all colours, and the colour classifier
averages "a {colour} {shape}" over all shapes, as CLIP's prompt ensembling does over templates.

The result is saved as the open_clip JSON config plus a state dict, the layout that
``samclip.model.clip_teacher.load_clip_teacher`` reads. The final accuracies are measured again
through that loader and ``samclip.model.zero_shot``, so they describe the saved teacher.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image

from samclip.model.clip_teacher import clip_input, load_clip_teacher
from samclip.model.zero_shot import build_text_classifier, classify
from samclip.testbed.captions import CaptionObject, caption_scene
from samclip.testbed.scenes import COLOURS, DEFAULT_SIZE, SceneSpec, generate_scene
from samclip.testbed.shapes import SHAPES

logger = logging.getLogger(__name__)

MODEL_NAME = "samclip-shapes-clip"
# A CLIP small enough to train on a CPU: open_clip's ModifiedResNet (the tower of OpenAI's RN50
# CLIP, at one bottleneck block per stage and width 32) on 64 px inputs. On this testbed it
# learned shape classes faster than a 4-layer ViT of 8 px patches, which after 300 steps still
# scored chance on shape while both learned colour.
SHAPES_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    # open_clip's tokenizer needs its full BPE vocabulary; captions stay under 32 tokens
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
CLASS_TEMPLATES: tuple[str, ...] = tuple(f"a {colour} {{c}}" for colour in COLOURS)
COLOUR_TEMPLATES: tuple[str, ...] = tuple(f"a {{c}} {shape}" for shape in SHAPES)


@dataclass
class ClipTrainConfig:
    """Data, optimisation and stopping settings of the CLIP teacher's training."""

    train_seed: int = 1000  # testbed seed of the training scenes
    eval_seed: int = 2000  # testbed seed of the held-out scenes
    train_scenes: int = 2000
    # Share of the training scenes drawn with a single object (from seed train_seed + 1). Two
    # such scenes of one colour differ in their captions only by the shape word.
    single_object_fraction: float = 0.3
    eval_scenes: int = 300  # held-out scenes of one to three objects (reported)
    eval_single_scenes: int = 300  # held-out single-object scenes (the targets apply to these)
    scene_size: int = DEFAULT_SIZE  # pixels; the model's transform resizes to its input size
    batch_size: int = 64
    max_steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    eval_every: int = 100  # steps between zero-shot evaluations
    target_class_accuracy: float = 0.8
    target_colour_accuracy: float = 0.8
    seed: int = 0  # initialisation and batch order
    threads: int | None = None  # torch CPU threads; None keeps torch's setting
    model_config: dict[str, Any] = field(default_factory=lambda: dict(SHAPES_CLIP_CONFIG))


@dataclass
class ClipTrainResult:
    """The saved teacher and how far it got."""

    model_name: str
    config_path: str
    weights_path: str
    steps: int
    seconds: float
    class_accuracy: float  # zero-shot top-1 on held-out single-object scenes, via load_clip_teacher
    colour_accuracy: float
    scene_class_accuracy: float  # the same on held-out scenes of 1-3 objects, largest object's label
    scene_colour_accuracy: float
    reached_targets: bool
    history: list[dict[str, float]]


@dataclass
class _SceneSet:
    images: torch.Tensor  # (N, 3, S, S) preprocessed
    objects: list[list[CaptionObject]]
    backgrounds: list[str]
    class_labels: torch.Tensor  # (N,) index into SHAPES of the largest object
    colour_labels: torch.Tensor  # (N,) index into COLOURS of the largest object
    raw: list[np.ndarray]  # (H, W, 3) uint8 images, for evaluation through the teacher's loader


def _scene_set(
    seed: int, count: int, size: int, preprocess: Any, spec: SceneSpec | None = None
) -> _SceneSet:
    """Generate `count` scenes of `seed` and preprocess their images once."""
    shape_names, colour_names = list(SHAPES), list(COLOURS)
    images, objects, backgrounds, classes, colours, raw = [], [], [], [], [], []
    for index in range(count):
        scene = generate_scene(seed, index, size, spec)
        raw.append(scene.image)
        images.append(preprocess(Image.fromarray(scene.image)))
        objects.append([
            CaptionObject(item.class_name, item.colour, item.area, _centroid(item.mask))
            for item in scene.instances
        ])  # fmt: skip
        backgrounds.append(scene.background)
        classes.append(shape_names.index(scene.label))
        colours.append(colour_names.index(scene.largest.colour))
    return _SceneSet(
        torch.stack(images), objects, backgrounds, torch.tensor(classes), torch.tensor(colours), raw
    )


def _concatenate(first: _SceneSet, second: _SceneSet) -> _SceneSet:
    return _SceneSet(
        torch.cat([first.images, second.images]),
        first.objects + second.objects,
        first.backgrounds + second.backgrounds,
        torch.cat([first.class_labels, second.class_labels]),
        torch.cat([first.colour_labels, second.colour_labels]),
        first.raw + second.raw,
    )


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@torch.no_grad()
def _classifier(
    model: Any, tokenizer: Any, names: list[str], templates: tuple[str, ...]
) -> torch.Tensor:
    """Return a (C, D) unit-norm zero-shot classifier: per class, the mean over templates."""
    texts = [template.format(c=name) for name in names for template in templates]
    embeddings = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    per_class = embeddings.view(len(names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: Any, tokenizer: Any, scenes: _SceneSet) -> dict[str, float]:
    """Measure top-1 zero-shot accuracy by class and by colour of the largest object."""
    was_training = model.training
    model.eval()
    image_embeddings = torch.cat([
        F.normalize(model.encode_image(batch), dim=-1) for batch in scenes.images.split(256)
    ])  # fmt: skip
    class_weights = _classifier(model, tokenizer, list(SHAPES), CLASS_TEMPLATES)
    colour_weights = _classifier(model, tokenizer, list(COLOURS), COLOUR_TEMPLATES)
    model.train(was_training)
    class_hits = (image_embeddings @ class_weights.t()).argmax(dim=1) == scenes.class_labels
    colour_hits = (image_embeddings @ colour_weights.t()).argmax(dim=1) == scenes.colour_labels
    return {
        "class_accuracy": float(class_hits.float().mean()),
        "colour_accuracy": float(colour_hits.float().mean()),
    }


def _lr_at(step: int, config: ClipTrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _write_model_config(out_dir: Path, model_config: dict[str, Any]) -> Path:
    config_path = out_dir / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
    if open_clip.get_model_config(MODEL_NAME) != model_config:
        open_clip.add_model_config(config_path)
    return config_path


def train_clip(config: ClipTrainConfig, out_dir: str | os.PathLike) -> ClipTrainResult:
    """Train the CLIP teacher on testbed scenes and save it under `out_dir`.

    Writes ``samclip-shapes-clip.json`` (open_clip model config), ``samclip-shapes-clip.bin``
    (state dict) and ``train_clip.json`` (settings, history and final accuracies).
    """
    started = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = _write_model_config(out, config.model_config)
    torch.manual_seed(config.seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None, device="cpu")
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    preprocess = open_clip.image_transform(
        config.model_config["vision_cfg"]["image_size"], is_train=False
    )

    # data: preprocessed once, since the scenes do not change between epochs
    single = round(config.single_object_fraction * config.train_scenes)
    train_set = _scene_set(
        config.train_seed, config.train_scenes - single, config.scene_size, preprocess
    )
    if single:
        single_set = _scene_set(
            config.train_seed + 1, single, config.scene_size, preprocess, SceneSpec(max_objects=1)
        )
        train_set = _concatenate(train_set, single_set)
    eval_set = _scene_set(config.eval_seed, config.eval_scenes, config.scene_size, preprocess)
    single_eval_set = _scene_set(
        config.eval_seed + 1, config.eval_single_scenes, config.scene_size, preprocess,
        SceneSpec(max_objects=1),
    )  # fmt: skip
    logger.info(
        "generated %d training and %d + %d held-out scenes in %.1f s",
        config.train_scenes, config.eval_single_scenes, config.eval_scenes,
        time.perf_counter() - started,
    )  # fmt: skip

    # optimiser: no weight decay on gains, biases, embeddings and the temperature, as in
    # open_clip's training script
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(config.seed)

    history: list[dict[str, float]] = []
    order = torch.randperm(config.train_scenes, generator=generator)
    position, epoch, step = 0, 0, 0
    train_started = time.perf_counter()
    model.train()
    while step < config.max_steps:
        # batch: the next scenes of this epoch's order, each with a fresh caption
        if position + config.batch_size > config.train_scenes:
            order = torch.randperm(config.train_scenes, generator=generator)
            position, epoch = 0, epoch + 1
        indices = order[position : position + config.batch_size].tolist()
        position += config.batch_size
        captions = [
            caption_scene(train_set.objects[index], train_set.backgrounds[index],
                          np.random.default_rng([config.train_seed, index, epoch]))
            for index in indices
        ]  # fmt: skip

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        image_features = F.normalize(model.encode_image(train_set.images[indices]), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        step += 1

        if step % config.eval_every == 0 or step == config.max_steps:
            accuracy = zero_shot_accuracy(model, tokenizer, single_eval_set)
            scene = zero_shot_accuracy(model, tokenizer, eval_set)
            accuracy |= {f"scene_{key}": value for key, value in scene.items()}
            elapsed = time.perf_counter() - train_started
            loss_value = float(loss.detach())
            history.append({"step": step, "loss": loss_value, "seconds": elapsed, **accuracy})
            logger.info(
                "step %d | loss %.3f | lr %.2e | scale %.1f | held-out single-object class %.3f "
                "colour %.3f | scenes class %.3f colour %.3f | %.1f samples/s",
                step, loss_value, _lr_at(step - 1, config), float(model.logit_scale.detach().exp()),
                accuracy["class_accuracy"], accuracy["colour_accuracy"],
                accuracy["scene_class_accuracy"], accuracy["scene_colour_accuracy"],
                step * config.batch_size / elapsed,
            )  # fmt: skip
            if (accuracy["class_accuracy"] >= config.target_class_accuracy
                    and accuracy["colour_accuracy"] >= config.target_colour_accuracy):  # fmt: skip
                break

    # save, then measure again through the ordinary loader
    weights_path = out / f"{MODEL_NAME}.bin"
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    torch.save(state_dict, weights_path)
    final = evaluate_saved_teacher(config_path, weights_path, single_eval_set.raw,
                                   single_eval_set.class_labels, single_eval_set.colour_labels)  # fmt: skip
    scene = evaluate_saved_teacher(config_path, weights_path, eval_set.raw,
                                   eval_set.class_labels, eval_set.colour_labels)  # fmt: skip
    result = ClipTrainResult(
        model_name=MODEL_NAME,
        config_path=str(config_path),
        weights_path=str(weights_path),
        steps=step,
        seconds=time.perf_counter() - started,
        class_accuracy=final["class_accuracy"],
        colour_accuracy=final["colour_accuracy"],
        scene_class_accuracy=scene["class_accuracy"],
        scene_colour_accuracy=scene["colour_accuracy"],
        reached_targets=final["class_accuracy"] >= config.target_class_accuracy
        and final["colour_accuracy"] >= config.target_colour_accuracy,
        history=history,
    )
    report = {"config": asdict(config), "result": asdict(result)}
    (out / "train_clip.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return result


@torch.no_grad()
def evaluate_saved_teacher(
    config_path: Path,
    weights_path: Path,
    images: list[np.ndarray],
    class_labels: torch.Tensor,
    colour_labels: torch.Tensor,
) -> dict[str, float]:
    """Load the saved teacher with load_clip_teacher and measure its zero-shot accuracy."""
    teacher = load_clip_teacher(MODEL_NAME, weights_path, config_path)
    inputs = torch.stack([clip_input(image, teacher) for image in images])
    embeddings = torch.cat([teacher.encode_image(batch) for batch in inputs.split(256)])
    class_logits = classify(
        embeddings, build_text_classifier(teacher, list(SHAPES), CLASS_TEMPLATES)
    )
    colour_logits = classify(
        embeddings, build_text_classifier(teacher, list(COLOURS), COLOUR_TEMPLATES)
    )
    return {
        "class_accuracy": float((class_logits.argmax(dim=1) == class_labels).float().mean()),
        "colour_accuracy": float((colour_logits.argmax(dim=1) == colour_labels).float().mean()),
    }
