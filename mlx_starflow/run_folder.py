"""A training run folder: checkpoints committed as one unit, and resuming from the latest.

`RUN/checkpoints/step-N/` holds one checkpoint: `model/` (a loadable model folder: flow,
condition and carried frozen components, with a manifest naming the parent model, data and
command) and `optimizer/` (the AdamW state and the run's settings), under a manifest of its
own. It is written in a temporary folder and renamed into place whole; then the pointer
`RUN/latest` (a symbolic link) is swapped to it atomically, and older checkpoints go. So an
interruption at any instant leaves `latest` on a complete checkpoint, and `--resume` goes on
from it. `RUN/model` and `RUN/optimizer` are fixed links through `latest`; `RUN/run.json`
marks the folder as a run of ours (what `--force` may start over); `RUN/samples/` holds the
sample grids. A run holds an exclusive lock on `RUN/.run.lock` while it writes, so two runs
into one folder never both go on; the lock ends with the process, however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .config import FlowConfig, LabelConfig, read_json_object
from .errors import ConfigError, OutputExists
from .flow import StarFlow
from .labels import LabelEncoder
from .model_folder import read_model_folder
from .model_io import FORMAT_NAME, MODEL_KIND, atomic_folder, is_stale_temporary, read_manifest, read_marker, save_weights, write_manifest

MODEL_FOLDER, OPTIMIZER_FOLDER, SAMPLES_FOLDER = "model", "optimizer", "samples"
CHECKPOINTS_FOLDER, LATEST, RUN_FILE, LOCK_FILE = "checkpoints", "latest", "run.json", ".run.lock"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"
RUN_KIND, CHECKPOINT_KIND = "starflow.training_run", "starflow.checkpoint"
CARRIED_COMPONENTS = ("text_encoder", "vae", "decoder")
"""Frozen components of a parent model, copied unchanged into every checkpoint."""
T = TypeVar("T")


def is_run_folder(out: Path) -> bool:
    """Whether `out` is a training run folder of ours (its `run.json` says so); a damaged,
    oversized or non-regular `run.json` (a FIFO) is not ours and is never waited on."""
    marker = read_marker(out / RUN_FILE)
    return marker is not None and marker.get("format") == FORMAT_NAME and marker.get("kind") == RUN_KIND


def check_new_run(out: Path, force: bool) -> None:
    """Refuse a new run in a folder that holds anything, unless `force` and it is a run of ours."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise OutputExists(f"{out} is not a folder (a file or a broken link); choose another --out")
    if out.exists() and any(path.name != LOCK_FILE for path in out.iterdir()):
        if not force:
            raise OutputExists(f"{out} already exists; pass --resume to continue that run or --force to start over")
        if not is_run_folder(out):
            raise OutputExists(f"{out} is not a training run folder (no {RUN_FILE} of ours), so --force will not empty it; "
                               "remove it yourself or choose another --out")


