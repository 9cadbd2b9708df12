"""The optimisation loop: frames, display steps, seeding, learning rates, precision, cancellation."""

import gc
import types
import weakref

import pytest
import torch

import dip.loop
from backbone.hardware import default_device, resolve_device
from dip import DipSettings, Frame, default_precision, is_display_step, visualise
from dip.network import offset_parameters
from prior.factory import random_models

# Small and fast: 32 px, 3 scales, 4 cutouts. Each step takes well under 0.1 s on 2 cores.
SMALL = DipSettings(size=32, num_scales=3, num_cutouts=4, iterations=4, display_freq=2, seed=7)


@pytest.fixture(scope="module")
def clip():
    return random_models("tiny").clip


@pytest.fixture(scope="module")
def target(clip):
    return torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def created(monkeypatch):
    """Records the networks and optimisers the loop builds."""
    made = {"net": [], "optimiser": []}
    original_build, original_madgrad = dip.loop.build_network, dip.loop.MADGRAD

    def build_network(*args, **kwargs):
        made["net"].append(net := original_build(*args, **kwargs))
        return net

    class RecordingMADGRAD(original_madgrad):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made["optimiser"].append(self)

    monkeypatch.setattr(dip.loop, "build_network", build_network)
    monkeypatch.setattr(dip.loop, "MADGRAD", RecordingMADGRAD)
    return made


def steps(target, clip, settings, **kwargs) -> list[int]:
    return [frame.step for frame in visualise(target, clip, settings, **kwargs)]


@pytest.mark.parametrize(
    ("iterations", "display_freq", "expected"),
    [
        (10, 5, [5, 10]),
        (10, 3, [3, 6, 9, 10]),  # the final step always, even off the grid
        (10, 10, [10]),  # the final step only once
        (10, 0, [10]),  # 0: the final image only
        (3, 25, [3]),  # fewer iterations than display_freq: still the final image
        (1, 1, [1]),
        (0, 25, [0]),  # no steps: the untrained network's image
        (0, 0, [0]),
    ],
)
def test_display_steps(iterations, display_freq, expected):
    assert [k for k in range(iterations + 1) if is_display_step(k, iterations, display_freq)] == expected


@pytest.mark.parametrize(("iterations", "display_freq", "expected"), [(5, 2, [2, 4, 5]), (3, 0, [3]), (2, 25, [2])])
def test_loop_yields_display_steps_and_the_final_step(target, clip, iterations, display_freq, expected):
    assert steps(target, clip, SMALL.replace(iterations=iterations, display_freq=display_freq)) == expected


def test_zero_iterations_yield_the_untrained_image_once(target, clip):
    (frame,) = visualise(target, clip, SMALL.replace(iterations=0))
    (first,) = visualise(target, clip, SMALL.replace(iterations=1))
    assert frame.step == 0
    # step 1 renders the same untrained network from the same seed
    assert torch.equal(frame.image, first.image)
    assert frame.metrics["loss"] > 0


def test_frame_holds_a_cpu_image_in_unit_range_and_metrics(target, clip):
    frame = next(iter(visualise(target, clip, SMALL)))
    assert isinstance(frame, Frame)
    step, image, metrics = frame
    assert step == 2
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert not image.requires_grad
    assert image.min().item() >= 0 and image.max().item() <= 1
    assert set(metrics) >= {"loss", "similarity", "lr", "seed"}
    assert -1 <= metrics["similarity"] <= 1 and metrics["seed"] == 7


def test_similarity_is_the_whole_images_cosine_to_the_target(target, clip):
    frame = next(iter(visualise(target, clip, SMALL)))
    expected = clip.embed_image(frame.image[None]) @ torch.nn.functional.normalize(target, dim=0)
    assert frame.metrics["similarity"] == pytest.approx(expected.item(), abs=1e-5)


