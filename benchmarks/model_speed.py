"""Speed of Any2AnyDiT candidate sizes on CPU: one forward and one training step.

Sizes the ``cpu-default`` preset. The working grid is 64^3 per modality (OpenKBP 128^3 pooled 2x)
and all 7 modalities are given (the worst case: 7 x (64/p)^3 tokens), dose as target.

    nice -n 15 python benchmarks/model_speed.py                 # default candidates
    nice -n 15 python benchmarks/model_speed.py --only p8-d192-L6-h4 --repeats 3

Forward = ``model(volumes, "dose", t)`` under ``torch.no_grad`` in eval mode, batch 1.
Train step = forward + flow-matching MSE + backward + AdamW step, batch 2, train mode.
Each figure is the median of ``--repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from diffkt3d.flow.matching import FlowConfig, add_noise, sample_timesteps, velocity_target
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import get_config

# name -> DiTConfig overrides on top of the cpu-default preset
CANDIDATES: dict[str, dict] = {
    "p8-d128-L4-h4": dict(patch=(8, 8, 8), dim=128, depth=4, heads=4, ffn_dim=512),
    "p8-d128-L6-h4": dict(patch=(8, 8, 8), dim=128, depth=6, heads=4, ffn_dim=512),
    "p8-d96-L6-h4": dict(patch=(8, 8, 8), dim=96, depth=6, heads=4, ffn_dim=384),
    "p8-d160-L4-h4": dict(patch=(8, 8, 8), dim=160, depth=4, heads=4, ffn_dim=640),
    "p8-d192-L6-h4": dict(patch=(8, 8, 8), dim=192, depth=6, heads=4, ffn_dim=768),
    "p8-d256-L6-h4": dict(patch=(8, 8, 8), dim=256, depth=6, heads=4, ffn_dim=1024),
    "p8-d256-L8-h8": dict(patch=(8, 8, 8), dim=256, depth=8, heads=8, ffn_dim=1024),
    "p8-d192-L8-h4": dict(patch=(8, 8, 8), dim=192, depth=8, heads=4, ffn_dim=768),
    "p488-d128-L6-h4": dict(patch=(4, 8, 8), dim=128, depth=6, heads=4, ffn_dim=512),
    "p488-d192-L4-h4": dict(patch=(4, 8, 8), dim=192, depth=4, heads=4, ffn_dim=768),
}


def make_volumes(cfg, batch: int, grid: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random volumes in [-1, 1] for every modality, (B, C_m, grid, grid, grid)."""
    return {
        m: torch.rand(batch, cfg.in_channels[m], grid, grid, grid, generator=gen) * 2 - 1
        for m in cfg.modalities
    }


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of ``repeats`` calls after a warm-up.

    On a shared machine the wall time includes waiting for other jobs; the CPU time (summed over
    threads) does not, so CPU time / threads estimates the wall time on an idle machine (exact
    only if the threads scale perfectly, hence a lower bound).
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def measure(name: str, overrides: dict, grid: int, repeats: int) -> dict:
    cfg = get_config("cpu-default", **overrides)
    torch.manual_seed(0)
    model = Any2AnyDiT(cfg)
    # Non-zero head so the backward pass runs through every block as in real training.
    for lin in model.head.head.values():
        torch.nn.init.normal_(lin.weight, std=0.02)
    gen = torch.Generator().manual_seed(0)
    flow = FlowConfig()

    vols1 = make_volumes(cfg, 1, grid, gen)
    t1 = torch.rand(1, generator=gen)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(vols1, "dose", t1)

    fwd_s, fwd_cpu_s = timed(forward, repeats)

    vols2 = make_volumes(cfg, 2, grid, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def train_step() -> None:
        x0 = vols2["dose"]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(2, flow, generator=gen)
        inputs = dict(vols2, dose=add_noise(x0, noise, t))
        loss = torch.nn.functional.mse_loss(model(inputs, "dose", t), velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s, step_cpu_s = timed(train_step, repeats)
    tokens = len(cfg.modalities) * (grid**3) // cfg.patch_volume
    return dict(
        name=name,
        params_m=model.num_parameters() / 1e6,
        tokens=tokens,
        fwd_s=fwd_s,
        fwd_cpu_s=fwd_cpu_s,
        train_step_s=step_s,
        train_step_cpu_s=step_cpu_s,
        config=cfg.to_dict(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=64, help="working grid edge in voxels (default 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help=f"candidate names among {list(CANDIDATES)}")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = args.only or list(CANDIDATES)
    results = []
    print(f"grid {args.grid}^3, 7 modalities, {args.threads} threads, median of {args.repeats}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print(
        "| candidate | params (M) | tokens | forward b1 wall (s) | forward CPU/threads (s) "
        "| train step b2 wall (s) | train step CPU/threads (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        r = measure(name, CANDIDATES[name], args.grid, args.repeats)
        results.append(r)
        print(
            f"| {name} | {r['params_m']:.2f} | {r['tokens']} | {r['fwd_s']:.3f} | "
            f"{r['fwd_cpu_s'] / args.threads:.3f} | {r['train_step_s']:.3f} | "
            f"{r['train_step_cpu_s'] / args.threads:.3f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=args.threads, results=results), f, indent=1)


if __name__ == "__main__":
    main()
