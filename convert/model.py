"""Assemble a model folder: the flow plus its condition encoder (T5 or labels) and VAE.

A model folder holds one component folder each (`flow/`, `text_encoder/` or `labels/`,
`vae/`, optionally a fine-tuned `decoder/`) and a top-level `manifest.json`, written last, that
names them and every source file with its sha256. It is built in a temporary folder and
renamed into place only when complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_starflow.config import DTYPES, FlowConfig, LabelConfig, T5Config, VAEConfig
from mlx_starflow.errors import ConfigError, ModelNotFound
from mlx_starflow.model_io import atomic_folder, check_output_folder, read_manifest, sha256_file, write_manifest
from mlx_starflow.model_io import MODEL_KIND

from .flow import write_flow
from .official_config import OfficialConfig, flow_config, read_official_config
from .t5 import convert_t5
from .tensors import check_regular_file
from .vae import convert_finetuned_decoder, convert_vae

VAE_DTYPE = "float32"
"""The VAE and fine-tuned decoder stay float32, as the official sampler decodes: they are small
(84 M parameters) and decoding runs once per image."""


def read_vocab(path: Path) -> tuple[str, ...]:
    """Class names of an official `.vocab` file: a TSV whose first column is the name."""
    names = [line.split("\t")[0].strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"{path} lists no class names; a .vocab file has one class per line (name<TAB>id)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path} lists a class name twice; class names must be unique")
    return tuple(names)


def find_vocab(official: OfficialConfig, labels: str | Path | None) -> Path:
    """The label vocabulary: given explicitly, else the YAML's `text:` beside the YAML or in the cwd."""
    candidates = [Path(labels)] if labels else [official.path.parent / official.text_encoder, Path(official.text_encoder)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"label vocabulary {official.text_encoder} not found beside {official.path} or in the current folder; pass --labels FILE"
    )


def write_labels(folder: Path, vocab: Path, txt_dim: int) -> LabelConfig:
    names = read_vocab(vocab)
    if len(names) + 1 != txt_dim:
        raise ConfigError(
            f"{vocab} lists {len(names)} classes but the checkpoint's condition width is {txt_dim} "
            f"(classes + 1 empty class); pass the vocabulary this model was trained with"
        )
    folder.mkdir(parents=True)
    config = LabelConfig(labels=names)
    config.save(folder)
    write_manifest(folder, LabelConfig.KIND, sources=[{"path": str(vocab), "sha256": sha256_file(vocab)}])
    return config


TEXT_ENCODER_DTYPE = "float32"
"""The official sampler runs flan-t5-xl in float32 whatever the flow's dtype; it encodes once per
prompt and is released before sampling, so float32 costs no peak memory."""


def convert_model(
    src: str | Path,
    config: str | Path,
    out: str | Path,
    dtype: str = "float32",
    quantize: int | None = None,
    force: bool = False,
    labels: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    decoder: str | Path | None = None,
    text_encoder_dtype: str = TEXT_ENCODER_DTYPE,
    name: str | None = None,
    source_sha256: str | None = None,
    origin: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert an official checkpoint + YAML into a model folder at `out`.

    Label-conditioned configs (`text: NAME.vocab`) get their `labels/` component. Text models
    get `text_encoder/` from a Hugging Face T5 folder (`text_encoder`) and `vae/` from a
    diffusers VAE folder (`vae`), the encoder in `text_encoder_dtype` (float16 overflows
    T5's feed-forward activations; prefer bfloat16 to save memory); without them the folder holds the flow alone, which
    `load_flow` reads but `mlx_starflow.load` refuses. `decoder` adds STARFlow's fine-tuned
    noisy-latent decoder (`pytorch_model.bin` or a `finetune_decoder.py` .pth). `source_sha256`
    spares hashing a checkpoint whose digest the caller already knows; `origin` is recorded in
    the top manifest for a cache to tell whether the folder is current.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ModelNotFound(f"checkpoint {src} does not exist; pass the official .pth (or .safetensors) file")
    check_regular_file(src)
    official = read_official_config(config)
    check_components(official, text_encoder, vae, decoder)
    flow_config(official, txt_dim=1, dtype=dtype)  # range checks, before the checkpoint is hashed
    if text_encoder_dtype not in DTYPES:
        raise ConfigError(f"text encoder dtype must be one of {', '.join(DTYPES)}, not {text_encoder_dtype!r}")
    check_output_folder(out, force, MODEL_KIND)
    sources = [{"path": str(src.resolve()), "sha256": source_sha256 or sha256_file(src)}]
    with atomic_folder(out, force=force, kind=MODEL_KIND) as tmp:
        flow = write_flow(tmp / "flow", src, sources[0]["sha256"], official, dtype=dtype, quantize=quantize, progress=progress)
        components = ["flow"]
        if official.is_label_model:
            write_labels(tmp / "labels", find_vocab(official, labels), flow.txt_dim)
            components.append("labels")
        if text_encoder is not None:
            convert_t5(text_encoder, tmp / "text_encoder", dtype=text_encoder_dtype)
            check_text_width(tmp / "text_encoder", flow)
            components.append("text_encoder")
        if vae is not None:
            convert_vae(vae, tmp / "vae", dtype=VAE_DTYPE)
            check_vae_fits(tmp / "vae", flow)
            components.append("vae")
        if decoder is not None:
            convert_finetuned_decoder(decoder, tmp / "vae", tmp / "decoder", dtype=VAE_DTYPE)
            components.append("decoder")
        for component in components[1:]:
            sources += [source for source in _component_sources(tmp / component) if not source["path"].startswith(str(tmp))]
        extra = {"origin": origin} if origin else {}
        write_manifest(tmp, MODEL_KIND, sources=sources, components=components, name=name or src.stem, **extra)
    return out


def check_components(official: OfficialConfig, text_encoder: str | Path | None, vae: str | Path | None,
                     decoder: str | Path | None) -> None:
    """Refuse components the config has no use for, before anything is written."""
    if text_encoder is not None and official.is_label_model:
        raise ConfigError(f"{official.path} is a label-conditioned model; it takes no --text-encoder")
    if text_encoder is not None and not official.text_encoder:
        raise ConfigError(f"{official.path} names no text encoder (no text: key); it takes no --text-encoder")
    if vae is not None and not official.vae:
        raise ConfigError(f"{official.path} is a pixel-space model (no vae: key); it takes no --vae")
    if decoder is not None and vae is None:
        raise ConfigError("--decoder needs --vae too: the fine-tuned decoder replaces the base VAE's decoder only")


def check_text_width(folder: Path, flow: FlowConfig) -> None:
    width = T5Config.load(folder).d_model
    if width != flow.txt_dim:
        raise ConfigError(
            f"the text encoder's width is {width} but the checkpoint's text projection takes {flow.txt_dim}; "
            "pass the text encoder the model was trained with (google/flan-t5-xl for the official model)"
        )


def check_vae_fits(folder: Path, flow: FlowConfig) -> None:
    config = VAEConfig.load(folder)
    if config.latent_channels != flow.in_channels or config.downsample_factor != flow.vae_factor:
        raise ConfigError(
            f"the VAE has {config.latent_channels} latent channels and factor {config.downsample_factor}, the flow expects "
            f"{flow.in_channels} and {flow.vae_factor}; pass the VAE the model was trained with (stabilityai/sd-vae-ft-ema)"
        )


def _component_sources(folder: Path) -> list[dict]:
    """A component's own source list (from its manifest), each path prefixed with the component."""
    manifest = read_manifest(folder)
    return [{**source, "component": folder.name} for source in manifest.get("sources", [])]
