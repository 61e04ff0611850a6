"""Cost of serving a latent-space (Wan VAE) model: measured on the CPU with a tiny model, estimated for Wan 1.3B.

    nice -n 15 python benchmarks/latent_speed.py [--case DIR] [--out benchmarks/results/latent_speed]

Part 1 (measured): a tiny random ``AutoencoderKLWan`` (Wan 2.1's structure, 4 base channels) and a
tiny latent DiT are built here (nothing is downloaded) and served through ``Predictor.load`` on one
OpenKBP validation case, at two sizes: a 32^3 working grid with a 17 x 32 x 32 crop, and OpenKBP's
native 128^3 grid with the paper's 97 x 128 x 160 crop. Per size, three dose requests on one
``LatentPredictor``: a cache miss (every condition VAE-encoded), the same request again (every
condition latent from the per-case cache) and a 1-step preview (cache hit). Reported: the
Predictor's stage timings (VAE encode, latent sampling, VAE decode, total) in wall seconds, and the
process CPU seconds of the whole call (on a shared machine the robust figure).

Part 2 (estimate, not measured): the cost of the ``wan-1.3b`` DiT with the real Wan 2.1 VAE per case
on one GPU, from FLOPs and memory. VAE FLOPs are counted by ``torch.utils.flop_counter`` on the
meta device (diffusers' default ``AutoencoderKLWan`` config is Wan 2.1's VAE); DiT FLOPs by the
matmul formula (its projection and FFN part checked here against the FLOP counter on a tiny DiT;
the counter does not see the CPU attention kernel, whose 4 N^2 d is the textbook count).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import describe_machine, openkbp_dir, write_results  # noqa: E402

Z = 4  # the tiny VAE's latent channels (Wan 2.1: 16)
SIZES = {"grid 32^3, crop 17x32x32": ((32, 32, 32), (17, 32, 32)),
         "grid 128^3, crop 97x128x160 (paper)": ((128, 128, 128), (97, 128, 160))}
# Wan 2.1 T2V-1.3B transformer (configs/wan-1.3b-gpu.yaml) and the paper's crop in latents.
WAN_DIM, WAN_DEPTH, WAN_FFN, WAN_Z = 1536, 30, 8960, 16
PAPER_TOKENS_PER_MODALITY = 25 * 8 * 10  # latents 25 x 16 x 20, patch (1, 2, 2)
H100_BF16_TFLOPS, H100_TF32_TFLOPS = 989.0, 494.0  # dense peak, SXM (NVIDIA data sheet)
# Assumed fractions of peak (DiT bf16, VAE fp32/TF32 convolutions): good and poor utilisation.
UTILISATION = {"good": (0.40, 0.20), "poor": (0.15, 0.05)}
FULL = "ct, ptv, oar, body, beam, angle (OpenKBP with its inferred beam plan)"


def build_tiny(folder: Path, grid: tuple[int, int, int], crop: tuple[int, int, int]) -> tuple[Path, Path]:
    """(checkpoint, VAE folder): a random tiny VAE and a tiny latent DiT made for it."""
    from diffusers import AutoencoderKLWan

    from diffkt3d.data.encoding import EncodingConfig
    from diffkt3d.models.any2any_dit import Any2AnyDiT
    from diffkt3d.models.checkpoint import save_checkpoint
    from diffkt3d.models.config import get_config
    from diffkt3d.models.wan_vae import WanLatentCodec

    torch.manual_seed(0)
    vae_dir = folder / "vae"
    AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * Z,
                     latents_std=[1.0] * Z).save_pretrained(vae_dir)
    codec = WanLatentCodec.from_pretrained(vae_dir)
    enc = EncodingConfig(grid=grid)
    cfg = get_config("tiny", in_channels={m: c * Z for m, c in enc.channels().items()},
                     modalities=list(enc.modalities), patch=(1, 2, 2), dim=24, heads=2, ffn_dim=32,
                     rope_slot_stride=32, zero_init_modulation=False)
    model = Any2AnyDiT(cfg).eval()
    meta = {"name": "tiny-latent-bench",
            "latent": {"vae_fingerprint": codec.fingerprint(), "crop": list(crop), "z_dim": Z}}
    return save_checkpoint(folder / "latent.pt", model, cfg, enc, flow_shift=3.0, meta=meta), vae_dir


def measure(case_dir: Path, work: Path) -> list[dict]:
    """Part 1: miss / hit / preview dose requests per size."""
    from diffkt3d.inference import Predictor
    from diffkt3d.io.case_folder import load_case_folder

    rows = []
    for name, (grid, crop) in SIZES.items():
        folder = work / f"g{grid[0]}"
        folder.mkdir()
        ckpt, vae_dir = build_tiny(folder, grid, crop)
        predictor = Predictor.load(ckpt, device="cpu", vae_dir=vae_dir)
        case = load_case_folder(case_dir, with_dose=False)
        for label, kwargs in (("miss (first request)", {}), ("hit (same request again)", {}),
                              ("hit, 1-step preview", {"preview": True})):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            pred = predictor.predict_dose(case, steps=10, candidates=1, template=None, with_dvh=False, **kwargs)
            t = pred.timings
            rows.append({"size": name, "request": label, "steps": pred.steps,
                         "encoded": pred.latent["conditions_encoded"], "cached": pred.latent["conditions_cached"],
                         "latent_grid": pred.latent["latent_grid"],
                         **{k: t[k] for k in ("encode_s", "vae_encode_s", "latent_sample_s", "vae_decode_s",
                                              "decode_s", "total_s")},
                         "wall_s": round(time.perf_counter() - wall0, 3),
                         "cpu_s": round(time.process_time() - cpu0, 3)})
            logging.info("%s / %s: %s", name, label, rows[-1])
    return rows


def dit_flops(tokens: int, dim: int, depth: int, ffn: int, attention: bool = True) -> float:
    """Forward FLOPs of the DiT blocks: q, k, v, o projections, FFN and (``attention``) the attention
    itself (scores and weighted sum, 4 N^2 d: quadratic in the tokens, most of it at 14 000 tokens)."""
    return depth * (8 * tokens * dim**2 + 4 * tokens * dim * ffn + (4 * tokens**2 * dim if attention else 0))


def check_dit_formula() -> dict:
    """The formula against torch's FLOP counter on the tiny DiT (real tensors, CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffkt3d.models.any2any_dit import Any2AnyDiT
    from diffkt3d.models.config import get_config

    mods = ("ct", "ptv", "dose")
    cfg = get_config("tiny", in_channels={m: Z for m in mods}, modalities=list(mods), patch=(1, 2, 2), dim=48,
                     heads=2, ffn_dim=128, rope_slot_stride=32)
    model = Any2AnyDiT(cfg).eval()
    grid = (4, 10, 20)  # (d, h, w) latents -> 4 * 5 * 10 = 200 tokens per modality with patch (1, 2, 2)
    vols = {m: torch.zeros(1, Z, *grid) for m in mods}
    n = len(mods) * 200
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(vols, "dose", torch.ones(1))
    # torch's counter has no formula for the CPU attention kernel, so the check covers the matmuls
    # (projections, FFN); the attention term is the textbook 4 N^2 d.
    return {"tokens": n, "counted": counter.get_total_flops(),
            "formula_without_attention": dit_flops(n, 48, cfg.depth, 128, attention=False)}


