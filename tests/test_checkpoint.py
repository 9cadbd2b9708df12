"""Loading prior checkpoints: formats, wrappers, precision, errors, safety, sources, integrity, identity."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from prior.checkpoint import Checkpoint, CheckpointError, save_safetensors
from prior.factory import WeightsIdentity
from prior.sampling import sample_image_embeds
from prior.weights import PROXY_VARIABLES, WeightsUnavailable, convert, converted_name, load_models
from testkit.oracles import LAION_PRIOR, SMALL_PRIOR, oracle_prior


@pytest.fixture(scope="module")
def prior_state(small_oracle):
    return small_oracle.state_dict()


@pytest.fixture(scope="module")
def clip_state(small_clip_model):
    return small_clip_model.state_dict()


def full_state(prior_state, clip_state, dtype=torch.float16):
    state = {**prior_state, **{f"clip.clip.{k}": v for k, v in clip_state.items()}}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def assert_loaded(models, prior_state, dtype=torch.float16):
    net = models.prior.net.state_dict()
    for key, value in prior_state.items():
        if key.startswith("net."):
            assert torch.equal(net[key.removeprefix("net.")], value.to(dtype).float()), key


@pytest.mark.parametrize("wrapper", ["raw", "ema_model", "model", "ema_model_prefixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_wrapper_and_precision_loads(tmp_path, prior_state, clip_state, wrapper, dtype):
    state = full_state(prior_state, clip_state, dtype)
    payload = {
        "raw": state,
        "ema_model": {"ema_model": state},
        "model": {"model": state, "optimizer": {}, "step": 3},
        "ema_model_prefixed": {"ema_model": {**{f"ema_model.{k}": v for k, v in state.items()}, "step": torch.ones(1)}},
    }[wrapper]
    path = tmp_path / "prior.pth"
    torch.save(payload, path)
    models = load_models(path, prior_dtype=torch.float32)
    assert models.prior.config.dim == SMALL_PRIOR["dim"] and models.prior.config.depth == SMALL_PRIOR["depth"]
    assert_loaded(models, prior_state, dtype)
    assert models.clip.embed_dim == 64


def test_prior_without_clip_takes_clip_from_the_directory(tmp_path, prior_state, clip_state):
    torch.save({k: v.half() for k, v in prior_state.items()}, tmp_path / "prior.pth")
    convert(tmp_path / "prior.pth", tmp_path / "prior.safetensors")
    from prior.checkpoint import save_safetensors

    save_safetensors(clip_state, tmp_path / "clip.safetensors")
    (tmp_path / "prior.pth").unlink()
    models = load_models(tmp_path, prior_dtype=torch.float32)
    assert_loaded(models, prior_state)
    weight = models.clip.model.token_embedding.weight
    assert torch.equal(weight, clip_state["token_embedding.weight"])


def test_prior_without_clip_and_no_clip_file_is_refused(tmp_path, prior_state):
    torch.save(prior_state, tmp_path / "prior.pth")
    with pytest.raises(WeightsUnavailable, match="carries no CLIP"):
        load_models(tmp_path / "prior.pth")


def test_safetensors_conversion_keeps_every_tensor(tmp_path, prior_state, clip_state):
    state = full_state(prior_state, clip_state)
    torch.save({"ema_model": state}, tmp_path / "prior.pth")
    convert(tmp_path / "prior.pth", tmp_path / "out" / "prior.safetensors")
    converted = dict(Checkpoint(tmp_path / "out" / "prior.safetensors").tensors())
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert converted[key].dtype == value.dtype and torch.equal(converted[key], value), key
    a = load_models(tmp_path / "prior.pth", prior_dtype=torch.float32).prior.net.state_dict()
    b = load_models(tmp_path / "out", prior_dtype=torch.float32).prior.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_dict_whose_tensors_share_memory_converts(tmp_path, prior_state, clip_state):
    # 0.11.5's layers share one rotary ``freqs`` tensor; fp32 keeps the sharing through torch.save
    state = full_state(prior_state, clip_state, torch.float32)
    freqs = [v for k, v in state.items() if k.endswith("rotary_emb.freqs")]
    assert len(freqs) == SMALL_PRIOR["depth"] and len({f.untyped_storage().data_ptr() for f in freqs}) == 1
    torch.save({"ema_model": state}, tmp_path / "prior.pth")
    convert(tmp_path / "prior.pth", tmp_path / "out" / "prior.safetensors")
    converted = dict(Checkpoint(tmp_path / "out" / "prior.safetensors").tensors())
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], v) for k, v in state.items())
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert listing == ["prior.safetensors", "prior.safetensors.manifest.json"]  # no partial file left


def test_a_dalle2_trainer_checkpoint_loads(tmp_path, prior_state, clip_state):
    """0.11.5's DiffusionPriorTrainer.save also pickles its package version, a packaging Version."""
    from packaging import version

    state = full_state(prior_state, clip_state)
    online = {k: torch.zeros_like(v) for k, v in state.items()}  # the trained, not averaged, weights
    ema = {"initted": torch.tensor(True), "step": torch.tensor(7), **{f"ema_model.{k}": v for k, v in state.items()}}
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=1.1e-4, weight_decay=6e-2)  # the trainer's optimiser
    weight.sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    saved = {"scaler": scaler, "optimizer": optimizer.state_dict(), "model": online, "step": 7}
    saved["version"] = version.parse("0.11.5")
    torch.save({**saved, "ema": ema, "ema_model": state}, tmp_path / "trainer.pth")
    assert_loaded(load_models(tmp_path / "trainer.pth", prior_dtype=torch.float32), prior_state)  # the EMA weights


