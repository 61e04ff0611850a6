"""Training data of a full-res stage: per-case cache of full-resolution inputs and coarse predictions,
and the random crops the stage learns on.

Why a cache: the coarse prediction is a full DiT sampling run (``coarse_steps`` network
evaluations on the working grid), far dearer than a training step; it is computed once per case
through ``Predictor.predict_coarse``, the very path inference uses, and kept on disk with the CPU
seconds it cost (counted in the run's budget). A case's full-res inputs (~60 MB in float16 for
128^3) are kept beside it and read back per step through a small in-memory LRU, so the training
set need not fit in RAM.

Crops follow MONAI's class-balanced sampling (``generate_label_classes_crop_centers``, the centre
draw of ``RandCropByLabelClassesd``): for masks a share ``foreground_ratio`` of crops is centred on
a structure drawn uniformly among those the case has, so the spinal cord and larynx are seen as
often as the mandible; dose and CT crops are centred in the body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import generate_label_classes_crop_centers

from diffkt3d.data.case import Case
from diffkt3d.data.encoding import available_modalities, encode_modality
from diffkt3d.errors import CaseError
from diffkt3d.models.full_res import FullResConfig, full_res_encoding, stage_conditions_tensor
from diffkt3d.training.augment import LEFT_RIGHT_AXIS, mirrored_channels

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CropBatch:
    """Crops (B, C, *crop) in the [-1, 1] encoding; ``target`` holds masks as 0/1 for mask targets."""

    conditions: torch.Tensor
    coarse: torch.Tensor | None
    target: torch.Tensor
    body: torch.Tensor  # (B, 1, *crop) bool
    present: torch.Tensor  # (B, target channels) bool: which structures the case has (masks)


def cache_key(cfg: FullResConfig, base_digest: str, coarse_steps: int, coarse_seed: int) -> str:
    """Cache folder name: changes with anything that changes what is cached."""
    blob = json.dumps({"stage": cfg.to_dict(), "base": base_digest, "steps": coarse_steps, "seed": coarse_seed,
                       "v": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def has_target(case: Case, target: str) -> bool:
    """Whether a case can teach a ``target`` stage (it has the target and a body)."""
    if case.body is None:
        return False
    if target == "dose":
        return case.has("dose") and case.has("ptv")
    return case.has(target)


def target_tensor(case: Case, cfg: FullResConfig, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference target on the case grid and which of its channels the case has.

    Dose and CT: (1, I, J, K) in the encoding. oar: one 0/1 channel per OAR channel of the
    encoding; ptv: one per prescription level (the union of the case's targets at that level).
    A structure the case lacks is not contoured, which is not the same as absent, so the loss
    skips its channel.
    """
    shape = case.grid.shape
    if cfg.target in ("dose", "ct"):
        return encode_modality(case, cfg.target, enc), torch.ones(1, dtype=torch.bool)
    if cfg.target == "oar":
        names = enc.oar_channels
        masks = [case.structures[n].mask if n in case.oars else np.zeros(shape, bool) for n in names]
        present = [n in case.oars for n in names]
    else:
        masks, present = [], []
        for level in cfg.ptv_levels_gy:
            union = np.zeros(shape, bool)
            for s in case.targets.values():
                if s.prescription_gy is not None and abs(s.prescription_gy - level) < 1e-6:
                    union |= s.mask
            masks.append(union)
            present.append(bool(union.any()))
    return torch.from_numpy(np.stack(masks).astype(np.uint8)), torch.tensor(present)


def build_case_cache(case_dir: Path, predictor, cfg: FullResConfig, coarse_steps: int, coarse_seed: int,
                     folder: Path) -> Path | None:
    """Encode one case and compute its coarse prediction once; None when the case lacks the target."""
    from diffkt3d.training.dataset import prepare_case

    out = folder / f"{case_dir.parent.name}__{case_dir.name}.pt"
    if out.exists() and out.with_suffix(".json").exists():
        return out
    case = prepare_case(case_dir, with_plates="beam" in cfg.conditions or "angle" in cfg.conditions)
    if not has_target(case, cfg.target):
        log.info("case %s has no %s (or no body): not used", case.case_id, cfg.target)
        return None
    enc = full_res_encoding(predictor.encoding, case.grid.shape)
    present_mods = set(available_modalities(case, enc))
    volumes = {m: encode_modality(case, m, enc) for m in cfg.conditions if m in present_mods}
    conditions = stage_conditions_tensor(volumes, cfg, predictor.encoding, case.grid.shape)
    target, present = target_tensor(case, cfg, enc)
    blob = {"case_id": case.case_id, "conditions": conditions.half(), "target": target, "present": present,
            "body": torch.from_numpy(case.body.copy()), "coarse_cpu_s": 0.0}
    if cfg.coarse_input:
        c0 = time.process_time()
        blob["coarse"] = predictor.predict_coarse(case, cfg.target, steps=coarse_steps, seed=coarse_seed)
        blob["coarse_cpu_s"] = time.process_time() - c0
    tmp = out.with_suffix(".part")
    torch.save(blob, tmp)
    tmp.replace(out)
    # the cost beside the tensors, so a run sums its budget without reading every case
    out.with_suffix(".json").write_text(json.dumps({"case_id": case.case_id, "coarse_cpu_s": blob["coarse_cpu_s"]}))
    return out


