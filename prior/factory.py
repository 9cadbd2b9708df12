"""Build CLIP and the prior from a named configuration or a weights source."""

from __future__ import annotations

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


@dataclass
class Models:
    clip: ClipEncoder
    prior: Prior
    name: str  # "tiny", "laion" or the directory the weights came from


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
    return Models(clip, prior, name)
