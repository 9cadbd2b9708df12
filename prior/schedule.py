"""The cosine noise schedule, with the 13 buffers of 0.11.5's ``NoiseScheduler``.

0.11.5 computes the schedule in float64 and keeps float32 buffers; checkpoints carry them as
``noise_scheduler.*`` (in fp16 when the whole file was halved). The reference samples with the
buffers it loaded, so a schedule read from a checkpoint is used as it is, after checking that it
is this cosine schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, float64 ``[timesteps]``, clipped to 0.999."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * torch.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


@dataclass
class NoiseSchedule:
    """All float32 ``[timesteps]``; names as in 0.11.5's state dict."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    p2_loss_weight: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def cosine(cls, timesteps: int = 1000) -> NoiseSchedule:
        betas = cosine_betas(timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        values = dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=torch.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=torch.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ac - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.log(posterior_variance.clamp(min=1e-20)),
            posterior_mean_coef1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
            p2_loss_weight=(1 + ac / (1 - ac)) ** -0.0,
        )
        return cls(**{k: v.to(torch.float32) for k, v in values.items()})

    @classmethod
    def from_state_dict(cls, buffers: dict[str, torch.Tensor]) -> NoiseSchedule:
        """A checkpoint's ``noise_scheduler.*`` buffers (prefix removed), checked against the cosine
        schedule at the precision they were stored in."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in buffers]
        if missing:
            raise ValueError(f"noise schedule buffers missing: {missing}")
        timesteps = buffers["betas"].shape[0]
        reference = cls.cosine(timesteps)
        # Only the buffers that sampling reads are compared, at their storage precision.
        for name in (
            "alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "posterior_log_variance_clipped",
        ):
            stored = buffers[name]
            if stored.shape != (timesteps,):
                raise ValueError(f"noise_scheduler.{name} has shape {tuple(stored.shape)}, expected ({timesteps},)")
            expected = getattr(reference, name).to(stored.dtype).float()
            rtol = 1e-2 if stored.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(stored.float(), expected, rtol=rtol, atol=rtol * 1e-3):
                raise ValueError(f"noise_scheduler.{name} is not the cosine schedule of {timesteps} steps")
        return cls(**{n: buffers[n].to(torch.float32) for n in names})

    def exact_alphas_cumprod(self) -> torch.Tensor:
        """float64 ``alphas_cumprod`` of this (checked) cosine schedule, for strided samplers.

        Stored fp16 buffers round ``alphas_cumprod[0]`` to 1 and the last one to 0; 0.11.5's
        ancestral step never divides by them, a strided step does.
        """
        return torch.cumprod(1.0 - cosine_betas(self.num_timesteps), dim=0)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def strided_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``num_timesteps - 1`` down to 0, descending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(num_timesteps - 1 - i * stride) for i in range(steps)]