def vae_flops() -> dict:
    """FLOPs of one Wan 2.1 VAE encode (1 grey channel as RGB) and decode at the paper's crop (meta device)."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # diffusers' defaults = Wan 2.1's VAE (base 96, z 16, mults 1, 2, 4, 4)
    params = sum(p.numel() for p in vae.parameters())
    x = torch.empty(1, 3, 97, 128, 160, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        mu = vae.encode(x).latent_dist.mean
    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        vae.decode(mu)
    return {"params": params, "encode": enc.get_total_flops(), "decode": dec.get_total_flops()}


def estimate(vae: dict) -> dict:
    """Part 2: the 1.3B model per case on one GPU (10 steps, 1 candidate)."""
    dit_params = 1.129e9  # measured on the meta device (docs/gpu.md section 4)
    cases = {}
    for label, conditions, voxel_channels in ((FULL, 6, 12), ("ct, ptv, oar, body (no beam plan)", 4, 10)):
        tokens = (conditions + 1) * PAPER_TOKENS_PER_MODALITY
        per_step = dit_flops(tokens, WAN_DIM, WAN_DEPTH, WAN_FFN)
        cases[label] = {"tokens": tokens, "dit_tflop_per_step": per_step / 1e12, "dit_tflop_10_steps": 10 * per_step / 1e12,
                        "vae_encodes": voxel_channels, "vae_encode_tflop": voxel_channels * vae["encode"] / 1e12,
                        "vae_decode_tflop": vae["decode"] / 1e12}
    memory_gb = {"DiT weights fp32": dit_params * 4 / 1e9, "bf16 weight copies (autocast cache)": dit_params * 2 / 1e9,
                 "VAE weights fp32": vae["params"] * 4 / 1e9,
                 "activations, 1 block at 14 000 tokens (bf16 q/k/v/o and FFN hidden, fp32 residual)":
                     14000 * (4 * WAN_DIM + WAN_FFN) * 2 / 1e9 + 14000 * WAN_DIM * 4 / 1e9}
    return {"cases": cases, "memory_gb": memory_gb}


def seconds(tflop: float, peak_tflops: float, efficiency: float) -> float:
    return tflop / (peak_tflops * efficiency)


def report(rows: list[dict], check: dict, vae: dict, est: dict, case_dir: Path, started: dt.datetime,
           machine: str, note: str = "") -> list[str]:
    lines = ["# Serving a latent-space (Wan VAE) model: CPU measurement (tiny model) and 1.3B GPU estimate", "",
             "Command: `nice -n 15 python benchmarks/latent_speed.py`  ",
             f"Machine: {machine}  ", f"Date (UTC): {started.strftime('%Y-%m-%d %H:%M')}{note}  ",
             f"Case: `{case_dir.name}` (OpenKBP validation, 128^3); 10 Euler steps unless preview, 1 candidate, "
             "no Scorecard/DVH (model time only).", "",
             "## 1. Measured on this CPU: tiny random VAE (4 base channels, z 4) and tiny DiT (dim 24, 2 blocks)", "",
             "Wall seconds per stage from the Predictor's `timings`; `cpu_s` = process CPU seconds of the call "
             "(the machine is shared, so wall times include waiting).", "",
             "| size | request | steps | VAE-encoded | from cache | VAE encode s | latent sample s | VAE decode s | "
             "total s | cpu s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['request']} | {r['steps']} | {len(r['encoded'])} | {len(r['cached'])} | "
                     f"{r['vae_encode_s']:.2f} | {r['latent_sample_s']:.2f} | {r['vae_decode_s']:.2f} | "
                     f"{r['total_s']:.2f} | {r['cpu_s']:.2f} |")
    lines += ["", "A cache hit leaves only the crop and the content hash of each condition in `VAE encode s`.", "",
              "## 2. Estimate (not measured): Wan 1.3B DiT + Wan 2.1 VAE per case on one GPU", "",
              f"DiT FLOP formula without the attention term vs torch's FLOP counter (which does not count "
              f"the CPU attention kernel) on a tiny DiT at {check['tokens']} tokens: "
              f"{check['formula_without_attention'] / 1e6:.1f} vs {check['counted'] / 1e6:.1f} MFLOP (the "
              "remainder is embeddings, modulation and heads); the attention term is 4 N^2 d per block.  ",
              f"Wan 2.1 VAE ({vae['params'] / 1e6:.0f} M parameters), counted at 97 x 128 x 160: "
              f"{vae['encode'] / 1e12:.1f} TFLOP per encoded channel, {vae['decode'] / 1e12:.1f} TFLOP per decode.", "",
              "| conditions | tokens | DiT TFLOP/step | DiT TFLOP, 10 steps | VAE encodes (miss) | VAE encode TFLOP | "
              "VAE decode TFLOP |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, c in est["cases"].items():
        lines.append(f"| {label} | {c['tokens']} | {c['dit_tflop_per_step']:.1f} | {c['dit_tflop_10_steps']:.0f} | "
                     f"{c['vae_encodes']} | {c['vae_encode_tflop']:.0f} | {c['vae_decode_tflop']:.0f} |")
    c = est["cases"][FULL]
    lines += ["", "Seconds on one H100 (SXM: 989 dense bf16 TFLOPS, 494 TF32) for the first row, 1 candidate, at two "
              "assumed utilisations: good = DiT at 40 % of the bf16 peak and VAE at 20 % of the TF32 peak; poor = "
              "15 % and 5 % (3D convolutions with few channels at full resolution use a GPU poorly):", "",
              "| stage | good | poor |", "| --- | --- | --- |"]
    rows_s = {"DiT, 10 steps": ("dit", c["dit_tflop_10_steps"]),
              f"VAE encode, cache miss ({c['vae_encodes']} channels)": ("vae", c["vae_encode_tflop"]),
              "VAE decode": ("vae", c["vae_decode_tflop"])}
    totals = {}
    for stage, (kind, tflop) in rows_s.items():
        cells = []
        for name, (dit_u, vae_u) in UTILISATION.items():
            sec = seconds(tflop, *((H100_BF16_TFLOPS, dit_u) if kind == "dit" else (H100_TF32_TFLOPS, vae_u)))
            totals.setdefault(name, {})[stage] = sec
            cells.append(f"{sec:.1f}")
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    miss = {n: sum(t.values()) for n, t in totals.items()}
    hit = {n: sum(v for k, v in t.items() if not k.startswith("VAE encode")) for n, t in totals.items()}
    lines += [f"| total, cache miss | {miss['good']:.1f} | {miss['poor']:.1f} |",
              f"| total, conditions cached | {hit['good']:.1f} | {hit['poor']:.1f} |",
              "", "The paper reports 16 s and 8.7 GB per case on an H100, above both columns: the estimate counts "
              "only the model's arithmetic (no data loading, resampling, Scorecard, kernel launches or memory-bound "
              "layers). Read it as: a clinic's GPU node serves a case in seconds to tens of seconds, and the "
              "condition cache removes the VAE encodes from every request after the first; measure on the node "
              "(docs/gpu.md).", "",
              "GPU memory (inference, estimate):", "", "| part | GB |", "| --- | --- |"]
    for part, gb in est["memory_gb"].items():
        lines.append(f"| {part} | {gb:.2f} |")
    lines.append(f"| sum | {sum(est['memory_gb'].values()):.1f} (plus the CUDA context, ~0.5-1 GB, and the VAE "
                 "decoder's activations, which the causal VAE bounds by decoding frame chunks) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default=str(Path(openkbp_dir("validation")) / "pt_201"), help="one case folder")
    p.add_argument("--out", default="benchmarks/results/latent_speed", help="results path without suffix")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="reuse part 1 (measurements, date, machine) of an earlier run's .json; recompute part 2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    case_dir = Path(args.case)
    if not (case_dir / "ct.nii.gz").is_file():
        raise SystemExit(f"case folder not found: {case_dir} (set DIFFKT3D_DATA_ROOT or pass --case)")
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        rows, started = earlier["rows"], dt.datetime.fromisoformat(earlier["date"])
        machine = earlier["machine"]
        note = f" (part 2 recomputed {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')})"
    else:
        machine, note = describe_machine(), ""
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(case_dir, Path(tmp))
    check = check_dit_formula()
    vae = vae_flops()
    est = estimate(vae)
    lines = report(rows, check, vae, est, case_dir, started, machine, note)
    write_results(args.out, lines, started, case=case_dir.name, rows=rows, dit_formula_check=check, vae_flops=vae,
                  estimate=est)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