def test_a_conversion_removes_partial_files_that_a_killed_conversion_left(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "prior.pth")
    target = tmp_path / "out" / "prior.safetensors"
    target.parent.mkdir()
    dead, alive = 2**22 + 12345, os.getppid()  # a pid above Linux's maximum, and a running process
    for pid in (dead, alive):
        target.with_name(f"prior.safetensors.{pid}.partial").write_bytes(b"half a model")
        target.with_name(f"prior.safetensors.manifest.json.{pid}.partial").write_bytes(b'{"fi')
    convert(tmp_path / "prior.pth", target)
    assert {p.name for p in target.parent.iterdir()} == {
        "prior.safetensors",
        "prior.safetensors.manifest.json",
        f"prior.safetensors.{alive}.partial",
        f"prior.safetensors.manifest.json.{alive}.partial",
    }


def test_convert_command_writes_safetensors(tmp_path, prior_state, clip_state):
    from prior.convert import main

    torch.save(full_state(prior_state, clip_state), tmp_path / "in.pth")
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "prior.safetensors")]) == 0
    assert load_models(tmp_path, prior_dtype=torch.float32).prior.config.dim == 64


def test_loaded_in_bf16_keeps_rotary_frequencies_in_fp32(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "p.pth")
    net = load_models(tmp_path / "p.pth", prior_dtype=torch.bfloat16).prior.net
    assert net.learned_query.dtype == torch.bfloat16
    freqs = net.causal_transformer.layers[0][0].rotary_emb.freqs
    assert freqs.dtype == torch.float32
    assert torch.equal(freqs, prior_state["net.causal_transformer.layers.0.0.rotary_emb.freqs"].half().float())


def test_a_file_converted_to_the_run_dtype_is_memory_mapped_not_copied(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "p.pth")
    path = convert(tmp_path / "p.pth", tmp_path / converted_name(torch.bfloat16), torch.bfloat16)
    stored = Checkpoint(path).dtypes("net.")
    assert stored["learned_query"] == torch.bfloat16
    assert stored["causal_transformer.layers.0.0.rotary_emb.freqs"] == torch.float32
    net = load_models(tmp_path, prior_dtype=torch.bfloat16).prior.net
    size = path.stat().st_size
    assert net.learned_query.untyped_storage().nbytes() == size  # a view of the whole mapped file
    reference = load_models(tmp_path / "p.pth", prior_dtype=torch.bfloat16).prior.net.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in net.state_dict().items())