@contextlib.contextmanager
def claimed_run(out: Path, check: Callable[[], T]) -> Iterator[T]:
    """Hold the run folder `out` for this run alone while the body runs; yields what `check` returns.

    `check` refuses a folder this run may not write (`check_new_run`, or reading the state to
    resume); it runs before anything is created, so a refused folder of the user's is left as it
    was, and again once the lock is held, since another run may have changed the folder in
    between. A second run into the same folder is refused at once. If the body fails (an
    interruption during setup included) before a checkpoint is committed in a folder this run
    created, the folder is removed again.
    """
    check()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.mkdir()
        created = True
    except FileExistsError:
        created = False
    with _locked(out):
        try:
            yield check()
        except BaseException:
            if created and not (out / LATEST).is_symlink():
                shutil.rmtree(out, ignore_errors=True)  # under the lock: a run waiting for it then refuses
            raise


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on `out/.run.lock`, taken without waiting; the OS releases it when the
    process ends, so a killed run never leaves a stale lock."""
    path = out / LOCK_FILE
    in_use = f"{out} is in use by another training run; wait for it to finish or choose another --out"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OutputExists(f"{path} is a symbolic link, not our lock file; remove it and run again") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputExists(f"{path} is not a regular file, so it is not our lock file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExists(in_use) from None
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:  # the folder was removed and made again by another run meanwhile
            raise OutputExists(in_use)
        yield
    finally:
        os.close(fd)


def start_run(out: Path) -> None:
    """Make the claimed folder `out` a fresh run folder (checked by `check_new_run`): our
    checkpoints and samples go, nothing else in it is touched, and the marker is written."""
    for name in (LATEST, MODEL_FOLDER, OPTIMIZER_FOLDER, CHECKPOINTS_FOLDER, SAMPLES_FOLDER):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    marker = {"format": FORMAT_NAME, "kind": RUN_KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = out / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, out / RUN_FILE)  # replaces whatever stood there (even a FIFO) without opening it


def save_checkpoint(out: Path, model: StarFlow, optimizer: optim.Optimizer, state: dict[str, Any], training: dict[str, Any],
                    source: dict[str, Any], labels: LabelEncoder | None, parent: Path | None) -> Path:
    """Commit checkpoint `state["step"]` as one unit and point `latest` at it; returns `RUN/model`.

    `source` is the parent's provenance, `labels` the class vocabulary of a label model, and
    `parent` the model folder whose frozen components are carried over.
    """
    provenance = {**source, "training_command": training.get("command")}
    step_folder = out / CHECKPOINTS_FOLDER / f"step-{state['step']:06d}"
    with atomic_folder(step_folder, force=True, kind=CHECKPOINT_KIND) as unit:
        tmp = unit / MODEL_FOLDER
        (tmp / "flow").mkdir(parents=True)
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
        (unit / OPTIMIZER_FOLDER).mkdir()
        mx.save_safetensors(str(unit / OPTIMIZER_FOLDER / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (unit / OPTIMIZER_FOLDER / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        write_manifest(unit, CHECKPOINT_KIND, step=state["step"])
    _point(out / LATEST, Path(CHECKPOINTS_FOLDER) / step_folder.name)
    for name in (MODEL_FOLDER, OPTIMIZER_FOLDER):
        target = Path(LATEST) / name
        if not ((out / name).is_symlink() and os.readlink(out / name) == str(target)):
            _point(out / name, target)
    _remove_old_checkpoints(out, step_folder.name)
    return out / MODEL_FOLDER


def _point(link: Path, target: Path) -> None:
    """Make `link` a symbolic link to `target` atomically: a new link renamed over the old one."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _remove_old_checkpoints(out: Path, keep: str) -> None:
    """Checkpoints other than the latest, and temporaries of killed runs, once `latest` has moved on."""
    for path in (out / CHECKPOINTS_FOLDER).iterdir():
        if path.name.startswith("step-") and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
        elif is_stale_temporary(path):
            shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a frozen component's file (a T5-XL is gigabytes), copying across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_run_state(out: Path) -> dict[str, Any]:
    """The state of a run folder's latest checkpoint, checked to be complete and consistent."""
    latest = out / LATEST
    if not latest.is_dir():
        if (out / MODEL_FOLDER).is_dir() and not (out / MODEL_FOLDER).is_symlink():
            raise ConfigError(f"{out} was written by an older mlx-starflow (no {LATEST} checkpoint pointer); start a new run")
        raise ConfigError(f"{out} holds no training checkpoint ({LATEST}/ pointing at {CHECKPOINTS_FOLDER}/step-N); start a run with --out instead")
    read_manifest(latest)
    state = read_json_object(latest / OPTIMIZER_FOLDER / STATE_FILE, "start a new run")
    trained = read_model_folder(latest / MODEL_FOLDER).manifest.get("training")
    trained = trained if isinstance(trained, dict) else {}
    if trained.get("step") != state.get("step"):
        raise ConfigError(f"{out}: the latest checkpoint's model is at step {trained.get('step')} but its optimizer state at step "
                          f"{state.get('step')}; start a new run")
    if not (type(state.get("step")) is int and state["step"] >= 0
            and all(type(state.get(key)) in (int, float) and state[key] >= 0 for key in ("train_seconds", "wall_seconds"))):
        raise ConfigError(f"{latest / OPTIMIZER_FOLDER / STATE_FILE} is damaged (its step and times); start a new run")
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
