"""Check a Core ML export on this Mac: error against MLX (and the official fixtures) and latency.

`make coreml-check` runs it (macOS 15+, the coreml extra installed). It exports a small model
(the tiny fixture model when ../shared/fixtures is present, else the shipped demo model
`weights/demo`), runs every stage of the export through Core ML on each compute unit (ALL,
CPU_AND_GPU, CPU_AND_NE, CPU_ONLY) with the same inputs as MLX, and prints one table: the max
|Δ| against MLX and against the official outputs, the float16 budget the tests hold the
exporter to, and the median latency per call. Elsewhere it stops at once: Core ML prediction
needs macOS 15+.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
GUIDANCE = 2.5
JACOBI_BLOCK = 16
FLOAT16_BUDGETS = {"text encoder": 2e-2, "flow sequential": 5e-2, "flow jacobi": 5e-2, "score step": 1e-2, "vae decoder": 1e-2}
"""Max |Δ| of the float16 export against float32 MLX, as measured and justified in tests/test_coreml_export.py."""


@dataclass
class Stage:
    """One stage to check: how to run it on a backend, and what to compare with."""

    name: str
    run: Callable[[object], np.ndarray]
    mlx: np.ndarray
    official: np.ndarray | None = None
    timing_keys: tuple[str, ...] = ()


@dataclass
class Check:
    export: Path
    manifest: dict
    stages: list[Stage] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    unit: str
    stage: str
    vs_mlx: float
    vs_official: float | None
    budget: float | None
    median_ms: float
    calls: int


def tiny_fixture_model(fixtures: Path, work: Path) -> Path:
    """The fixture flow, T5 and VAE converted into one model folder."""
    from mlx_starflow.convert.model import convert_model

    return convert_model(fixtures / "starflow" / "model.pth", fixtures / "starflow" / "config.yaml", work / "tiny",
                         text_encoder=fixtures / "t5", vae=fixtures / "vae")


def find_model(fixtures: Path | None, work: Path) -> Path:
    if fixtures is not None:
        return tiny_fixture_model(fixtures, work)
    demo = REPO / "weights" / "demo"
    if not (demo / "flow").is_dir():
        raise SystemExit(f"no model to check: {demo} is missing and no fixtures were found; pass --model")
    return demo


def prepare(model_dir: Path, export: Path, fixtures: Path | None) -> Check:
    """Export (unless `export` already holds one) and compute every stage's MLX reference."""
    from mlx_starflow.convert.coreml.export import export_coreml
    from mlx_starflow.convert.coreml.manifest import MANIFEST_FILE, read_manifest
    from mlx_starflow.convert.coreml.pipeline import sample
    from mlx_starflow.flow import load_flow
    from mlx_starflow.samplers import Jacobi

    if not (export / MANIFEST_FILE).is_file():
        export_coreml(model_dir, export, jacobi_block_sizes=(JACOBI_BLOCK,), force=export.exists())
    manifest = read_manifest(export)
    check = Check(export, manifest)
    condition = manifest["condition"]
    official = official_inputs(fixtures) if fixtures is not None and condition and condition["kind"] == "text" else {}
    flow = load_flow(model_dir)
    latent = manifest["latent"]
    noise = official.get("noise")
    if noise is None:
        noise = np.random.RandomState(0).standard_normal((1, latent["channels"], latent["height"], latent["width"])).astype(np.float32)
    if condition and condition["kind"] == "labels":
        cond = np.eye(condition["dim"], dtype=np.float32)[[0, condition["dim"] - 1]][:, None, :]
    elif condition:
        states = text_stage(check, model_dir, official)
        cond = official.get("cond", states)
    else:
        cond = None

    y = None if cond is None else mx.array(cond)
    sequential = np.array(flow.sample(mx.array(noise), y, guidance=GUIDANCE))
    jacobi = np.array(flow.sample(mx.array(noise), y, guidance=GUIDANCE, sampler=Jacobi(JACOBI_BLOCK)))
    check.stages.append(Stage("flow sequential", lambda b: sample(manifest, b.block, noise, cond, GUIDANCE)[0][-1],
                              sequential, official.get("sequential"), ("block",)))
    check.stages.append(Stage("flow jacobi", lambda b: sample(manifest, b.block, noise, cond, GUIDANCE, Jacobi(JACOBI_BLOCK))[0][-1],
                              jacobi, None, ("block",)))
    if manifest["score_step"]:
        before = official.get("denoise_in", sequential)
        text = None if cond is None else cond[:1]
        denoised = np.array(flow.denoise(mx.array(before), None if text is None else mx.array(text)))
        check.stages.append(Stage("score step", lambda b: b.denoise(before, text), denoised, official.get("denoise_out"), ("score_step",)))
    if manifest["vae"]:
        from mlx_starflow.vae import load_vae

        image = np.array(load_vae(model_dir / "vae").decode(mx.array(sequential)))
        check.stages.append(Stage("vae decoder", lambda b: b.decode(sequential), image, None, ("vae_decoder",)))
    return check


def official_inputs(fixtures: Path) -> dict[str, np.ndarray]:
    """Image 0 of the official fixtures: noise, [conditional; unconditional] states, its guided
    sample, its score step, and the T5 ids/states of the same caption and of ""."""
    def load(path: Path) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in mx.load(str(path)).items()}

    inputs, samples = load(fixtures / "starflow" / "inputs.safetensors"), load(fixtures / "starflow" / "sample.safetensors")
    denoise, t5 = load(fixtures / "starflow" / "denoise.safetensors"), load(fixtures / "t5" / "fixtures.safetensors")
    return {
        "noise": inputs["noise"][:1], "cond": inputs["y_cfg"][[0, 2]], "sequential": samples["g2p5.seq.6"][:1],
        "denoise_in": denoise["sample_g2p5.in"][:1], "denoise_out": denoise["sample_g2p5.out"][:1],
        "ids": t5["cfg.input_ids"][[0, 2]].astype(np.int32), "mask": t5["cfg.attention_mask"][[0, 2]].astype(np.int32),
        "states": t5["cfg.text_states"][[0, 2]],
    }


