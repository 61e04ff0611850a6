"""Training data: case folders encoded once to working-grid tensors and kept in memory.

Encoding a 128^3 OpenKBP case (NIfTI decode, plates, resampling) costs seconds, a CPU training step
about as much; so cases are encoded once into a cache folder (float16 .pt per case, keyed by the
encoding config) and the whole training set lives in RAM (~13 channels x 64^3 x 2 B = 7 MB/case).
Missing modalities (OpenKBP cases without CT or dose) are kept: Any2Any uses what is present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from diffkt3d.data.encoding import EncodingConfig, available_modalities, encode_case
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder

log = logging.getLogger(__name__)


def list_case_dirs(roots: list[str | Path]) -> list[Path]:
    """Case folders under each root (a root may itself be a case folder)."""
    out: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise CaseError("data root does not exist", file=str(root))
        if any(root.glob("*.nii.gz")):
            out.append(root)
        else:
            out.extend(sorted((p for p in root.iterdir() if p.is_dir()), key=_natural_key))
    return out


def _natural_key(p: Path) -> tuple:
    digits = "".join(ch for ch in p.name if ch.isdigit())
    return (p.name.rstrip("0123456789"), int(digits) if digits else -1, p.name)


def prepare_case(case_dir: Path, with_plates: bool = True):
    """Load a case folder and rasterise beam/angle plates from its plan when absent."""
    case = load_case_folder(case_dir)
    if with_plates:
        from diffkt3d.data.plates import ensure_plates

        ensure_plates(case)
    return case


def _cache_key(cfg: EncodingConfig, with_plates: bool) -> str:
    blob = json.dumps({"enc": cfg.to_dict(), "plates": with_plates, "v": 2}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def build_cache(case_dirs: list[Path], cfg: EncodingConfig, cache_dir: str | Path,
                with_plates: bool = True) -> list[Path]:
    """Encode each case once; returns the cache files (existing ones are reused)."""
    cache_dir = Path(cache_dir) / _cache_key(cfg, with_plates)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, case_dir in enumerate(case_dirs):
        f = cache_dir / f"{case_dir.parent.name}__{case_dir.name}.pt"
        if not f.exists():
            case = prepare_case(case_dir, with_plates)
            tensors = {m: v.half() for m, v in encode_case(case, cfg).items()}
            tmp = f.with_suffix(".part")
            torch.save({"case_id": case.case_id, "tensors": tensors}, tmp)
            tmp.replace(f)
            log.info("cached %s (%d/%d): %s", case.case_id, i + 1, len(case_dirs), ", ".join(tensors))
        files.append(f)
    return files


@dataclass
class EncodedCase:
    case_id: str
    tensors: dict[str, torch.Tensor]  # modality -> (C, D, H, W) float16

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(self.tensors)


class EncodedCaseSet:
    """In-memory encoded cases with Any2Any batch sampling."""

    def __init__(self, cases: list[EncodedCase]):
        if not cases:
            raise CaseError("no training cases")
        self.cases = cases

    @classmethod
    def from_cache(cls, files: list[Path]) -> EncodedCaseSet:
        cases = []
        for f in files:
            blob = torch.load(f, weights_only=True)
            cases.append(EncodedCase(blob["case_id"], blob["tensors"]))
        return cls(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def with_modality(self, modality: str) -> list[EncodedCase]:
        return [c for c in self.cases if modality in c.tensors]

    def batch(self, cases: list[EncodedCase], modalities: list[str]) -> dict[str, torch.Tensor]:
        """Stack the given modalities of the given cases: {m: (B, C, D, H, W) float32}."""
        return {m: torch.stack([c.tensors[m] for c in cases]).float() for m in modalities}

    def sample_any2any(self, rng: random.Random, batch_size: int, target_weights: dict[str, float],
                       p_condition: float) -> tuple[str, list[str], list[EncodedCase]]:
        """Pick a target, a batch of cases that have it, and a random subset of the rest as conditions.

        The condition set is drawn from the modalities every case of the batch has, each kept with
        probability `p_condition` (at least one is kept: an unconditional target teaches little).
        """
        targets = [m for m in target_weights if self.with_modality(m)]
        target = rng.choices(targets, weights=[target_weights[m] for m in targets])[0]
        pool = self.with_modality(target)
        chosen = rng.sample(pool, k=min(batch_size, len(pool)))
        common = set.intersection(*(set(c.modalities) for c in chosen)) - {target}
        candidates = sorted(common)
        conditions = [m for m in candidates if rng.random() < p_condition]
        if not conditions and candidates:
            conditions = [rng.choice(candidates)]
        return target, conditions, chosen

    def sample_target(self, rng: random.Random, batch_size: int, target: str,
                      exclude: tuple[str, ...] = ()) -> tuple[list[str], list[EncodedCase]]:
        """Stage B: a batch for one target, conditioned on everything else the batch shares.

        Cases are grouped by their modality set so a case without CT is trained with the CT-free
        condition set rather than dragging the whole batch down to it.
        """
        pool = self.with_modality(target)
        first = rng.choice(pool)
        same = [c for c in pool if c.modalities == first.modalities and c is not first]
        chosen = [first, *rng.sample(same, k=min(batch_size - 1, len(same)))]
        conditions = sorted(set(first.modalities) - {target} - set(exclude))
        return conditions, chosen


def modality_counts(cases: EncodedCaseSet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in cases.cases:
        for m in c.tensors:
            counts[m] = counts.get(m, 0) + 1
    return counts


__all__ = ["EncodedCase", "EncodedCaseSet", "available_modalities", "build_cache", "list_case_dirs",
           "modality_counts", "prepare_case"]
