"""Latent cache of case folders for training in the frozen Wan VAE's latent space.

A data concern, so it lives with the training code and not in ``models.wan_vae``, which keeps the
model side (codec, crops, latent sampling): each training case is loaded once, cropped around its
PTV centre, encoded by the codec and written as one file in the format of
``training.dataset.build_cache``, so ``EncodedCaseSet.from_cache`` reads latents and voxel caches alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from diffkt3d.data.case import Case
from diffkt3d.data.encoding import EncodingConfig, encode_case
from diffkt3d.errors import CaseError
from diffkt3d.models.wan_vae import PAPER_CROP, WanLatentCodec, crop_clips

__all__ = ["encode_case_latents", "build_latent_cache"]

log = logging.getLogger(__name__)


def encode_case_latents(
    case: Case, codec: WanLatentCodec, encoding: EncodingConfig, crop: tuple[int, int, int] = PAPER_CROP,
) -> tuple[dict[str, Tensor], dict[str, Tensor], tuple[int, int, int]]:
    """Encode every available modality of a case: voxel crop around the PTV centre -> latents.

    The crop is :func:`~diffkt3d.models.wan_vae.crop_clips`'s, the one inference uses: clip order
    (z, y, x), so ``crop`` is (slices, y, x) like the paper's 97 x 128 x 160.

    Returns:
        latents {m: (C_m * z, d, h, w) float32}, voxel crops {m: (C_m, *crop)} in clip order (for
        scoring in voxel space) and the crop start in clip order (see :func:`uncrop`).
    """
    voxels = encode_case(case, encoding)
    if not voxels:
        raise CaseError("no modality could be encoded", case=case.case_id)
    crops, start = crop_clips(voxels, crop)
    latents = {m: codec.encode(v[None])[0] for m, v in crops.items()}
    return latents, crops, start


def build_latent_cache(case_dirs: list[Path], encoding: EncodingConfig, codec: WanLatentCodec,
                       cache_dir: str | Path, crop: tuple[int, int, int] = PAPER_CROP,
                       with_plates: bool = True) -> list[Path]:
    """Encode each case once to latents (float16 .pt, the format of ``training.dataset.build_cache``).

    Each file holds ``{"case_id", "tensors": {m: latent}, "voxel": {"dose", "body"} crops, "start"}``
    so ``EncodedCaseSet.from_cache`` trains on latents and validation can score decoded doses.
    The folder is keyed by the encoding, the crop and the VAE fingerprint (config and weights).
    """
    from diffkt3d.training.dataset import prepare_case

    key = hashlib.sha1(json.dumps({"enc": encoding.to_dict(), "crop": list(crop), "vae": codec.fingerprint(),
                                   "plates": with_plates, "v": 1}, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(cache_dir) / f"latent-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, case_dir in enumerate(case_dirs):
        f = folder / f"{case_dir.parent.name}__{case_dir.name}.pt"
        if not f.exists():
            case = prepare_case(case_dir, with_plates)
            latents, crops, start = encode_case_latents(case, codec, encoding, crop)
            voxel = {m: crops[m].half() for m in ("dose", "body") if m in crops}
            tmp = f.with_suffix(".part")
            torch.save({"case_id": case.case_id, "tensors": {m: v.half() for m, v in latents.items()},
                        "voxel": voxel, "start": list(start)}, tmp)
            tmp.replace(f)
            log.info("latent-cached %s (%d/%d): %s", case.case_id, i + 1, len(case_dirs), ", ".join(latents))
        files.append(f)
    return files
