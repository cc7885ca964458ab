"""report.json and the per-stage table of a rehearsal."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAGE_FIELDS = ("run", "stage", "wall_s", "peak_rss_gb", "mlx_peak_gb")


def read_stages(path: Path) -> list[dict[str, Any]]:
    """The stage records a measured run appended (JSON lines); none when it wrote nothing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    memory = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        memory = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) * 1024
    return {
        "system": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "memory_gb": round(memory / 1e9, 1),
        "blas_preload": os.environ.get("LD_PRELOAD", ""),
    }


def largest_peak(stages: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The stage with the highest peak RSS."""
    return max((s for s in stages if "peak_rss_gb" in s), key=lambda stage: stage["peak_rss_gb"], default=None)


def table(stages: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of the stages, as the README shows it."""
    lines = ["| run | stage | wall time | peak RSS | MLX peak |", "|---|---|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s['run']} | {s['stage']} | {s['wall_s']:.1f} s | {s['peak_rss_gb']:.2f} GB | {s['mlx_peak_gb']:.2f} GB |")
    return "\n".join(lines)


def write_report(path: Path, stages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """report.json: the machine, every stage, the largest peak and whatever else the run adds."""
    report = {"machine": machine(), "stages": stages, "largest_peak": largest_peak(stages), **extra}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
