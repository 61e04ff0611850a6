"""Deterministic Euler ODE sampler for the flow of :mod:`diffkt3d.flow.matching`.

Integrates dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 (data) on a shifted schedule (the same
shift as in training puts more steps at the noisy end). No randomness inside :func:`sample`: the
noise comes from seeds (:func:`seeded_noise`), one generator per seed, so candidate k of a request
is reproducible from its own seed whatever the batch. ``steps=1`` is the one-step preview
x0 = eps - v(eps, 1).

:func:`sample_with_seeds` is the one place a model is sampled from seeds: the Predictor, ScardNFT
and the Wan latent path all call it, so the same seeds give the same noise and the same sample
everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from diffkt3d.flow.matching import shift_time

__all__ = ["timestep_schedule", "sample", "seeded_noise", "sample_with_seeds", "cuda_autocast", "StepCallback"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
# Called after every Euler step with (steps done, steps in total). A server reports progress with
# it and stops a cancelled job by raising from it (the sampler keeps no state worth cleaning up).
StepCallback = Callable[[int, int], None]


def timestep_schedule(steps: int, shift: float = 3.0) -> Tensor:
    """(steps + 1,) float64 times from exactly 1 down to exactly 0, strictly decreasing.

    Uniform u = 1, 1 - 1/steps, ..., 0, shifted with t = s * u / (1 + (s - 1) * u).
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, found {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, found {shift}")
    u = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    return shift_time(u, shift)


def sample(velocity_fn: VelocityFn, noise: Tensor, steps: int = 10, shift: float = 3.0,
           on_step: StepCallback | None = None) -> Tensor:
    """Euler-integrate from ``noise`` (t = 1) to an x0 sample (t = 0).

    Args:
        velocity_fn: ``(x_t (B, ...), t (B,)) -> v_hat`` of x_t's shape, e.g. a closure over the
            model and the condition volumes. Gradients are not disabled here: wrap the call in
            ``torch.no_grad()`` for inference.
        noise: (B, ...) standard normal starting point.
        steps: number of Euler steps (network evaluations), >= 1; 1 = preview.
        shift: schedule shift (match training's flow shift).
        on_step: called as ``on_step(i, steps)`` after step i = 1 .. steps; an exception it raises
            stops the sampling and propagates (how a running job is cancelled).

    Returns:
        x0 sample, shape and dtype of ``noise``.
    """
    schedule = timestep_schedule(steps, shift)
    x = noise
    batch = noise.shape[0]
    for i in range(int(steps)):
        t_cur, t_next = float(schedule[i]), float(schedule[i + 1])
        t = torch.full((batch,), t_cur, dtype=torch.float32, device=noise.device)
        v = velocity_fn(x, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
        x = (x.float() + (t_next - t_cur) * v.float()).to(noise.dtype)
        if on_step is not None:
            on_step(i + 1, int(steps))
    return x


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """(len(seeds), *shape) float32 standard normal on the CPU; row k is drawn from seed ``seeds[k]`` alone.

    One generator per seed (not one for the batch) so a candidate does not depend on how many
    others are drawn with it: the seed shown to the user reproduces exactly that candidate.
    """
    if not seeds:
        raise ValueError("seeds is empty: one seed per sample is needed")
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def cuda_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the model keeps its fp32 islands); nothing on other devices."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sample_with_seeds(model: nn.Module, conditions: Mapping[str, Tensor], target: str, shape: Sequence[int],
                      seeds: Sequence[int], steps: int = 10, shift: float = 3.0, device: torch.device | None = None,
                      one_by_one: bool = False, on_step: StepCallback | None = None) -> Tensor:
    """x0 samples of ``target`` from a model ``(volumes, target, t) -> v_hat``, one per seed.

    Args:
        model: e.g. an ``Any2AnyDiT`` (or a LoRA-wrapped one); called under :func:`cuda_autocast`.
        conditions: {modality: (1 or len(seeds), C_m, D, H, W)} clean condition volumes on ``device``;
            batch 1 is shared by every sample.
        target: the modality to sample.
        shape: (C_target, D, H, W) of one sample.
        seeds: sample k starts from the noise of ``seeds[k]`` (:func:`seeded_noise`).
        steps, shift: Euler steps and schedule shift (match training's flow shift).
        device: where the model runs (default: the device of its first parameter).
        one_by_one: sample the seeds one after another (batch 1) instead of as one batch: the same
            CPU cost, a fraction of the activation memory. Needs batch-1 conditions.
        on_step: progress / cancellation hook (see :func:`sample`); with ``one_by_one`` the count
            runs over all seeds (steps * len(seeds) in total).

    Returns:
        (len(seeds), *shape) float32 on ``device``.
    """
    if device is None:
        device = next(model.parameters()).device
    noise = seeded_noise(shape, seeds).to(device)

    def velocity(x_t: Tensor, t: Tensor) -> Tensor:
        conds = {m: v.expand(x_t.shape[0], *v.shape[1:]) for m, v in conditions.items()}
        with cuda_autocast(device):
            return model({**conds, target: x_t}, target, t).float()

    if one_by_one:
        total = int(steps) * len(seeds)

        def seed_step(k: int) -> StepCallback | None:
            if on_step is None:
                return None
            return lambda i, _n: on_step(k * int(steps) + i, total)

        return torch.cat([sample(velocity, noise[k:k + 1], steps=steps, shift=shift, on_step=seed_step(k))
                          for k in range(len(seeds))])
    return sample(velocity, noise, steps=steps, shift=shift, on_step=on_step)
