"""Per-stage wall time, peak RSS and MLX peak memory of one run, in its own process.

    python -m benchmarks.rehearsal.measure generate REPORT [--hub-config YAML] -- <starflow generate arguments>
    python -m benchmarks.rehearsal.measure variant REPORT CHECKPOINT YAML OUT --dtype D [--quantize B] [--tokens N]

`generate` runs the real `starflow generate` in this process and marks a stage boundary where
the app calls into each part (resolve/convert, load, encode, sample, score-step denoise, decode,
PNG). A stage ends where the next begins, so MLX's lazy work is counted where it is evaluated.
Peak RSS per stage comes from the kernel's high-water mark (VmHWM), reset at each boundary
through /proc/self/clear_refs. Each finished stage is appended to REPORT (JSON lines) at once,
so a run that is killed still leaves what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

GB = 1e9
PNG_WRITERS = ("write_image", "write")  # names the generate command has given its PNG writer


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageMeter:
    """Stages one after another; `enter` closes the running stage and starts the next."""

    def __init__(self, report: Path, label: str):
        self.report = report
        self.label = label
        self.current: str | None = None
        self.started = 0.0
        self.exact_rss = True

    def enter(self, name: str) -> None:
        if name == self.current:
            return
        self.close()
        self.exact_rss = _reset_high_water() and self.exact_rss
        mx.reset_peak_memory()
        self.current, self.started = name, time.perf_counter()

    def close(self) -> None:
        if self.current is None:
            return
        record = {
            "run": self.label,
            "stage": self.current,
            "wall_s": round(time.perf_counter() - self.started, 2),
            "peak_rss_gb": round(_status_kib("VmHWM") * 1024 / GB, 3),
            "mlx_peak_gb": round(mx.get_peak_memory() / GB, 3),
            "rss_after_gb": round(_status_kib("VmRSS") * 1024 / GB, 3),
            "peak_rss_exact": self.exact_rss,
        }
        with self.report.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[rehearsal] {self.label} {record['stage']}: {record['wall_s']} s, peak RSS {record['peak_rss_gb']} GB, "
              f"MLX peak {record['mlx_peak_gb']} GB", file=sys.stderr, flush=True)
        self.current = None


def _at_call(meter: StageMeter, stage: str, function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        meter.enter(stage)
        return function(*args, **kwargs)

    return wrapped


def _at_generator(meter: StageMeter, stage: str, function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapped(*args, **kwargs) -> Iterator:
        meter.enter(stage)
        yield from function(*args, **kwargs)

    return wrapped


def run_generate(report: Path, label: str, argv: list[str], hub_config: Path | None) -> int:
    """`starflow generate ARGV` with a stage boundary at each part the app calls."""
    from mlx_starflow.app.cli import main
    from mlx_starflow.app.commands import generate
    from mlx_starflow.convert import hub
    from mlx_starflow.flow import StarFlow
    from mlx_starflow.pipeline import StarFlowPipeline

    meter = StageMeter(report, label)
    if hub_config is not None:  # a scaled-down rehearsal: the shipped 3B YAML would not fit its checkpoint
        model = hub.HUB_MODELS[hub.DEFAULT_MODEL]
        model.__class__.config_path = lambda self: hub_config  # type: ignore[method-assign]
    generate.resolve_model = _at_call(meter, "convert", generate.resolve_model)
    generate.load = _at_call(meter, "load", generate.load)
    for name in PNG_WRITERS:  # the app's PNG writer; without one, writing counts in decode
        if hasattr(generate, name):
            setattr(generate, name, _at_call(meter, "png", getattr(generate, name)))
    StarFlowPipeline.encode_distinct = _at_call(meter, "encode", StarFlowPipeline.encode_distinct)
    StarFlowPipeline.decode = _at_call(meter, "decode", StarFlowPipeline.decode)
    StarFlow.iter_sample = _at_generator(meter, "sample", StarFlow.iter_sample)
    StarFlow.denoise = _at_call(meter, "denoise", StarFlow.denoise)
    try:
        return main(["generate", *argv])
    finally:
        meter.close()


def run_variant(report: Path, label: str, checkpoint: Path, yaml: Path, out: Path, dtype: str, quantize: int | None,
                tokens: int, text_tokens: int, seed: int = 0) -> int:
    """Convert the flow alone at `dtype`/`quantize`, load it, and sample a 1×`tokens` latent with
    guidance (CFG rows) after a `text_tokens` text prefix of random states.

    The prefix is short on purpose: MLX's CPU kernels for bfloat16 and quantised weights are
    slow enough that the full 128-token prefix would take most of an hour; memory is set by the
    weights, which are loaded in full.
    """
    import numpy as np

    from mlx_starflow.convert.hub import checkpoint_digest
    from mlx_starflow.convert.model import convert_model
    from mlx_starflow.flow import load_flow

    meter = StageMeter(report, label)
    try:
        digest = checkpoint_digest(checkpoint)
        meter.enter("convert")
        convert_model(checkpoint, yaml, out, dtype=dtype, quantize=quantize, force=True, source_sha256=digest)
        meter.enter("load")
        flow = load_flow(out)
        mx.eval(flow.parameters())
        meter.enter(f"sample {tokens} tokens after {text_tokens} text tokens")
        config = flow.config
        rng = np.random.default_rng(seed)
        noise = mx.array(rng.standard_normal((1, config.in_channels, 1, tokens)).astype(np.float32))
        y = mx.array(rng.standard_normal((2, text_tokens, config.txt_dim)).astype(np.float32) * 0.1)
        samples = flow.sample(noise, y, guidance=3.6)
        mx.eval(samples)
    finally:
        meter.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rehearsal.measure")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate")
    gen.add_argument("report", type=Path)
    gen.add_argument("--label", default="generate")
    gen.add_argument("--hub-config", type=Path)
    var = commands.add_parser("variant")
    for name in ("report", "checkpoint", "yaml", "out"):
        var.add_argument(name, type=Path)
    var.add_argument("--label", required=True)
    var.add_argument("--dtype", required=True)
    var.add_argument("--quantize", type=int)
    var.add_argument("--tokens", type=int, default=2)
    var.add_argument("--text-tokens", type=int, default=4)
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # what follows `--` goes to `starflow generate`
    args = parser.parse_args(argv[:split])
    if args.command == "generate":
        return run_generate(args.report, args.label, argv[split + 1 :], args.hub_config)
    return run_variant(args.report, args.label, args.checkpoint, args.yaml, args.out, args.dtype, args.quantize, args.tokens, args.text_tokens)


if __name__ == "__main__":
    sys.exit(main())
