"""Teacher files: find them on any URI, write the random smoke teachers once, fingerprint them.

A fingerprint names everything that determines a teacher's features, so feature folders keyed
by it are reused exactly when the features would come out the same:

- SAM: sha256 of the checkpoint file, the variant, the input size and the input transform
  (resize of the longest side, SAM's pixel mean and std, zero padding at bottom and right);
- CLIP: sha256 of the weights file, the model name, the model config JSON and OpenCLIP's
  preprocessing config.

Both are the first 16 hex digits of a sha256 over those values written as sorted JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from samclip.config import PipelineConfig
from samclip.tasks import storage

logger = logging.getLogger(__name__)

FINGERPRINT_CHARS = 16
SAM_INPUT_TRANSFORM = "resize-longest-side, normalise, pad-bottom-right"
CACHE_ENV = "SAMCLIP_CACHE_DIR"


@dataclass(frozen=True)
class TeacherFiles:
    """Local copies of the teacher files, where they came from, and their fingerprints.

    The local paths are valid on the machine that called ``ensure_teachers``. A Ray worker on
    another node calls ``localised()`` to fetch its own copies from the URIs.
    """

    sam_variant: str
    sam_checkpoint_uri: str
    sam_checkpoint: str  # local path
    clip_model: str  # OpenCLIP model name
    clip_weights_uri: str
    clip_weights: str  # local path
    clip_model_config_uri: str | None
    clip_model_config: str | None  # local path of the OpenCLIP JSON config, for custom models
    sam_fingerprint: str
    clip_fingerprint: str
    clip_embed_dim: int  # D of the CLIP teacher's (D,) image embedding
    cache_dir: str
    clip_pretrained: str | None = None  # OpenCLIP pretrained tag whose preprocessing applies
    # what each fingerprint hashes, for lineage records
    sam_fingerprint_inputs: dict[str, Any] = field(default_factory=dict, compare=False)
    clip_fingerprint_inputs: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def sam_embedding_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the SAM teacher's image-encoder embedding for one image."""
        from samclip.model.sam_teacher import get_sam_arch

        arch = get_sam_arch(self.sam_variant)
        return (arch.prompt_embed_dim, arch.embedding_size, arch.embedding_size)

    def localised(self) -> "TeacherFiles":
        """Return these files with local paths that exist on this machine, downloading if needed."""
        if all(
            path is None or os.path.isfile(path)
            for path in (self.sam_checkpoint, self.clip_weights, self.clip_model_config)
        ):
            return self
        config_path = None
        if self.clip_model_config_uri is not None:
            config_path = local_copy(self.clip_model_config_uri, self.cache_dir)
        return replace(
            self,
            sam_checkpoint=local_copy(self.sam_checkpoint_uri, self.cache_dir),
            clip_weights=local_copy(self.clip_weights_uri, self.cache_dir),
            clip_model_config=config_path,
        )


