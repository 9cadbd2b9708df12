"""The prior against dalle2-pytorch 0.11.5 on this CPU: step time, sampling, parity, loading.

Full run: the LAION configuration (249 M parameters) with random weights. ``--quick``: the same
widths with 4 layers. The oracle's 1000-step ``sample`` is extrapolated from timed steps (1000
times the median step); ours is timed end to end (prefix encoding included).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from backbone.clip import TextEncoding
from prior.config import PriorConfig
from prior.model import PriorNetwork
from prior.sampling import make_denoiser, sample_image_embeds
from prior.schedule import NoiseSchedule
from prior.weights import default_prior_dtype
from testkit import ROOT
from testkit.oracles import LAION_PRIOR, oracle_prior

CANDIDATES = 2


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def text_condition(dim: int, seed: int = 0) -> TextEncoding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[:, :12] = True  # a 10-word caption
    return TextEncoding(
        F.normalize(torch.randn(1, dim, generator=g), dim=-1), torch.randn(1, 77, dim, generator=g), mask
    )


# Run as ``python -c`` in the repository root, which puts the root first on the child's import path.
_LOAD_SCRIPT = r"""
import json, sys, time, torch
from prior.checkpoint import Checkpoint
from prior.weights import load_prior
def status(field):  # VmHWM, not ru_maxrss: Linux carries the forking parent's peak RSS across exec into ru_maxrss
    return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) * 1024
def rss():
    return status('VmRSS')
dtype = getattr(torch, sys.argv[2])
before = rss()
started = time.perf_counter()
prior = load_prior(Checkpoint(sys.argv[1]), dtype)
seconds = time.perf_counter() - started
with torch.inference_mode():  # touch every weight: mapped pages count once they are used
    dim = prior.config.dim
    mask = torch.ones(1, 77, dtype=torch.bool)
    prior.net(torch.zeros(1, dim), torch.zeros(1, dtype=torch.long), torch.zeros(1, dim), torch.zeros(1, 77, dim),
              mask, mask[:, 0])
peak = status('VmHWM')
model = sum(t.numel() * t.element_size() for t in prior.net.state_dict().values())
print(json.dumps({"seconds": seconds, "peak_over_model": (peak - before) / model}))
"""


def measure_load(path: Path, dtype: torch.dtype) -> dict:
    """Load in a fresh process (file already in the page cache) and run one forward.

    Returns the load seconds and (peak RSS - RSS before loading) / bytes of the network.
    """
    name = str(dtype).removeprefix("torch.")
    args = [sys.executable, "-c", _LOAD_SCRIPT, str(path.resolve()), name]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)  # warm the page cache
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool) -> dict[str, float]:
    config = {**LAION_PRIOR, "depth": 4} if quick else LAION_PRIOR
    repeats = 3 if quick else 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = oracle_prior(config)
    ours32 = PriorNetwork(PriorConfig(**config)).eval()
    ours32.load_state_dict({k.removeprefix("net."): v for k, v in oracle.state_dict().items() if k.startswith("net.")})
    dim = config["dim"]
    text = text_condition(dim)
    rows = CANDIDATES
    x = torch.randn(rows, dim) * dim**0.5
    t = torch.full((rows,), 500)
    cond = dict(
        text_embed=text.embed.repeat(rows, 1),
        text_encodings=text.encodings.repeat(rows, 1, 1),
        mask=text.mask.repeat(rows, 1),
    )
    figures: dict[str, float] = {}

    with torch.inference_mode():
        # parity of the network output, fp32
        expected = oracle.net(x, t, **{**cond, "mask": cond["mask"].clone()})
        got = ours32(x, t, cond["text_embed"], cond["text_encodings"], cond["mask"], torch.ones(rows, dtype=torch.bool))
        figures["prior.parity_max_abs_diff"] = (got - expected).abs().max().item()

        def oracle_step(scale: float):
            return lambda: oracle.p_sample(x, t, text_cond={**cond, "mask": cond["mask"].clone()}, cond_scale=scale)

        oracle_step_1 = median_seconds(oracle_step(1.0), repeats)
        oracle_step_2 = median_seconds(oracle_step(2.0), repeats)

        dtype = default_prior_dtype(torch.device("cpu"))
        ours = PriorNetwork(PriorConfig(**config)).eval()
        ours.load_state_dict(ours32.state_dict())
        ours.cast(dtype)
        del ours32
        schedule = NoiseSchedule.cosine()
        denoise = make_denoiser(ours, text, CANDIDATES, 1.0)

        def our_step():
            x0 = denoise(x, 500)
            return schedule.posterior_mean_coef1[500] * x0 + schedule.posterior_mean_coef2[500] * x

        our_step_seconds = median_seconds(our_step, repeats * 3)

        def our_sample(scale: float):
            generator = torch.Generator().manual_seed(0)
            return lambda: sample_image_embeds(ours, schedule, text, generator, candidates=CANDIDATES, cond_scale=scale)

        our_sample_1 = median_seconds(our_sample(1.0), 1 if quick else 3, warmup=1)
        our_sample_2 = median_seconds(our_sample(2.0), 1 if quick else 3, warmup=1)

    figures["prior.oracle_step_seconds"] = oracle_step_1
    figures["prior.step_seconds"] = our_step_seconds
    figures["prior.speedup_equal_steps"] = oracle_step_1 / our_step_seconds
    figures["prior.oracle_sample_seconds_extrapolated"] = 1000 * oracle_step_1
    figures["prior.sample_seconds"] = our_sample_1
    figures["prior.speedup_default"] = 1000 * oracle_step_1 / our_sample_1
    figures["prior.oracle_guided_step_seconds"] = oracle_step_2
    figures["prior.sample_seconds_guided"] = our_sample_2
    figures["prior.speedup_guided"] = 1000 * oracle_step_2 / our_sample_2
    figures["prior.cpu_dtype_is_bf16"] = float(dtype == torch.bfloat16)
    print("  (oracle 1000-step totals extrapolated as 1000 x its median timed step)")

    # loading LAION's fp16 .pth against the safetensors file that set-up converts it to (the
    # network stored in the precision it runs in, memory-mapped at load)
    from prior.weights import convert, converted_name

    state = {k: v.half() for k, v in oracle.state_dict().items()}
    oracle = None  # free it before the load measurements
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "prior_ema_fp16.pth"
        torch.save(state, pth)
        del state
        safetensors = convert(pth, Path(tmp) / converted_name(dtype), dtype)
        from_pth = measure_load(pth, dtype)
        from_safetensors = measure_load(safetensors, dtype)
    figures["prior.load_seconds_pth"] = from_pth["seconds"]
    figures["prior.load_seconds_safetensors"] = from_safetensors["seconds"]
    figures["prior.load_speedup_safetensors"] = from_pth["seconds"] / from_safetensors["seconds"]
    figures["prior.peak_rss_over_model_bytes"] = from_safetensors["peak_over_model"]
    figures["prior.peak_rss_over_model_bytes_pth"] = from_pth["peak_over_model"]
    return figures


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
