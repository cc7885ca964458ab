"""Write what `swift test` reads into app/swift/Tests/Resources/generated/ (git-ignored).

- models/flow, models/label_flow: the tiny fixture models converted by `convert_model`, for the
  reference backend's parity tests;
- exports/text, exports/label: their Core ML exports (`export_coreml`), and
  exports/{text,label}.interfaces.json: every function's declared inputs and outputs as the
  saved packages state them, so the Swift tests check the manifest contract against real files;
- noise/seed7.safetensors: a noise file as `starflow invert` writes it (`save_noise`), holding
  the noise that seed 7 draws for the text model, so `generate(noise:)` is checked against
  `generate(seed:)` through a file written by Python.

Runs on Linux without PyTorch, from the repository root:

    .venv/bin/python app/swift/Tests/Resources/make_test_resources.py

Fixtures come from ../shared/fixtures beside the repository, or STARFLOW_FIXTURES.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_starflow.convert.coreml.coremltools_api import ct, quiet
from mlx_starflow.convert.coreml.export import export_coreml
from mlx_starflow.convert.model import convert_model
from mlx_starflow.noise_file import NOISE_FORMAT, save_noise
from mlx_starflow.pipeline import seeded_noise

REPO = Path(__file__).resolve().parents[4]
FIXTURES = Path(os.environ.get("STARFLOW_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()
GENERATED = Path(__file__).resolve().parent / "generated"


def declared_interfaces(export: Path) -> dict[str, dict[str, dict[str, list[int]]]]:
    """`package:function` → multi-array inputs and outputs with their shapes (states left out)."""
    interfaces = {}
    for package in sorted(export.glob("*.mlpackage")):
        description = ct.utils.load_spec(str(package)).description
        for function in description.functions or [description]:
            name = getattr(function, "name", "") or "main"
            interfaces[f"{package.name}:{name}"] = {
                side: {f.name: list(f.type.multiArrayType.shape) for f in features if f.type.WhichOneof("Type") == "multiArrayType"}
                for side, features in (("inputs", function.input), ("outputs", function.output))
            }
    return interfaces


def main() -> None:
    starflow = FIXTURES / "starflow"
    models = {
        "flow": (starflow / "model.pth", starflow / "config.yaml",
                 {"text_encoder": FIXTURES / "t5", "vae": FIXTURES / "vae"}),
        "label_flow": (starflow / "label_model" / "model.pth", starflow / "label_model" / "config.yaml", {}),
    }
    for name, (checkpoint, config, parts) in models.items():
        convert_model(checkpoint, config, GENERATED / "models" / name, force=True, **parts)
    for name, model in (("text", "flow"), ("label", "label_flow")):
        export = GENERATED / "exports" / name
        with quiet():
            export_coreml(GENERATED / "models" / model, export, dtype="float32", force=True)
        target = GENERATED / "exports" / f"{name}.interfaces.json"
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(declared_interfaces(export), indent=1, sort_keys=True) + "\n")
        os.replace(partial, target)
    (GENERATED / "noise").mkdir(exist_ok=True)
    save_noise(GENERATED / "noise" / "seed7.safetensors", seeded_noise([7], 4, 8, 8),
               {"format": NOISE_FORMAT, "model": "flow", "size": "64x64", "prompts": "[\"\"]"}, overwrite=True)
    print(f"wrote {GENERATED}")


if __name__ == "__main__":
    main()
