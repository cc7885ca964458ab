"""The rehearsal's synthetic-file builders and report, at tiny sizes (the full run is `make rehearsal`).

Each builder is checked against the official-format fixtures: the same key names, shapes and
order as the files the official code (and transformers / diffusers) wrote.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from benchmarks.rehearsal import synthetic
from benchmarks.rehearsal.hf_cache import place_repo
from benchmarks.rehearsal.measure import StageMeter
from benchmarks.rehearsal.report import largest_peak, read_stages, table, write_report
from mlx_starflow.convert.checkpoint import open_checkpoint

TINY_FLOW = synthetic.FlowShape(channels=128, layers_per_block=(1, 1, 1, 1, 1, 2), latent_side=8, txt_size=16, txt_dim=32)
TINY_T5 = synthetic.T5Shape(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=1024)
TINY_VAE = synthetic.VAEShape(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=32)


def shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def test_starflow_keys_and_order_match_the_official_checkpoint(fixtures_dir):
    official = shapes(open_checkpoint(fixtures_dir / "starflow" / "model.pth"))
    ours = {draw.name: draw.shape for draw in synthetic.starflow_draws(TINY_FLOW)}
    assert list(ours.items()) == list(official.items())


def test_starflow_3b_has_the_released_parameter_count():
    draws = synthetic.starflow_draws(synthetic.Spec.full().flow)
    buffers = ("var", "attn_mask", "feat_rope")
    count = sum(math.prod(d.shape) for d in draws if not any(part in d.name for part in buffers))
    assert 3.85e9 < count < 3.87e9  # the "3.86 B" of the release
    assert dict((d.name, d.shape) for d in draws)["blocks.5.proj_txt.weight"] == (3072, 2048)


def test_t5_keys_match_the_sharded_flan_t5_fixture(fixtures_dir):
    official = shapes(open_checkpoint(fixtures_dir / "t5" / "sharded" / "model.safetensors.index.json"))
    ours = {draw.name: draw.shape for draw in synthetic.t5_draws(TINY_T5)}
    assert ours == official


def test_flan_t5_xl_shards_hold_the_encoder_in_the_first(tmp_path):
    full = synthetic.shard(synthetic.t5_draws(synthetic.Spec.full().t5), synthetic.Spec.full().t5_shard_bytes)
    sizes = [sum(math.prod(d.shape) * 4 for d in part) / 1e9 for part in full]
    assert len(full) == 2 and 9.3 < sizes[0] < 9.6 and 1.8 < sizes[1] < 2.1  # the real 9.45 GB + 1.95 GB
    assert all(not d.name.startswith(("encoder.", "shared.")) for d in full[1])


def test_written_t5_repository_reads_back_through_its_index(fixtures_dir, tmp_path):
    synthetic.write_t5(tmp_path, TINY_T5, fixtures_dir / "t5" / "tokenizer.json", shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = open_checkpoint(tmp_path / "model.safetensors.index.json")
    expected = {draw.name: synthetic.draw_array(draw) for draw in synthetic.t5_draws(TINY_T5)}
    assert shapes(tensors) == {name: value.shape for name, value in expected.items()}
    np.testing.assert_array_equal(tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"].numpy(),
                                  expected["encoder.block.1.layer.1.DenseReluDense.wo.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["feed_forward_proj"] == "gated-gelu"


def test_vae_keys_match_the_diffusers_0_4_layout(fixtures_dir):
    official = shapes(open_checkpoint(fixtures_dir / "vae" / "legacy_layout" / "diffusion_pytorch_model.safetensors"))
    ours = {draw.name: draw.shape for draw in synthetic.vae_draws(TINY_VAE)}
    assert ours == official
    config = json.loads((fixtures_dir / "vae" / "legacy_layout" / "config.json").read_text())
    assert synthetic.vae_config(TINY_VAE) == {**config, "_diffusers_version": "0.4.2"}


def test_starflow_checkpoint_is_bfloat16_with_the_drawn_spread(tmp_path):
    synthetic.write_starflow(tmp_path / "model.pth", TINY_FLOW)
    tensors = open_checkpoint(tmp_path / "model.pth")
    assert {tensor.dtype for tensor in tensors.values()} == {"bfloat16"}
    qkv = np.array(tensors["blocks.5.attn_blocks.1.attention.qkv.weight"].mlx().astype(mx.float32))
    assert qkv.std() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    mask = np.array(tensors["blocks.0.attn_mask"].mlx().astype(mx.float32))
    np.testing.assert_array_equal(mask, np.tril(np.ones((80, 80))))


def test_bfloat16_rounding_matches_mlx():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    expected = np.array(mx.array(values).astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(synthetic.as_bfloat16_bits(values), expected)


def test_tokenizer_has_the_flan_t5_vocabulary(fixtures_dir, tmp_path):
    template = json.loads((fixtures_dir / "t5" / "tokenizer.json").read_text())
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(synthetic.full_vocabulary_tokenizer(template)))
    tokenizer = Tokenizer.from_file(str(path))
    small = Tokenizer.from_file(str(fixtures_dir / "t5" / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 32100
    assert tokenizer.token_to_id("<extra_id_0>") == 32099 and tokenizer.token_to_id("<extra_id_99>") == 32000
    assert tokenizer.token_to_id("</s>") == 1 and tokenizer.token_to_id("<pad>") == 0
    text = "a film still of a cat playing piano"
    assert tokenizer.encode(text).ids == small.encode(text).ids


def test_official_yaml_takes_the_shape():
    template = "arguments:\n- img_size: 256\n- txt_size: 128\n- channels: 3072\n- layers_per_block: 2 2 2 2 2 24\n- cfg: 2.5\n"
    assert synthetic.official_yaml(template, TINY_FLOW) == (
        "arguments:\n- img_size: 64\n- txt_size: 16\n- channels: 128\n- layers_per_block: 1 1 1 1 1 2\n- cfg: 2.5\n"
    )


def test_cache_layout_is_found_by_huggingface_hub(tmp_path):
    from huggingface_hub import snapshot_download

    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "config.json").write_text("{}")
    (files / "sub" / "a.bin").write_bytes(b"abc")
    snapshot = place_repo(tmp_path / "hub", "google/flan-t5-xl", files)
    found = Path(snapshot_download("google/flan-t5-xl", cache_dir=tmp_path / "hub", local_files_only=True))
    assert found == snapshot
    assert (found / "sub" / "a.bin").read_bytes() == b"abc" and (found / "config.json").is_symlink()


def test_stage_meter_and_report(tmp_path):
    lines = tmp_path / "stages.jsonl"
    meter = StageMeter(lines, "run")
    meter.enter("first")
    held = mx.zeros((1 << 20,))  # 4 MB through MLX's allocator
    mx.eval(held)
    meter.enter("second")
    meter.close()
    stages = read_stages(lines)
    assert [s["stage"] for s in stages] == ["first", "second"]
    assert stages[0]["mlx_peak_gb"] >= 0.004 and stages[0]["peak_rss_gb"] > 0
    stages.append({"run": "synthesize", "stage": "starflow", "wall_s": 1.0, "bytes": 10})
    report = write_report(tmp_path / "report.json", stages, size=64)
    assert json.loads((tmp_path / "report.json").read_text())["size"] == 64
    assert report["largest_peak"]["stage"] in ("first", "second")
    assert largest_peak([]) is None
    rows = table([{"run": "g", "stage": "load", "wall_s": 12.34, "peak_rss_gb": 15.5, "mlx_peak_gb": 15.46}]).splitlines()
    assert rows[2] == "| g | load | 12.3 s | 15.50 GB | 15.46 GB |"