def text_stage(check: Check, model_dir: Path, official: dict[str, np.ndarray]) -> np.ndarray:
    """Adds the text-encoder stage; returns the MLX states of [prompt; empty prompt]."""
    from mlx_starflow.text_encoder import load_text_encoder

    encoder = load_text_encoder(model_dir / "text_encoder")
    if official:
        ids, mask = official["ids"], official["mask"]
    else:
        ids_mx, mask_mx = encoder.tokenize(["a red panda in the snow", ""], check.manifest["condition"]["length"])
        ids, mask = np.array(ids_mx, np.int32), np.array(mask_mx, np.int32)
    states = np.array(mx.where(mx.array(mask)[..., None] != 0, encoder.encoder(mx.array(ids), mx.array(mask)), 0.0))

    def run(backend) -> np.ndarray:
        return np.concatenate([backend.encode_text(ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))])

    check.stages.append(Stage("text encoder", run, states, official.get("states"), ("text_encoder",)))
    return states


def run_stages(check: Check, backend, unit: str) -> list[Row]:
    """Every stage on one backend: errors and the median wall time per call of its functions."""
    rows = []
    for stage in check.stages:
        backend.per_call_seconds.clear()
        out = stage.run(backend)
        times = [t for key, values in backend.per_call_seconds.items() if key.startswith(stage.timing_keys) for t in values]
        vs_official = float(np.abs(out - stage.official).max()) if stage.official is not None else None
        rows.append(Row(unit, stage.name, float(np.abs(out - stage.mlx).max()), vs_official,
                        FLOAT16_BUDGETS.get(stage.name) if check.manifest["precision"] == "float16" else None,
                        1000 * statistics.median(times) if times else float("nan"), len(times)))
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'compute unit':<13} {'stage':<28} {'max|Δ| MLX':>11} {'max|Δ| official':>16} {'budget':>8} {'ms/call':>9} {'calls':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        official = f"{r.vs_official:.2e}" if r.vs_official is not None else "-"
        budget = f"{r.budget:.0e}" if r.budget is not None else "-"
        flag = "" if r.budget is None or r.vs_mlx <= r.budget else "  over budget"
        lines.append(f"{r.unit:<13} {r.stage:<28} {r.vs_mlx:>11.2e} {official:>16} {budget:>8} {r.median_ms:>9.2f} {r.calls:>6}{flag}")
    return "\n".join(lines)


def state_sharing(export: Path, manifest: dict, unit: str) -> str:
    """Whether this device runs one Core ML state shared by a block's functions (what the Swift
    package tries first): a state made by `step_1`, used by the deep block's `prefill` (or the
    largest step). Refused means the Swift package needs an export made with --state-fallback."""
    from mlx_starflow.convert.coreml.coremltools_api import ct

    block = manifest["flow"]["blocks"][-1]
    package = str(export / block["packages"][0])
    steps = block["functions"]["step"]
    owner = ct.models.MLModel(package, compute_units=getattr(ct.ComputeUnit, unit), function_name=steps[min(steps, key=int)])
    other_name = block["functions"].get("prefill") or steps[max(steps, key=int)]
    other = ct.models.MLModel(package, compute_units=getattr(ct.ComputeUnit, unit), function_name=other_name)
    inputs = {}
    described = next(f for f in other.get_spec().description.functions if f.name == other_name)
    for feature in described.input:
        shape = tuple(feature.type.multiArrayType.shape)
        inputs[feature.name] = np.zeros(shape, np.int32 if feature.name == block["inputs"]["position"] else np.float32)
    try:
        other.predict(inputs, state=owner.make_state())
    except Exception as error:  # noqa: BLE001 - any refusal is the answer being reported
        fallback = "the export has the --state-fallback twins" if "cache_io" in block else "export with --state-fallback"
        return f"{unit}: shared state refused ({type(error).__name__}: {error}); {fallback}"
    return f"{unit}: shared state across {block['packages'][0]} functions works"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Converted model folder (default: tiny fixture model, else weights/demo).")
    parser.add_argument("--export", type=Path, help="Reuse or write the export here (default: a temporary folder).")
    parser.add_argument("--units", nargs="+", default=list(COMPUTE_UNITS), choices=COMPUTE_UNITS)
    args = parser.parse_args(argv)

    from mlx_starflow.convert.coreml.coremltools_api import CoreMLUnavailable, require_prediction

    try:
        require_prediction()
    except CoreMLUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from mlx_starflow.convert.coreml.backends import CoreMLBackend

    fixtures = REPO.parent / "shared" / "fixtures"
    fixtures = fixtures if fixtures.is_dir() and args.model is None else None
    with tempfile.TemporaryDirectory(prefix="starflow-coreml-check-") as tmp:
        model = args.model or find_model(fixtures, Path(tmp))
        check = prepare(model, args.export or Path(tmp) / "export", fixtures)
        rows = []
        for unit in args.units:
            rows += run_stages(check, CoreMLBackend(check.export, unit), unit)
            print(format_table([r for r in rows if r.unit == unit]), flush=True)
            print(state_sharing(check.export, check.manifest, unit), flush=True)
    over = [r for r in rows if r.budget is not None and r.vs_mlx > r.budget]
    print(f"\n{len(over)} of {len(rows)} results over the float16 budget" if over else f"\nall {len(rows)} results within budget")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
