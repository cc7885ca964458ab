#!/usr/bin/env python3
"""Side by side with the official sampler: the same prompt, noise and settings through apple/ml-starflow's
PyTorch code and through ours, with the difference printed at every stage.

    python scripts/official_check.py --official-repo ~/ml-starflow --checkpoint starflow_3B_t2i_256x256.pth \\
        --text-encoder ~/flan-t5-xl --vae ~/sd-vae-ft-ema [--prompt "…"] [--seed 0] [--size 256]

For people who have the real weights and PyTorch: run it with a Python that has torch, transformers,
diffusers, einops and pyyaml (the official code's own needs) and this package installed. The
official code is imported from your checkout (--official-repo), never installed by us; modules it
imports only for training or logging (torchvision, wandb, torchmetrics, …) are stubbed when absent.
It runs on CPU (a Mac without CUDA included); the 3B model in float32 needs about 32 GB.

Stages, each compared as max |official - ours| (the image also as PSNR):
  text states       official `utils.encode_text` (transformers T5 encoder) vs ours, both prompts of CFG
  each block        `Model(noise, y, reverse=True, return_sequence=True)` vs our sampler, token by
                    token (KV cache), guidance on the deep block; both read the official text states,
                    so each stage shows the flow's own difference
  denoise           `utils.apply_denoising` (the score step, official `self_denoise`) vs ours, on the
                    official sample
  decoded image     the official `VAE.decode` vs ours, on the official denoised latent
  end to end        the official image vs ours made by our own pipeline from the same prompt and noise
For bfloat16 our model is converted to bfloat16 and compared with the official model whose weights
are rounded to bfloat16 and which computes in float32, as its sampler's float32 autocast does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_YAML = ROOT / "convert" / "configs" / "starflow_3B_t2i_256x256.yaml"
OPTIONAL_MODULES = (  # imported by the official code for training, data or logging only
    "torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io", "torchvision.utils",
    "wandb", "psutil", "torchinfo", "decord", "torchmetrics", "torchmetrics.image", "torchmetrics.image.fid",
    "torchmetrics.image.inception", "torchmetrics.multimodal", "torchmetrics.multimodal.clip_score",
    "torchmetrics.utilities", "torchmetrics.utilities.data",
)
NOISE_STD = 0.3  # sample.py passes args.noise_std to the denoising step


class _Absent:
    """Stands in for any name of a stubbed module; using it fails loudly."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("a module the official code imports only for training was used; install it")


def _absent_attribute(name: str):
    if name.startswith("__"):  # module metadata (__file__, …) is simply missing, as introspection expects
        raise AttributeError(name)
    return _Absent