def coarse_cpu_seconds(files: list[Path]) -> float:
    """CPU seconds the coarse predictions of these cached cases cost when they were computed."""
    return sum(float(json.loads(f.with_suffix(".json").read_text())["coarse_cpu_s"]) for f in files)


class CaseCropper:
    """Random crops of cached cases; draws come from the trainer's ``random.Random`` (resumable)."""

    def __init__(self, files: list[Path], cfg: FullResConfig, oar_channels: tuple[str, ...],
                 foreground_ratio: float, flip_lr: float, keep_in_memory: int = 8):
        if not files:
            raise CaseError(f"no training case has the target {cfg.target!r} and a body")
        self.files, self.cfg, self.oar_channels = list(files), cfg, tuple(oar_channels)
        self.foreground_ratio, self.flip_lr = foreground_ratio, flip_lr
        self.keep = keep_in_memory
        self._lru: OrderedDict[Path, dict] = OrderedDict()

    def _case(self, path: Path) -> dict:
        if path in self._lru:
            self._lru.move_to_end(path)
            return self._lru[path]
        blob = torch.load(path, map_location="cpu", weights_only=True)
        body = blob["body"].numpy()
        if self.cfg.target in ("oar", "ptv"):
            labels = blob["target"].numpy().astype(bool)
            union = labels.any(axis=0)
            blob["indices"] = [np.flatnonzero(body & ~union)] + [np.flatnonzero(m) for m in labels if m.any()]
        else:
            blob["indices"] = [np.flatnonzero(body)]
        self._lru[path] = blob
        while len(self._lru) > self.keep:
            self._lru.popitem(last=False)
        return blob

    def _ratios(self, indices: list[np.ndarray]) -> list[float]:
        n = len(indices) - 1
        if self.cfg.target not in ("oar", "ptv"):
            return [1.0]
        if n == 0:
            return [1.0]
        bg = 1.0 - self.foreground_ratio if len(indices[0]) else 0.0
        return [bg] + [self.foreground_ratio / n] * n

    def crop(self, rng: random.Random) -> dict[str, torch.Tensor]:
        """One crop of a random case: conditions, coarse, target, body, present."""
        blob = self._case(self.files[rng.randrange(len(self.files))])
        shape = tuple(blob["body"].shape)
        state = np.random.RandomState(rng.randrange(2**31))
        center = generate_label_classes_crop_centers(self.cfg.crop, 1, shape, blob["indices"],
                                                     self._ratios(blob["indices"]), state, allow_smaller=True,
                                                     warn=False)[0]
        out = {"conditions": _crop(blob["conditions"].float(), center, self.cfg.crop, -1.0),
               "target": _crop(blob["target"].float(), center, self.cfg.crop,
                               0.0 if self.cfg.target in ("oar", "ptv") else -1.0),
               "body": _crop(blob["body"][None], center, self.cfg.crop, False),
               "present": blob["present"].clone()}
        if "coarse" in blob:
            out["coarse"] = _crop(blob["coarse"].float(), center, self.cfg.crop, -1.0)
        if self.flip_lr > 0 and rng.random() < self.flip_lr:
            out = self._mirror(out)
        return out

    def _mirror(self, crop: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Left-right mirror; the Left/Right OAR channels swap in the conditions and an oar target."""
        dim = 1 + LEFT_RIGHT_AXIS
        from diffkt3d.inference.full_res import mirrored_condition_order

        order = mirrored_channels(self.oar_channels)
        out = {k: (v.flip(dim) if k != "present" else v) for k, v in crop.items()}
        if "oar" in self.cfg.conditions:
            out["conditions"] = out["conditions"][mirrored_condition_order(self.cfg.conditions, self.oar_channels)]
        if self.cfg.target == "oar":
            for k in ("target", "coarse", "present"):
                if k in out:
                    out[k] = out[k][order]
        return out

    def batch(self, rng: random.Random, size: int) -> CropBatch:
        crops = [self.crop(rng) for _ in range(size)]
        return CropBatch(conditions=torch.stack([c["conditions"] for c in crops]),
                         coarse=torch.stack([c["coarse"] for c in crops]) if "coarse" in crops[0] else None,
                         target=torch.stack([c["target"] for c in crops]),
                         body=torch.stack([c["body"] for c in crops]),
                         present=torch.stack([c["present"] for c in crops]))


def _crop(volume: torch.Tensor, center, size: tuple[int, ...], pad_value) -> torch.Tensor:
    """(C, I, J, K) -> (C, *size) around ``center``, kept inside the grid; padded where the grid is smaller."""
    slices, pads = [slice(None)], []
    for c, s, n in zip(center, size, volume.shape[1:], strict=True):
        start = int(min(max(int(c) - s // 2, 0), max(n - s, 0)))
        slices.append(slice(start, start + s))
        pads.append(max(s - n, 0))
    out = volume[tuple(slices)]
    if any(pads):
        pad = [p for extra in reversed(pads) for p in (0, extra)]
        out = F.pad(out.float() if out.dtype == torch.bool else out, pad, value=float(pad_value))
        out = out.bool() if volume.dtype == torch.bool else out
    return out


__all__ = ["CaseCropper", "CropBatch", "build_case_cache", "cache_key", "coarse_cpu_seconds", "has_target",
           "target_tensor"]
