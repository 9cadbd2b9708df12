"""Where the weights come from: the tiny random configuration, LAION's files, or a directory.

``DIDP_WEIGHTS`` (or the ``weights`` argument) selects:

- ``tiny``: random CLIP and prior from a fixed seed; no files; a pipeline check only.
- ``laion``: LAION's ``prior_ema_fp16.pth`` from Hugging Face, converted once to safetensors
  in the weights directory, in the precision the network runs in (``prior-<dtype>.safetensors``,
  checked against its manifest and memory-mapped at every later start); CLIP from the prior file
  when it carries ``clip.clip.*``, else OpenAI's ViT-L/14 (open_clip's ``openai`` weights) from
  Hugging Face.
- a directory holding ``prior.safetensors`` (see ``python -m prior.convert``) and, when the prior
  carries no CLIP, ``clip.safetensors``; or a single checkpoint file.

Downloads are cached and resumable (huggingface_hub). When a file is absent and the hub cannot
be reached, loading fails at once with a message saying what to fetch and where to put it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from backbone.clip import ClipEncoder, clip_model, openai_clip_config
from backbone.hardware import cpu_has_native_bf16

from .checkpoint import PREFIXES, Checkpoint, CheckpointError, check_shapes, materialize, save_safetensors
from .config import PriorConfig
from .factory import Models, Prior, WeightsIdentity, combined_sha256, random_models
from .integrity import (
    SHA256_HEX,
    Manifest,
    file_sha256,
    manifest_path,
    read_manifest,
    verified_sha256,
    write_manifest,
)
from .model import PriorNetwork
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PRIOR_FILE = "prior.safetensors"
CLIP_FILE = "clip.safetensors"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    about: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


LAION_PRIOR = HubFile("laion/DALLE2-PyTorch", "prior_ema_fp16.pth", "LAION's ViT-L/14 diffusion prior (fp16 EMA)")
OPENAI_CLIP = HubFile(
    "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors", "OpenAI CLIP ViT-L/14 (open_clip format)"
)


class WeightsUnavailable(RuntimeError):
    """Weights that are neither on disk nor downloadable now."""


def weights_dir() -> Path:
    return Path(os.environ.get("DIDP_WEIGHTS_DIR", DEFAULT_WEIGHTS_DIR))


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds,
    name lookup included (a resolver that never answers would otherwise stall set-up).

    Behind a proxy (``HTTPS_PROXY`` and the like, which huggingface_hub follows) the endpoint is
    not reached directly, so it counts as reachable and the download itself decides.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    # create_connection's timeout does not cover the name lookup: wait for both together, and
    # leave a lookup that hangs to its daemon thread
    probe = threading.Thread(target=connect, name="hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered) and answered[0]


def fetch(file: HubFile, cache_dir: Path) -> Path:
    """A local copy of ``file``: the cached one, or a resumable download into ``cache_dir``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(file.repo_id, file.filename, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise WeightsUnavailable(
            f"{file.filename} ({file.about}) is not in {cache_dir} and Hugging Face cannot be reached "
            f"(offline). Download {file.url} on a connected machine and pass its path or directory "
            f"as DIDP_WEIGHTS, or copy the hub cache into {cache_dir}. DIDP_WEIGHTS=tiny runs the "
            f"offline pipeline check."
        )
    log.info("downloading %s from %s", file.filename, file.url)
    return Path(hf_hub_download(file.repo_id, file.filename, cache_dir=cache_dir))


def hub_file_sha256(path: Path) -> str:
    """The sha256 of a file ``fetch`` returned, read from its name when the hub's cache gives it.

    The cache keeps a large (LFS) file as ``blobs/<sha256 of its content>``, linked from its
    snapshot: OpenAI's CLIP (1.7 GB, about a second to hash) is then not read at every start just
    to be named. A file elsewhere (a copied cache without links) is hashed.
    """
    blob = path.resolve()
    return blob.name if SHA256_HEX.fullmatch(blob.name) else file_sha256(path)


def prior_config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> PriorConfig:
    """Read the network's hyper-parameters off a ``net.*`` state dict's shapes."""
    anchors = ("learned_query", "to_time_embeds.0.weight", "causal_transformer.layers.0.0.null_kv")
    missing = [a for a in anchors if a not in shapes]
    if missing:
        raise CheckpointError(f"{source}: not a dalle2-pytorch 0.11.5 diffusion prior: no net.{', net.'.join(missing)}")
    dim = shapes["learned_query"][0]
    dim_head = shapes["causal_transformer.layers.0.0.null_kv"][1]
    ff_in = shapes.get("causal_transformer.layers.0.1.1.weight", (0,))[0]
    return PriorConfig(
        dim=dim,
        depth=len({k.split(".")[2] for k in shapes if k.startswith("causal_transformer.layers.")}),
        dim_head=dim_head,
        heads=shapes.get("causal_transformer.layers.0.0.to_q.weight", (dim_head,))[0] // dim_head,
        ff_mult=max(ff_in // 2 // dim, 1),
        normformer="causal_transformer.layers.0.1.3.gamma" in shapes,
        num_timesteps=shapes["to_time_embeds.0.weight"][0],
    )


def load_prior(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu") -> Prior:
    """The network (``net.*``) and schedule (``noise_scheduler.*``) of a checkpoint, checked."""
    source = str(checkpoint.path)
    checkpoint.check_prefixes()
    shapes = checkpoint.shapes(PREFIXES["net"])
    config = prior_config_from_shapes(shapes, source)
    with torch.device("meta"):
        net = PriorNetwork(config).cast(dtype)
    check_shapes(net, shapes, source)
    # A file stored in the run dtype is memory-mapped, not copied: loading costs nothing.
    wanted = {k: v.dtype for k, v in net.state_dict().items()}
    mapped = torch.device(device).type == "cpu" and checkpoint.dtypes(PREFIXES["net"]) == wanted
    materialize(net, checkpoint.tensors(PREFIXES["net"], mapped), device)
    schedule_buffers = dict(checkpoint.tensors(PREFIXES["schedule"]))
    try:
        schedule = NoiseSchedule.from_state_dict(schedule_buffers) if schedule_buffers else None
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if schedule is None:
        schedule = NoiseSchedule.cosine(config.num_timesteps)
    if schedule.num_timesteps != config.num_timesteps:
        raise CheckpointError(f"{source}: schedule of {schedule.num_timesteps} steps for {config.num_timesteps}")
    return Prior(net.eval().requires_grad_(False), schedule.to(device), source)


def load_clip(checkpoint: Checkpoint, prefix: str = "", device: torch.device | str = "cpu") -> ClipEncoder:
    """OpenAI-format CLIP (ViT) tensors under ``prefix`` -> float32 ``ClipEncoder``."""
    source = f"{checkpoint.path} ({prefix}*)" if prefix else str(checkpoint.path)
    shapes = checkpoint.shapes(prefix)
    try:
        config = openai_clip_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    except KeyError as error:
        raise CheckpointError(f"{source}: not an OpenAI-format CLIP ViT state dict (no {error})") from None
    with torch.device("meta"):
        model = clip_model(config)
    ignore = ("input_resolution", "context_length", "vocab_size")
    check_shapes(model, shapes, source, ignore=ignore)
    materialize(model, checkpoint.tensors(prefix), device, ignore=ignore)
    n = config["text_cfg"]["context_length"]
    model.attn_mask = torch.full((n, n), float("-inf"), device=device).triu_(1)  # not in state dicts
    return ClipEncoder(model).to(device)


def load_checkpoint_models(
    checkpoint: Checkpoint,
    clip_path: Path | None,
    dtype: torch.dtype,
    device: torch.device | str,
    name: str,
    identity: WeightsIdentity,
) -> Models:
    """Prior from ``checkpoint``; CLIP from it when it carries ``clip.clip.*``, else from ``clip_path``."""
    prior_path = checkpoint.path
    prior = load_prior(checkpoint, dtype, device)
    if checkpoint.shapes(PREFIXES["clip"]):
        clip = load_clip(checkpoint, PREFIXES["clip"], device)
    elif clip_path is not None:
        clip = load_clip(Checkpoint(clip_path), "", device)
    else:
        raise WeightsUnavailable(f"{prior_path} carries no CLIP (clip.clip.*) and no CLIP file was given")
    if clip.embed_dim != prior.config.dim:
        clip_source = prior_path if clip_path is None else clip_path
        raise CheckpointError(
            f"{clip_source}: CLIP embeds in {clip.embed_dim} dimensions but the prior expects {prior.config.dim}"
            + ("" if clip_source == prior_path else f" (prior: {prior_path})")
        )
    return Models(clip, prior, name, identity)


def run_dtypes(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype of every ``net.*`` tensor when the network runs in ``dtype`` (see ``cast``)."""
    shapes = checkpoint.shapes(PREFIXES["net"])
    with torch.device("meta"):
        net = PriorNetwork(prior_config_from_shapes(shapes, str(checkpoint.path))).cast(dtype)
    return {PREFIXES["net"] + k: v.dtype for k, v in net.state_dict().items()}


def convert(source: Path, target: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint's tensors, unwrapped and with their names, as safetensors.

    With ``dtype`` the network's tensors are stored as it runs in that dtype, so that loading
    for that dtype maps the file instead of converting it; CLIP and the schedule keep theirs.
    Beside it goes its manifest (``prior.integrity``: size, sha256, the source's name).
    """
    checkpoint = Checkpoint(source)
    checkpoint.check_prefixes()
    wanted = run_dtypes(checkpoint, dtype) if dtype is not None else {}
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = manifest_path(target)
    for path in (target, manifest):
        _remove_abandoned_partials(path)
    # one partial per file and process: no two writers share one
    partial, manifest_partial = (p.with_name(f"{p.name}.{os.getpid()}.partial") for p in (target, manifest))
    try:
        state = {name: t.to(wanted.get(name, t.dtype)) for name, t in checkpoint.tensors()}
        save_safetensors(state, partial, metadata={"source": source.name})
        del state
        size, digest = partial.stat().st_size, file_sha256(partial)  # of the file as written
        write_manifest(Manifest(target.name, size, digest, source.name), manifest_partial)
        partial.replace(target)
        # the manifest last: one that matches its file means the conversion completed, and a crash
        # between the two renames leaves a file that fails its check and is converted again
        manifest_partial.replace(manifest)
    finally:
        partial.unlink(missing_ok=True)
        manifest_partial.unlink(missing_ok=True)
    _fsync_directory(target.parent)
    return target


def _remove_abandoned_partials(target: Path) -> None:
    """Remove ``target``'s partial files whose writing process is gone (killed mid-conversion)."""
    for partial in target.parent.glob(f"{target.name}.*.partial"):
        try:
            os.kill(int(partial.name.removeprefix(f"{target.name}.").removesuffix(".partial")), 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def converted_name(dtype: torch.dtype) -> str:
    return f"prior-{str(dtype).removeprefix('torch.')}.safetensors"


def laion_prior(cache: Path, dtype: torch.dtype) -> tuple[Checkpoint, str]:
    """LAION's prior converted for ``dtype`` and its sha256: the converted file if it matches its
    manifest, else a new conversion of LAION's file (fetched if need be)."""
    converted = cache / "laion" / converted_name(dtype)
    problem = None
    if converted.is_file():
        try:
            digest = verified_sha256(converted)
            return Checkpoint(converted), digest  # Checkpoint checks the header against the file's size
        except CheckpointError as error:
            problem = error
            log.warning("%s cannot be used, converting it again: %s", converted, error)
    try:
        source = fetch(LAION_PRIOR, cache)
    except WeightsUnavailable as error:
        if problem is None:
            raise
        raise WeightsUnavailable(
            f"{converted} cannot be used and cannot be converted again: {problem}. Put good copies of "
            f"{converted.name} and {manifest_path(converted).name} back in {converted.parent}, or provide the "
            f"source: {error}"
        ) from None
    converted.unlink(missing_ok=True)  # frees its space for the new copy; only now that there will be one
    convert(source, converted, dtype)
    return Checkpoint(converted), read_manifest(converted).sha256


def laion_models(dtype: torch.dtype, device: torch.device | str) -> Models:
    """LAION's prior, converted to safetensors on first use and checked at every start, and its CLIP."""
    cache = weights_dir()
    checkpoint, prior_sha256 = laion_prior(cache, dtype)  # the manifest's hash: the file is not read again
    if checkpoint.shapes(PREFIXES["clip"]):
        clip_path, digests = None, [prior_sha256]
    else:
        clip_path = fetch(OPENAI_CLIP, cache)
        digests = [prior_sha256, hub_file_sha256(clip_path)]
    identity = WeightsIdentity("laion", combined_sha256(digests))
    return load_checkpoint_models(checkpoint, clip_path, dtype, device, "laion", identity)


def directory_files(path: Path, dtype: torch.dtype) -> tuple[Path, Path | None]:
    """The prior checkpoint in a user's directory, and its ``clip.safetensors`` if there is one."""
    prior_path = next((p for p in (path / converted_name(dtype), path / PRIOR_FILE) if p.is_file()), None)
    if prior_path is None:
        candidates = sorted(p for p in path.glob("*.pth")) if path.is_dir() else []
        if len(candidates) != 1:
            raise WeightsUnavailable(f"{path}: expected {PRIOR_FILE} (python -m prior.convert) or a single .pth file")
        prior_path = candidates[0]
    clip_path = path / CLIP_FILE
    return prior_path, clip_path if clip_path.is_file() else None


def directory_models(path: Path, dtype: torch.dtype, device: torch.device | str) -> Models:
    """The weights in a user's directory, or a single checkpoint file, identified by the files loaded."""
    prior_path, clip_path = (path, None) if path.is_file() else directory_files(path, dtype)
    checkpoint = Checkpoint(prior_path)
    if checkpoint.shapes(PREFIXES["clip"]):
        clip_path = None  # the prior's own CLIP is loaded, not a clip.safetensors beside it
    files = [prior_path] if clip_path is None else [prior_path, clip_path]
    # one read of each file, which pages it in for the loading (or re-reads what a .pth's CRC check
    # paged in); a manifest that python -m prior.convert wrote beside a file is checked on the way
    identity = WeightsIdentity(
        Path(os.path.abspath(path)).name,  # the name given (".." resolved, links not followed), never a path
        combined_sha256([verified_sha256(file, required=False) for file in files]),
    )
    return load_checkpoint_models(checkpoint, clip_path, dtype, device, str(path), identity)


def default_prior_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the weights' own precision); bf16 on a CPU with native bf16, else fp32."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def load_models(
    weights: str | os.PathLike = "tiny",
    device: torch.device | str = "cpu",
    prior_dtype: torch.dtype | None = None,
) -> Models:
    """CLIP and the prior for ``weights`` (``tiny``, ``laion``, or a directory/file), on ``device``.

    CLIP runs in float32; the prior network in ``prior_dtype`` (see ``default_prior_dtype``).
    """
    device = torch.device(device)
    dtype = prior_dtype or default_prior_dtype(device)
    spec = os.fspath(weights)
    if spec == "tiny":
        models = random_models("tiny")
        models.prior.net.cast(dtype)
        models.prior.to(device)
        models.clip.to(device)
        return models
    if spec == "laion":
        return laion_models(dtype, device)
    path = Path(spec)
    if not path.exists():
        raise WeightsUnavailable(f"weights {spec!r}: no such file or directory (use tiny, laion or a path)")
    return directory_models(path, dtype, device)
