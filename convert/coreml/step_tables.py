"""RoPE rows and the causal mask as step inputs (`--step-tables`), computed by the sampler.

By default each step function gathers its chunk's RoPE rows from a constant table at the runtime
`position` and builds the causal mask from it inside the graph. The Neural Engine prefers graphs
without runtime gathers, so this variant takes them as inputs instead: `rope_cos`/`rope_sin`
(n, head_dim), the table rows position…position+n−1, and `mask` (n, cache length), 0 where a key
index ≤ the query's position and −3e4 elsewhere. The export writes each block's table beside the
packages (float32 little-endian, cos rows then sin rows); the runners slice it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .builder import NEG_LARGE

ROPE_COS, ROPE_SIN, MASK = "rope_cos", "rope_sin", "mask"


def table_file(index: int) -> str:
    return f"FlowBlock{index}.rope.f32"


@dataclass(frozen=True)
class StepTables:
    """A block's RoPE table (cache length, head_dim) and the inputs of one step call."""

    cos: np.ndarray
    sin: np.ndarray

    @classmethod
    def load(cls, folder: str | Path, entry: dict[str, Any]) -> "StepTables":
        spec = entry["step_tables"]
        values = np.fromfile(Path(folder) / spec["file"], dtype="<f4").reshape(2, entry["cache_length"], spec["head_dim"])
        return cls(values[0], values[1])

    def write(self, path: Path) -> None:
        np.stack([self.cos, self.sin]).astype("<f4").tofile(path)

    def inputs(self, position: int, chunk: int) -> dict[str, np.ndarray]:
        """The table rows and the mask for a chunk of `chunk` tokens whose first sits at `position`."""
        rows = slice(position, position + chunk)
        keys = np.arange(self.cos.shape[0])[None, :]
        queries = np.arange(position, position + chunk)[:, None]
        mask = np.where(keys <= queries, 0.0, NEG_LARGE).astype(np.float32)
        return {ROPE_COS: np.ascontiguousarray(self.cos[rows], np.float32),
                ROPE_SIN: np.ascontiguousarray(self.sin[rows], np.float32), MASK: mask}
