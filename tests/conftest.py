"""Shared fixtures: the dalle2-pytorch 0.11.5 oracle, random OpenAI-format CLIP weights, and the
predictor on the tiny models, in this process and behind the real Cog server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small but complete: several heads, rotary on 32 of 64 head dimensions, normformer.
SMALL_PRIOR = dict(dim=64, depth=2, dim_head=64, heads=2, ff_mult=2)
LAION_PRIOR = dict(dim=768, depth=24, dim_head=64, heads=32, ff_mult=4)
# A small OpenAI-format CLIP: embed 64, ViT 224/32 width 64 x2, text width 64 x2.
SMALL_CLIP = dict(
    embed_dim=64,
    image_resolution=224,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)


def oracle_prior(config: dict, clip=None, seed: int = 0):
    """A dalle2-pytorch 0.11.5 ``DiffusionPrior`` with the LAION settings and random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle2_pytorch.dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    torch.manual_seed(seed)
    net = DiffusionPriorNetwork(
        **config,
        normformer=True,
        attn_dropout=0.05,
        ff_dropout=0.05,
        num_timesteps=1000,
        num_time_embeds=1,
        num_image_embeds=1,
        num_text_embeds=1,
    )
    return DiffusionPrior(
        net=net,
        clip=clip,
        image_embed_dim=config["dim"],
        timesteps=1000,
        cond_drop_prob=0.1,
        loss_type="l2",
        condition_on_text_encodings=True,
    ).eval()


def openai_clip_model(seed: int = 0, **overrides):
    """clip-anytorch's ``CLIP`` (the OpenAI model class) with random fp32 weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**{**SMALL_CLIP, **overrides}).eval()
    return model


@pytest.fixture(scope="session")
def small_oracle():
    return oracle_prior(SMALL_PRIOR)


@pytest.fixture(scope="session")
def small_clip_model():
    return openai_clip_model()


# -- the predictor on the tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    """``predict.Predictor`` set up in this process on the tiny models, with the default memory budget."""
    return tiny_predictor()


def tiny_predictor():
    """A ``predict.Predictor`` set up on the tiny models, with the default memory budget."""
    import predict

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIDP_WEIGHTS", "tiny")
        patch.delenv("DIDP_MEMORY_BUDGET_MB", raising=False)
        instance = predict.Predictor()
        instance.record_metric = lambda name, value: None
        instance.setup()
    return instance


def run_predictor(predictor, **inputs) -> list[Path]:
    """The files of one run of ``predictor`` (prompt "a lighthouse" unless given), inputs checked as the
    server checks them."""
    from pipeline.validation import validate_inputs

    return [Path(p) for p in predictor.run(**validate_inputs({"prompt": "a lighthouse", **inputs}))]


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """The output directory of the module's ``server``."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def server(output_dir, tmp_path_factory):
    """The real Cog server on the tiny models, one per test module, writing into ``output_dir``."""
    from http_server import CogServer

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with CogServer(weights="tiny", output_dir=output_dir, log_path=log_path) as running:
        yield running


@contextlib.contextmanager
def held_by_another_process(directory: Path):
    """``directory`` held (``pipeline.locks.hold``) by another process until the block ends, as a
    running ``didp`` holds its ``-o`` and the predictor its run directory."""
    code = (
        "import sys, pathlib\nfrom pipeline import locks\n"
        "held = locks.hold(pathlib.Path(sys.argv[1]))\nprint('held', flush=True)\nsys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate("")  # ends the holder
    assert holder.returncode == 0
