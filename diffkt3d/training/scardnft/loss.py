"""The DiffusionNFT objective on a group of rewarded candidates (package docstring, step 3).

The reward side (Scorecard, hinge penalties, MAE anchor, group advantages) is
:mod:`diffkt3d.training.reward`; this module turns the optimality probabilities r it yields into
the loss on the policy's velocities.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["nft_loss"]


def _adaptive_l2(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """Per-sample mean‖x̂0 − x0‖² / sg(max(mean|x̂0 − x0|, 1e-5)) -> (B,)."""
    dims = tuple(range(1, x0.ndim))
    err = x0_hat - x0
    return err.pow(2).mean(dims) / err.abs().mean(dims).detach().clamp_min(1e-5)


def nft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float = 1.0,
             v_ref: Tensor | None = None, kl_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """The DiffusionNFT loss (module docstring) on a batch.

    Args:
        v_theta: (B, C, D, H, W) current policy velocity (with grad).
        v_old: same shape, old policy velocity (detached here: sg).
        x_t: noised candidates (1 − t)·x0 + t·ε; x0: the candidates (B, C, D, H, W).
        t: (B,) flow times; r: (B,) optimality probabilities in [0, 1].
        v_ref: frozen base velocity for the KL term (None: no KL term).

    Returns:
        (scalar loss, {"nft", "kl", "l_pos", "l_neg"} floats for logging).
    """
    v_old = v_old.detach()
    tt = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, 1, 1, 1)
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    l_pos = _adaptive_l2(x_t - tt * v_pos, x0)  # (B,)
    l_neg = _adaptive_l2(x_t - tt * v_neg, x0)
    r = r.to(l_pos.dtype)
    nft = ((r * l_pos + (1.0 - r) * l_neg) / beta).mean()
    kl = (v_theta - v_ref.detach()).pow(2).mean() if v_ref is not None else v_theta.new_zeros(())
    loss = nft + kl_weight * kl
    stats = {"nft": nft.detach(), "kl": kl.detach(), "l_pos": l_pos.detach().mean(), "l_neg": l_neg.detach().mean()}
    return loss, {k: float(v) for k, v in stats.items()}
