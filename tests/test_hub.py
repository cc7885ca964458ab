"""First run against a fake Hugging Face cache: fetch, convert once, reuse; never the network.

The fake repositories are laid out as `huggingface_hub` lays out its cache
(`models--org--name/refs/main` and `snapshots/<revision>/…`) under a temporary HF_HUB_CACHE,
with the fixture tiny files as content; the default model's config is pointed at the tiny
fixture YAML. Downloads are simulated by replacing huggingface_hub's network calls.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mlx_starflow.app.cli import main
from mlx_starflow.convert import hub
from mlx_starflow import load
from mlx_starflow.errors import InputError, ModelNotFound
from mlx_starflow.samplers import Sequential

REVISION = "0123456789abcdef0123456789abcdef01234567"
CHECKPOINT = "starflow_3B_t2i_256x256.pth"
T5_FILES = ("config.json", "tokenizer.json", "model.safetensors", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def put_repo(cache: Path, repo_id: str, files: dict[str, Path], revision: str = REVISION) -> Path:
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


def repo_files(fixtures_dir: Path) -> dict[str, dict[str, Path]]:
    return {
        "apple/starflow": {CHECKPOINT: fixtures_dir / "starflow" / "model.pth"},
        "google/flan-t5-xl": {name: fixtures_dir / "t5" / name for name in T5_FILES},
        "stabilityai/sd-vae-ft-ema": {name: fixtures_dir / "vae" / name for name in ("config.json", "diffusion_pytorch_model.safetensors")},
    }


@pytest.fixture
def env(fixtures_dir, tmp_path, monkeypatch):
    """Empty cache and models folder, the tiny YAML as the default model's config, and no network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("STARFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.HubModel, "config_path", lambda self: fixtures_dir / "starflow" / "config.yaml")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    real_snapshot = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: real_snapshot(*a, **k) if k.get("local_files_only") else no_network())
    return tmp_path


@pytest.fixture
def cached(env, fixtures_dir):
    for repo_id, files in repo_files(fixtures_dir).items():
        put_repo(env / "hub", repo_id, files)
    return env


def resolve(**kwargs) -> tuple[Path, list[str]]:
    messages: list[str] = []
    folder = hub.resolve_model(None, dtype=kwargs.pop("dtype", "float32"), notify=messages.append, **kwargs)
    return folder, messages


