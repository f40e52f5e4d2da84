"""Evaluation on standard layouts: tiny ImageFolder, table, VOC and COCO sets with hand-computed metrics.

The stub models below make every prediction known in advance: an image's or patch's class is its
dominant colour channel, and SAM's decoder is replaced by one that fills each prompt box. The
expected numbers in each test are counted from the pictures drawn here.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from samclip.model.metrics import confusion_matrix, iou_per_class, mask_ious, mean_iou, topk_accuracy
from samclip.tasks import eval_datasets, eval_protocols, eval_suite

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COLOUR_WORDS = ("red", "green", "blue")


class ColourTeacher:
    """Text encoder stub: a text maps to the one-hot axis of the colour word it contains."""

    def tokenize(self, texts):
        return list(texts)

    def encode_text(self, texts):
        rows = []
        for text in texts:
            axis = next((i for i, word in enumerate(COLOUR_WORDS) if word in text), 2)  # "background": blue
            rows.append(torch.nn.functional.one_hot(torch.tensor(axis), 3).float())
        return torch.stack(rows)


class ColourModel(torch.nn.Module):
    """CLIP-head stub: the embedding of an image or a 16-pixel patch is its dominant channel."""

    def clip_embedding(self, images):  # (B, 3, S, S) -> (B, 3)
        return torch.nn.functional.one_hot(images.mean(dim=(2, 3)).argmax(-1), 3).float()

    def clip_patch_embeddings(self, images):  # (B, 3, S, S) -> (B, S/16, S/16, 3)
        pooled = torch.nn.functional.avg_pool2d(images, 16)
        return torch.nn.functional.one_hot(pooled.argmax(1), 3).float()


def _png(path, pixels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels.astype(np.uint8), mode="L" if pixels.ndim == 2 else "RGB")
    if palette:
        image = image.convert("P")
    image.save(path)


def _solid(colour, size=(24, 32)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


# ---------------------------------------------------------------- metric maths


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    targets = torch.tensor([0, 2, 1, 0])
    scores = topk_accuracy(logits, targets, (1, 2, 5))
    assert scores[1] == 0.25  # only row 0
    assert scores[2] == 0.5  # rows 0 and 1
    assert scores[5] == 1.0  # k clamps to the 3 classes


def test_confusion_ignores_and_counts_invalid():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    predicted = np.array([[0, 1, 1], [-1, 2, 2]])
    confusion = confusion_matrix(predicted, target, 3)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    ious = iou_per_class(confusion)
    assert ious[0] == pytest.approx(1 / 2)  # TP 1, FN 1
    assert ious[1] == pytest.approx(1 / 3)  # TP 1, FP 1, FN 1 (the -1 pixel)
    assert ious[2] == pytest.approx(1.0)
    assert mean_iou(confusion) == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_mask_ious_empty_pair_is_one():
    predicted = torch.zeros(2, 4, 4, dtype=torch.bool)
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    predicted[0, :2] = True
    target[0, :1] = True
    assert mask_ious(predicted, target).tolist() == [0.5, 1.0]


def test_background_threshold_assigns_background():
    probabilities = torch.tensor([[[0.9, 0.4]], [[0.1, 0.6]]])  # (C'=2, H=1, W=2)
    assert eval_protocols.assign_labels(probabilities, [1, 2], None, 0).tolist() == [[1, 2]]
    assert eval_protocols.assign_labels(probabilities, [1, 2], 0.7, 0).tolist() == [[1, 0]]


# ---------------------------------------------------------------- classification


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "folder"
    _png(root / "red" / "r1.png", _solid(RED))
    _png(root / "red" / "r2.png", _solid((200, 30, 10)))
    _png(root / "green" / "g1.png", _solid(GREEN))
    _png(root / "green" / "g2.png", _solid((240, 10, 10)))  # labelled green, looks red
    _png(root / "blue" / "b1.png", _solid(BLUE))
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_top1_by_hand(image_folder):
    dataset = eval_datasets.read_image_folder(str(image_folder))
    assert dataset.class_names == ["blue", "green", "red"]
    assert len(dataset.items) == 5
    metrics = eval_suite.evaluate_classification(ColourModel(), ColourTeacher(), dataset, ("a {c} thing",), 32)
    assert metrics["cls/top1"] == pytest.approx(4 / 5)  # g2 is predicted red
    assert metrics["cls/top5"] == 1.0


def test_csv_table_matches_folder(image_folder):
    rows = ["image,label", "red/r1.png,red", "red/r2.png,red", "green/g1.png,green", "green/g2.png,green", "blue/b1.png,blue"]
    table = image_folder / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    dataset = eval_suite.read_classification(str(table))
    assert dataset.class_names == ["blue", "green", "red"]
    assert dataset.items[0][0] == str(image_folder / "red" / "r1.png")
    metrics = eval_suite.evaluate_classification(ColourModel(), ColourTeacher(), dataset, ("a {c} thing",), 32)
    assert metrics["cls/top1"] == pytest.approx(4 / 5)


def test_parquet_table_needs_image_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"picture": ["a.png"], "label": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no image column"):
        eval_datasets.read_label_table(str(tmp_path / "t.parquet"))


# ---------------------------------------------------------------- VOC-style segmentation


@pytest.fixture()
def voc_root(tmp_path):
    """One 32 x 32 image: left half red, right half green. The mask labels the top 8 rows of the
    right half red as well (the colour predictor gets those wrong) and ignores the top 4 rows of
    the left half."""
    root = tmp_path / "voc"
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = RED
    image[:, 16:] = GREEN
    mask = np.full((32, 32), 2, np.uint8)
    mask[:, :16] = 1
    mask[:8, 16:] = 1
    mask[:4, :16] = 255
    _png(root / "JPEGImages" / "a.png", image)
    _png(root / "SegmentationClass" / "a.png", mask, palette=True)
    (root / "classes.txt").write_text("background\nred\ngreen\n")
    return root


def test_voc_clip_head_miou_by_hand(voc_root):
    dataset = eval_datasets.read_voc(str(voc_root))
    assert dataset.class_names == ["background", "red", "green"]
    image = eval_datasets.load_image(dataset.items[0][0])
    truth = eval_datasets.load_class_mask(dataset.items[0][1])
    assert truth[0, 0] == 255 and truth[10, 20] == 2

    from samclip.model.zero_shot import build_text_classifier

    classifier = build_text_classifier(ColourTeacher(), dataset.class_names, ("a {c} thing",))
    labels = eval_protocols.semantic_segmentation(ColourModel(), image, classifier, [0, 1, 2])
    assert (labels[:, :16] == 1).all() and (labels[:, 16:] == 2).all()
    confusion = confusion_matrix(labels, truth, 3)
    ious = iou_per_class(confusion)
    # red: 448 px right (16 x 32 minus 64 ignored), 128 px of the top-right missed
    assert ious[1] == pytest.approx(448 / (448 + 128))
    # green: 384 px right, 128 px predicted green that are red
    assert ious[2] == pytest.approx(384 / (384 + 128))
    assert np.isnan(ious[0])  # neither present nor predicted
    assert mean_iou(confusion) == pytest.approx((448 / 576 + 384 / 512) / 2)


def test_voc_both_heads_scored_alike(voc_root, monkeypatch):
    """Text-prompted labels go through the same confusion matrix; background (-1) maps to class 0."""
    from samclip.model import text_segmentation

    def fake_segment(model, image, classifier, generator, num_points, threshold):
        labels = np.zeros(image.shape[:2], np.int64)  # classifier row 0 = "red"
        labels[:, 16:] = 1  # row 1 = "green"
        labels[:, 24:] = text_segmentation.BACKGROUND
        return text_segmentation.ImageTextSegmentation(labels, None, None, None)

    monkeypatch.setattr(text_segmentation, "segment_image_by_text", fake_segment)
    image = eval_datasets.load_image(str(voc_root / "JPEGImages" / "a.png"))
    truth = eval_datasets.load_class_mask(str(voc_root / "SegmentationClass" / "a.png"))
    scored, background = eval_suite.segmentation_classes(["background", "red", "green"], threshold=0.5)
    assert (scored, background) == ([1, 2], 0)
    labels = eval_protocols.text_prompted_segmentation(
        ColourModel(), image, torch.zeros(2, 3), scored, torch.Generator(), 1, 0.5, background
    )
    ious = iou_per_class(confusion_matrix(labels, truth, 3))
    # green: TP 24 rows x 8 cols = 192; FP 8 x 8 = 64 (red truth); FN 24 x 8 = 192 (background)
    assert ious[2] == pytest.approx(192 / (192 + 64 + 192))
    assert ious[0] == 0.0  # 256 px predicted background, none is


def test_voc_split_names_missing_mask(voc_root):
    (voc_root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="first: b"):
        eval_datasets.read_voc(str(voc_root), split="val")


def test_rgb_mask_rejected(tmp_path):
    _png(tmp_path / "m.png", _solid(RED))
    with pytest.raises(ValueError, match="palette"):
        eval_datasets.load_class_mask(str(tmp_path / "m.png"))


# ---------------------------------------------------------------- COCO-style instances


def _box_filling_decoder(prompt_encoder, mask_decoder, image_embeddings, prompts, multimask_output=False):
    """Stand-in for SAM's decoder: each box's mask is the low-resolution cells whose centre lies in it."""
    from samclip.model.student import MaskPrediction

    batch, count = prompts.boxes.shape[:2]
    side = 4 * image_embeddings.shape[-1]
    centres = (torch.arange(side) + 0.5) * (256 / side)  # cell centres in the 256 px SAM frame
    logits = torch.full((batch, count, side, side), -10.0)
    for b in range(batch):
        for k, (x0, y0, x1, y1) in enumerate(prompts.boxes[b].tolist()):
            rows = (centres >= y0) & (centres <= y1)
            cols = (centres >= x0) & (centres <= x1)
            logits[b, k][rows[:, None] & cols[None, :]] = 10.0
    return MaskPrediction(logits=logits, iou=torch.ones(batch, count))


@pytest.fixture()
def coco_files(tmp_path):
    from samclip.model.rle import encode_mask

    _png(tmp_path / "coco" / "images" / "one.png", _solid((90, 90, 90), (256, 256)))
    second = np.zeros((256, 256), bool)
    second[64:112, 64:128] = True  # 48 x 64 px inside a 64 x 64 box
    annotations = {
        "images": [{"id": 1, "file_name": "one.png", "height": 256, "width": 256}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [
            # the top half (32 x 16 px, PIL fills both ends) of a 32 x 32 box
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [16, 16, 32, 32], "iscrowd": 0,
             "segmentation": [[16, 16, 47, 16, 47, 31, 16, 31]]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [64, 64, 64, 64], "iscrowd": 0,
             "segmentation": encode_mask(second)},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 8, 8], "iscrowd": 1,
             "segmentation": [[0, 0, 7, 0, 7, 7]]},
        ],
    }  # fmt: skip
    path = tmp_path / "coco" / "annotations" / "instances_val.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(annotations))
    return path


def test_coco_box_prompt_iou_by_hand(coco_files, monkeypatch):
    from samclip.model import student as student_module
    from samclip.model.architectures import build_student
    from samclip.model.sam_teacher import build_sam

    dataset = eval_datasets.read_coco(str(coco_files), str(coco_files.parent.parent / "images"))
    assert dataset.categories == {7: "thing"}
    assert len(dataset.images[0].instances) == 2  # the crowd annotation is skipped
    assert eval_datasets.instance_mask(dataset.images[0].instances[0], 256, 256).sum() == 32 * 16

    monkeypatch.setattr(student_module, "decode_masks", _box_filling_decoder)
    torch.manual_seed(0)
    teacher = build_sam("tiny").eval()
    model = build_student("tiny", teacher, 16, clip_head_depth=1).eval()
    metrics, samples = eval_suite.evaluate_instances(model, teacher, dataset)
    result = samples[0]["result"]
    # Bilinear upscaling of the +-10 cells loses the 4 corner pixels of each box (there the
    # inside cell weighs 0.625^2 < 0.5), so box 1 gives 32 x 32 - 4 px; the truth keeps the two
    # top corners that the mask lacks.
    assert result.student_masks[0].sum() == 32 * 32 - 4
    expected = [(512 - 2) / (1020 + 2), (3072 - 2) / (4092 + 2)]
    assert result.student_vs_truth.tolist() == pytest.approx(expected)
    assert metrics["sam/box_miou_vs_truth"] == pytest.approx(sum(expected) / 2)
    assert metrics["sam/teacher_box_miou_vs_truth"] == pytest.approx(sum(expected) / 2)
    assert metrics["sam/box_miou_vs_teacher"] == 1.0
    assert metrics["sam/instances"] == 2.0


# ---------------------------------------------------------------- the whole dataset evaluation


def test_evaluate_datasets_writes_reports(tmp_path, image_folder, voc_root, coco_files):
    """A real tiny student on all three layouts: reports, overlays and one MLflow run."""
    from mlflow import MlflowClient

    from samclip.config import load_config
    from samclip.model.architectures import build_student
    from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from, load_sam_teacher

    root = tmp_path / "run"
    config = load_config("smoke", [
        f"storage.root={root}", f"evaluate.classification={image_folder}", f"evaluate.segmentation={voc_root}",
        f"evaluate.instances={coco_files}", "evaluate.templates=simple", "evaluate.background_threshold=0.5",
        "evaluate.dataset_seg_resolution=64", "evaluate.overlays=1",
    ])  # fmt: skip
    teachers = ensure_teachers(config)
    torch.manual_seed(0)
    embed_dim = load_clip_teacher_from(teachers).encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1]
    model = build_student("tiny", load_sam_teacher(teachers), embed_dim, clip_head_depth=1)

    result = eval_suite.evaluate_datasets(config, model=model, name="tiny")
    for key in ("cls/top1", "cls/top5", "seg/miou", "textseg/miou", "sam/box_miou_vs_truth", "sam/box_miou_vs_teacher"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    assert result.metrics["sam/box_miou_vs_teacher"] == 1.0  # the student's SAM parts are the teacher's
    assert result.metrics["cls/images"] == 5.0
    report = json.loads((root / "evaluate" / "tiny" / "report.json").read_text())
    assert report["metrics"] == result.metrics
    assert "| seg/miou |" in (root / "evaluate" / "tiny" / "report.md").read_text()
    assert len(result.overlay_uris) == 2  # one segmentation and one instance picture
    assert all(open(uri, "rb").read(4) == b"\x89PNG" for uri in result.overlay_uris)

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["seg.miou"] == pytest.approx(result.metrics["seg/miou"])
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "evaluation")} >= {"evaluation/report.json"}
