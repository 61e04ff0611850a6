"""MONAI regression peer for the dose benchmark: BasicUNet on the same encoded inputs.

Same working grid, same condition modalities as the shipped DiT (ct, ptv, oar, body, beam, angle,
concatenated as channels; a missing CT is a channel of -1 = air), trained with an L1 loss on the
[-1, 1] dose under the same CPU-time budget as the DiT. `python benchmarks/peer.py train ...`
trains it; `benchmarks/dose_benchmark.py` evaluates it beside the DiT in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from machine_info import case_dirs, openkbp_dir
from monai.networks.nets import BasicUNet

from diffkt3d.data.encoding import PTV_RESAMPLING, EncodingConfig
from diffkt3d.training.dataset import EncodedCaseSet, build_cache
from diffkt3d.training.trainer import body_mean

log = logging.getLogger("peer")

CONDITIONS = ("ct", "ptv", "oar", "body", "beam", "angle")
FEATURES = (16, 32, 64, 128, 256, 16)
LOSS_REGIONS = ("all", "body")


def stack_inputs(tensors: dict[str, torch.Tensor], enc: EncodingConfig) -> torch.Tensor:
    """{modality: (C, D, H, W)} -> (C_total, D, H, W); absent modalities become -1 (empty/air)."""
    chans = enc.channels()
    parts = []
    for m in CONDITIONS:
        if m in tensors:
            parts.append(tensors[m].float())
        else:
            parts.append(-torch.ones((chans[m], *enc.grid)))
    return torch.cat(parts, dim=0)


def build_peer(enc: EncodingConfig) -> BasicUNet:
    in_ch = sum(enc.channels()[m] for m in CONDITIONS)
    return BasicUNet(spatial_dims=3, in_channels=in_ch, out_channels=1, features=FEATURES)


def peer_loss(pred: torch.Tensor, dose: torch.Tensor, inputs: torch.Tensor, enc: EncodingConfig,
              region: str) -> torch.Tensor:
    """Mean |pred - dose| over every voxel ("all") or over the voxels that touch the body ("body").

    "body" is the DiT's Stage B ``loss_region: body`` (docs/model-card.md): ~92 % of a 64^3 OpenKBP
    grid is air, where the prediction is never scored, and under the absolute error those voxels
    pull the dose at the body edge toward zero. The peer gets the same choice so that the
    comparison is not won on a loss flaw the DiT no longer has.
    """
    error = (pred - dose).abs()  # (B, 1, D, H, W)
    if region == "all":
        return error.mean()
    return body_mean(error, inputs[:, body_channel(enc)].unsqueeze(1))


def body_channel(enc: EncodingConfig) -> int:
    """Index of the body mask among the stacked input channels (``stack_inputs``)."""
    chans = enc.channels()
    return sum(chans[m] for m in CONDITIONS[: CONDITIONS.index("body")])


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    enc = EncodingConfig(grid=tuple(args.grid), ptv_resampling=args.ptv_resampling)
    files = build_cache(case_dirs(args.train_roots), enc, args.cache_dir, with_plates=True)
    data = EncodedCaseSet.from_cache(files)
    cases = data.with_modality("dose")
    model = build_peer(enc)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    step, used0 = 0, 0.0
    if args.resume and out.exists():
        # Continue a budgeted run: the CPU minutes already spent count against --cpu-minutes.
        blob = torch.load(out, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        if "optimizer" in blob:
            opt.load_state_dict(blob["optimizer"])
        step, used0 = int(blob["steps"]), float(blob["cpu_minutes"])
        rng.seed(args.seed + step)
        log.info("resumed %s at step %d, %.1f CPU-min used", out, step, used0)
    cpu0 = time.process_time()

    def used() -> float:
        return used0 + (time.process_time() - cpu0) / 60

    def save() -> None:
        torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "grid": list(enc.grid),
                    "ptv_resampling": enc.ptv_resampling, "features": FEATURES, "steps": step, "cpu_minutes": used(),
                    "loss_region": args.loss_region}, out)

    while used() < args.cpu_minutes:
        # Same warm-up-free constant lr with the optional final linear decay as the DiT recipe.
        into = (used() / args.cpu_minutes - (1 - args.decay_fraction)) / max(args.decay_fraction, 1e-9)
        scale = 1.0 - (1.0 - args.final_lr_ratio) * min(max(into, 0.0), 1.0) if args.decay_fraction > 0 else 1.0
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        batch = rng.sample(cases, k=args.batch_size)
        x = torch.stack([stack_inputs(c.tensors, enc) for c in batch])
        y = torch.stack([c.tensors["dose"].float() for c in batch])
        pred = torch.tanh(model(x))
        loss = peer_loss(pred, y, x, enc, args.loss_region)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            log.info("step %d loss %.4f lr %.2e (cpu %.1f / %.1f min)", step, loss.item(), args.lr * scale,
                     used(), args.cpu_minutes)
            save()
    save()
    log.info("peer done: %d steps, %s", step, json.dumps({"out": str(out)}))


def load_peer(path: str | Path) -> tuple[BasicUNet, EncodingConfig, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    # Peers saved before ptv_resampling existed saw area-averaged prescription maps.
    enc = EncodingConfig(grid=tuple(blob["grid"]), ptv_resampling=blob.get("ptv_resampling", "area"))
    model = build_peer(enc)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), enc, {"steps": blob["steps"], "cpu_minutes": blob["cpu_minutes"],
                               "loss_region": blob.get("loss_region", "all")}


@torch.no_grad()
def predict_peer(model: BasicUNet, tensors: dict[str, torch.Tensor], enc: EncodingConfig) -> torch.Tensor:
    """(1, D, H, W) dose in [-1, 1] on the working grid."""
    return torch.tanh(model(stack_inputs(tensors, enc)[None]))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--train-roots", nargs="+", default=[openkbp_dir("train")])
    t.add_argument("--cache-dir", default="runs/cache")
    t.add_argument("--grid", nargs=3, type=int, default=[64, 64, 64])
    t.add_argument("--ptv-resampling", choices=PTV_RESAMPLING, default="max",
                   help="prescription map to the grid; the same as the DiT's recipe")
    t.add_argument("--cpu-minutes", type=float, required=True, help="process CPU-time budget")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/peer/basicunet.pt")
    t.add_argument("--resume", action="store_true", help="continue --out, counting its CPU minutes")
    t.add_argument("--decay-fraction", type=float, default=0.0, help="final linear lr decay share")
    t.add_argument("--final-lr-ratio", type=float, default=0.05)
    t.add_argument("--loss-region", choices=LOSS_REGIONS, default="all",
                   help="L1 over every voxel (the peers of the results up to 2026-12-03) or over the "
                        "voxels that touch the body (the DiT's Stage B loss_region)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "train":
        train(args)


if __name__ == "__main__":
    main()
