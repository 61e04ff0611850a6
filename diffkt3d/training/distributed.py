"""Data-parallel training on torch.distributed, launched with torchrun (GPU nodes; gloo on CPU).

    torchrun --nproc_per_node 8 -m diffkt3d.training.distributed --config configs/wan-1.3b-gpu.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m diffkt3d.training.distributed --config configs/wan-1.3b-gpu.yaml

Each process (rank) runs :class:`~diffkt3d.training.trainer.Trainer`'s loop on its own shard of the
training cases (``cases[rank::world_size]``, the DistributedSampler rule; each rank also encodes
and caches only its shard) with its own seed for the
Any2Any target/condition draws and the noise; DDP averages the gradients, so with batch 1 per GPU
the effective batch is ``world_size`` (paper: 1/GPU on 8 GPUs). The Any2Any sampling leaves the
patch embeddings/heads of absent modalities without gradients on some ranks, hence
``find_unused_parameters=True``. Rank 0 alone logs, evaluates and writes checkpoints; at the end of
every stage all ranks compare a checksum of their weights (``dist_sync.json``) and stop if they
differ. On CUDA: NCCL, one GPU per process (``LOCAL_RANK``), TF32 matmuls, bf16 autocast (the
Trainer's ``autocast_context``); gradient checkpointing is the model config's
``gradient_checkpointing`` (``--gradient-checkpointing``).

Optional ``wan:`` section of the YAML (not part of TrainConfig): ``checkpoint`` (Wan 2.1 DiT weights
to transfer, :mod:`diffkt3d.models.wan_transfer`), ``vae_dir`` (frozen Wan VAE: train on latents of
``crop``-sized volumes, :mod:`diffkt3d.models.wan_vae`), ``crop``, ``latent_cache_dir``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from diffkt3d.errors import ConfigError, DiffKT3DError
from diffkt3d.training.config import TrainConfig
from diffkt3d.training.recipe import DATA_ROOT_ENV, build_train_config, parse_assignments, read_recipe
from diffkt3d.training.trainer import Trainer, autocast_context

__all__ = [
    "DistEnv",
    "WanSetup",
    "init_distributed",
    "DistributedTrainer",
    "load_config",
    "torchrun_command",
    "launch_distributed",
    "main",
]

log = logging.getLogger("diffkt3d.training.distributed")  # not "__main__" under -m


@dataclass
class DistEnv:
    """Where this process sits: rank among ``world_size`` processes, GPU ``local_rank`` on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class WanSetup:
    """The ``wan:`` section of a distributed config (paths on the GPU node; nothing is downloaded).

    Args:
        checkpoint: Wan 2.1 T2V DiT checkpoint (file, folder or index json; either key layout).
        vae_dir: diffusers ``AutoencoderKLWan`` folder; set = train in the VAE latent space.
        crop: (D, H, W) voxel crop around the PTV centre for the latent path (paper 97 x 128 x 160).
        latent_cache_dir: where per-case latents are cached.
    """

    checkpoint: str | None = None
    vae_dir: str | None = None
    crop: tuple[int, int, int] = (97, 128, 160)
    latent_cache_dir: str = "runs/latent-cache"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> WanSetup:
        d = dict(d or {})
        known = {"checkpoint", "vae_dir", "crop", "latent_cache_dir"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in the 'wan' section; known: {sorted(known)}")
        if "crop" in d:
            d["crop"] = tuple(int(v) for v in d["crop"])
        return cls(**d)


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without those variables this is a single process (world size 1, no process group). Backend:
    NCCL with CUDA, else gloo. On CUDA each process takes GPU ``LOCAL_RANK`` and enables TF32.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if world > 1 and not dist.is_initialized():
        # Long timeout: rank 0 may encode the validation cases with the VAE while the others wait
        # in DDP's first broadcast (the 10 min NCCL default is too short for a cold latent cache).
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DistEnv(rank, local_rank, world, backend if world > 1 else None, device)


def _reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= env.world_size
    return x


class DistributedTrainer(Trainer):
    """:class:`Trainer` with DDP, per-rank data shards and rank-0-only side effects.

    Args:
        cfg: the training config (identical on every rank).
        env: from :func:`init_distributed`.
        wan: optional Wan transfer / latent-path settings.
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv, wan: WanSetup | None = None):
        for stage in cfg.stages:
            if stage.max_minutes is not None or stage.max_cpu_minutes is not None:
                # Ranks measure time separately and would stop at different steps -> deadlock in
                # the gradient all-reduce. Step counts are the same on every rank.
                raise ConfigError(f"stage {stage.name!r}: time budgets (max_minutes / max_cpu_minutes) "
                                  "are not supported in distributed training; use steps")
            if wan is not None and wan.vae_dir and (stage.dvh_loss_weight > 0 or stage.augmentation.active):
                # Both act on voxel volumes (structures, image axes); latents have neither.
                raise ConfigError(f"stage {stage.name!r}: dvh_loss_weight and augment_* work on voxel "
                                  "volumes and are not supported with a Wan VAE (latent training)")
        self.env = env
        self.wan = wan or WanSetup()
        self.codec = None
        if self.wan.vae_dir:
            from diffkt3d.data.encoding import EncodingConfig
            from diffkt3d.models.wan_vae import WanLatentCodec

            self.codec = WanLatentCodec.from_pretrained(self.wan.vae_dir, device=env.device)
            channels = EncodingConfig(grid=tuple(cfg.grid)).channels()
            cfg.model_overrides = dict(cfg.model_overrides)
            cfg.model_overrides.setdefault("in_channels", {m: c * self.codec.z_dim for m, c in channels.items()})
        super().__init__(cfg, device=str(env.device))
        # Same init on every rank (Trainer seeded torch with cfg.seed); different data and noise.
        self.rng = random.Random(cfg.seed + 7919 * env.rank)
        self.generator = torch.Generator().manual_seed(cfg.seed + 7919 * env.rank)
        self.transfer_report = None
        if self.wan.checkpoint:
            from diffkt3d.models.wan_transfer import load_wan_into_dit

            self.transfer_report = load_wan_into_dit(self.model, self.wan.checkpoint)
            self.ema.load_state_dict(self.model.state_dict())
            if env.is_main:
                log.info("%s", self.transfer_report.summary())
                (self.out_dir / "wan_transfer.json").write_text(json.dumps(self.transfer_report.to_dict(), indent=1))
        self.ddp: DistributedDataParallel | None = None
        self.shard_case_ids: list[str] = []
        self.val_voxels: dict[str, dict[str, torch.Tensor]] = {}

    # -- data: cache built once (rank 0), each rank keeps its shard --------------------------------
    def load_data(self) -> None:
        from diffkt3d.training.dataset import EncodedCaseSet, build_cache, list_case_dirs

        cfg = self.cfg

        def cache(dirs):
            if self.codec is None:
                return build_cache(dirs, self.encoding, cfg.cache_dir, cfg.with_plates)
            from diffkt3d.training.latent_cache import build_latent_cache

            return build_latent_cache(dirs, self.encoding, self.codec, self.wan.latent_cache_dir,
                                      self.wan.crop, cfg.with_plates)

        train_dirs = list_case_dirs(cfg.train_roots)
        val_dirs = list_case_dirs(cfg.val_roots) if cfg.val_roots and cfg.val_cases > 0 else []
        # Each rank encodes (VAE: on its own GPU) and reads only its own shard; files are written
        # atomically, one per case, so ranks never touch the same file.
        files = cache(train_dirs[self.env.rank :: self.env.world_size])
        if not files:
            raise ConfigError(f"{len(train_dirs)} training cases cannot be shared by {self.env.world_size} ranks")
        self.train_set = EncodedCaseSet.from_cache(files)
        self.shard_case_ids = [c.case_id for c in self.train_set.cases]
        log.info("rank %d trains on %d cases", self.env.rank, len(files))
        if val_dirs and self.env.is_main:
            vfiles = cache(val_dirs)
            val = EncodedCaseSet.from_cache(vfiles)
            keep = [c for c in val.cases if "dose" in c.tensors][: cfg.val_cases]
            self.val_set = EncodedCaseSet(keep) if keep else None
            if self.codec is not None:
                for f in vfiles:
                    blob = torch.load(f, weights_only=True)
                    self.val_voxels[blob["case_id"]] = blob.get("voxel", {})

    # -- the step: forward through DDP ------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch, norm: str = "l2", region: str = "all",
             dvh_weight: float = 0.0) -> torch.Tensor:
        if model is self.model and self.ddp is not None:
            model = self.ddp
        return super().loss(model, batch, norm, region, dvh_weight)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Voxel path: the Trainer's 1-step dose MAE. Latent path: same, after decoding with the VAE."""
        if self.codec is None:
            return super().validate()
        if self.val_set is None:
            return None
        gen = torch.Generator().manual_seed(1234)
        errors = []
        for case in self.val_set.cases:
            voxel = self.val_voxels.get(case.case_id, {})
            if "dose" not in voxel:
                continue
            vols = {m: v[None].float().to(self.device) for m, v in case.tensors.items() if m != "dose"}
            noise = torch.randn((1, *case.tensors["dose"].shape), generator=gen).to(self.device)
            vols["dose"] = noise
            with autocast_context(self.device):
                v = self.ema(vols, "dose", torch.ones(1, device=self.device)).float()
            dose = self.codec.decode(noise - v)[0].clamp(-1, 1).cpu()  # (1, D, H, W)
            ref = voxel["dose"].float()
            body = voxel["body"].float() > -1 if "body" in voxel else torch.ones_like(ref, dtype=torch.bool)
            errors.append(float(((dose - ref).abs() * 0.5 * self.encoding.dose_scale_gy)[body].mean()))
        return sum(errors) / len(errors) if errors else None

    # -- rank-0-only side effects ----------------------------------------------------------------
    def save(self, name: str, with_state: bool) -> Path:
        path = self.out_dir / name
        if self.env.is_main:
            path = super().save(name, with_state)
            log.info("rank 0 wrote %s", path)
        return path

    def meta(self) -> dict:
        meta = super().meta()
        meta["world_size"] = self.env.world_size
        if self.transfer_report is not None:
            meta["wan_transfer"] = self.transfer_report.source
        if self.codec is not None:
            meta["latent"] = {"vae_fingerprint": self.codec.fingerprint(), "crop": list(self.wan.crop),
                              "z_dim": self.codec.z_dim}
        return meta

    def _emit(self, record: dict) -> None:
        if self.env.is_main:
            super()._emit(record)
        else:
            self.history.append(record)

    def try_resume(self) -> bool:
        resumed = super().try_resume()
        if resumed:  # last.pt holds rank 0's streams: give each rank its own again
            seed = self.cfg.seed + 7919 * self.env.rank + 104729 * self.global_step
            self.rng = random.Random(seed)
            self.generator = torch.Generator().manual_seed(seed)
        return resumed

    # -- loop -------------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> Path:
        if self.train_set is None:
            self.load_data()
        if resume:
            self.try_resume()
        if self.env.distributed:
            ids = [self.env.local_rank] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        final = super().run(resume=False)
        self._barrier()  # every rank returns only once rank 0 has written the final checkpoint
        return final

    def _run_stage(self, stage) -> None:
        super()._run_stage(stage)
        self.check_in_sync(stage.name)

    def weight_checksum(self) -> str:
        """SHA-1 of all model weights (bitwise: DDP keeps replicas identical)."""
        h = hashlib.sha1()
        for _name, p in sorted(self.model.state_dict().items()):
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_in_sync(self, stage: str) -> None:
        """All ranks compare weight checksums; rank 0 writes dist_sync.json; mismatch is an error."""
        local = {"rank": self.env.rank, "checksum": self.weight_checksum(), "cases": self.shard_case_ids,
                 "steps": self.stage_step}
        gathered = [local]
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, local)
        in_sync = len({g["checksum"] for g in gathered}) == 1
        if self.env.is_main:
            (self.out_dir / "dist_sync.json").write_text(json.dumps(
                {"stage": stage, "world_size": self.env.world_size, "in_sync": in_sync, "ranks": gathered}, indent=1))
        if not in_sync:
            raise RuntimeError(f"ranks diverged after stage {stage}: {[g['checksum'][:8] for g in gathered]}")

    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()