def test_mapped_weights_are_copy_on_write(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "p.pth")
    path = convert(tmp_path / "p.pth", tmp_path / converted_name(torch.bfloat16), torch.bfloat16)
    before = path.read_bytes()
    net = load_models(tmp_path, prior_dtype=torch.bfloat16).prior.net
    net.learned_query.data.zero_()
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_gives_a_clear_error(tmp_path, prior_state, clip_state, suffix):
    path = tmp_path / "prior.pth"
    torch.save(full_state(prior_state, clip_state), path)
    if suffix == ".safetensors":
        convert(path, tmp_path / "prior.safetensors")
        path = tmp_path / "prior.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*truncated"):
        load_models(path)


def test_corrupted_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "prior.pth"
    noise = random.Random(0).randbytes(4096)
    path.write_bytes(b"\0" + noise)
    with pytest.raises(CheckpointError, match="prior.pth: corrupted: neither a PyTorch"):
        load_models(path)
    path.write_bytes(b"PK\x03\x04" + noise)
    with pytest.raises(CheckpointError, match="prior.pth: truncated or corrupted PyTorch file"):
        load_models(path)
    path = tmp_path / "prior.safetensors"
    path.write_bytes((100).to_bytes(8, "little") + b"{not json" + bytes(200))
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        load_models(path)


def test_mis_shaped_and_missing_keys_are_named(tmp_path, prior_state, clip_state):
    state = full_state(prior_state, clip_state)
    state["net.causal_transformer.layers.1.0.to_q.weight"] = torch.zeros(3, 3)
    del state["net.causal_transformer.norm.gamma"]
    torch.save(state, tmp_path / "p.pth")
    with pytest.raises(CheckpointError) as error:
        load_models(tmp_path / "p.pth")
    message = str(error.value)
    assert "missing causal_transformer.norm.gamma" in message
    assert "mis-shaped causal_transformer.layers.1.0.to_q.weight (3, 3) (expected (128, 64))" in message


def test_unexpected_keys_are_named(tmp_path, prior_state, clip_state):
    state = full_state(prior_state, clip_state)
    state["net.causal_transformer.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "p.pth")
    with pytest.raises(CheckpointError, match="unexpected causal_transformer.extra.weight"):
        load_models(tmp_path / "p.pth")


def test_a_foreign_checkpoint_is_refused(tmp_path):
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(
        CheckpointError, match="not a dalle2-pytorch diffusion prior checkpoint: unexpected keys weight"
    ):
        load_models(tmp_path / "resnet.pth")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pth_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"net.learned_query": _RunsCode(marker)}, f)
    torch.save({"state": _RunsCode(marker)}, tmp_path / "evil_zip.pth")
    for candidate in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="refused to load"):
            load_models(candidate)
    assert not marker.exists()


def test_missing_laion_weights_offline_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as error:
        load_models("laion")
    assert time.monotonic() - started < 2.0
    message = str(error.value)
    assert "prior_ema_fp16.pth" in message and "huggingface.co/laion/DALLE2-PyTorch" in message
    assert "DIDP_WEIGHTS" in message and str(tmp_path) in message


def test_hf_hub_offline_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="offline"):
        load_models("laion")


def test_converted_laion_weights_in_the_cache_load_without_network(tmp_path, monkeypatch, prior_state, clip_state):
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(full_state(prior_state, clip_state), tmp_path / "src.pth")
    convert(tmp_path / "src.pth", tmp_path / "laion" / converted_name(torch.float32), torch.float32)
    models = load_models("laion", prior_dtype=torch.float32)
    assert models.name == "laion"
    assert_loaded(models, prior_state)


