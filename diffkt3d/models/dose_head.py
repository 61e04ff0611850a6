"""The dose target's head: turns the patch head's channels into the dose x0_hat.

Why a module of its own: the Any2Any backbone is general (any target from any conditions), but
in voxel space a patch-linear head cannot draw the dose well on its own. For the dose target the
patch head therefore emits extra channels (prior weights, refiner features; see
``DoseHeadConfig.extra_channels``) that this head combines with the geometric prior
(``models.dose_prior``) and the voxel refiner (``models.dose_refiner``). The backbone only asks
whether a target has such a head (``Any2AnyDiT.target_heads``) and hands it the patch head's
output; nothing dose-specific stays in the backbone's forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffkt3d.models.config import DiTConfig
from diffkt3d.models.dose_prior import mix_to_dose_encoding, prior_basis
from diffkt3d.models.dose_refiner import DoseRefiner

__all__ = ["DoseHead", "build_target_heads"]


class DoseHead(nn.Module):
    """Prior mix + voxel refiner on the dose channels of the patch head (``config.dose_head``)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        head = config.dose_head
        assert head is not None, "DoseHead built for a config without dose_head"
        self.head_config = head
        self.dose_channels = config.in_channels["dose"]  # 1 whenever there is a prior (validated)
        # Voxel-level refiner (``refiner_width``; models.dose_refiner says why).
        self.refiner = DoseRefiner(config) if head.refiner_width else None

    def check_grid(self, spatial: tuple[int, ...]) -> None:
        """Raise ValueError if the working grid ``spatial`` (D, H, W) cannot run through this head.

        The U-Net refiner halves the grid four times and its instance norms need more than one
        voxel; the backbone calls this before its blocks run, so a bad grid is named early.
        """
        if self.refiner is not None and self.head_config.refiner_unet and any(s % 16 or s < 32 for s in spatial):
            raise ValueError(f"dose_head.refiner_unet needs a working grid of multiples of 16, at least 32 per axis; "
                             f"found {spatial}")

    def forward(self, out: Tensor, volumes: dict[str, Tensor]) -> Tensor:
        """Dose x0_hat from the patch head's channels, the geometric prior and the voxel refiner, fp32.

        Args:
            out: (B, C + n + F, D, H, W) unpatchified patch-head output: C residual channels (1
                with a prior), n prior weights, F refiner features (``DoseHeadConfig.extra_channels``).
            volumes: the backbone's inputs; ``volumes["dose"]`` is the noised dose x_t.

        Returns:
            (B, C, D, H, W) in the [-1, 1] dose encoding: 2 * sum_j (w0_j + w_j) * P_j - 1 +
            residual, or the residual alone without a prior or a ``ptv`` condition; with a
            refiner, its correction is added to the residual and the weights first.
        """
        cfg = self.head_config
        c = self.dose_channels
        n_dose = c + cfg.prior_weight_channels()
        dose_ch, features = out[:, :n_dose].float(), out[:, n_dose:]
        basis = None
        if cfg.prior_falloffs and "ptv" in volumes:
            basis = prior_basis(volumes["ptv"], volumes.get("body"), cfg.prior_falloffs,
                                cfg.prior_reach)  # (B, n, D, H, W) in [0, 1]
        if self.refiner is not None:
            dose_ch = dose_ch + self.refiner(features, volumes["dose"], volumes, basis)
        residual = dose_ch[:, :c]
        if basis is None:
            return residual
        w0 = torch.tensor(cfg.prior_weights, device=out.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        weights = dose_ch[:, c:] + w0  # (B, n, D, H, W)
        return mix_to_dose_encoding(basis, weights) + residual


def build_target_heads(config: DiTConfig) -> nn.ModuleDict:
    """One head module per target that has a head config (``DiTConfig.target_heads``)."""
    builders = {"dose": DoseHead}
    return nn.ModuleDict({target: builders[target](config) for target in config.target_heads()})
