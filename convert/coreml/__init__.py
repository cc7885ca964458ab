"""Core ML export of converted STARFlow models, built with coremltools' MIL builder (no PyTorch).

Importing this package needs the optional `coreml` extra (coremltools); generating images
with MLX never does. The library entry is `export_coreml(model_dir, out, ...)`; the exported
folder's `manifest.json` is the contract with the Swift package.
"""

from .export import export_coreml

__all__ = ["export_coreml"]
