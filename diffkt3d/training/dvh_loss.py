"""A DVH-aware loss: generalised dose moments per structure, predicted against reference.

Why: the voxel-wise absolute error treats a 1 Gy miss in the spinal cord like one in the
shoulder; the OpenKBP DVH score (and the Scorecard) read a handful of per-structure statistics:
D99, D95 and D1 of each PTV, Dmean and D0.1cc of each OAR. The generalised mean
M_p = (sum_i w_i d_i^p / sum_i w_i)^(1/p) of the dose d over a structure is a smooth,
differentiable stand-in for them: p = 1 is the mean, large p tends to the maximum (D1, D0.1cc),
large negative p to the minimum (D99). This is the moment loss of the DVH-aware dose-prediction
literature (Jhanwar et al., "Domain knowledge driven 3D dose prediction using moment-based loss
function", Phys. Med. Biol. 2022), with the negative moment added for PTV coverage.

Structures come from the conditions the model already reads, on the working grid: each OAR
channel, weighted by the fraction of the working voxel it covers (thin organs like the cord
survive as fractions where a threshold would lose them), and each prescription level of the PTV
map (voxels whose map value rounds to that many Gy).
"""

from __future__ import annotations

import torch

# (power, ...) per structure kind: the DVH score's PTV statistics (D1, mean, D99) and OAR
# statistics (Dmean, D0.1cc ~ near-maximum).
PTV_POWERS = (1.0, 10.0, -10.0)
OAR_POWERS = (1.0, 10.0)
# Dose (as a share of the encoding's scale) below which the negative moment is clamped: a
# predicted 0 Gy voxel inside a PTV must give a large but finite penalty.
FLOOR = 0.02


def generalized_mean(d: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """(sum w d^p / sum w)^(1/p) over the last axis; d > 0, w >= 0 of the same shape (B, N).

    Computed in log space (log-sum-exp), so that d^p neither overflows nor underflows float32 for
    large |p| (0.2^-60 is 1e42).
    """
    log_w = torch.where(w > 0, w.clamp_min(1e-30).log(), torch.full_like(w, float("-inf")))
    log_total = w.sum(dim=-1).clamp_min(1e-6).log()
    return torch.exp((torch.logsumexp(p * d.log() + log_w, dim=-1) - log_total) / p)


def structure_weights(volumes: dict[str, torch.Tensor], dose_scale_gy: float,
                      min_voxels: float = 1.0) -> list[tuple[torch.Tensor, tuple[float, ...]]]:
    """[(weights (B, D*H*W), powers)] for every OAR channel and PTV level present in ``volumes``.

    ``volumes``: the encoded conditions (B, C, D, H, W) in [-1, 1]: ``oar`` masks as fractions,
    ``ptv`` the prescription map (Gy / dose_scale_gy). A structure with fewer than ``min_voxels``
    of weight in a case gets weight 0 there (and so no say in that case's loss).
    """
    out = []
    if "oar" in volumes:
        oar = ((volumes["oar"].float() + 1.0) * 0.5).flatten(2)  # (B, n_oar, N) in [0, 1]
        for k in range(oar.shape[1]):
            w = oar[:, k]
            w = w * (w.sum(dim=-1, keepdim=True) >= min_voxels)
            out.append((w, OAR_POWERS))
    if "ptv" in volumes:
        rx = torch.round((volumes["ptv"].float() + 1.0) * 0.5 * dose_scale_gy).flatten(1)  # (B, N) Gy
        for level in torch.unique(rx[rx > 0]).tolist():
            w = (rx == level).float()
            w = w * (w.sum(dim=-1, keepdim=True) >= min_voxels)
            out.append((w, PTV_POWERS))
    return out


def moment_loss(pred: torch.Tensor, ref: torch.Tensor, volumes: dict[str, torch.Tensor],
                dose_scale_gy: float) -> torch.Tensor:
    """Mean |M_p(pred) - M_p(ref)| over structures, powers and cases, in units of the dose scale.

    Args:
        pred, ref: (B, 1, D, H, W) dose in the [-1, 1] encoding (pred = the model's x0 estimate).
        volumes: the conditions (see :func:`structure_weights`).
        dose_scale_gy: Gy at +1 of the encoding.

    Returns:
        a scalar; 0 when no structure is present. Multiply by dose_scale_gy for Gy.
    """
    d_pred = ((pred.float() + 1.0) * 0.5).flatten(1).clamp_min(FLOOR)  # (B, N) share of the scale
    d_ref = ((ref.float() + 1.0) * 0.5).flatten(1).clamp_min(FLOOR)
    terms = []
    for w, powers in structure_weights(volumes, dose_scale_gy):
        present = w.sum(dim=-1) > 0  # (B,)
        if not present.any():
            continue
        # A case without this structure gets uniform dummy weights, dropped below: an all-zero
        # weight would give inf moments whose gradient is NaN even where it is not selected.
        w = torch.where(present[:, None], w, torch.ones_like(w))
        for p in powers:
            diff = (generalized_mean(d_pred, w, p) - generalized_mean(d_ref, w, p)).abs()
            terms.append(diff[present].mean())
    if not terms:
        return pred.new_zeros(())
    return torch.stack(terms).mean()


__all__ = ["OAR_POWERS", "PTV_POWERS", "generalized_mean", "moment_loss", "structure_weights"]