def fake_hub_cache(cache: Path, filename: str, data: Path) -> None:
    """``data`` as huggingface_hub's cache holds ``laion/DALLE2-PyTorch``'s ``filename``."""
    repo = cache / "models--laion--DALLE2-PyTorch"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / filename).write_bytes(data.read_bytes())


def test_a_damaged_converted_file_in_the_cache_is_converted_again(tmp_path, monkeypatch, prior_state, clip_state):
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(full_state(prior_state, clip_state), tmp_path / "src.pth")
    fake_hub_cache(tmp_path, "prior_ema_fp16.pth", tmp_path / "src.pth")
    converted = tmp_path / "laion" / converted_name(torch.float32)
    convert(tmp_path / "src.pth", converted, torch.float32)
    whole = converted.read_bytes()
    converted.write_bytes(whole[: len(whole) // 2])  # e.g. a full disk, or a copy cut short
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(converted)
    assert_loaded(load_models("laion", prior_dtype=torch.float32), prior_state)
    assert len(dict(Checkpoint(converted).tensors())) == len(full_state(prior_state, clip_state))  # whole again


def test_behind_a_proxy_the_hub_is_not_probed_directly(monkeypatch):
    from prior.weights import hub_reachable

    def no_direct_route(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", no_direct_route)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable()  # huggingface_hub goes through the proxy: the download decides


def test_a_name_lookup_that_hangs_counts_as_unreachable_within_the_timeout(monkeypatch):
    from prior.weights import hub_reachable

    for name in ("HF_HUB_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    release = threading.Event()

    def hanging_lookup(address, timeout):  # a resolver that does not answer; the timeout is the connect's
        release.wait(30)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    started = time.monotonic()
    assert not hub_reachable(timeout=0.5)
    assert time.monotonic() - started < 1.5
    release.set()


def test_the_probe_uses_the_endpoint_schemes_port(monkeypatch):
    from huggingface_hub import constants

    from prior.weights import hub_reachable

    for name in ("HF_HUB_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    probed = []

    def record(address, timeout):
        probed.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", record)
    for endpoint in ("http://mirror.example", "https://mirror.example", "http://mirror.example:8080"):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        hub_reachable()
    assert probed == [("mirror.example", 80), ("mirror.example", 443), ("mirror.example", 8080)]


def test_unknown_weights_name_is_explained():
    with pytest.raises(WeightsUnavailable, match="use tiny, laion or a path"):
        load_models("no-such-weights")


def test_tiny_weights_are_deterministic():
    a = load_models("tiny", prior_dtype=torch.float32)
    text = a.clip.encode_text(a.clip.tokenize("a cat").ids)
    first = sample_image_embeds(a.prior.net, a.prior.schedule, text, torch.Generator().manual_seed(0))
    b = load_models("tiny", prior_dtype=torch.float32)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.prior.net.state_dict().values(), b.prior.net.state_dict().values(), strict=True)
    )
    assert all(
        torch.equal(x, y) for x, y in zip(a.clip.state_dict().values(), b.clip.state_dict().values(), strict=True)
    )
    second = sample_image_embeds(
        b.prior.net,
        b.prior.schedule,
        b.clip.encode_text(b.clip.tokenize("a cat").ids),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(first.image_embeds, second.image_embeds)


@pytest.mark.slow
def test_full_size_laion_layout_checkpoint_loads_and_samples(tmp_path):
    """A random fp16 checkpoint of the real LAION configuration and key layout (~500 MB)."""
    oracle = oracle_prior(LAION_PRIOR)
    state = {k: v.half() for k, v in oracle.state_dict().items()}
    del oracle
    torch.save(state, tmp_path / "prior_ema_fp16.pth")
    from prior.checkpoint import save_safetensors
    from testkit.oracles import openai_clip_model

    save_safetensors(
        openai_clip_model(embed_dim=768, transformer_width=768, transformer_heads=12).state_dict(),
        tmp_path / "clip.safetensors",
    )
    models = load_models(tmp_path, prior_dtype=torch.float32)
    config = models.prior.config
    assert (config.dim, config.depth, config.heads, config.dim_head, config.ff_mult) == (768, 24, 32, 64, 4)
    assert sum(p.numel() for p in models.prior.net.parameters()) == pytest.approx(249.2e6, rel=0.01)
    assert_loaded(models, state)
    text = models.clip.encode_text(models.clip.tokenize("a lighthouse").ids)
    sample = sample_image_embeds(
        models.prior.net, models.prior.schedule, text, torch.Generator().manual_seed(0), steps=4, cond_scale=2.0
    )
    assert sample.image_embeds.shape == (1, 768) and torch.isfinite(sample.image_embeds).all()


# -- integrity of converted files: a manifest of size and sha256 beside each ----------------------------


def manifest_of(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def flip_a_byte_of(path: Path, name: str) -> None:
    """Change one byte in the data of tensor ``name`` of a safetensors file; header and size stay valid."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def laion_cache(tmp_path: Path, monkeypatch, state: dict, keep_source: bool = True) -> Path:
    """``tmp_path`` as the weights directory after a first ``laion`` start in float32, offline from now on;
    LAION's file stays in the hub cache unless not ``keep_source``. Returns the converted file."""
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "download" / "prior_ema_fp16.pth"
    source.parent.mkdir()
    torch.save(state, source)
    if keep_source:
        fake_hub_cache(tmp_path, source.name, source)
    return convert(source, tmp_path / "laion" / converted_name(torch.float32), torch.float32)


def test_a_conversion_records_the_files_size_and_sha256_in_a_manifest_beside_it(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "src.pth")
    target = convert(tmp_path / "src.pth", tmp_path / "out" / "prior.safetensors")
    data = target.read_bytes()
    assert json.loads(manifest_of(target).read_text()) == {
        "file": "prior.safetensors",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": "src.pth",
    }


def test_the_convert_command_writes_the_manifest_too(tmp_path, prior_state, clip_state):
    from prior.convert import main

    torch.save(full_state(prior_state, clip_state), tmp_path / "in.pth")
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "prior.safetensors")]) == 0
    recorded = json.loads(manifest_of(tmp_path / "prior.safetensors").read_text())["sha256"]
    assert recorded == hashlib.sha256((tmp_path / "prior.safetensors").read_bytes()).hexdigest()


def test_a_flipped_byte_in_the_converted_laion_file_is_found_and_converted_again(
    tmp_path, monkeypatch, caplog, prior_state, clip_state
):
    converted = laion_cache(tmp_path, monkeypatch, full_state(prior_state, clip_state))
    good = converted.read_bytes()
    flip_a_byte_of(converted, "net.learned_query")
    Checkpoint(converted)  # header and size still pass: only the checksum tells
    with caplog.at_level(logging.WARNING, logger="prior.weights"):
        models = load_models("laion", prior_dtype=torch.float32)
    assert_loaded(models, prior_state)
    assert converted.read_bytes() == good
    assert f"{converted} cannot be used, converting it again" in caplog.text
    assert f"sha256 {hashlib.sha256(good).hexdigest()}" in caplog.text  # what the manifest recorded


@pytest.mark.parametrize(
    ("damage", "reason"), [("delete", "missing"), ("garble", "unreadable")], ids=["missing", "unreadable"]
)
def test_a_converted_laion_file_without_a_readable_manifest_is_converted_again(
    tmp_path, monkeypatch, caplog, prior_state, clip_state, damage, reason
):
    """As a cache filled before manifests were recorded, or one whose manifest was damaged, is."""
    converted = laion_cache(tmp_path, monkeypatch, full_state(prior_state, clip_state))
    manifest = manifest_of(converted)
    manifest.unlink() if damage == "delete" else manifest.write_text('{"file": "prior-float32.safet')
    with caplog.at_level(logging.WARNING, logger="prior.weights"):
        assert_loaded(load_models("laion", prior_dtype=torch.float32), prior_state)
    assert f"{manifest}: {reason}" in caplog.text
    assert json.loads(manifest.read_text())["sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()


def test_a_damaged_converted_laion_file_that_cannot_be_converted_again_is_refused_saying_what_to_do(
    tmp_path, monkeypatch, prior_state, clip_state
):
    converted = laion_cache(tmp_path, monkeypatch, full_state(prior_state, clip_state), keep_source=False)
    flip_a_byte_of(converted, "net.learned_query")
    damaged = converted.read_bytes()
    with pytest.raises(WeightsUnavailable) as error:
        load_models("laion", prior_dtype=torch.float32)
    message = str(error.value)
    assert message.startswith(f"{converted} cannot be used and cannot be converted again: {converted}: sha256 ")
    restore = f"Put good copies of {converted.name} and {manifest_of(converted).name} back in {converted.parent}"
    assert restore in message
    assert "prior_ema_fp16.pth" in message and "huggingface.co/laion/DALLE2-PyTorch" in message  # the source
    assert converted.read_bytes() == damaged  # nothing removed that could not be replaced


def test_a_users_converted_file_that_contradicts_its_manifest_is_refused(tmp_path, prior_state, clip_state):
    """Directory weights need no manifest; one that ``python -m prior.convert`` wrote beside them is checked."""
    torch.save(full_state(prior_state, clip_state), tmp_path / "src.pth")
    target = convert(tmp_path / "src.pth", tmp_path / "mine" / "prior.safetensors")
    flip_a_byte_of(target, "net.learned_query")
    expected = r"mine/prior.safetensors: sha256 [0-9a-f]{64}, but prior.safetensors.manifest.json records sha256 "
    with pytest.raises(CheckpointError, match=expected):
        load_models(tmp_path / "mine", prior_dtype=torch.float32)


# -- identity: which weights were loaded, by name and content hash, never by path -------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_weights_have_the_same_identity_at_every_load_in_any_precision():
    """The identity of the generated weights, before the prior is cast to the precision it runs in."""
    first = load_models("tiny", prior_dtype=torch.float32).identity
    assert first == load_models("tiny", prior_dtype=torch.float32).identity
    assert first == load_models("tiny", prior_dtype=torch.bfloat16).identity
    assert first.name == "tiny" and re.fullmatch("[0-9a-f]{64}", first.sha256)


def test_a_directory_is_identified_by_its_name_and_the_sha256_of_the_file_loaded(tmp_path, prior_state, clip_state):
    weights = tmp_path / "server" / "mine"
    weights.mkdir(parents=True)
    torch.save(full_state(prior_state, clip_state), weights / "prior.pth")
    identity = load_models(weights, prior_dtype=torch.float32).identity
    assert identity.to_dict() == {"name": "mine", "sha256": sha256_of(weights / "prior.pth")}
    assert "/" not in json.dumps(identity.to_dict())


def test_a_single_file_is_identified_by_its_file_name(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "prior.pth")
    identity = load_models(tmp_path / ".." / tmp_path.name / "prior.pth", prior_dtype=torch.float32).identity
    assert identity == WeightsIdentity("prior.pth", sha256_of(tmp_path / "prior.pth"))


def test_different_checkpoints_have_different_identities_under_the_same_name(tmp_path, prior_state, clip_state):
    state = full_state(prior_state, clip_state)
    other = {**state, "net.learned_query": state["net.learned_query"] + 1}  # one tensor retrained
    identities = []
    for host, weights in (("a", state), ("b", other)):
        (tmp_path / host / "weights").mkdir(parents=True)
        torch.save(weights, tmp_path / host / "weights" / "prior.pth")
        identities.append(load_models(tmp_path / host / "weights", prior_dtype=torch.float32).identity)
    assert identities[0].name == identities[1].name == "weights"
    assert identities[0].sha256 != identities[1].sha256


def test_a_prior_with_a_separate_clip_file_is_identified_by_both_files(tmp_path, prior_state, clip_state):
    """The sha256 of the two files' hex digests, prior first, one per line."""
    torch.save({k: v.half() for k, v in prior_state.items()}, tmp_path / "prior.pth")
    save_safetensors(clip_state, tmp_path / "clip.safetensors")
    identity = load_models(tmp_path, prior_dtype=torch.float32).identity
    both = f"{sha256_of(tmp_path / 'prior.pth')}\n{sha256_of(tmp_path / 'clip.safetensors')}"
    assert identity.sha256 == hashlib.sha256(both.encode()).hexdigest()


def test_a_clip_file_that_is_not_loaded_is_not_part_of_the_identity(tmp_path, prior_state, clip_state):
    torch.save(full_state(prior_state, clip_state), tmp_path / "prior.pth")  # carries its own CLIP
    save_safetensors(clip_state, tmp_path / "clip.safetensors")
    assert load_models(tmp_path, prior_dtype=torch.float32).identity.sha256 == sha256_of(tmp_path / "prior.pth")


def test_laion_weights_are_identified_by_the_sha256_their_manifest_records(
    tmp_path, monkeypatch, prior_state, clip_state
):
    converted = laion_cache(tmp_path, monkeypatch, full_state(prior_state, clip_state))
    recorded = json.loads(manifest_of(converted).read_text())["sha256"]
    assert load_models("laion", prior_dtype=torch.float32).identity == WeightsIdentity("laion", recorded)


@pytest.mark.parametrize("layout", ["hub blob", "plain copy"])
def test_laion_weights_with_openais_clip_are_identified_by_both_files(
    tmp_path, monkeypatch, prior_state, clip_state, layout
):
    """The hub's cache names a large file's blob by its sha256, which is taken as it is; a plain copy is hashed."""
    converted = laion_cache(tmp_path, monkeypatch, {k: v.half() for k, v in prior_state.items()})
    clip = tmp_path / "clip.safetensors"
    save_safetensors(clip_state, clip)
    snapshot = tmp_path / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    if layout == "hub blob":
        blob = snapshot.parent.parent / "blobs" / sha256_of(clip)
        blob.parent.mkdir()
        clip.rename(blob)
        (snapshot / "open_clip_model.safetensors").symlink_to(Path("../../blobs") / blob.name)
    else:
        clip.rename(snapshot / "open_clip_model.safetensors")
    identity = load_models("laion", prior_dtype=torch.float32).identity
    prior_sha256 = json.loads(manifest_of(converted).read_text())["sha256"]
    clip_sha256 = sha256_of(snapshot / "open_clip_model.safetensors")
    assert identity == WeightsIdentity("laion", hashlib.sha256(f"{prior_sha256}\n{clip_sha256}".encode()).hexdigest())


def test_result_json_names_directory_weights_by_name_and_hash_not_by_their_path(tmp_path, prior_state, clip_state):
    from pipeline.request import Request
    from pipeline.runner import Pipeline

    weights = tmp_path / "server" / "mine"
    weights.mkdir(parents=True)
    torch.save(full_state(prior_state, clip_state), weights / "prior.pth")
    pipeline = Pipeline(str(weights), output_root=tmp_path / "outputs")
    out = pipeline.new_run_directory()
    job = pipeline.prepare(Request.check(prompt="a lighthouse", mode="embed", prior_steps=4))
    *_, result_path = pipeline.run(job, out)
    text = result_path.read_text()
    assert json.loads(text)["weights"] == {"name": "mine", "sha256": sha256_of(weights / "prior.pth")}
    assert str(tmp_path) not in text
    out.discard()
