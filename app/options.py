"""Options several commands share, declared once so a flag means the same everywhere.

Each is an annotated type; a command gives only the default. Values with a fixed domain are
checked as the command line is parsed, so a mistake fails in one line before any model is
fetched, converted or loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Optional

import mlx.core as mx
import typer

from mlx_starflow.config import DTYPES
from mlx_starflow.errors import InputError
from mlx_starflow.pipeline import MAX_SEED
from mlx_starflow.quantization import BITS
from mlx_starflow.samplers import Jacobi, Sampler, Sequential, default_sampler

from .inputs import check_text
from .limits import MAX_IMAGE_SIDE, MAX_IMAGES, check_at_most, check_batch, check_finite, check_image_side

def backend_dtype() -> str:
    """The weight dtype a first run converts to on this machine's MLX backend: bfloat16 on a GPU
    (Metal, CUDA), as the official sampler runs the transformer, with float32's range at half the
    bytes; float32 on the CPU backend, whose fast kernels are float32 only (measured by `make
    bench`: a full-width bfloat16 step is several times slower than float32 there)."""
    return "bfloat16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


FIRST_RUN_DTYPE = backend_dtype()


def _check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {value!r}")
    return value


def _check_quantize(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in BITS:
        raise InputError(f"--quantize must be one of {', '.join(map(str, BITS))} (bits), not {value}")
    return value


def _check_seed(value: Optional[int]) -> Optional[int]:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise InputError(f"--seed {value} is out of range: seeds are 0 … {MAX_SEED}")
    return value


def check_seeds(values: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """Typer callback for a pair of seeds (`interpolate --seeds A B`): each within 0 … MAX_SEED."""
    for value in values or ():
        if not 0 <= value <= MAX_SEED:
            raise InputError(f"--seeds {value} is out of range: seeds are 0 … {MAX_SEED}")
    return values


def check_side(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
    """Typer callback: an image side in pixels, within 1 … MAX_IMAGE_SIDE (None: the default)."""
    if value is not None and value < 1:
        raise InputError(f"--{param.name} is a size in pixels and must be positive, not {value}")
    return value if value is None else check_image_side(f"--{param.name}", value)


def check_batch_size(value: Optional[int]) -> Optional[int]:
    """Typer callback: a batch size within 1 … MAX_BATCH (None: the command's default)."""
    return value if value is None else check_batch("--batch-size", value)


def image_count(param: typer.CallbackParam, value: int) -> int:
    """Typer callback for a number of images to make (`-n`, frames): within 1 … MAX_IMAGES."""
    return check_at_most(f"--{param.name.replace('_', '-')}", value, MAX_IMAGES, "images planned per run")


def utf8_text(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """Typer callback for a prompt option: bytes that were not UTF-8 on the command line are
    refused as they are parsed, before the tokenizer meets them."""
    return value if value is None else check_text(value, f"--{param.name.replace('_', '-')}")


def finite(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """Typer callback for every float option: NaN and infinities are refused as they are parsed."""
    return value if value is None else check_finite(f"--{param.name.replace('_', '-')}", value)


Model = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="A converted model folder, an official checkpoint file, or a Hugging Face repo id "
         "(default: apple/starflow, fetched and converted on first use).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", callback=_check_dtype,
    help=f"Weight dtype when converting: {', '.join(DTYPES)} (default: bfloat16 on a GPU, float32 on the CPU backend).")]
Quantize = Annotated[Optional[int], typer.Option(
    "--quantize", "-q", callback=_check_quantize,
    help=f"Quantise the flow's attention and MLP linears to {' or '.join(map(str, BITS))} bits "
         "(MLX affine, group 64) when converting.")]
Offline = Annotated[bool, typer.Option(
    "--offline", help="Never touch the network: use only the Hugging Face cache and converted models.")]
Width = Annotated[Optional[int], typer.Option(
    "--width", "-W", callback=check_side,
    help=f"Image width in pixels, a multiple of the model's VAE factor × patch size, at most {MAX_IMAGE_SIDE} "
         "(a memory limit, see the README; default: the training size).")]
Height = Annotated[Optional[int], typer.Option(
    "--height", "-H", callback=check_side, help="Image height in pixels (same rule as --width).")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", "-s", callback=_check_seed, help=f"Random seed, 0 … {MAX_SEED}: the same seed repeats the same result.")]
Guidance = Annotated[float, typer.Option(
    "--guidance", "-g", callback=finite, help="Classifier-free guidance weight; 0 turns it off.")]
Force = Annotated[bool, typer.Option("--force", help="Replace existing output instead of stopping.")]
Bfloat16Rope = Annotated[bool, typer.Option(
    "--bfloat16-rope",
    help="Round the flow's RoPE angles to bfloat16, as the official GPU sampler does (by up to 0.03 rad at 256²; "
         "default: exact angles, as the official float32 code).")]
Float32Compute = Annotated[bool, typer.Option(
    "--float32-compute",
    help="Run a float16/bfloat16 flow with float32 activations, as the official sampler's float32 autocast "
         "(closer to float32 samples; the flow's weights take twice the memory). Default: the weights' dtype.")]
JacobiFlag = Annotated[Optional[bool], typer.Option(
    "--jacobi/--sequential",
    help="Block-wise Jacobi iteration (official settings) or token-by-token decoding (exact inverse of the forward "
         "pass). Default: Jacobi on a GPU; sequential on MLX's CPU backend, where a Jacobi pass is bound by "
         "arithmetic and sequential decoding is several times faster (from `make bench` figures).")]
@dataclass(frozen=True)
class JacobiOverrides:
    """The single Jacobi flags given on the command line (None: the preset's value)."""

    block_size: int | None = None
    threshold: float | None = None
    max_iter: int | None = None
    deep_threshold: float | None = None
    init: str | None = None
    coupled: bool = False


def make_sampler(jacobi: bool | None, preset: str | None = None, overrides: JacobiOverrides = JacobiOverrides(),
                 attn_temp: float = 1.0) -> Sampler:
    """The sampler the flags ask for: the named preset (default: official) with each given
    Jacobi flag replacing its setting; Jacobi's flags are ignored with --sequential. Without
    --jacobi/--sequential, a Jacobi flag or --attn-temp says which is meant, and otherwise the
    backend's default applies (`default_sampler`)."""
    if jacobi is None:
        if preset is not None or overrides != JacobiOverrides():
            jacobi = True
        elif attn_temp != 1.0:
            jacobi = False
        else:
            return default_sampler()
    if not jacobi:
        return Sequential(attn_temp)
    if attn_temp != 1.0:
        raise InputError("--attn-temp applies to --sequential sampling (the official Jacobi sampler has no temperature); add --sequential")
    given = {name: value for name, value in asdict(overrides).items() if value is not None}
    return replace(Jacobi.preset(preset or "official"), **given)


Denoise = Annotated[Optional[str], typer.Option(
    "--denoise", help="score, decoder or none (default: decoder if the model has one, else score); none shows the flow's own sample.")]
