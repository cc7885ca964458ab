"""The one module that imports coremltools and reaches into its internal APIs.

coremltools is an optional extra (`mlx-starflow[coreml]`): generating images never needs it.
Importing it on Linux prints harmless warnings about its missing native runtime, and its
converter draws progress bars for every pass; both are silenced here. Re-reading a saved
package as a MIL program uses the internal milproto loader, so the tests check what was
written to disk rather than what was built in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

from mlx_starflow.errors import StarFlowError


class CoreMLUnavailable(StarFlowError):
    """coremltools is not installed, or Core ML prediction is impossible on this machine."""


logging.getLogger("coremltools").setLevel(logging.ERROR)
try:
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, Var, types
    from coremltools.converters.mil.mil.types.type_mapping import np_int4_dtype, nptype_from_builtin, string_to_builtin
except ImportError:  # pragma: no cover - exercised only without the extra
    raise CoreMLUnavailable("Core ML export needs coremltools: pip install 'mlx-starflow[coreml]' (no PyTorch is needed)") from None

TARGETS = {"macOS15": ct.target.macOS15, "iOS18": ct.target.iOS18}
OPSET = ct.target.iOS18
"""Stateful models, `read_state` and the fused attention op all need the iOS 18 / macOS 15 opset."""

__all__ = ["CoreMLUnavailable", "Function", "OPSET", "Program", "TARGETS", "Var", "ct", "cto", "load_program", "mb", "np_int4_dtype",
           "palette_index_dtype", "quiet", "require_prediction", "types"]


def palette_index_dtype(nbits: int) -> type:
    """coremltools' NumPy dtype for n-bit palette indices (uint4, uint6 are its own sub-byte types)."""
    return nptype_from_builtin(string_to_builtin(f"uint{nbits}"))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow the converter's per-pass progress bars (errors still raise)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_program(package: str | Path) -> Program:
    """A saved `.mlpackage` re-read as a MIL program (every function, compressed weights included)."""
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return load(model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


def require_prediction() -> None:
    """Core ML runs models only on macOS 15 or later; say so before trying."""
    if platform.system() != "Darwin":
        raise CoreMLUnavailable(f"Core ML prediction needs macOS 15+; this is {platform.system()}. Export here, then run the check on a Mac")
    major = int(platform.mac_ver()[0].split(".")[0] or 0)
    if major < 15:
        raise CoreMLUnavailable(f"Core ML prediction needs macOS 15+ (stateful models); this Mac runs macOS {platform.mac_ver()[0]}")
