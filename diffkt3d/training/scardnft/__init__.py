"""ScardNFT: Scorecard-reward RL post-training of the dose DiT with LoRA (DiffusionNFT objective).

One iteration on one training case (DiffKT3D supplement B.5, DiffusionNFT; docs/scardnft.md):
  1. sample G candidate doses with the *old* policy, the deterministic 10-step Euler sampler and G
     initial noises (seeds), decode them to the case grid;
  2. reward each with :mod:`diffkt3d.training.reward` (Scorecard with template or learned weights,
     hinge penalties, MAE anchor), normalise in the group, A = (R − mean)/(std + 1e-4) clipped to
     ±5, r = clip(A/10 + 0.5, 0, 1);
  3. for ``inner_steps`` optimiser steps: noise every candidate at a fresh t, and minimise
        v⁺ = β·v_θ + (1 − β)·sg(v_old),   v⁻ = (1 + β)·sg(v_old) − β·v_θ,
        x̂0^p = x_t − t·v^p,   L^p = mean‖x̂0^p − x0‖² / sg(max(mean|x̂0^p − x0|, 1e-5)),
        loss = mean_batch[(r·L⁺ + (1 − r)·L⁻)/β] + kl_weight·mean‖v_θ − v_ref‖²
     (x0 = the candidate, v_ref = the frozen base model), updating only rank-64 LoRA adapters on
     every self-attention and FFN Linear plus the modulation MLP / tables;
  4. old policy θ_old ← d·θ_old + (1 − d)·θ.

With G = 4 candidates every case contributes four positive/negative pairs (each candidate enters
both branches, weighted r and 1 − r). Preference records, when given, are first turned into item
weights (:func:`diffkt3d.preferences.learner.learn_item_weights`) that replace the template's
weights in the reward.

Entry points: :func:`run_scardnft` (Python / MONAI Label) and :func:`run_scardnft_from_yaml`
(``diffkt3d train --stage scardnft --config configs/scardnft-cpu.yaml``). Outputs in ``out_dir``:
``adapter.pt`` (LoRA + modulation weights only), ``merged.pt`` (a full checkpoint loadable by
:func:`diffkt3d.models.checkpoint.load_checkpoint`), ``history.jsonl`` and ``summary.json``.

Modules: ``config`` (the run's dataclass), ``loss`` (the DiffusionNFT objective), ``lora`` (peft
LoRA on the DiT), ``adapter`` (adapter files), ``trainer`` (the loop), ``run`` (entry points).
"""

from diffkt3d.training.scardnft.adapter import ADAPTER_FORMAT, load_adapter, save_adapter
from diffkt3d.training.scardnft.config import ScardNFTConfig
from diffkt3d.training.scardnft.lora import LORA_TARGETS, add_lora, merge_lora, trainable_state
from diffkt3d.training.scardnft.loss import nft_loss
from diffkt3d.training.scardnft.run import run_scardnft, run_scardnft_from_yaml
from diffkt3d.training.scardnft.trainer import ScardNFTResult, ScardNFTTrainer

__all__ = ["ScardNFTConfig", "ScardNFTResult", "nft_loss", "add_lora", "trainable_state", "save_adapter",
           "load_adapter", "merge_lora", "ScardNFTTrainer", "run_scardnft", "run_scardnft_from_yaml",
           "LORA_TARGETS", "ADAPTER_FORMAT"]