def test_target_may_be_batched_and_unnormalised(target, clip):
    a = [f.image for f in visualise(target, clip, SMALL)]
    b = [f.image for f in visualise(4 * target[None], clip, SMALL)]  # a power of 2 normalises exactly
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_same_seed_gives_bitwise_equal_images(target, clip):
    noisy = SMALL.replace(input_noise_strength=0.5, param_noise_strength=0.5)  # every random stream in use
    torch.manual_seed(1)
    a = [f.image for f in visualise(target, clip, noisy)]
    torch.manual_seed(2)  # the global RNG plays no part
    b = [f.image for f in visualise(target, clip, noisy)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_different_seeds_give_different_images(target, clip):
    a = [f.image for f in visualise(target, clip, SMALL)]
    b = [f.image for f in visualise(target, clip, SMALL.replace(seed=8))]
    assert all((x - y).abs().max().item() > 1e-3 for x, y in zip(a, b, strict=True))


def test_the_loop_leaves_the_global_rng_alone(target, clip):
    state = torch.get_rng_state()
    list(visualise(target, clip, SMALL.replace(input_noise_strength=0.5, param_noise_strength=0.5)))
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_minus_one_draws_and_reports_a_seed_that_reproduces_the_run(target, clip):
    frames = list(visualise(target, clip, SMALL.replace(seed=-1)))
    seed = frames[0].metrics["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert all(f.metrics["seed"] == seed for f in frames)
    again = list(visualise(target, clip, SMALL.replace(seed=seed)))
    assert torch.equal(frames[-1].image, again[-1].image)


@pytest.mark.parametrize(("noise", "value"), [("input_noise_strength", 0.5), ("param_noise_strength", 1.0)])
def test_noise_strengths_change_the_result(target, clip, noise, value):
    plain = list(visualise(target, clip, SMALL))[-1].image
    noisy = list(visualise(target, clip, SMALL.replace(**{noise: value})))[-1].image
    assert (plain - noisy).abs().max().item() > 1e-3


def test_lr_decays_after_every_step(target, clip):
    frames = list(visualise(target, clip, SMALL.replace(iterations=5, display_freq=1, lr=2e-3, lr_decay=0.5)))
    assert [f.metrics["lr"] for f in frames] == pytest.approx([2e-3 * 0.5**k for k in range(5)], rel=1e-12)


@pytest.mark.parametrize("offset_type", ["1x1", "full"])
def test_offset_group_lr_is_scaled_and_decays_too_and_its_layers_learn(target, clip, created, offset_type):
    settings = SMALL.replace(iterations=6, display_freq=3, lr=1e-2, lr_decay=0.9, offset_lr_fac=0.1)
    frames = visualise(target, clip, settings.replace(offset_type=offset_type, size=24))
    next(frames)  # frame 3: its lr has decayed twice
    (optimiser,), (net,) = created["optimiser"], created["net"]
    main, offsets = optimiser.param_groups
    assert main["lr"] == pytest.approx(1e-2 * 0.9**2, rel=1e-12)
    assert offsets["lr"] == pytest.approx(1e-3 * 0.9**2, rel=1e-12)
    assert {id(p) for p in offsets["params"]} == {id(p) for p in offset_parameters(net)}
    # the offset branches start at zero and have moved
    assert max(p.abs().max().item() for p in offsets["params"]) > 1e-5
    frames.close()


def test_optimisation_raises_the_similarity(target, clip):
    settings = DipSettings(size=64, num_scales=4, num_cutouts=4, iterations=30, display_freq=0, seed=1)
    (start,) = visualise(target, clip, settings.replace(iterations=0))
    (end,) = visualise(target, clip, settings)
    # a random direction: about 0.03 for the untrained image; 0.19 after 30 steps on 2 cores
    assert end.metrics["similarity"] > start.metrics["similarity"] + 0.1


def test_closing_the_generator_releases_the_network_and_optimiser(target, clip, created):
    frames = visualise(target, clip, SMALL.replace(iterations=10, display_freq=1))
    next(frames)
    refs = [weakref.ref(created["net"][0]), weakref.ref(created["optimiser"][0])]
    params = [weakref.ref(p) for p in created["net"][0].parameters()]
    created.clear()
    frames.close()
    assert all(ref() is None for ref in refs + params)  # freed by reference counting, no gc needed


@pytest.mark.parametrize("failing_step", [1, 2, 3])  # 3: after a frame was emitted (display_freq=2)
def test_a_failing_loop_releases_its_tensors_too(target, clip, created, monkeypatch, failing_step):
    calls = []
    distance = dip.loop.weighted_spherical_loss

    def fail_at_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_step:
            raise RuntimeError("boom")
        return distance(*args, **kwargs)

    monkeypatch.setattr(dip.loop, "weighted_spherical_loss", fail_at_step)
    frames = visualise(target, clip, SMALL)
    with pytest.raises(RuntimeError, match="boom") as caught:
        list(frames)
    net = weakref.ref(created["net"][0])
    params = [weakref.ref(p) for p in created["net"][0].parameters()]
    created.clear()
    gc.collect()
    assert caught.value.__traceback__ is not None  # the traceback lives on, as in a caller's log or debugger
    assert net() is None and all(ref() is None for ref in params)


def test_settings_are_checked_before_any_work(target, clip, created):
    with pytest.raises(ValueError, match="num_scales=7 does not fit size=256"):
        visualise(target, clip, DipSettings(num_scales=7))
    assert created["net"] == []


def test_target_shape_is_checked(target, clip):
    with pytest.raises(ValueError, match="target must have shape"):
        visualise(torch.randn(2, clip.embed_dim), clip, SMALL)


def test_precision_is_checked(target, clip):
    with pytest.raises(ValueError, match="precision"):
        visualise(target, clip, SMALL, precision="fp64")


def test_bf16_autocast_runs_and_stays_close_to_fp32(target, clip):
    fp32 = list(visualise(target, clip, SMALL, precision="fp32"))[-1]
    bf16 = list(visualise(target, clip, SMALL, precision="bf16"))[-1]
    assert bf16.image.dtype == torch.float32
    assert bf16.metrics["similarity"] == pytest.approx(fp32.metrics["similarity"], abs=0.05)


def test_fp16_takes_every_step_and_ends_near_fp32(target, clip, monkeypatch):
    """CUDA's precision, checked on the CPU: fp16 autocast with gradient scaling. Before the
    augmentations ran in float32, their fp16 backward gave NaN gradients on about half the
    steps, each one skipped by the scaler, which also halved its scale every time."""
    scales = []

    class RecordingScaler(torch.amp.GradScaler):
        def update(self, new_scale=None):
            super().update(new_scale)
            if self.is_enabled():
                scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    settings = SMALL.replace(iterations=10, display_freq=0)  # fp16 on a CPU is slow: 0.6 s a step
    fp32 = list(visualise(target, clip, settings, precision="fp32"))[-1]
    fp16 = list(visualise(target, clip, settings, precision="fp16"))[-1]
    assert scales == [65536.0] * 10  # no step skipped: a skip halves the scale
    assert fp16.image.dtype == torch.float32 and torch.isfinite(fp16.image).all()
    assert fp16.metrics["similarity"] == pytest.approx(fp32.metrics["similarity"], abs=0.02)


def test_default_precision_is_fp16_on_cuda_and_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    import dip.loop

    assert default_precision(torch.device("cuda")) == "fp16"
    monkeypatch.setattr(dip.loop, "cpu_has_native_bf16", lambda: True)
    assert default_precision(torch.device("cpu")) == "bf16"
    monkeypatch.setattr(dip.loop, "cpu_has_native_bf16", lambda: False)
    assert default_precision(torch.device("cpu")) == "fp32"


def test_a_bare_cuda_device_means_the_current_cuda_device_that_clip_reports(monkeypatch, target):
    """Tensors moved to ``cuda`` report ``cuda:0``, and ``torch.device("cuda") != "cuda:0"``: a
    run asked for on ``cuda`` with CLIP moved there must not be refused as on another device."""
    has_gpu = torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert torch.device("cuda") != torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0") == default_device()
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")

    class MovedToCuda(torch.nn.Module):  # as CLIP's parameters report it after .to("cuda")
        embed_dim = target.shape[-1]

        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda:0"))

    with pytest.raises(Exception) as raised:  # gets past the device check; fails later for want of a GPU
        next(iter(visualise(target, MovedToCuda(), SMALL, device="cuda")))
    assert "move clip first" not in str(raised.value) and "embed_dim" not in str(raised.value), raised.value
    if not has_gpu:  # the first CUDA allocation, past every check
        message = str(raised.value)
        assert isinstance(raised.value, (RuntimeError, AssertionError)), raised.value
        assert "NVIDIA driver" in message or "not compiled with CUDA" in message, message
    with pytest.raises(ValueError, match="clip is on cuda:0 but device is cuda:1"):
        next(iter(visualise(target, MovedToCuda(), SMALL, device="cuda:1")))


def test_default_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_cuda_backends_tune_convolutions_and_keep_float32_exact():
    from backbone.hardware import configure_backends

    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.conv.fp32_precision)
    try:
        cudnn.benchmark, cudnn.conv.fp32_precision = False, "tf32"  # PyTorch's defaults
        configure_backends(torch.device("cpu"))
        assert (cudnn.benchmark, cudnn.conv.fp32_precision) == (False, "tf32")
        configure_backends(torch.device("cuda", 0))
        assert (cudnn.benchmark, cudnn.conv.fp32_precision) == (True, "ieee")
        assert torch.backends.cuda.matmul.fp32_precision in ("none", "ieee")  # matmuls: full float32 already
    finally:
        cudnn.benchmark, cudnn.conv.fp32_precision = saved