# --- config, launch ------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: dict[str, Any] | None = None, data_root: str | Path | None = None,
                **top_level: Any) -> tuple[TrainConfig, WanSetup]:
    """A training recipe with an optional ``wan:`` section -> (TrainConfig, WanSetup).

    ``overrides`` (dotted keys, as ``--set``) and ``top_level`` fields (None skipped) go on top of the
    recipe through :func:`diffkt3d.training.recipe.build_train_config`; relative data folders are
    under ``data_root`` (None: ``$DIFFKT3D_DATA_ROOT``).
    """
    data = read_recipe(path)
    wan = WanSetup.from_dict(data.pop("wan", None))
    merged = {**(overrides or {}), **{k: v for k, v in top_level.items() if v is not None}}
    return build_train_config(data, merged, data_root, source=str(path)), wan


def torchrun_command(config_path: str | Path, nproc: int, *, nnodes: int = 1, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, extra_args: list[str] | None = None) -> list[str]:
    """The torchrun command line for ``nproc`` processes per node (``python -m torch.distributed.run``).

    Single node: ``--standalone`` (free local port). Several nodes: pass ``nnodes`` and the c10d
    ``rdzv_endpoint`` (``host:port`` of any node) and run the same command on every node.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, found {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("multi-node training needs rdzv_endpoint='host:port'")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
    return cmd + ["-m", "diffkt3d.training.distributed", "--config", str(config_path), *(extra_args or [])]


def launch_distributed(config_path: str | Path, nproc: int, *, extra_args: list[str] | None = None,
                       env: dict[str, str] | None = None, cwd: str | Path | None = None,
                       **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the torchrun command (blocking) and return the finished process (check ``returncode``).

    For the MONAI Label train task: ``launch_distributed("configs/wan-1.3b-gpu.yaml", nproc=8)``.
    Output goes to the caller's stdout/stderr; progress is in ``OUT_DIR/progress.json``.
    """
    cmd = torchrun_command(config_path, nproc, extra_args=extra_args, **kwargs)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffkt3d.training.distributed",
                                description="DDP training of the Any2Any DiT; start with torchrun.")
    p.add_argument("--config", required=True, help="training YAML (optional 'wan:' section)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help=f"folder the recipe's relative train_roots/val_roots are under (default: ${DATA_ROOT_ENV})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field, VALUE read as YAML (repeatable)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--backend", default=None, help="nccl (CUDA default) or gloo (CPU default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--wan-checkpoint", default=None, help="override wan.checkpoint")
    p.add_argument("--vae-dir", default=None, help="override wan.vae_dir")
    args = p.parse_args(argv)

    env = init_distributed(args.backend)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s")
    try:
        cfg, wan = load_config(args.config, parse_assignments(args.overrides), args.data_root, out_dir=args.out_dir)
        if args.gradient_checkpointing:
            cfg.model_overrides = {**cfg.model_overrides, "gradient_checkpointing": True}
        if args.wan_checkpoint:
            wan.checkpoint = args.wan_checkpoint
        if args.vae_dir:
            wan.vae_dir = args.vae_dir
        trainer = DistributedTrainer(cfg, env, wan)
        final = trainer.run(resume=not args.no_resume)
        if env.is_main:
            log.info("final checkpoint: %s", final)
        # The DDP reducer keeps gloo work objects; free it while the process group still exists,
        # not in the interpreter's teardown after destroy_process_group (see _exit_now).
        trainer.ddp = None
        del trainer
        gc.collect()
        return 0
    except DiffKT3DError as exc:
        logging.getLogger("diffkt3d").error("rank %d: %s", env.rank, exc)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_now(code: int) -> None:
    """Flush and leave without running C++ static destructors.

    Why: with gloo on CPU, a rank that had finished cleanly sometimes aborted at interpreter exit
    ("terminate called without an active exception", SIGABRT; seen in CI on torch 2.13 with 2
    processes) when a gloo thread object was destroyed during finalisation; torchrun then
    reported the whole run as failed although every checkpoint was written. All work is done
    and the process group destroyed by the time this runs, so skipping finalisation loses nothing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
