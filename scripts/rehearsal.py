#!/usr/bin/env python3
"""The first run, rehearsed at full size without the real weights (`make rehearsal`; a developer tool).

    python scripts/rehearsal.py [--size 64] [--out build/rehearsal] [--variant-tokens 2] [--no-variants]

1. Writes synthetic files in the layouts of the real releases (benchmarks/rehearsal/synthetic.py):
   a STARFlow 3B `.pth` (bfloat16 storages), flan-t5-xl as two float32 safetensors shards with
   their index, sd-vae-ft-ema in the diffusers 0.4.2 layout. They are kept under
   OUT/synthetic/<sizes digest>/ and reused by the next run.
2. Lays them out as a Hugging Face cache (HF_HOME=OUT/hf) under the real repository ids.
3. Runs `starflow generate PROMPT --offline` in float32 against that cache (the converted model
   goes to STARFLOW_HOME=OUT/starflow-home): convert, load, encode, sample, score-step
   denoise, decode, PNG, each stage timed with its peak RSS and MLX peak memory.
4. Converts and loads the bfloat16, 8-bit and 4-bit flows and samples a few tokens with each,
   to measure their memory (each converted variant is deleted afterwards to save disk).
5. Writes OUT/report.json and prints the per-stage table.

Sampling is token by token (--sequential): with random weights Jacobi iteration's number of
passes is arbitrary, so a fixed token count keeps the time predictable. Run it with nothing
else heavy on the machine: the float32 flow alone is 15.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rehearsal import synthetic  # noqa: E402
from benchmarks.rehearsal.hf_cache import place_repo  # noqa: E402
from benchmarks.rehearsal.report import read_stages, table, write_report  # noqa: E402

SHIPPED_YAML = ROOT / "convert" / "configs" / "starflow_3B_t2i_256x256.yaml"
TOKENIZER_TEMPLATE = Path(os.environ.get("STARFLOW_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "t5" / "tokenizer.json"
CHECKPOINT = "starflow_3B_t2i_256x256.pth"
REPOS = {"apple/starflow": "starflow", "google/flan-t5-xl": "flan-t5-xl", "stabilityai/sd-vae-ft-ema": "sd-vae-ft-ema"}
VARIANTS = (("bfloat16", None), ("bfloat16", 8), ("bfloat16", 4))
MARKER = "complete.json"


def build_synthetic(folder: Path, spec: synthetic.Spec, log) -> list[dict]:
    """Write each repository's files unless a previous run finished them; returns build stages."""
    stages = []
    builders = {
        "starflow": lambda out: synthetic.write_starflow(out / CHECKPOINT, spec.flow),
        "flan-t5-xl": lambda out: synthetic.write_t5(out, spec.t5, TOKENIZER_TEMPLATE, spec.t5_shard_bytes),
        "sd-vae-ft-ema": lambda out: synthetic.write_vae(out, spec.vae),
    }
    for name, build in builders.items():
        out = folder / name
        if (out / MARKER).is_file():
            log(f"reusing synthetic {name} in {out}")
            continue
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        log(f"writing synthetic {name} into {out}")
        started = time.perf_counter()
        build(out)
        seconds = round(time.perf_counter() - started, 1)
        files = dict(synthetic.sizes(out))
        (out / MARKER).write_text(json.dumps({"seconds": seconds, "files": files}, indent=1))
        stages.append({"run": "synthesize", "stage": name, "wall_s": seconds, "bytes": sum(files.values())})
    return stages


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def measured(command: list[str], env: dict[str, str], log_file: Path, timeout: float | None) -> dict:
    """Run one measured process (it appends its own stage records); its wall time and exit status."""
    started = time.perf_counter()
    with log_file.open("a") as log:
        try:
            status = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    return {"exit": status, "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels (64: 64 latent tokens; 256: the full 1024).")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "rehearsal", help="Where the files, PNG and report.json go.")
    parser.add_argument("--prompt", default="a film still of a cat playing piano", help="The prompt of the generated image.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the image's noise.")
    parser.add_argument("--variant-tokens", type=int, default=2, help="Image tokens each bfloat16/8-bit/4-bit variant samples.")
    parser.add_argument("--variant-timeout", type=float, default=1200, help="Seconds after which a variant's run is stopped.")
    parser.add_argument("--no-variants", action="store_true", help="Only the float32 first run.")
    parser.add_argument("--keep-variants", action="store_true", help="Keep the converted variants (about 14 GB at full size).")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full", help=argparse.SUPPRESS)  # tiny: a quick check of the path
    args = parser.parse_args(argv)

    spec = synthetic.Spec.full() if args.scale == "full" else synthetic.Spec.tiny()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "log.txt"

    def log(message: str) -> None:
        print(f"[rehearsal] {message}", flush=True)
        with log_file.open("a") as f:
            f.write(f"[rehearsal] {message}\n")

    started = time.perf_counter()
    synthetic_folder = out / "synthetic" / f"{args.scale}-{spec.key()}"
    stages = build_synthetic(synthetic_folder, spec, log)
    yaml = synthetic_folder / "config.yaml"
    yaml.write_text(synthetic.official_yaml(SHIPPED_YAML.read_text(), spec.flow))

    hf_home = out / "hf"
    for repo_id, name in REPOS.items():
        place_repo(hf_home / "hub", repo_id, synthetic_folder / name)
    home = out / "starflow-home"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "STARFLOW_HOME": str(home),
           "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    python = sys.executable

    report_lines = out / "stages.jsonl"
    report_lines.unlink(missing_ok=True)
    png = out / f"rehearsal-{args.size}px.png"
    generate = [python, "-m", "benchmarks.rehearsal.measure", "generate", str(report_lines), "--label", f"generate float32 {args.size}px"]
    if args.scale != "full":
        generate += ["--hub-config", str(yaml)]
    generate += ["--", args.prompt, "--offline", "--dtype", "float32", "--width", str(args.size), "--height", str(args.size),
                 "--seed", str(args.seed), "--sequential", "--batch-size", "1", "--output", str(png), "--force"]
    log(f"running starflow generate (float32, {args.size}x{args.size}) against {hf_home}")
    runs = {"generate": measured(generate, env, log_file, None)}

    converted = sorted(path for path in (home / "models").glob("*") if path.is_dir()) if (home / "models").is_dir() else []
    checkpoint = synthetic_folder / "starflow" / CHECKPOINT
    if not args.no_variants:
        for dtype, bits in VARIANTS:
            label = f"{dtype}" + (f" {bits}-bit" if bits else "")
            folder = out / "variants" / label.replace(" ", "-")
            command = [python, "-m", "benchmarks.rehearsal.measure", "variant", str(report_lines), str(checkpoint), str(yaml),
                       str(folder), "--label", label, "--dtype", dtype, "--tokens", str(args.variant_tokens)]
            if bits:
                command += ["--quantize", str(bits)]
            log(f"measuring the {label} flow ({args.variant_tokens} tokens)")
            runs[label] = measured(command, env, log_file, args.variant_timeout)
            if folder.exists():
                runs[label]["converted_bytes"] = folder_bytes(folder)
                if not args.keep_variants:
                    shutil.rmtree(folder)

    stages += read_stages(report_lines)
    disk = {
        "synthetic": folder_bytes(synthetic_folder),
        "converted": {path.name: folder_bytes(path) for path in converted},
        "variants": {label: run["converted_bytes"] for label, run in runs.items() if "converted_bytes" in run},
    }
    report = write_report(
        out / "report.json", stages,
        scale=args.scale, size=args.size, prompt=args.prompt, seed=args.seed, variant_tokens=args.variant_tokens,
        runs=runs, disk_bytes=disk, png=str(png) if png.exists() else None, total_s=round(time.perf_counter() - started, 1),
    )
    print(table([s for s in stages if "peak_rss_gb" in s]))
    peak = report["largest_peak"]
    if peak:
        print(f"largest peak: {peak['peak_rss_gb']:.2f} GB RSS ({peak['run']}, {peak['stage']})")
    failed = {label: run["exit"] for label, run in runs.items() if run["exit"] != 0}
    if failed:
        print(f"failed runs: {failed}; see {log_file}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'report.json'}" + (f" and {png}" if png.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
