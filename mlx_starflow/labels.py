"""Class-label conditioning: prompts that name a class, encoded as one-hot rows.

The official label models condition on a fixed `eye(K+1)` embedding of the class id with a
text length of 1; id K is the empty class, used for the empty prompt and as the unconditional
row of guidance. Unlike the official code, an unknown label is an error listing the known
ones, not a silent switch to the empty class.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .config import LabelConfig
from .errors import StarFlowError
from .model_io import read_manifest, verify_changed


class UnknownLabel(StarFlowError):
    """A prompt that is not one of the model's class names."""


class LabelEncoder:
    def __init__(self, config: LabelConfig):
        self.labels = config.labels
        self._ids = {name.lower(): i for i, name in enumerate(config.labels)}

    @property
    def empty_id(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return len(self.labels) + 1

    def ids(self, prompts: list[str]) -> list[int]:
        """Class id per prompt (case and surrounding spaces ignored); "" is the empty class."""
        ids = []
        for prompt in prompts:
            key = " ".join(prompt.split()).lower()
            if key == "":
                ids.append(self.empty_id)
            elif key in self._ids:
                ids.append(self._ids[key])
            else:
                raise UnknownLabel(f"unknown label {prompt!r}; this model knows: {', '.join(self.labels)} (or \"\" for any)")
        return ids

    def encode(self, prompts: list[str]) -> mx.array:
        """(B, 1, K+1) one-hot condition states."""
        ids = mx.array(self.ids(prompts))
        return (ids[:, None, None] == mx.arange(self.dim)[None, None, :]).astype(mx.float32)


def load_label_encoder(folder: str | Path) -> LabelEncoder:
    """Load a converted labels folder, its files checked against the manifest's sha256 when changed."""
    verify_changed(folder, read_manifest(folder))
    return LabelEncoder(LabelConfig.load(folder))
