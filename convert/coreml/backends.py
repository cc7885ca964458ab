"""Running an export folder: with the NumPy MIL evaluator (anywhere) or with Core ML (macOS 15+).

Both read only the manifest and the packages, exactly as the Swift package does, and offer the
same calls: a flow block per block (`pipeline.ExportedBlock`), the text encoder, the
score step and the VAE decoder. `per_call_seconds` records each call's wall time by function,
for the Mac check script's latency table.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import mil_eval, score
from .coremltools_api import ct, load_program, require_prediction, types
from .flow import updated_name
from .manifest import read_manifest
from .step_tables import StepTables


class Backend(ABC):
    """Shared bookkeeping: the manifest, and wall time per function."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.per_call_seconds: dict[str, list[float]] = defaultdict(list)

    def timed(self, label: str, call: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        result = call()
        self.per_call_seconds[label].append(time.perf_counter() - started)
        return result

    def block_entry(self, index: int) -> dict[str, Any]:
        return next(e for e in self.manifest["flow"]["blocks"] if e["index"] == index)

    @abstractmethod
    def run(self, package: str, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        """One call of a package's function (with its state, for stateful flow blocks)."""

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(1, T) ids and mask → (1, T, D) masked states, through every text-encoder package."""
        entry = self.manifest["text_encoder"]
        mask = attention_mask.astype(np.int32)
        hidden = entry["hidden"]
        values = {entry["inputs"]["input_ids"]: input_ids.astype(np.int32)}
        for package in entry["packages"]:
            out = self.timed("text_encoder", lambda: self.run(package, "main", {**values, entry["inputs"]["attention_mask"]: mask}))
            values = {hidden["input"]: out[hidden["output"]]} if hidden["output"] in out else out
        return values[entry["output"]]

    def denoise(self, latent: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        """One image's score step through the flow blocks' `forward`/`vjp` functions (`score.denoise`)."""
        return self.timed("score_step", lambda: score.denoise(self.manifest, self.run, latent, text))

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """The flow's latent (1, C, h, w) → raw image (1, 3, H, W): divides by the scaling factor first."""
        entry = self.manifest["vae"]
        unscaled = (latent / np.float32(entry["scaling_factor"])).astype(np.float32)
        return self.timed("vae_decoder", lambda: self.run(entry["package"], "main", {entry["input"]: unscaled}))[entry["output"]]


class PackageBlock:
    """A flow block's packages run in order, each with its own cache (state dict or Core ML state)."""

    def __init__(self, backend: Backend, index: int, make_state: Callable[[str], Any]):
        self.backend = backend
        self.entry = backend.block_entry(index)
        self.make_state = make_state
        self.states: list[Any] = []

    def reset(self) -> None:
        self.states = [self.make_state(package) for package in self.entry["packages"]]

    def _chain(self, function: str, first: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
        hidden = self.entry["hidden"]
        shared = {self.entry["inputs"]["position"], *self.entry.get("step_tables", {}).get("inputs", {}).values()}
        position = {k: v for k, v in first.items() if k in shared}
        values = first
        started = time.perf_counter()
        for package, state in zip(self.entry["packages"], self.states):
            out = self.backend.run(package, function, {**values, **position}, state)
            values = {hidden["input"]: out[hidden["output"]]} if package != self.entry["packages"][-1] else out
        self.backend.per_call_seconds[label].append(time.perf_counter() - started)
        return values

    def prefill(self, text: np.ndarray) -> None:
        self._chain(self.entry["functions"]["prefill"], {self.entry["inputs"]["text"]: text.astype(np.float32)}, f"block{self.entry['index']}.prefill")

    def step(self, tokens: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        function = self.entry["functions"]["step"][str(tokens.shape[1])]
        inputs = {self.entry["inputs"]["tokens"]: tokens.astype(np.float32),
                  self.entry["inputs"]["position"]: np.array([position], np.int32)}
        if "step_tables" in self.entry:
            inputs.update(StepTables.load(self.backend.folder, self.entry).inputs(position, tokens.shape[1]))
        out = self._chain(function, inputs, f"block{self.entry['index']}.{function}")
        return out[self.entry["outputs"]["scale_logit"]], out[self.entry["outputs"]["shift"]]


class EvaluatorBackend(Backend):
    """Runs the saved packages with `mil_eval`; Core ML states are a dict of float16 arrays."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self._programs: dict[str, Any] = {}

    def program(self, package: str) -> Any:
        if package not in self._programs:
            self._programs[package] = load_program(self.folder / package)
        return self._programs[package]

    def run(self, package: str, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        program = self.program(package)
        if self.manifest["kv_cache"] == "io" and state is not None:
            out = mil_eval.run(program, {**inputs, **state}, function=function)
            for name in state:
                state[name] = out[updated_name(name)]
            return out
        return mil_eval.run(program, inputs, state, function=function)

    def _zero_caches(self, package: str) -> dict[str, np.ndarray]:
        """Every cache of a package at zero, shaped and typed as its cached functions declare
        (the score step's `forward`/`vjp` functions take no cache)."""
        caches = {}
        for function in self.program(package).functions.values():
            for name, var in function.inputs.items():
                if name.startswith(("key_cache_", "value_cache_")):
                    dtype = np.float16 if self.manifest["kv_cache"] == "state" else mil_eval.DTYPES[types.builtin_to_string(var.dtype)]
                    caches[name] = np.zeros(var.shape, dtype)
        return caches

    def block(self, index: int) -> PackageBlock:
        return PackageBlock(self, index, self._zero_caches)


class CoreMLBackend(Backend):
    """Runs the packages with Core ML on the chosen compute units (macOS 15+ only)."""

    def __init__(self, folder: str | Path, compute_units: str = "ALL"):
        require_prediction()
        super().__init__(folder)
        self.compute_units = getattr(ct.ComputeUnit, compute_units)
        self._models: dict[tuple[str, str], Any] = {}

    def model(self, package: str, function: str) -> Any:
        key = (package, function)
        if key not in self._models:
            kwargs = {} if function == "main" else {"function_name": function}
            self._models[key] = ct.models.MLModel(str(self.folder / package), compute_units=self.compute_units, **kwargs)
        return self._models[key]

    def run(self, package: str, function: str, inputs: dict[str, np.ndarray], state: Any = None) -> dict[str, np.ndarray]:
        model = self.model(package, function)
        out = model.predict(inputs, state=state) if state is not None else model.predict(inputs)
        return {k: np.asarray(v) for k, v in out.items()}

    def block(self, index: int) -> PackageBlock:
        entry = self.block_entry(index)
        first = entry["functions"]["step"][min(entry["functions"]["step"], key=int)]
        return PackageBlock(self, index, lambda package: self.model(package, first).make_state())