def _stub_missing(names: tuple[str, ...]) -> None:
    stubbed: set[str] = set()
    for name in names:
        if name in sys.modules and name not in stubbed:
            continue
        if name.rpartition(".")[0] not in stubbed:
            try:
                importlib.import_module(name)
                continue
            except ImportError:
                pass
        stubbed.add(name)
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []  # a package, so its stubbed submodules can be imported
        module.__getattr__ = _absent_attribute  # type: ignore[attr-defined]
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def import_official(repo: Path):
    """torch, the official `transformer_flow` and `utils`, from the user's checkout."""
    import torch
    # The names the official code takes from diffusers and transformers, resolved before any stub
    # exists: both libraries import lazily and would otherwise find the stubs.
    from diffusers import DiTPipeline  # noqa: F401
    from diffusers.models import AutoencoderKL, AutoencoderKLWan  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel, T5Tokenizer  # noqa: F401

    _stub_missing(OPTIONAL_MODULES)
    sys.path.insert(0, str(repo))
    import train  # noqa: F401  (the parser load_model_config uses)
    import utils

    if not torch.distributed.is_initialized():  # MetaBlock.jacobi all-reduces; one local process
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    return torch, utils


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def psnr(a, b) -> float:
    """PSNR of two images in [-1, 1] after clipping, as saved images are (peak 2)."""
    a, b = np.clip(np.asarray(a, np.float64), -1, 1), np.clip(np.asarray(b, np.float64), -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def official_model(torch, utils, yaml: Path, checkpoint: Path, txt_dim: int, vae_factor: int, bfloat16: bool):
    """As sample.py builds it: load_model_config, img_size //= VAE factor, setup_transformer, strict=False load."""
    args = utils.load_model_config(str(yaml))
    if args.vae is not None:
        args.img_size //= vae_factor
    model = utils.setup_transformer(args, None, txt_dim=txt_dim, use_checkpoint=1)
    model.load_state_dict(torch.load(str(checkpoint), map_location="cpu"), strict=False)
    if bfloat16:
        model.to(torch.bfloat16).to(torch.float32)  # bf16-rounded weights, float32 compute
    else:
        model.to(torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.eval()
    return args, model


def official_vae(utils, folder: Path, work: Path):
    """The official VAE wrapper; it recognises an SD VAE by 'sd-vae' in its path, so it gets a link named so."""
    link = work / "sd-vae-ft-ema"
    if not link.exists():
        link.symlink_to(folder.resolve(), target_is_directory=True)
    return utils.VAE(str(link), dist=None).to("cpu")


def run(options: argparse.Namespace) -> list[tuple[str, str, float]]:
    torch, utils = import_official(options.official_repo.resolve())
    torch.set_num_threads(options.threads)
    import mlx.core as mx
    from transformers import AutoModel, AutoTokenizer

    from mlx_starflow.convert.model import convert_model
    from mlx_starflow.pipeline import load, seeded_noise

    rows: list[tuple[str, str, float]] = []
    prompts = [options.prompt, ""]  # conditional row, then the unconditional one (sample.py's CFG rows)
    tokenizer = AutoTokenizer.from_pretrained(str(options.text_encoder))
    try:  # setup_encoder's call; transformers 5 no longer accepts the keyword (it changed nothing for T5)
        t5 = AutoModel.from_pretrained(str(options.text_encoder), add_cross_attention=False)
    except TypeError:
        t5 = AutoModel.from_pretrained(str(options.text_encoder))
    encoder = t5.encoder.float().eval()
    with tempfile.TemporaryDirectory(prefix="official-check-") as tmp:
        work = Path(tmp)
        vae = official_vae(utils, options.vae, work)
        for dtype in options.dtypes:
            args, model = official_model(torch, utils, options.config, options.checkpoint, encoder.config.hidden_size,
                                         vae.downsample_factor, dtype == "bfloat16")
            y = utils.encode_text(encoder, tokenizer, list(prompts), args.txt_size, "cpu")
            ours = load(convert_model(options.checkpoint, options.config, work / dtype, dtype=dtype,
                                      text_encoder=options.text_encoder, vae=options.vae, force=True))
            rows.append((dtype, "text states", max_diff(y.numpy(), ours.encode(prompts))))

            side = (options.size or args.img_size * vae.downsample_factor) // vae.downsample_factor
            noise = seeded_noise([options.seed], args.channel_size, side, side)
            with torch.no_grad():
                official_seq = model(torch.from_numpy(np.array(noise)), y, reverse=True, kv_caches=None, guidance=options.guidance,
                                     guide_top=None, verbose=False, return_sequence=True, jacobi=False, attn_temp=1.0,
                                     annealed_guidance=False, context_length=16)
            our_seq = ours.flow.sample(noise, mx.array(y.numpy()), guidance=options.guidance, return_sequence=True)
            for index, (theirs, mine) in enumerate(zip(official_seq[1:], our_seq[1:])):
                block = len(official_seq) - 2 - index
                name = "deep block" if index == 0 else f"block {block}"
                rows.append((dtype, f"{name} output", max_diff(theirs.float().numpy(), mine)))

            sample = official_seq[-1].float()
            denoise_args = argparse.Namespace(txt_size=args.txt_size, disable_learnable_denoiser=0)
            official_denoised = utils.apply_denoising(model, sample.clone(), y[:1], None, None, denoise_args, {}, NOISE_STD)
            model.eval()  # the score step leaves the official model in train mode
            our_denoised = ours.flow.denoise(mx.array(sample.numpy()), mx.array(y[:1].numpy()), noise_std=NOISE_STD)
            rows.append((dtype, "denoise", max_diff(official_denoised.detach().numpy(), our_denoised)))

            with torch.no_grad():
                official_image = vae.decode(official_denoised.detach()).float().numpy()
            our_image = np.array(ours.vae.decode(mx.array(official_denoised.detach().numpy())))
            rows.append((dtype, "decoded image", max_diff(official_image, our_image)))
            rows.append((dtype, "image PSNR (dB)", psnr(official_image, our_image)))
            own_y = ours.encode(prompts)  # ours end to end: own text states, sample, score step and decoder
            own_sample = ours.flow.sample(noise, own_y, guidance=options.guidance)
            own_image = np.array(ours.vae.decode(ours.flow.denoise(own_sample, own_y[:1], noise_std=NOISE_STD)))
            rows.append((dtype, "end-to-end image PSNR (dB)", psnr(official_image, own_image)))
            del model, ours
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--official-repo", type=Path, required=True, help="A checkout of apple/ml-starflow.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="The official .pth checkpoint.")
    parser.add_argument("--config", type=Path, default=SHIPPED_YAML, help="The official YAML (default: the shipped 3B one).")
    parser.add_argument("--text-encoder", type=Path, required=True, help="A google/flan-t5-xl folder (config.json, tokenizer, weights).")
    parser.add_argument("--vae", type=Path, required=True, help="A stabilityai/sd-vae-ft-ema folder (diffusers layout).")
    parser.add_argument("--prompt", default="a film still of a cat playing piano")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise (our generator; both sides get the same array).")
    parser.add_argument("--guidance", type=float, default=3.6)
    parser.add_argument("--size", type=int, default=None, help="Image side in pixels (default: the YAML's).")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    options = parser.parse_args(argv)
    rows = run(options)
    width = max(len(stage) for _, stage, _ in rows)
    print(f"{'dtype':<9} {'stage':<{width}}  max |official - ours|  (PSNR in dB)")
    for dtype, stage, value in rows:
        print(f"{dtype:<9} {stage:<{width}}  {value:.3g}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