def test_first_run_converts_once_then_reuses(cached, fixtures_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, messages = resolve()
    sha = hub.sha256_file(fixtures_dir / "starflow" / "model.pth")
    assert folder == cached / "home" / "models" / f"starflow_3B_t2i_256x256-{sha[:12]}-float32"
    assert any(message.startswith("converting") for message in messages)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"] == ["flow", "text_encoder", "vae"]
    assert manifest["origin"] == {"checkpoint_sha256": sha, "google/flan-t5-xl": REVISION, "stabilityai/sd-vae-ft-ema": REVISION}
    assert load(folder).generate("a cat", seed=0, sampler=Sequential())[0].size == (64, 64)

    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again, messages = resolve()
    assert again == folder and messages == [] and (folder / "manifest.json").stat().st_mtime_ns == stamp
    quantized, _ = resolve(quantize=8, dtype="bfloat16")
    assert quantized.name.endswith("-bfloat16-q8") and quantized != folder


@pytest.mark.parametrize("damage", ["truncate", "no_manifest", "new_revision"])
def test_stale_or_half_written_conversions_are_redone(cached, fixtures_dir, damage):
    folder, _ = resolve(offline=True)
    if damage == "truncate":
        with open(folder / "flow" / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    else:
        put_repo(cached / "hub", "google/flan-t5-xl", repo_files(fixtures_dir)["google/flan-t5-xl"], revision="f" * 40)
    again, messages = resolve(offline=True)
    assert again == folder and any(message.startswith("converting") for message in messages)
    load(again)


@pytest.mark.parametrize("layout", ["sharded", "pytorch_bin"])
def test_other_t5_weight_layouts(env, fixtures_dir, layout):
    files = repo_files(fixtures_dir)
    files["google/flan-t5-xl"] = {name: fixtures_dir / "t5" / name for name in ("tokenizer.json", "spiece.model")}
    files["google/flan-t5-xl"].update({p.name: p for p in (fixtures_dir / "t5" / layout).iterdir()})
    for repo_id, repo in files.items():
        put_repo(env / "hub", repo_id, repo)
    folder, _ = resolve(offline=True)
    assert load(folder).condition.get().encoder.config.d_model == 32


def sharded_t5(fixtures_dir: Path, shards: tuple[int, ...] = (1, 2)) -> dict[str, Path]:
    """flan-t5-xl as the real repository lays it out: config, tokenizer, index and shards (tiny sizes)."""
    t5 = fixtures_dir / "t5"
    files = {name: t5 / name for name in ("config.json", "tokenizer.json", "spiece.model")}
    files["model.safetensors.index.json"] = t5 / "sharded" / "model.safetensors.index.json"
    files.update({f"model-0000{i}-of-00002.safetensors": t5 / "sharded" / f"model-0000{i}-of-00002.safetensors" for i in shards})
    return files


def test_only_the_shards_holding_the_encoder_are_needed(env, fixtures_dir):
    """The fixture index puts `shared` and the whole encoder in shard 1, the decoder across both
    (as flan-t5-xl's real index does): shard 1 alone is a complete cache entry, shard 2 alone is not."""
    t5 = hub.HUB_FILES["google/flan-t5-xl"]
    index = json.loads((fixtures_dir / "t5" / "sharded" / "model.safetensors.index.json").read_text())
    assert hub.index_shards(index, t5.needed_keys) == ["model-00001-of-00002.safetensors"]
    assert hub.index_shards(index, ()) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    snapshot = put_repo(env / "hub", "google/flan-t5-xl", sharded_t5(fixtures_dir, shards=(2,)))
    assert hub.local_snapshot(t5) is None
    put_repo(env / "hub", "google/flan-t5-xl", sharded_t5(fixtures_dir, shards=(1,)))
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    assert hub.local_snapshot(t5) == snapshot


def test_an_encoder_only_cache_converts_and_generates(env, fixtures_dir):
    files = repo_files(fixtures_dir)
    files["google/flan-t5-xl"] = sharded_t5(fixtures_dir, shards=(1,))
    for repo_id, repo in files.items():
        put_repo(env / "hub", repo_id, repo)
    folder, _ = resolve(offline=True)
    assert load(folder).generate("a cat", seed=0, sampler=Sequential(), denoise="none")[0].size == (64, 64)


def test_offline_without_files_says_what_to_download_and_where(env, fixtures_dir, capsys, monkeypatch):
    put_repo(env / "hub", "apple/starflow", repo_files(fixtures_dir)["apple/starflow"])
    monkeypatch.setattr(hub, "convert_model", lambda *a, **k: pytest.fail("no conversion may start"))
    out = env / "out"
    started = time.perf_counter()
    code = main(["generate", "a cat", "--offline", "-o", str(out)])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and elapsed < 5
    first, *commands = err.strip().splitlines()
    assert "offline" in first and str(env / "hub") in first and "google/flan-t5-xl" in first
    assert commands == [
        "hf download google/flan-t5-xl config.json tokenizer.json model.safetensors.index.json model-00001-of-00002.safetensors",
        "hf download stabilityai/sd-vae-ft-ema config.json diffusion_pytorch_model.safetensors",
    ], "the checkpoint is cached and must not be listed; the files are the real repositories' names"
    assert not out.exists() and not (env / "home" / "models").exists()


def test_offline_with_nothing_cached_names_every_repository(env, capsys):
    code = main(["generate", "a cat", "--offline"])
    err = capsys.readouterr().err
    assert code == 1
    assert [line.split()[2] for line in err.strip().splitlines()[1:]] == ["apple/starflow", "google/flan-t5-xl", "stabilityai/sd-vae-ft-ema"]
    assert "hf download apple/starflow starflow_3B_t2i_256x256.pth" in err


def test_local_components_need_no_cache(env, fixtures_dir, tmp_path):
    """A fully local, offline run: a checkpoint file and the two companions' folders, an empty cache."""
    local = tmp_path / "ckpt" / "model.pth"
    local.parent.mkdir()
    shutil.copyfile(fixtures_dir / "starflow" / "model.pth", local)
    t5 = tmp_path / "flan-t5-xl"
    t5.mkdir()
    for name, source in sharded_t5(fixtures_dir, shards=(1,)).items():
        shutil.copyfile(source, t5 / name)
    vae = fixtures_dir / "vae"
    folder = hub.resolve_model(str(local), dtype="float32", offline=True, text_encoder=t5, vae=vae,
                               decoder=vae / "finetuned" / "pytorch_model.bin")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"] == ["flow", "text_encoder", "vae", "decoder"]
    assert manifest["origin"]["google/flan-t5-xl"] == f"local {t5.resolve()}"
    assert load(folder).decoder is not None
    assert not (env / "hub").exists()
    with pytest.raises(InputError, match="apply only when converting"):
        hub.resolve_model(str(folder), vae=vae)
    (t5 / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="lacks the files of a google/flan-t5-xl folder"):
        hub.resolve_model(str(local), offline=True, text_encoder=t5, vae=vae)


def fake_hub(monkeypatch, files: dict[str, dict[str, Path]]) -> list[tuple[str, tuple[str, ...]]]:
    """huggingface_hub's listing and downloads served from `files`; returns the (repo, files) fetched."""
    import huggingface_hub

    fetched: list[tuple[str, tuple[str, ...]]] = []

    def fake_snapshot(repo_id, *, allow_patterns=None, cache_dir=None, **kwargs):
        fetched.append((repo_id, tuple(allow_patterns)))
        return str(put_repo(Path(cache_dir), repo_id, {n: p for n, p in files[repo_id].items() if n in allow_patterns}))

    def fake_file(repo_id, filename, *, cache_dir=None, **kwargs):
        fetched.append((repo_id, (filename,)))
        return str(put_repo(Path(cache_dir), repo_id, {filename: files[repo_id][filename]}) / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **k: sorted(files[repo_id]) + ["README.md"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    return fetched


@pytest.mark.parametrize("names,expected", [
    (["starflow-v_7B_t2v_480p.pth", "starflow_3B_t2i_v2.pth"], "starflow_3B_t2i_v2.pth"),
    (["starflow_3B_t2i_256.pth", "starflow_3B_t2i_512.pth"], "several text-to-image checkpoints (starflow_3B_t2i_256.pth, starflow_3B_t2i_512.pth)"),
    (["starflow-v_7B_t2v_480p.pth"], "it has README.md, starflow-v_7B_t2v_480p.pth)"),
])
def test_the_checkpoint_is_found_by_pattern_or_the_files_are_named(env, fixtures_dir, monkeypatch, names, expected):
    files = repo_files(fixtures_dir)
    files["apple/starflow"] = {name: fixtures_dir / "starflow" / "model.pth" for name in names}
    fetched = fake_hub(monkeypatch, files)
    if expected.endswith(".pth"):
        folder, _ = resolve()
        assert fetched[0] == ("apple/starflow", (expected,))
        load(folder)
        assert resolve(offline=True)[0] == folder, "the picked file counts as cached"
    else:
        with pytest.raises(ModelNotFound) as failure:
            resolve()
        assert expected in str(failure.value) and [repo for repo, _ in fetched] == []


def test_offline_reuses_a_conversion_when_the_cache_is_gone(cached, monkeypatch):
    folder, _ = resolve(offline=True)
    shutil.rmtree(cached / "hub")
    again, messages = resolve(offline=True)
    assert again == folder and messages == []


def test_download_shows_the_licence_once_and_fetches_only_the_encoder_shards(env, fixtures_dir, monkeypatch):
    files = repo_files(fixtures_dir)
    files["google/flan-t5-xl"] = sharded_t5(fixtures_dir)
    fetched = fake_hub(monkeypatch, files)
    folder, messages = resolve()
    assert sum("non-commercial research only" in message for message in messages) == 1
    assert fetched == [
        ("apple/starflow", (CHECKPOINT,)),
        ("google/flan-t5-xl", ("model.safetensors.index.json",)),
        ("google/flan-t5-xl", ("config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "spiece.model")),
        ("stabilityai/sd-vae-ft-ema", ("config.json", "diffusion_pytorch_model.safetensors")),
    ]
    load(folder)
    fetched.clear()
    again, messages = resolve()
    assert again == folder and fetched == [] and messages == []


def test_failed_download_is_one_actionable_line(env, monkeypatch):
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelNotFound, match=r"could not download apple/starflow \(ConnectionError: Name or service not known\)") as failure:
        resolve()
    first, *commands = str(failure.value).splitlines()
    assert str(env / "hub") in first and "--offline" in first
    assert [command.split()[:3] for command in commands] == [["hf", "download", repo_id] for repo_id in
                                                             ("apple/starflow", "google/flan-t5-xl", "stabilityai/sd-vae-ft-ema")]


def test_a_local_checkpoint_path_converts_with_cached_companions(cached, fixtures_dir, tmp_path):
    local = tmp_path / "ckpts" / "my_model.pth"
    local.parent.mkdir()
    shutil.copyfile(fixtures_dir / "starflow" / "model.pth", local)
    folder = hub.resolve_model(str(local), dtype="float32", offline=True)
    assert folder.name.startswith("my_model-") and load(folder).name == "my_model"


def test_unknown_repository_and_converted_folder(env, tmp_path):
    with pytest.raises(ModelNotFound, match="apple/starflow"):
        hub.resolve_model("someone/else", offline=True)
    (tmp_path / "converted").mkdir()
    assert hub.resolve_model(str(tmp_path / "converted")) == tmp_path / "converted"


def test_checkpoint_digests_are_remembered(env, fixtures_dir, monkeypatch):
    calls = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda path: calls.append(path) or real(path))
    path = fixtures_dir / "starflow" / "model.pth"
    assert hub.checkpoint_digest(path) == hub.checkpoint_digest(path) == real(path)
    assert len(calls) == 1


def test_models_home_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("STARFLOW_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hub.sys, "platform", "linux")
    assert hub.models_home() == tmp_path / "mlx-starflow"
    monkeypatch.setattr(hub.sys, "platform", "darwin")
    assert hub.models_home() == Path.home() / "Library" / "Caches" / "mlx-starflow"


def test_the_shipped_config_is_the_official_3b_model():
    from mlx_starflow.convert.official_config import flow_config, read_official_config

    official = read_official_config(hub.HUB_MODELS["apple/starflow"].config_path())
    config = flow_config(official, txt_dim=2048)
    assert config.layers_per_block == (2, 2, 2, 2, 2, 24) and config.channels == 3072 and config.latent_size == 32
    assert config.txt_size == 128 and config.vae_factor == 8 and official.text_encoder == "google/flan-t5-xl"
    assert official.vae == "stabilityai/sd-vae-ft-ema"


def test_a_snapshot_with_one_of_several_layouts_counts_as_complete(env, fixtures_dir):
    """After a download, huggingface_hub remembers the repository's whole file list; the snapshot
    holds one weight layout of several and must still count as cached."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    files = repo_files(fixtures_dir)["google/flan-t5-xl"]
    snapshot = put_repo(env / "hub", "google/flan-t5-xl", files)
    listing = [*files, "pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    entries = {name: tree_cache.TreeCacheEntry(size=1, blob_id="0" * 40) for name in listing}
    tree_cache.write_tree_cache(str(snapshot.parent.parent), REVISION, entries)
    assert hub.local_snapshot(hub.HUB_FILES["google/flan-t5-xl"]) == snapshot


# ---- hostile local files: checked before anything is fetched, read with bounds ---------------------


DEEP_JSON = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("kind,fragment", [
    ("random", "is not a checkpoint"),
    ("truncated", "truncated or corrupt"),
    ("fifo", "not a regular file"),
])
def test_a_damaged_local_checkpoint_is_refused_before_any_download(env, fixtures_dir, capsys, monkeypatch, kind, fragment):
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("a download started before the checkpoint was checked"))
    monkeypatch.setattr(hub, "sha256_file", lambda *a, **k: pytest.fail("the checkpoint was hashed before it was checked"))
    damaged = env / "damaged.pth"
    if kind == "random":
        damaged.write_bytes(bytes(range(256)) * 20)
    elif kind == "truncated":
        damaged.write_bytes((fixtures_dir / "starflow" / "model.pth").read_bytes()[:3000])
    else:
        os.mkfifo(damaged)
    code = main(["generate", "a cat", "--model", str(damaged), "-o", str(env / "out.png")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert str(damaged) in err and fragment in err, err
    assert not (env / "out.png").exists() and not (env / "home").exists() and not (env / "hub").exists()


def test_an_index_nested_too_deep_is_not_a_usable_layout(fixtures_dir, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(fixtures_dir / "t5", folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(DEEP_JSON)
    assert hub.local_files(folder, hub.HUB_FILES["google/flan-t5-xl"]) is None


@pytest.mark.parametrize("memo", ["deep", "fifo"])
def test_a_damaged_digest_memo_is_computed_again(env, fixtures_dir, memo):
    checkpoint = fixtures_dir / "starflow" / "model.pth"
    path = env / "home" / hub.DIGESTS_FILE
    path.parent.mkdir(parents=True)
    if memo == "deep":
        path.write_text(DEEP_JSON)
    else:
        os.mkfifo(path)
    assert hub.checkpoint_digest(checkpoint) == hub.sha256_file(checkpoint)
    assert json.loads(path.read_text())[str(checkpoint.resolve())]["sha256"] == hub.sha256_file(checkpoint)


def test_a_fifo_cache_ref_is_no_snapshot(env):
    ref = env / "hub" / "models--apple--starflow" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    os.mkfifo(ref)
    assert hub.cached_snapshot("apple/starflow") is None
