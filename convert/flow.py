"""Convert an official STARFlow checkpoint into a flow component folder.

The checkpoint is read lazily and written tensor by tensor (mapped, cast, optionally
quantised), so converting the 3B model needs memory near its largest tensor, not its size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_starflow.config import FlowConfig
from mlx_starflow.errors import WeightsError
from mlx_starflow.flow import StarFlow
from mlx_starflow.model_io import WEIGHTS_FILE, write_manifest
from mlx_starflow.quantization import GROUP_SIZE, is_quantized_layer

from .checkpoint import open_checkpoint
from .maps.rules import prefixes
from .maps.starflow import map_names, strip_wrappers
from .official_config import OfficialConfig, flow_config
from .safetensors_io import write_safetensors
from .tensors import LazyTensor, TensorEntry, check_weight_dtypes, finite_weight

logger = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def text_width(tensors: dict[str, LazyTensor], num_blocks: int) -> int:
    """`txt_dim` = input width of the deep block's `proj_txt` (0 for an unconditional model)."""
    suffix = f"blocks.{num_blocks - 1}.proj_txt.weight"
    for key, tensor in tensors.items():
        if strip_wrappers(key) == suffix:
            return tensor.shape[1]
    return 0


def _expected_shapes(config: FlowConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the (unquantised) model; building it allocates nothing (MLX is lazy)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(StarFlow(config).parameters())}


def _quantized_paths(config: FlowConfig) -> set[str]:
    model = StarFlow(config)
    return {path for path, module in model.named_modules() if is_quantized_layer(path, module)}


def check_shapes(mapping: dict[str, str], tensors: dict[str, LazyTensor], expected: dict[str, tuple[int, ...]]) -> None:
    """The first checkpoint tensor whose shape differs from the config's is an error naming both."""
    for ours, key in mapping.items():
        if tuple(tensors[key].shape) != expected[ours]:
            raise WeightsError(
                f"the config does not match the checkpoint: {key} has shape {list(tensors[key].shape)}, "
                f"the config implies {list(expected[ours])} for it; is --config the YAML this checkpoint was trained with?"
            )


def write_flow(folder: Path, src: Path, source_sha256: str, official: OfficialConfig, dtype: str = "float32",
               quantize: int | None = None, progress: Callable[[int, int], None] | None = None) -> FlowConfig:
    """Write `config.json`, `model.safetensors` and `manifest.json` of a flow component into a new `folder`."""
    folder.mkdir(parents=True)
    tensors = open_checkpoint(src)
    probe = flow_config(official, txt_dim=1, dtype=dtype)
    txt_dim = text_width(tensors, probe.num_blocks)
    if probe.txt_size > 0 and txt_dim == 0:
        raise WeightsError(f"{src}: the config has txt_size {probe.txt_size} but the checkpoint has no deep-block proj_txt weight")
    quantization = {"bits": quantize, "group_size": GROUP_SIZE} if quantize else None
    config = flow_config(official, txt_dim=txt_dim, dtype=dtype, quantization=quantization)
    plain = FlowConfig.from_dict({**config.to_dict(), "quantization": None})
    expected = _expected_shapes(plain)
    matched = map_names(tensors, expected)
    _warn_dropped(src, matched.dropped)
    mapping = matched.keys()
    check_shapes(mapping, tensors, expected)
    check_weight_dtypes((tensors[key] for key in mapping.values()), src)
    quantized = _quantized_paths(plain) if quantize else set()
    target = DTYPES[dtype]

    entries = []
    for ours in expected:
        source = tensors[mapping[ours]]
        path, leaf = ours.rsplit(".", 1)
        if path in quantized and leaf == "weight":
            entries += _quantized_entries(ours, source, dtype, quantize, src)
        else:
            entries.append(TensorEntry(ours, dtype, tuple(source.shape), _cast(source, target, src)))
    write_safetensors(folder / WEIGHTS_FILE, _reporting(entries, progress))
    config.save(folder)
    extra = {"dropped_keys": list(matched.dropped)} if matched.dropped else {}
    write_manifest(folder, FlowConfig.KIND, sources=[{"path": str(src), "sha256": source_sha256}],
                   config_source=str(official.path), **extra)
    return config


def _warn_dropped(src: Path, dropped: tuple[str, ...]) -> None:
    """One line for the keys outside the flow that the official loader (strict=False) ignores too."""
    if dropped:
        logger.warning("%s: dropped %d key%s outside the flow's weights (under %s), as the official loader ignores them",
                       src, len(dropped), "" if len(dropped) == 1 else "s", ", ".join(prefixes(dropped)))


def _reporting(entries: list[TensorEntry], progress: Callable[[int, int], None] | None) -> list[TensorEntry]:
    """The same entries, each producer reporting (done, total) to `progress` as it is written."""
    if progress is None:
        return entries

    def reported(index: int, produce: Callable[[], mx.array]) -> Callable[[], mx.array]:
        def produce_and_report() -> mx.array:
            array = produce()
            progress(index + 1, len(entries))
            return array
        return produce_and_report

    return [entry._replace(producer=reported(i, entry.producer)) for i, entry in enumerate(entries)]


def _cast(source: LazyTensor, target: mx.Dtype, src: Path) -> Callable[[], mx.array]:
    return lambda: finite_weight(source, src).astype(target)


def _quantized_entries(name: str, source: LazyTensor, dtype: str, bits: int, src: Path) -> list[TensorEntry]:
    """(weight, scales, biases) of one linear, quantised once and shared by the three producers."""
    memo: dict[str, mx.array] = {}

    def part(index: int) -> Callable[[], mx.array]:
        def produce() -> mx.array:
            if not memo:
                q, scales, biases = mx.quantize(finite_weight(source, src).astype(DTYPES[dtype]), group_size=GROUP_SIZE, bits=bits)
                memo.update(weight=q, scales=scales, biases=biases)
            return memo.pop(("weight", "scales", "biases")[index])
        return produce

    out_features, in_features = source.shape
    if in_features % GROUP_SIZE:
        raise WeightsError(f"{name}: input width {in_features} is not a multiple of the quantisation group {GROUP_SIZE}")
    base = name.rsplit(".", 1)[0]
    packed = (out_features, in_features * bits // 32)
    groups = (out_features, in_features // GROUP_SIZE)
    return [
        TensorEntry(f"{base}.weight", "uint32", packed, part(0)),
        TensorEntry(f"{base}.scales", dtype, groups, part(1)),
        TensorEntry(f"{base}.biases", dtype, groups, part(2)),
    ]

