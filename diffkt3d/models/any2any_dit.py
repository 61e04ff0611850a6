"""Any2Any DiT: Wan 2.1 blocks without cross-attention over the tokens of all given modalities.

One model predicts the flow velocity of any modality (dose, CT, PTV, OAR ...) from any subset of
the others (DiffKT3D paper, docs/method.md): each modality has its own Conv3d patch embedding and a
domain embedding; clean condition tokens and the noised target tokens are concatenated and
processed with full self-attention; a binary role embedding (target / condition) is added to the
timestep embedding, so the AdaLN modulation differs per token; a 4D RoPE (slot = modality, D, H,
W) tells modalities and positions apart; the output head reads the target tokens only.

Parameter names mirror Wan's original layout where the structure is the same (so Wan 2.1
checkpoints can be mapped in): ``blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}``,
``blocks.N.norm1/norm2`` (no affine), ``blocks.N.ffn.{0,2}``, ``blocks.N.modulation`` (1, 6, dim),
``time_embedding.{0,2}``, ``time_projection.1``, ``head.norm``, ``head.head.<modality>``,
``head.modulation`` (1, 2, dim). New: ``patch_embedding.<modality>``, ``domain_embedding``,
``role_embedding`` and ``target_heads.<modality>``: a head module for a target whose x0 needs more
than a patch-linear head (today the dose, ``models.dose_head``), chosen by the config.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffkt3d.models.config import DiTConfig
from diffkt3d.models.dose_head import build_target_heads
from diffkt3d.models.layers import (
    FP32LayerNorm,
    RMSNorm,
    apply_rope,
    init_modulation_table,
    modulate,
    rope_axis_dims,
    rope_cos_sin,
    sinusoidal_embedding,
    wan_rope_axis_dims,
)

__all__ = ["Any2AnyDiT", "ROLE_TARGET", "ROLE_CONDITION"]

logger = logging.getLogger(__name__)

ROLE_TARGET = 0
ROLE_CONDITION = 1


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm over all heads and RoPE (Wan ``WanSelfAttention``)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps=config.eps) if config.qk_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x`` (B, N, dim); ``cos``/``sin`` (N, head_dim/2) -> (B, N, dim)."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, self.head_dim)  # (B, N, h, hd)
        k = self.norm_k(self.k(x)).view(b, n, self.heads, self.head_dim)
        v = self.v(x).view(b, n, self.heads, self.head_dim)
        q = apply_rope(q, cos, sin).to(v.dtype)
        k = apply_rope(k, cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (B, h, N, hd)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, dim)


class DiTBlock(nn.Module):
    """Wan 2.1 attention block with the cross-attention removed.

    x += gate_msa * SA(LN(x) * (1 + scale_msa) + shift_msa)
    x += gate_ffn * FFN(LN(x) * (1 + scale_ffn) + shift_ffn)
    with (shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn) = modulation + e0 per token.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = FP32LayerNorm(dim, eps=config.eps)
        self.self_attn = SelfAttention(config)
        self.norm2 = FP32LayerNorm(dim, eps=config.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = init_modulation_table(6, dim, zero=config.zero_init_modulation)

    def forward(self, x: Tensor, e0_role: Tensor, n_target: int, cos: Tensor, sin: Tensor) -> Tensor:
        """One block.

        Args:
            x: (B, N, dim) tokens, kept in fp32 between blocks (residual stream); the first
                ``n_target`` tokens are target tokens (role 0), the rest condition tokens (role 1).
            e0_role: (B, 2, 6, dim) fp32 ``time_projection(e_t + e_role)`` for role 0 and 1.
            n_target: number of target tokens.
            cos, sin: (N, head_dim/2) RoPE tables.
        """
        # 0. Modulation per role (fp32): block table + projection of (time + role) embedding. Each
        #    token uses the row of its role; applied per contiguous role segment (see
        #    _modulate_roles) instead of materialising a (B, N, 6, dim) per-token tensor.
        with torch.autocast(device_type=x.device.type, enabled=False):
            e = self.modulation.float().unsqueeze(0) + e0_role  # (B, 2, 6, dim)
            shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = e.unbind(dim=2)  # (B, 2, dim)
        # 1. Self-attention over all tokens, gated residual.
        y = self.self_attn(_modulate_roles(self.norm1(x), shift_msa, scale_msa, n_target), cos, sin)
        x = x + _gate_roles(y, gate_msa, n_target)  # (B, N, dim) fp32
        # 2. Feed-forward, gated residual.
        y = self.ffn(_modulate_roles(self.norm2(x), shift_ffn, scale_ffn, n_target))
        return x + _gate_roles(y, gate_ffn, n_target)


def _modulate_roles(x_norm: Tensor, shift: Tensor, scale: Tensor, n_target: int) -> Tensor:
    """AdaLN per role: tokens [:n_target] use row 0 of (B, 2, dim) shift/scale, the rest row 1."""
    return torch.cat(
        [
            modulate(x_norm[:, :n_target], shift[:, :1], scale[:, :1]),
            modulate(x_norm[:, n_target:], shift[:, 1:], scale[:, 1:]),
        ],
        dim=1,
    )  # (B, N, dim) fp32


def _gate_roles(y: Tensor, gate: Tensor, n_target: int) -> Tensor:
    """Residual gate per role, fp32: (B, N, dim) * row 0 / row 1 of the (B, 2, dim) gate."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        y = y.float()
        return torch.cat([y[:, :n_target] * gate[:, :1], y[:, n_target:] * gate[:, 1:]], dim=1)


class Head(nn.Module):
    """Output head on target tokens: LN, 2-way modulation, per-modality Linear(dim, C_m * prod(patch))."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = FP32LayerNorm(dim, eps=config.eps)
        self.head = nn.ModuleDict(
            {m: nn.Linear(dim, config.head_channels(m) * config.patch_volume) for m in config.modalities}
        )
        self.modulation = init_modulation_table(2, dim, zero=False)

    def forward(self, x: Tensor, e_target: Tensor, target: str) -> Tensor:
        """``x`` (B, n, dim) target tokens, ``e_target`` (B, dim) fp32 -> (B, n, C_t * prod(patch))."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift, scale = (self.modulation.float() + e_target.float().unsqueeze(1)).unbind(dim=1)  # (B, dim)
        return self.head[target](modulate(self.norm(x), shift.unsqueeze(1), scale.unsqueeze(1)))


class Any2AnyDiT(nn.Module):
    """Velocity predictor for any target modality given any subset of the others.

    Token order: the target's tokens first, then the conditions in slot order
    (``config.modalities`` order); within a modality, tokens run over the patch grid in (d, h, w)
    raster order. The order only matters for :meth:`forward`'s bookkeeping: attention is
    permutation-equivariant and positions come from the 4D RoPE.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        self.slot = {m: i for i, m in enumerate(config.modalities)}
        # RoPE channel split: (slot, D, H, W) of the paper, or Wan's (t=D, H, W) with the slot as a
        # D offset (config.rope_slot_stride > 0, the layout used for Wan 2.1 weight transfer).
        if config.rope_slot_stride:
            self.rope_dims: tuple[int, ...] = wan_rope_axis_dims(config.head_dim)
        else:
            self.rope_dims = rope_axis_dims(config.head_dim, config.rope_slot_dims)

        # Embeddings: one Conv3d patch embedding per modality (kernel = stride = patch).
        self.patch_embedding = nn.ModuleDict(
            {
                m: nn.Conv3d(config.in_channels[m], dim, kernel_size=config.patch, stride=config.patch)
                for m in config.modalities
            }
        )
        self.domain_embedding = nn.Embedding(len(config.modalities), dim)
        self.role_embedding = nn.Embedding(2, dim)  # 0 = target, 1 = condition
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.head = Head(config)
        # Target heads on top of the patch head (config ``target_heads()``, e.g. the dose head).
        self.target_heads = build_target_heads(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Wan's init (xavier Linears / patch convs, N(0, 0.02) embeddings) plus zero-inits.

        The output head is zero-initialised so the first prediction is v = 0 (a neutral guess for
        targets scaled to [-1, 1]) and training starts from a smooth point instead of a random
        map; with ``zero_init_modulation`` every block also starts as the identity (adaLN-Zero,
        DiT), which keeps the residual stream stable when training from scratch.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for conv in self.patch_embedding.values():
            nn.init.xavier_uniform_(conv.weight.flatten(1))
            nn.init.zeros_(conv.bias)
        for emb in (self.domain_embedding, self.role_embedding):
            nn.init.normal_(emb.weight, std=0.02)
        for layer in self.time_embedding:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for linear in self.head.head.values():
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.config.zero_init_modulation:
            nn.init.zeros_(self.time_projection[1].weight)
            nn.init.zeros_(self.time_projection[1].bias)

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, volumes: dict[str, Tensor], target: str, t: Tensor) -> tuple[int, ...]:
        """Validate the call; returns the common spatial size (D, H, W)."""
        cfg = self.config
        unknown = [m for m in volumes if m not in self.slot]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this model knows {list(cfg.modalities)}")
        if target not in volumes:
            raise ValueError(f"target {target!r} missing from volumes (given: {list(volumes)})")
        spatial = None
        for m, vol in volumes.items():
            if vol.ndim != 5 or vol.shape[1] != cfg.in_channels[m]:
                raise ValueError(
                    f"volume {m!r}: expected (B, {cfg.in_channels[m]}, D, H, W), found {tuple(vol.shape)}"
                )
            if spatial is None:
                spatial, batch = tuple(vol.shape[2:]), vol.shape[0]
            elif tuple(vol.shape[2:]) != spatial or vol.shape[0] != batch:
                raise ValueError(
                    f"volume {m!r}: shape {tuple(vol.shape)} differs from the others "
                    f"(batch {batch}, spatial {spatial})"
                )
        if any(s % p for s, p in zip(spatial, cfg.patch, strict=True)):
            raise ValueError(f"spatial size {spatial} is not a multiple of the patch {cfg.patch}")
        if target in self.target_heads:
            self.target_heads[target].check_grid(spatial)  # before the blocks run, not deep in the head
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t: expected shape ({batch},), found {tuple(t.shape)}")
        return spatial

    def _positions(self, order: list[str], grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """(N, 4) long positions (slot, d, h, w) of all tokens in ``order``."""
        d, h, w = grid
        zz, yy, xx = torch.meshgrid(
            torch.arange(d, device=device),
            torch.arange(h, device=device),
            torch.arange(w, device=device),
            indexing="ij",
        )
        spatial = torch.stack([zz, yy, xx], dim=-1).reshape(-1, 3)  # (n, 3) raster order
        rows = []
        for m in order:
            slot = torch.full((spatial.shape[0], 1), self.slot[m], device=device, dtype=spatial.dtype)
            rows.append(torch.cat([slot, spatial], dim=1))
        return torch.cat(rows, dim=0)

    def forward(self, volumes: dict[str, Tensor], target: str, t: Tensor) -> Tensor:
        """Predict the flow velocity of ``target``.

        Args:
            volumes: modality -> (B, C_m, D, H, W) float in [-1, 1], all the same size (a multiple
                of ``config.patch``). ``volumes[target]`` is the noised target x_t; every other
                entry is a clean condition (any subset of the modalities; absent = not given).
            target: the modality to predict.
            t: (B,) flow time in [0, 1] (1 = pure noise).

        Returns:
            v_hat: (B, C_target, D, H, W) velocity (eps - x0 convention), dtype of the head.
        """
        cfg = self.config
        spatial = self._check_inputs(volumes, target, t)
        grid = tuple(s // p for s, p in zip(spatial, cfg.patch, strict=True))  # (d, h, w) tokens per axis
        order = [target] + [m for m in cfg.modalities if m in volumes and m != target]
        device = volumes[target].device

        # 1. Patch + domain embedding per modality, concatenated: target first.
        tokens = []
        patches = []
        for m in order:
            x_m = self.patch_embedding[m](volumes[m])  # (B, dim, d, h, w)
            x_m = x_m.flatten(2).transpose(1, 2)  # (B, n, dim)
            patches.append(x_m)
            tokens.append(x_m + self.domain_embedding.weight[self.slot[m]])
        if cfg.condition_shortcut and len(order) > 1:
            # Spatially aligned condition shortcut (config docstring): same raster order per modality.
            tokens[0] = tokens[0] + torch.stack(patches[1:]).mean(dim=0)  # (B, n, dim)
        x = torch.cat(tokens, dim=1).float()  # (B, N, dim), N = len(order) * n
        n_target = tokens[0].shape[1]  # tokens [:n_target] have role ROLE_TARGET, the rest ROLE_CONDITION

        # 2. Time + role embedding and modulation inputs, fp32 island.
        with torch.autocast(device_type=device.type, enabled=False):
            e_t = self.time_embedding(sinusoidal_embedding(t * cfg.time_scale, cfg.freq_dim))  # (B, dim)
            e_role = e_t.unsqueeze(1) + self.role_embedding.weight.float().unsqueeze(0)  # (B, 2, dim)
            e0_role = self.time_projection(e_role).unflatten(2, (6, cfg.dim))  # (B, 2, 6, dim)
            assert e0_role.dtype == torch.float32

        # 3. 4D RoPE tables (slot, d, h, w), fp32.
        positions = self._positions(order, grid, device)  # (N, 4) slot, d, h, w
        if cfg.rope_slot_stride:
            # Wan layout: slot -> offset along D (Wan's t axis); (N, 3) positions (d', h, w).
            if grid[0] > cfg.rope_slot_stride:
                raise ValueError(
                    f"{grid[0]} tokens along D exceed rope_slot_stride {cfg.rope_slot_stride}: "
                    "modalities would share RoPE positions; raise rope_slot_stride"
                )
            positions = torch.cat(
                [positions[:, 1:2] + positions[:, 0:1] * cfg.rope_slot_stride, positions[:, 2:]], dim=1
            )
        cos, sin = rope_cos_sin(positions, self.rope_dims, cfg.rope_theta)

        # 4. Blocks: full self-attention over condition and target tokens.
        for block in self.blocks:
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, e0_role, n_target, cos, sin, use_reentrant=False)
            else:
                x = block(x, e0_role, n_target, cos, sin)

        # 5. Head on the target tokens only, modulated by the target's embedding; unpatchify.
        out = self.head(x[:, :n_target], e_role[:, ROLE_TARGET], target)  # (B, n, C * p^3)
        out = self.unpatchify(out, grid, cfg.head_channels(target))  # (B, C_head, D, H, W)
        if target in self.target_heads:
            # 6. Target head (x0 heads only, validated): extra channels -> x0_hat (B, C_target, D, H, W).
            out = self.target_heads[target](out, volumes)
        if cfg.prediction == "x0":
            # 7. x0-parameterised head (config docstring): v_hat = (x_t - x0_hat) / t, fp32.
            t_div = t.float().clamp_min(cfg.x0_min_t).view(-1, 1, 1, 1, 1)
            return (volumes[target].float() - out.float()) / t_div
        return out

    def unpatchify(self, tokens: Tensor, grid: tuple[int, ...], channels: int) -> Tensor:
        """(B, d*h*w, C * pd*ph*pw) -> (B, C, d*pd, h*ph, w*pw), inverse of the Conv3d patching."""
        b = tokens.shape[0]
        d, h, w = grid
        pd, ph, pw = self.config.patch
        x = tokens.reshape(b, d, h, w, channels, pd, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, d, pd, h, ph, w, pw)
        return x.reshape(b, channels, d * pd, h * ph, w * pw)

    def num_parameters(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())
