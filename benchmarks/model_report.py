"""Print the parameter counts of each student part and time one CPU forward of tiny and vit_b.

Run from the repository root:  .venv/bin/python benchmarks/model_report.py [--skip-vit-b]

The timings are reported, never asserted: they depend on the machine, the torch build and the
thread count, which the output states. The weights are random (a vit_b forward costs the same
with trained weights). One untimed warm-up forward precedes each timed one.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from samclip.model.architectures import build_student_random
from samclip.model.param_report import count_parameters, count_student_parameters, format_counts

# The CLIP teacher's embedding dimension per student: 768 is the text-embedding dimension of
# OpenCLIP ViT-L/14 (SAM-CLIP's teacher), and 256 is the tiny random teacher's.
EMBED_DIMS = {"vit_b": 768, "tiny": 256}


def time_forward(arch: str, embed_dim: int) -> tuple[float, tuple[int, ...]]:
    """Build a random student and time one forward of one image at its SAM resolution."""
    torch.manual_seed(0)
    model = build_student_random(arch, embed_dim).eval()
    size = model.arch.sam_resolution
    images = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        model(images)  # warm-up
        started = time.perf_counter()
        output = model(images)
        seconds = time.perf_counter() - started
    assert count_parameters(model) == count_student_parameters(arch, embed_dim)
    return seconds, tuple(output.image_embeddings.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-vit-b", action="store_true", help="time the tiny student only")
    args = parser.parse_args()

    print("Parameter counts (built on the meta device)")
    for arch, embed_dim in EMBED_DIMS.items():
        print(format_counts(f"{arch} (CLIP embedding dim {embed_dim})", count_student_parameters(arch, embed_dim)))

    print(
        f"\nCPU forward, batch 1, both heads' image parts (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    )
    for arch, embed_dim in EMBED_DIMS.items():
        if arch == "vit_b" and args.skip_vit_b:
            continue
        seconds, shape = time_forward(arch, embed_dim)
        print(f"  {arch:6s} {seconds:7.2f} s  (image embeddings {shape})")


if __name__ == "__main__":
    main()