def ensure_teachers(config: PipelineConfig) -> TeacherFiles:
    """Resolve the configured teacher files, create the random smoke teachers if asked, fingerprint.

    A missing file with ``create_random`` true is written once, deterministically from
    ``teachers.seed``, and committed atomically to its URI; a later call finds and reuses it.
    A missing file with ``create_random`` false raises ValueError naming the file and the
    config field. Files on remote stores are downloaded once into the local cache.
    """
    from samclip.model.clip_teacher import write_random_clip
    from samclip.model.sam_teacher import write_random_sam

    teachers = config.teachers
    storage.configure_endpoint(config.storage.endpoint_url)
    cache_dir = teacher_cache_dir(config)

    # SAM checkpoint
    sam_uri = config.resolve_uri(teachers.sam.checkpoint)
    if not storage.exists(sam_uri):
        _require_random(
            sam_uri, "teachers.sam.checkpoint", teachers.sam.create_random, "teachers.sam"
        )
        logger.info(
            "writing a random SAM %s teacher (seed %d) to %s",
            teachers.sam.variant, teachers.seed, sam_uri,
        )
        _write_through_temp(
            {sam_uri: "sam.pth"},
            lambda folder: write_random_sam(
                os.path.join(folder, "sam.pth"), variant=teachers.sam.variant, seed=teachers.seed
            ),
        )

    # CLIP config and weights
    clip = teachers.clip
    weights_uri = config.resolve_uri(clip.weights)
    config_uri = config.resolve_uri(clip.model_config_path) if clip.model_config_path else None
    config_missing = config_uri is not None and not storage.exists(config_uri)
    if not storage.exists(weights_uri):
        _require_random(weights_uri, "teachers.clip.weights", clip.create_random, "teachers.clip")
        if config_uri is None:
            raise ValueError(
                f"CLIP teacher weights not found at {weights_uri}, and a random teacher needs an "
                "OpenCLIP JSON config to describe its architecture: set "
                "teachers.clip.model_config_path, or point teachers.clip.weights at an "
                "existing file"
            )
        logger.info("writing a random CLIP teacher (seed %d) to %s", teachers.seed, weights_uri)
        # open_clip registers a JSON config under its file stem, so the temporary file keeps
        # the configured name.
        config_name = os.path.basename(config_uri)
        weights_name = "weights-" + os.path.basename(weights_uri)

        def write_clip(folder: str) -> None:
            config_path = os.path.join(folder, config_name)
            write_random_clip(config_path, os.path.join(folder, weights_name), seed=teachers.seed)
            if not config_missing:
                with open(config_path, "rb") as handle:
                    if handle.read() != storage.read_bytes(config_uri):
                        raise ValueError(
                            f"CLIP teacher weights not found at {weights_uri}, and random weights "
                            f"exist only for the built-in tiny config, but {config_uri} holds "
                            "another config; supply weights for that config, or remove it"
                        )

        # The config is committed first: existing weights are what marks the teacher complete.
        targets = {config_uri: config_name} if config_missing else {}
        targets[weights_uri] = weights_name
        _write_through_temp(targets, write_clip)
    elif config_missing:
        raise ValueError(
            f"CLIP model config not found at {config_uri} although the weights at {weights_uri} "
            "exist; restore the JSON that describes those weights, or set "
            "teachers.clip.model_config_path to null for a built-in OpenCLIP model name"
        )

    # local copies and fingerprints
    sam_path = local_copy(sam_uri, cache_dir)
    weights_path = local_copy(weights_uri, cache_dir)
    config_path = local_copy(config_uri, cache_dir) if config_uri else None
    sam_inputs = _sam_fingerprint_inputs(sam_path, teachers.sam.variant)
    clip_inputs, clip_embed_dim = _clip_fingerprint_inputs(
        clip.model, weights_path, config_path, clip.pretrained
    )
    files = TeacherFiles(
        sam_variant=teachers.sam.variant,
        sam_checkpoint_uri=sam_uri,
        sam_checkpoint=sam_path,
        clip_model=clip.model,
        clip_weights_uri=weights_uri,
        clip_weights=weights_path,
        clip_model_config_uri=config_uri,
        clip_model_config=config_path,
        sam_fingerprint=fingerprint(sam_inputs),
        clip_fingerprint=fingerprint(clip_inputs),
        clip_embed_dim=clip_embed_dim,
        cache_dir=cache_dir,
        clip_pretrained=clip.pretrained,
        sam_fingerprint_inputs=sam_inputs,
        clip_fingerprint_inputs=clip_inputs,
    )
    logger.info(
        "teachers: SAM %s (fingerprint %s), CLIP %s (fingerprint %s)",
        files.sam_variant, files.sam_fingerprint, files.clip_model, files.clip_fingerprint,
    )
    return files


def load_sam_teacher(files: TeacherFiles):
    """Load the SAM teacher (a segment_anything ``Sam`` in eval mode) from its checkpoint."""
    from samclip.model.sam_teacher import load_sam_checkpoint

    return load_sam_checkpoint(files.localised().sam_checkpoint, files.sam_variant)


