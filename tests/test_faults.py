"""Faults: broken weights files, memory, out-of-memory errors and unwritable outputs.

Weights faults go through the real Cog server (``/health-check`` must say ``SETUP_FAILED`` with a
message naming the file and what is wrong); the fault servers start side by side. Memory and
output faults run in-process on the tiny models where a fault has to be injected, and through
the server where it can be provoked from outside.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import time
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
from dip.memory import estimate_peak_bytes
from pipeline import memory, runner
from pipeline.memory import MemoryBudget, memory_budget_bytes, total_memory_bytes
from pipeline.results import FinalScore, OutputPicture, Result
from pipeline.rundir import OutputError
from pipeline.validation import validate_inputs
from prior.weights import convert
from testkit.cog_server import CogServer, running
from testkit.inputs import EMBED, SMALL
from testkit.predictor import run_predictor

OUTPUT_NAMES = {"text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "result.json"}


# -- weights files ----------------------------------------------------------------------------------


def full_state(prior_state: dict, clip_state: dict) -> dict:
    state = {**prior_state, **{f"clip.clip.{k}": v for k, v in clip_state.items()}}
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def flip_bytes(path: Path, start: int, count: int = 32) -> Path:
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def make_weights(root: Path, prior_state: dict, clip_state: dict) -> dict[str, tuple[Path, list[str]]]:
    """Broken weights files: name -> (path, words the setup message must contain besides the path)."""
    state = full_state(prior_state, clip_state)
    good = root / "good.pth"
    torch.save(state, good)
    cases: dict[str, tuple[Path, list[str]]] = {}

    def copy(name: str) -> Path:
        path = root / name
        path.write_bytes(good.read_bytes())
        return path

    cases["truncated-pth"] = (truncate(copy("truncated.pth")), ["truncated or corrupted"])
    safetensors = convert(good, root / "truncated" / "prior.safetensors")
    cases["truncated-safetensors"] = (truncate(safetensors), ["truncated"])
    noise = root / "noise.pth"
    noise.write_bytes(b"\0" + random.Random(0).randbytes(8192))
    cases["corrupted-noise"] = (noise, ["corrupted: neither a PyTorch"])
    size = good.stat().st_size
    cases["corrupted-zip-directory"] = (flip_bytes(copy("directory.pth"), size - 120), ["corrupted"])
    header = convert(good, root / "header" / "prior.safetensors")
    cases["corrupted-safetensors-header"] = (flip_bytes(header, 40), ["corrupted safetensors header"])
    conv = root / "resnet.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), conv)
    cases["foreign-keys"] = (conv, ["not a dalle2-pytorch diffusion prior", "unexpected keys weight"])
    clip_only = root / "clip-only.pth"
    torch.save(clip_state, clip_only)
    cases["foreign-model-clip-only"] = (clip_only, ["not a dalle2-pytorch diffusion prior", "visual."])
    shaped = dict(state)
    shaped["net.causal_transformer.layers.1.0.to_q.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    torch.save(shaped, root / "shapes.pth")
    cases["foreign-shapes"] = (
        root / "shapes.pth",
        ["mis-shaped causal_transformer.layers.1.0.to_q.weight (3, 3) (expected (128, 64))"],
    )
    narrow_clip = {k: v for k, v in state.items() if not k.startswith("clip.clip.")}
    narrow_clip.update({f"clip.clip.{k}": v.half() for k, v in _clip_state(embed_dim=32).items()})
    torch.save(narrow_clip, root / "other-clip.pth")
    cases["foreign-clip-dimension"] = (root / "other-clip.pth", ["CLIP embeds in 32 dimensions", "prior expects 64"])
    return cases


def _clip_state(**overrides) -> dict:
    from testkit.oracles import openai_clip_model

    return openai_clip_model(**overrides).state_dict()


WEIGHT_FAULTS = [
    "truncated-pth",
    "truncated-safetensors",
    "corrupted-noise",
    "corrupted-zip-directory",
    "corrupted-safetensors-header",
    "foreign-keys",
    "foreign-model-clip-only",
    "foreign-shapes",
    "foreign-clip-dimension",
]
SERVER_WEIGHT_FAULTS = ["truncated-pth", "corrupted-noise", "foreign-shapes"]  # one of each kind, through HTTP


@pytest.fixture(scope="module")
def weight_faults(tmp_path_factory, small_oracle, small_clip_model):
    return make_weights(
        tmp_path_factory.mktemp("fault-weights"), small_oracle.state_dict(), small_clip_model.state_dict()
    )


@pytest.fixture(scope="module")
def fault_servers(tmp_path_factory, weight_faults):
    """Servers on broken weights (one of each kind), on missing weights offline, with a small memory
    budget and with an output directory that cannot be made; all started side by side."""
    logs = tmp_path_factory.mktemp("fault-logs")
    servers = {
        name: CogServer(weights=str(weight_faults[name][0]), log_path=logs / f"{name}.log")
        for name in SERVER_WEIGHT_FAULTS
    }
    empty = tmp_path_factory.mktemp("empty-weights-dir")
    servers["offline-missing"] = CogServer(
        weights="laion",
        log_path=logs / "offline.log",
        env={"DIDP_WEIGHTS_DIR": str(empty), "HF_HUB_OFFLINE": "1"},
    )
    budget_outputs = tmp_path_factory.mktemp("budget-outputs")
    servers["budget"] = CogServer(
        output_dir=budget_outputs, log_path=logs / "budget.log", env={"DIDP_MEMORY_BUDGET_MB": "2000"}
    )
    blocked = tmp_path_factory.mktemp("blocked")
    (blocked / "blocker").write_text("a regular file where the output directory's parent should be")
    servers["unwritable"] = CogServer(output_dir=blocked / "blocker" / "outputs", log_path=logs / "unwritable.log")
    with running(*servers.values()):
        yield {"servers": servers, "empty": empty, "budget": budget_outputs, "blocked": blocked}


@pytest.mark.parametrize("fault", WEIGHT_FAULTS)
def test_broken_weights_fail_setup_with_a_message_naming_the_file_and_the_problem(weight_faults, fault, monkeypatch):
    from prior.checkpoint import CheckpointError

    path, words = weight_faults[fault]
    monkeypatch.setenv("DIDP_WEIGHTS", str(path))
    with pytest.raises(CheckpointError) as error:
        predict.Predictor().setup()
    message = str(error.value)
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("fault", SERVER_WEIGHT_FAULTS)
def test_broken_weights_make_the_server_report_setup_failed_naming_the_file(fault_servers, weight_faults, fault):
    server = fault_servers["servers"][fault]
    path, words = weight_faults[fault]
    health = server.health()
    assert health["status"] == "SETUP_FAILED", health
    logs = health["setup"]["logs"]
    assert "CheckpointError" in logs  # the error's type and message, not a stack trace alone
    assert str(path) in logs, logs
    for word in words:
        assert word in logs, logs
    response = server.post({"input": {"prompt": "a lighthouse", **EMBED}})
    assert response.status_code == 503


def test_missing_weights_while_offline_make_the_server_report_setup_failed(fault_servers):
    health = fault_servers["servers"]["offline-missing"].health()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert "WeightsUnavailable" in logs and "prior_ema_fp16.pth" in logs and "offline" in logs
    assert "huggingface.co/laion/DALLE2-PyTorch" in logs and str(fault_servers["empty"]) in logs


def test_missing_weights_while_offline_fail_setup_in_under_two_seconds(tmp_path, monkeypatch):
    """Timed in-process: the server's log does not reliably carry the moment setup() starts
    (coglet may drop the worker's lines when set-up fails at once)."""
    from prior.weights import WeightsUnavailable

    monkeypatch.setenv("DIDP_WEIGHTS", "laion")
    monkeypatch.setenv("DIDP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="prior_ema_fp16.pth"):
        predict.Predictor().setup()
    assert time.perf_counter() - started < 2.0


def record_data_offset(path: Path, suffix: str) -> int:
    """Where the data of the zip record whose name ends with ``suffix`` starts in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_flipped_bytes_in_a_pth_record_are_detected(tmp_path, small_oracle, small_clip_model, record):
    """Tensor data (which would load silently as wrong weights) and the pickle (which would read
    as a refusal) are both caught by the records' CRC-32s, and named as corruption."""
    from prior.checkpoint import CheckpointError
    from prior.weights import load_models

    path = tmp_path / "prior.pth"
    torch.save(full_state(small_oracle.state_dict(), small_clip_model.state_dict()), path)
    flip_bytes(path, record_data_offset(path, "/" + record) + 8, 8)
    with pytest.raises(CheckpointError, match=rf"prior.pth: corrupted: the data of '.*/{record}' does not match"):
        load_models(path, prior_dtype=torch.float32)


# -- memory: refused up front --------------------------------------------------------------------


def test_a_request_over_the_memory_budget_is_refused_up_front(fault_servers):
    server = fault_servers["servers"]["budget"]
    outputs = fault_servers["budget"]
    response = server.post(
        {"input": {"prompt": "a lighthouse", **SMALL, "size": 512, "num_cutouts": 32, "num_scales": 7}}
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "failed"
    error = body["error"]
    for words in ("size=512", "num_cutouts=32", "num_scales=7", "over the memory budget", "DIDP_MEMORY_BUDGET_MB=2000"):
        assert words in error, error
    assert body["metrics"]["predict_time"] < 1.0  # before any work
    assert not list(outputs.iterdir())  # no run directory was made
    assert server.settled_status() == "READY"
    ok = server.post({"input": {"prompt": "a lighthouse", **SMALL}}).json()  # under the budget
    assert ok["status"] == "succeeded", ok.get("error")


@pytest.fixture
def output_root(predictor, tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    monkeypatch.setattr(predictor.pipeline, "output_root", root)
    return root


def budget_from_the_environment(device: torch.device) -> tuple[int, str]:
    """The budget as the server's setup reads it: ``DIDP_MEMORY_BUDGET_MB``, else the default."""
    return memory_budget_bytes(device, os.environ.get("DIDP_MEMORY_BUDGET_MB"))


def test_the_default_budget_is_80_percent_of_the_device_memory(predictor, monkeypatch):
    monkeypatch.delenv("DIDP_MEMORY_BUDGET_MB", raising=False)
    total, kind = total_memory_bytes(predictor.pipeline.device)
    budget, source = budget_from_the_environment(predictor.pipeline.device)
    assert kind == ("GPU memory" if predictor.pipeline.device.type == "cuda" else "RAM")
    assert budget == int(total * 0.8) and source.startswith("80% of")
    assert predictor.pipeline.memory.bytes == budget
    monkeypatch.setenv("DIDP_MEMORY_BUDGET_MB", "1500")
    assert budget_from_the_environment(torch.device("cpu")) == (1500 * 2**20, "DIDP_MEMORY_BUDGET_MB=1500")
    monkeypatch.setenv("DIDP_MEMORY_BUDGET_MB", "inf")
    assert budget_from_the_environment(torch.device("cpu"))[0] >= 2**60
    for bad in ("lots", "-5", "0", "nan"):
        monkeypatch.setenv("DIDP_MEMORY_BUDGET_MB", bad)
        with pytest.raises(ValueError, match="DIDP_MEMORY_BUDGET_MB must be"):
            budget_from_the_environment(torch.device("cpu"))


def test_a_containers_memory_limit_caps_the_machines_memory_in_cgroup_v2_or_v1(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(memory, "CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    unlimited = total_memory_bytes(torch.device("cpu"))  # neither file: the machine's RAM
    cases = [("max", str(2**62), unlimited[0]), ("max", str(2**30), 2**30), (None, str(2**31), 2**31)]
    cases.append((str(2**29), None, 2**29))
    for v2_text, v1_text, expected in cases:
        for path, text in ((v2, v2_text), (v1, v1_text)):
            path.unlink(missing_ok=True)
            if text is not None:
                path.write_text(text + "\n")
        assert total_memory_bytes(torch.device("cpu")) == (expected, "RAM"), (v2_text, v1_text)


def test_the_refusal_names_the_inputs_the_budget_and_what_fits(predictor, output_root, monkeypatch):
    needed = predictor.pipeline.peak_bytes(256, 32, 4)
    budget = MemoryBudget(predictor.pipeline.device, predictor.pipeline.peak_bytes(256, 12, 4), "a test budget")
    monkeypatch.setattr(predictor.pipeline, "memory", budget)
    with pytest.raises(ValueError) as error:
        run_predictor(predictor, **{**SMALL, "num_cutouts": 32})
    message = str(error.value)
    assert f"needs about {needed / 2**30:.2f} GB on {predictor.pipeline.device.type}" in message
    assert "size=256 with num_cutouts=32 and num_scales=4" in message and "(a test budget)" in message
    assert "num_cutouts=12 fits at size=256" in message
    assert not output_root.exists()  # refused before the output directory was touched
    assert run_predictor(predictor, **{**SMALL, "num_cutouts": 12, "iterations": 0})[-1].name == "result.json"


def saved_bytes(forward, parameters) -> int:
    """The bytes autograd saves for the backward pass while ``forward()`` runs, each storage
    counted once, ``parameters`` (which live on regardless) left out."""
    kept = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


@pytest.mark.parametrize("members", [1, 3])
def test_the_estimate_covers_what_autograd_keeps_for_one_step(predictor, members):
    """The estimate's activations (without the resident weights) against a measurement: the bytes
    autograd saves for the backward pass of one step, 256 px, 8 cutouts, on the tiny CLIP, in the
    precision the server runs in, for one picture and for three optimised together."""
    from dip.loop import _render_and_score, _Run, default_precision
    from dip.settings import DipSettings

    clip = predictor.pipeline.models.clip
    device = predictor.pipeline.device
    settings = DipSettings(size=256, num_scales=4, num_cutouts=8, seed=0)
    runs = [_Run(settings, seed, clip, device) for seed in range(members)]
    targets = torch.nn.functional.normalize(torch.randn(members, clip.embed_dim, device=device), dim=-1)
    inputs = [run.net_input for run in runs]
    parameters = [*clip.parameters(), *(p for run in runs for p in run.net.parameters())]
    precision = default_precision(device)
    measured = saved_bytes(lambda: _render_and_score(runs, inputs, clip, targets, precision), parameters)
    estimated = predictor.pipeline.peak_bytes(256, 8, 4, members) - predictor.pipeline.resident_bytes
    assert measured <= estimated <= 2.5 * measured, (measured >> 20, estimated >> 20)


def test_the_estimate_covers_clip_vit_l14s_attention_in_bf16_on_the_cpu():
    """CLIP's part of the estimate against the bytes autograd saves for 2 layers of a ViT-L/14-sized
    image tower (width 1024, 16 heads, 257 tokens), 8 cutouts, bf16 autocast on the CPU, where the
    attention keeps each layer's scores."""
    import open_clip

    from backbone.clip import build_clip

    config = dict(open_clip.get_model_config("ViT-L-14"), quick_gelu=True)
    config["vision_cfg"] = {**config["vision_cfg"], "layers": 2}
    torch.manual_seed(0)
    clip = build_clip(config)
    cutouts = torch.rand(8, 3, 224, 224, requires_grad=True)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            clip.encode_image(clip.normalize(cutouts))

    measured = saved_bytes(forward, clip.parameters())

    def clip_part(heads):  # the estimate's transformer layers: less its network and cutouts
        shape = dict(clip_image_size=224, vit_tokens=257, vit_width=1024, precision="bf16")
        with_layers = estimate_peak_bytes(8, 8, 1, **shape, vit_layers=2, kept_score_heads=heads)
        return with_layers - estimate_peak_bytes(8, 8, 1, **shape, vit_layers=0)

    assert clip_part(0) < measured <= clip_part(16) <= 2.5 * measured, (clip_part(0) >> 20, measured >> 20)


# -- memory: out of memory during a run ----------------------------------------------------------


def test_out_of_memory_mid_run_is_reported_freed_and_the_next_run_succeeds(predictor, output_root, monkeypatch):
    real = runner.visualise_batch
    held: list[weakref.ref] = []

    def visualise_then_oom(*args, **kwargs):
        frames = real(*args, **kwargs)

        def gen():
            ballast = torch.empty(2**25)  # 128 MB the failed step still holds
            held.append(weakref.ref(ballast))
            try:
                yield next(frames)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            finally:
                frames.close()

        return gen()

    monkeypatch.setattr(runner, "visualise_batch", visualise_then_oom)
    produced = []
    with pytest.raises(RuntimeError) as error:
        for path in predictor.run(**validate_inputs({"prompt": "a lighthouse", **SMALL, "iterations": 0})):
            produced.append(Path(path))
    message = str(error.value)
    assert type(error.value) is RuntimeError
    assert f"out of memory on {predictor.pipeline.device.type} during this run (size=256, num_cutouts=4)" in message
    assert "Tried to allocate 20.00 GiB" in message and "lower num_cutouts or size" in message
    assert len(produced) == 4  # the embeddings and one picture came out before the failure
    assert not any(path.exists() for path in produced)
    assert list(output_root.iterdir()) == []  # the run's files are gone
    assert held and held[0]() is None  # and so is the memory the failed step held
    monkeypatch.setattr(runner, "visualise_batch", real)
    assert run_predictor(predictor, **{**SMALL, "iterations": 0})[-1].name == "result.json"


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 1 bytes"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ],
    ids=["cuda", "cpu-allocator", "cublas", "cudnn"],
)
def test_out_of_memory_in_the_prior_is_reported_and_the_next_run_succeeds(predictor, output_root, monkeypatch, error):
    def sample(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner, "sample_image_embeds", sample)
    with pytest.raises(RuntimeError, match=r"out of memory on \w+ during this run \(the prior\)"):
        run_predictor(predictor, **EMBED)
    assert list(output_root.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(predictor.pipeline, "output_root", output_root)
    assert {p.name for p in run_predictor(predictor, **EMBED)} == OUTPUT_NAMES


def test_other_errors_are_not_mistaken_for_out_of_memory(predictor, output_root, monkeypatch):
    def sample(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(runner, "sample_image_embeds", sample)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        run_predictor(predictor, **EMBED)
    assert list(output_root.iterdir()) == []  # any failure removes the run's files


# -- a server killed in mid-prediction ----------------------------------------------------------------


def test_a_run_directory_of_a_server_killed_mid_prediction_goes_at_an_immediate_restart(tmp_path):
    """``kill -9`` of the served process group (an out-of-memory kill, a container restart), then a
    new server at once on the same output directory: the killed run's directory, seconds old, is
    removed by the new server's setup."""
    outputs = tmp_path / "outputs"
    long_run = {"prompt": "a lighthouse", "iterations": 1000, "display_freq": 1, "num_scales": 4, "num_cutouts": 4}
    killed = CogServer(output_dir=outputs, log_path=tmp_path / "killed.log").start()
    try:
        killed.wait_for_setup()
        accepted = killed.post({"input": long_run}, headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        deadline = time.monotonic() + 120
        while not list(outputs.glob("run-*/step_0001.png")) and time.monotonic() < deadline:
            time.sleep(0.2)
        (left,) = outputs.iterdir()
        assert (left / "step_0001.png").is_file()
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait(timeout=30)
    finally:
        killed.stop()
    assert left.is_dir()  # nothing ran to remove it
    with CogServer(output_dir=outputs, log_path=tmp_path / "restarted.log") as restarted:
        assert restarted.health()["status"] == "READY"
        assert list(outputs.iterdir()) == []


# -- outputs: not writable, full --------------------------------------------------------------------


def test_a_full_disk_fails_the_run_clearly_and_the_next_run_succeeds(predictor, output_root, monkeypatch):
    real_save = np.save

    def save_then_full(path, array, *args, **kwargs):
        Path(path).write_bytes(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save_then_full)
    with pytest.raises(OutputError) as error:
        run_predictor(predictor, **EMBED)
    message = str(error.value)
    assert "text_tokens.npy: No space left on device" in message
    assert f"DIDP_OUTPUT_DIR ({output_root}) must be a writable directory with free space" in message
    assert list(output_root.iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    assert {p.name for p in run_predictor(predictor, **EMBED)} == OUTPUT_NAMES


def test_an_output_dir_that_cannot_be_made_fails_the_run_clearly(predictor, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(predictor.pipeline, "output_root", tmp_path / "file" / "outputs")
    with pytest.raises(OutputError, match="cannot write the outputs: .*file/outputs: Not a directory"):
        run_predictor(predictor, **EMBED)


def test_an_unwritable_output_dir_fails_the_request_and_the_server_stays_up(fault_servers):
    server = fault_servers["servers"]["unwritable"]
    blocked = fault_servers["blocked"]
    body = server.post({"input": {"prompt": "a lighthouse", **EMBED}}).json()
    assert body["status"] == "failed"
    assert "cannot write the outputs" in body["error"] and "Not a directory" in body["error"]
    assert "DIDP_OUTPUT_DIR" in body["error"]
    assert server.settled_status() == "READY"
    (blocked / "blocker").unlink()  # the operator fixes the directory: no restart needed
    body = server.post({"input": {"prompt": "a lighthouse", **EMBED}}).json()
    assert body["status"] == "succeeded", body.get("error")
    (run_dir,) = (blocked / "blocker" / "outputs").iterdir()
    assert {p.name for p in run_dir.iterdir()} == OUTPUT_NAMES


def test_result_json_stays_strict_json_when_a_run_diverges(tmp_path):
    """A large lr can drive the loss to NaN; result.json must still parse as standard JSON."""

    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")

    nan, inf = float("nan"), float("inf")
    data = Result(
        inputs={"lr": 10.0},
        seed=3,
        device="cpu",
        weights={"name": "tiny"},
        final=FinalScore(loss=nan, similarity_to_target=inf),
        outputs=[OutputPicture(file="best_01.png", loss=-inf, similarity_to_target=0.5, seed=3)],
    )
    path = tmp_path / "result.json"
    path.write_text(data.to_json())
    result = json.loads(Path(path).read_text(), parse_constant=refuse)
    assert result["final"] == {"loss": None, "similarity_to_target": None}
    assert result["outputs"] == [{"file": "best_01.png", "loss": None, "similarity_to_target": 0.5, "seed": 3}]
    assert result["inputs"]["lr"] == 10.0
