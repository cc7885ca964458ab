"""A training run folder: checkpoints that are loadable model folders, and resuming from them.

`RUN/model/` is the latest checkpoint (flow, condition and carried frozen components, with a
manifest naming the parent model, data and command), `RUN/optimizer/` the AdamW state and the
run's settings, `RUN/samples/` the sample grids. Each checkpoint part is written atomically and
the two parts must agree on the step, so an interrupted checkpoint is detected on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .config import FlowConfig, LabelConfig, read_json_object
from .errors import ConfigError
from .flow import StarFlow
from .labels import LabelEncoder
from .model_io import MODEL_KIND, atomic_folder, read_manifest, save_weights, write_manifest

MODEL_FOLDER, OPTIMIZER_FOLDER, SAMPLES_FOLDER = "model", "optimizer", "samples"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"
CARRIED_COMPONENTS = ("text_encoder", "vae", "decoder")
"""Frozen components of a parent model, copied unchanged into every checkpoint."""


def save_checkpoint(out: Path, model: StarFlow, optimizer: optim.Optimizer, state: dict[str, Any], training: dict[str, Any],
                    source: dict[str, Any], labels: LabelEncoder | None, parent: Path | None) -> Path:
    """Write `out/model/` (a loadable model folder) then `out/optimizer/`, each atomically.

    `source` is the parent's provenance, `labels` the class vocabulary of a label model, and
    `parent` the model folder whose frozen components are carried over.
    """
    provenance = {**source, "training_command": training.get("command")}
    with atomic_folder(out / MODEL_FOLDER, force=True) as tmp:
        (tmp / "flow").mkdir()
        model.config.save(tmp / "flow")
        save_weights(tmp / "flow", model)
        write_manifest(tmp / "flow", FlowConfig.KIND, sources=[provenance], training_step=state["step"])
        components = ["flow"]
        if labels is not None:
            (tmp / "labels").mkdir()
            LabelConfig(labels=labels.labels).save(tmp / "labels")
            write_manifest(tmp / "labels", LabelConfig.KIND, sources=[training["data"]])
            components.append("labels")
        for name in CARRIED_COMPONENTS:
            if parent is not None and (parent / name).is_dir():
                shutil.copytree(parent / name, tmp / name, copy_function=_link_or_copy)
                components.append(name)
        write_manifest(tmp, MODEL_KIND, sources=[provenance], components=components, training=training)
    with atomic_folder(out / OPTIMIZER_FOLDER, force=True) as tmp:
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return out / MODEL_FOLDER


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a frozen component's file (a T5-XL is gigabytes), copying across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_run_state(out: Path) -> dict[str, Any]:
    """The state of a run folder's last checkpoint, checked to be complete and consistent."""
    state_path = out / OPTIMIZER_FOLDER / STATE_FILE
    if not state_path.is_file() or not (out / MODEL_FOLDER).is_dir():
        raise ConfigError(f"{out} holds no training checkpoint ({MODEL_FOLDER}/ and {OPTIMIZER_FOLDER}/{STATE_FILE}); start a run with --out instead")
    state = read_json_object(state_path, "start a new run")
    trained = read_manifest(out / MODEL_FOLDER).get("training", {})
    if trained.get("step") != state.get("step"):
        raise ConfigError(
            f"{out}: the model is at step {trained.get('step')} but the optimizer state at step {state.get('step')} "
            f"(a checkpoint was interrupted); start a new run"
        )
    return state


def check_resumable(out: Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
    """A resumed run must have the model config, classes, data and settings it was started with."""
    for key, value in expected.items():
        if state.get(key) == value:
            continue
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            diffs = [f"{k}: {state[key].get(k)!r} there, {value.get(k)!r} now" for k in sorted(set(value) | set(state[key]))
                     if state[key].get(k) != value.get(k)]
            detail = "; ".join(diffs[:4])
        else:
            detail = "it differs"
        raise ConfigError(f"{out} was trained with a different {key.replace('_', ' ')} ({detail}); resume with that run's options or start a new run")


def restore_optimizer(optimizer: optim.Optimizer, model: StarFlow, folder: Path) -> None:
    """Load the saved AdamW state; it must cover exactly the model's parameters."""
    saved = mx.load(str(folder / OPTIMIZER_FILE))
    expected = {k for k, _ in tree_flatten(optimizer.state)}
    if set(saved) != expected:
        raise ConfigError(f"{folder / OPTIMIZER_FILE} does not match this model's parameters; start a new run")
    optimizer.state = tree_unflatten(list(saved.items()))
    optimizer.init(model.trainable_parameters())
