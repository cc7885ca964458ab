"""What inversion and caption ranking cost next to one sampling run, on the shipped demo model.

Inverting an image is one forward pass through every block (all tokens at once), where sampling
is one pass per token (or per Jacobi iteration); ranking N captions is N forward passes in
caption batches. Both are given as ratios to one guided sampling run of one image with the
same model, measured in the same process, so they carry over to other machines better than the
seconds do. On the 3B model the forward pass is a much smaller share still (1024 tokens per
sequential block instead of the demo's 64), so these ratios are upper bounds there.
"""

from __future__ import annotations

from pathlib import Path

from mlx_starflow import load
from mlx_starflow.samplers import Jacobi, Sequential

from .timing import best_seconds

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
REPEATS = 3


def run(repeats: int = REPEATS) -> tuple[str, dict]:
    pipe = load(DEMO)
    labels = list(pipe.condition.labels)
    image = pipe.generate([labels[0]], seed=0, sampler=Sequential())[0]
    sequential = best_seconds(lambda: pipe.generate([labels[0]], seed=0, sampler=Sequential(), denoise="none"), repeats)
    jacobi = best_seconds(lambda: pipe.generate([labels[0]], seed=0, sampler=Jacobi(), denoise="none"), repeats)
    invert = best_seconds(lambda: pipe.invert([image], [labels[0]]), repeats)
    rank_all = best_seconds(lambda: pipe.rank(image, labels), repeats)
    rank_one = best_seconds(lambda: pipe.rank(image, labels[:1]), repeats)
    per_caption = rank_all / len(labels)
    figures = {
        "sample_sequential_s": sequential,
        "sample_jacobi_s": jacobi,
        "invert_s": invert,
        "invert_vs_sequential_sample": invert / sequential,
        "invert_vs_jacobi_sample": invert / jacobi,
        "rank_captions": len(labels),
        "rank_per_caption_s": per_caption,
        "rank_one_caption_s": rank_one,
        "rank_per_caption_vs_sequential_sample": per_caption / sequential,
    }
    lines = [
        "### Invert and rank against one sampling run (demo model, 1 image, guidance 3.6, no denoise)",
        "",
        "| operation | seconds | ÷ sequential sample | ÷ Jacobi sample |",
        "|---|---|---|---|",
        f"| sample, sequential | {sequential:.3f} | 1 | {sequential / jacobi:.2f} |",
        f"| sample, Jacobi (official preset) | {jacobi:.3f} | {jacobi / sequential:.2f} | 1 |",
        f"| invert (one forward pass) | {invert:.3f} | {invert / sequential:.2f} | {invert / jacobi:.2f} |",
        f"| rank, per caption ({len(labels)} captions) | {per_caption:.3f} | {per_caption / sequential:.2f} | {per_caption / jacobi:.2f} |",
        f"| rank, one caption | {rank_one:.3f} | {rank_one / sequential:.2f} | {rank_one / jacobi:.2f} |",
    ]
    return "\n".join(lines), {"editing_cost": figures}
