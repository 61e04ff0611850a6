"""Voxel-level dose refiner under the patch-level DiT (``DoseHeadConfig.refiner_width``).

Why: the cpu-default DiT decodes each 8^3 patch from one token with a linear map, so its dose is
smooth within a patch and blind to voxel-level anatomy: where an OAR boundary, the body contour
or the beam plate cuts through a patch, the head cannot follow it (the geometric prior of
``models.dose_prior`` fixes the PTV edge only). PRDiT (docs/method.md) pairs a patch-level global DiT
with a pixel-level local network for the same reason. Here the network is a few 3D convolutions
at working-grid resolution that read, per voxel, the feature channels the dose head emits, the
noised dose x_t, every condition volume and the prior basis maps, and add a correction to the
head's dose channels (residual and prior weights). Its last layer is zero-initialised, so a
fresh refiner changes nothing and training starts from the patch head's prediction.

Its body is either that stack (``refiner_kernels``) or, with ``refiner_unet``, a MONAI
``BasicUNet``: the stack sees a few voxels, the U-Net the whole working grid at several scales,
which is what the BasicUNet regression peer (benchmarks/peer.py) learns the dose with in few steps.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from diffkt3d.models.config import DiTConfig

__all__ = ["DoseRefiner"]


class DoseRefiner(nn.Module):
    """Conv3d stack: (features, x_t, conditions, prior basis) -> correction of the dose channels."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        head = config.dose_head
        assert head is not None and head.refiner_width > 0, "DoseRefiner built without a refiner config"
        self.conditions = tuple(m for m in config.modalities if m != "dose")
        self.condition_channels = {m: config.in_channels[m] for m in self.conditions}
        self.n_basis = head.prior_weight_channels()
        self.out_channels = config.in_channels["dose"] + self.n_basis
        in_ch = (head.refiner_feature_channels() + config.in_channels["dose"]
                 + sum(self.condition_channels.values()) + self.n_basis)
        width = head.refiner_width
        if head.refiner_unet:
            self.body = nn.Sequential(
                BasicUNet(spatial_dims=3, in_channels=in_ch, out_channels=width, features=head.refiner_unet),
                nn.GELU(approximate="tanh"),
            )
        else:
            layers: list[nn.Module] = []
            for k in head.refiner_kernels:
                layers += [nn.Conv3d(in_ch, width, kernel_size=k, padding=k // 2), nn.GELU(approximate="tanh")]
                in_ch = width
            self.body = nn.Sequential(*layers)
        self.out = nn.Conv3d(width, self.out_channels, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, x_t: Tensor, volumes: dict[str, Tensor], basis: Tensor | None) -> Tensor:
        """Correction (B, out_channels, D, H, W) for the head's dose channels.

        Args:
            features: (B, F, D, H, W) refiner features from the dose head.
            x_t: (B, 1, D, H, W) noised dose.
            volumes: the model's inputs; conditions absent from it enter as zeros (the token
                features already tell which modalities were given).
            basis: (B, n_basis, D, H, W) prior basis maps, or None (zeros) without a prior or
                without a ``ptv`` condition.
        """
        b, _, *spatial = features.shape
        ref = features.float()
        parts = [ref, x_t.float()]
        for m in self.conditions:
            vol = volumes.get(m)
            parts.append(vol.float() if vol is not None else ref.new_zeros(b, self.condition_channels[m], *spatial))
        if self.n_basis:
            parts.append(basis.float() if basis is not None else ref.new_zeros(b, self.n_basis, *spatial))
        return self.out(self.body(torch.cat(parts, dim=1)))
