"""Build CLIP and the prior from a named configuration or a weights source."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from backbone.clip import ClipEncoder, build_clip

from .config import PriorConfig, named_config
from .model import PriorNetwork
from .schedule import NoiseSchedule


@dataclass
class Prior:
    """The prior network, its noise schedule and where they came from."""

    net: PriorNetwork
    schedule: NoiseSchedule
    source: str

    @property
    def config(self) -> PriorConfig:
        return self.net.config

    def to(self, device: torch.device | str) -> Prior:
        self.net.to(device=device)
        self.schedule = self.schedule.to(device)
        return self


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights were loaded: a name and a content hash, never a path.

    ``name`` is ``tiny``, ``laion``, or the base name of the directory or file given. ``sha256``
    (hex) is, for ``tiny``, that of the generated tensors (``state_sha256``, before the prior is
    cast to its run precision); for ``laion``, that of the converted prior file as its manifest
    records it (one per run precision: the stored weights differ); for a directory or file, that
    of the prior file loaded. When CLIP is read from a file of its own (OpenAI's for ``laion``,
    ``clip.safetensors`` in a directory), it is ``combined_sha256`` of the prior's and CLIP's.
    """

    name: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


def combined_sha256(digests: Sequence[str]) -> str:
    r"""One file's sha256 as it is; several files' as the sha256 of their hex digests joined by
    newlines, in load order (prior first): ``printf '%s\n%s' PRIOR CLIP | sha256sum``."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def state_sha256(states: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """The sha256 of state dicts by prefix: each tensor's prefixed name, dtype, shape and bytes, in
    sorted name order (dtype and shape too, so that the same bytes read otherwise differ)."""
    tensors = {prefix + name: tensor for prefix, state in states.items() for name, tensor in state.items()}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Models:
    clip: ClipEncoder
    prior: Prior
    name: str  # "tiny", "laion" or the directory or file as given (a path: for logs, not for results)
    identity: WeightsIdentity  # for results: a name and a content hash, no path


def random_models(name: str) -> Models:
    """CLIP and prior of a named configuration with random weights from its fixed seed.

    Deterministic on a given machine. The ``tiny`` configuration is a pipeline check only:
    its embeddings and images mean nothing.
    """
    data = named_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.get("seed", 0))
        clip = build_clip(data["clip"])
        net = PriorNetwork(PriorConfig.from_dict(data["prior"]))
    prior = Prior(net.eval().requires_grad_(False), NoiseSchedule.cosine(net.config.num_timesteps), f"random:{name}")
    identity = WeightsIdentity(name, state_sha256({"clip.": clip.state_dict(), "prior.": net.state_dict()}))
    return Models(clip, prior, name, identity)