def load_clip_teacher_from(files: TeacherFiles):
    """Load the CLIP teacher (``samclip.model.clip_teacher.ClipTeacher``) from its files."""
    from samclip.model.clip_teacher import load_clip_teacher

    local = files.localised()
    return load_clip_teacher(
        local.clip_model, local.clip_weights, local.clip_model_config, pretrained=local.clip_pretrained
    )


def fingerprint(inputs: dict[str, Any]) -> str:
    """Hash a JSON-serialisable description of a teacher to 16 hex digits."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def teacher_cache_dir(config: PipelineConfig) -> str:
    """Return the local folder for copies of remote teacher files.

    Order: ``teachers.cache_dir``, then ``$SAMCLIP_CACHE_DIR``, then ``~/.cache/samclip``.
    """
    folder = (
        config.teachers.cache_dir
        or os.environ.get(CACHE_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "samclip")
    )
    return os.path.join(folder, "teachers")


def local_copy(uri: str, cache_dir: str) -> str:
    """Return a local path with the URI's content: the path itself for local files.

    Remote files are downloaded once into ``cache_dir``, in a folder named after the URI and the
    store's size and ETag (or modification time), so a changed object is downloaded again.
    """
    local = storage.local_path(uri)
    if local is not None:
        if not os.path.isfile(local):
            raise FileNotFoundError(f"teacher file not found: {local}")
        return local

    info = storage.file_info(uri)
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
    identity = f"{uri}|{info.get('size')}|{version}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:FINGERPRINT_CHARS]
    path = os.path.join(cache_dir, key, uri.rstrip("/").rsplit("/", 1)[-1])
    if not os.path.isfile(path):
        logger.info("downloading %s to %s", uri, path)
        storage.get_file(uri, path)
    return path


def file_sha256(path: str) -> str:
    """Return the sha256 hex digest of a local file, memoised by path, size and mtime."""
    stat = os.stat(path)
    return _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sam_fingerprint_inputs(checkpoint: str, variant: str) -> dict[str, Any]:
    from samclip.model.images import SAM_PIXEL_MEAN, SAM_PIXEL_STD
    from samclip.model.sam_teacher import get_sam_arch

    return {
        "weights_sha256": file_sha256(checkpoint),
        "variant": variant,
        "input_size": get_sam_arch(variant).image_size,
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
        "transform": SAM_INPUT_TRANSFORM,
    }


def _clip_fingerprint_inputs(
    model: str, weights: str, model_config: str | None, pretrained: str | None = None
) -> tuple[dict[str, Any], int]:
    from samclip.model.clip_teacher import load_clip_teacher

    # Loading the teacher reads OpenCLIP's preprocessing config and checks that the files fit.
    teacher = load_clip_teacher(model, weights, model_config, pretrained=pretrained)
    config_text = None
    if model_config is not None:
        with open(model_config, encoding="utf-8") as handle:
            config_text = handle.read()
    inputs = {
        "weights_sha256": file_sha256(weights),
        "model": model,
        "model_config": config_text,
        "preprocess_cfg": _jsonable(teacher.preprocess_cfg),
    }
    if pretrained:
        inputs["pretrained"] = pretrained
    return inputs, int(teacher.embed_dim)


def _jsonable(value: Any) -> Any:
    """Turn tuples and other containers into JSON types, so a fingerprint never depends on repr."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _require_random(uri: str, field_name: str, create_random: bool, section: str) -> None:
    if not create_random:
        raise ValueError(
            f"teacher file not found: {uri}; set {field_name} to the location of the file, or set "
            f"{section}.create_random=true to write deterministic random weights (smoke runs only)"
        )


def _write_through_temp(targets: dict[str, str], write: Callable[[str], None]) -> None:
    """Let ``write`` fill a local temporary folder, then commit files to their URIs atomically.

    ``targets`` maps each final URI to the name of the file in that folder that becomes it.
    """
    with tempfile.TemporaryDirectory(prefix="samclip-teacher-") as folder:
        write(folder)
        for uri, name in targets.items():
            storage.put_file(os.path.join(folder, name), uri)
