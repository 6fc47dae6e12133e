"""Data-parallel learner under torchrun: DDP (or FSDP2) over N ranks (gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node N -m learner.main [key=value ...]

Design (rank 0 leads, the others follow):
- rank 0 is the ordinary ``Learner``: it alone binds the data, control and weights sockets, runs
  the ingest thread and the batcher, publishes weights (one broadcast) and writes checkpoints,
  TensorBoard and summary.json (one writer); ``make_leader`` only gives its ``Trainer``
  (``learner/trainer.py``) a CPU batcher and ``DataParallelTrainer.lead`` as the update step.
- per update, rank 0 takes ``global_batch_size`` segments from its batcher, cuts them into N
  shards of ``global_batch_size / N`` segments along B, draws the update's real (SFT) samples
  from its replay (``real_batch_size / N`` per rank, in the order one rank would have drawn them)
  and scatters shard r to rank r. Real samples come from rank 0 too, so live episodes that the
  collector streams in reach every rank and the demonstrations sit in memory once per host.
- every rank runs the one train step of every learner (``cotrain.optimizer_update``, here through
  ``data_parallel_train_step``'s ``GradSync`` hooks) on its shard: a forward/backward of the
  co-training loss per micro-batch, DDP averages the gradients (all-reduce in the backward of
  each epoch's last micro-batch), then the same clip and optimiser step on identical gradients,
  so the replicas stay identical without any weight broadcast between ranks.
- an optimiser step whose loss or gradient norm is not finite on any rank is skipped on every
  rank (an all-reduced flag) and counted (``train/skipped_nonfinite_steps``), as on one process.
- the logged statistics are reduced over ranks (means; max/min for the importance-ratio extremes),
  so rank 0 logs the global batch's values under the usual names.

What scales with N here: the training compute (each rank backpropagates 1/N of the batch) and
so the segments the learner can consume per second. What does not: the input path (sockets,
shared-memory copies, the batcher, one scatter of N-1 shards per update) stays on rank 0's ingest
thread and train loop. That is enough while the actors' segment rate is far below what one core
can copy; where it is not (many actors, large images), the next step is per-rank data endpoints
(port = base + rank, actors spread across them, each rank batching its own shard, the ranks
agreeing per update that every shard is ready, only rank 0 serving control and weights); this
module does not do that yet.

``strategy: fsdp`` (for the large backends): every rank trains a replica sharded with FSDP2
(``fully_shard`` on the modules named in ``fsdp_shard_modules``, then on the whole loss module);
rank 0's ``Trainer.policy`` stays a full copy on the CPU, refreshed from the shards (one all-gather)
after each update that makes a new version, and is what rank 0 publishes and checkpoints. The
optimiser state stays sharded: checkpoints of an fsdp run hold the weights of the last version,
and a resumed fsdp run starts its optimiser state afresh.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from learner.batcher import Batcher
from learner.cotrain import MAX_REDUCED, MIN_REDUCED, CoTrainLossModule, GradSync, make_optimizer, \
    optimizer_update, split_segments
from learner.trainer import Trainer

log = logging.getLogger("tandem.learner.distributed")

STEP, STOP = "step", "stop"  # leader -> follower commands


def launched() -> bool:
    """True under torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device
    data_group: dist.ProcessGroup  # gloo: CPU objects (shards, stats) whatever the gradient backend


def init(dcfg, device_name: str) -> Context:
    """Join the process group from torchrun's environment; one device per local rank."""
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    # rank 0 waits for actors' data between updates while the followers block in the scatter
    timeout = datetime.timedelta(seconds=float(dcfg.idle_timeout_s))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
    data_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return Context(rank, world_size, device, data_group)


def wrap(policy: torch.nn.Module, dcfg) -> torch.nn.Module:
    """The policy's loss module wrapped for data parallelism, in place (parameters shared with ``policy``).
    ddp: the constructor broadcasts rank 0's parameters and buffers, so every replica starts equal.
    fsdp: ``policy`` must already hold the same weights on every rank; its parameters become shards."""
    module = CoTrainLossModule(policy)
    if dcfg.strategy == "ddp":
        # inputs are moved by the caller (device_ids=None); the normaliser buffers never change in training
        return DistributedDataParallel(module, device_ids=None, broadcast_buffers=False,
                                       find_unused_parameters=bool(dcfg.find_unused_parameters))
    if dcfg.strategy == "fsdp":
        names = set(dcfg.fsdp_shard_modules or ())
        for sub in list(module.modules())[1:]:
            if type(sub).__name__ in names:
                fully_shard(sub)
        fully_shard(module)
        return module
    raise ValueError(f"learner.distributed.strategy={dcfg.strategy!r}: expected ddp or fsdp")


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module):
    """Accumulate this block's gradients locally: no all-reduce (ddp) or reduce-scatter (fsdp)."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def per_rank_config(lcfg, world_size: int) -> DictConfig:
    """The ``learner`` config one rank trains with: its share of the global and real batches."""
    if lcfg.global_batch_size % world_size:
        raise ValueError(f"learner.global_batch_size ({lcfg.global_batch_size}) must be a multiple of the "
                         f"number of ranks ({world_size})")
    unsupported = [k for k in ("critic_warmup_updates", "target_kl") if lcfg.get(k)]
    unsupported += ["num_minibatches"] if (lcfg.get("num_minibatches") or 1) > 1 else []
    unsupported += ["rl_objective"] if lcfg.get("rl_objective", "ppo") != "ppo" else []
    if unsupported:
        raise ValueError(f"learner.{unsupported} are not supported by the data-parallel learner yet: "
                         "set them to 0/null (rl_objective: ppo) or run one process")
    shard = lcfg.global_batch_size // world_size
    return OmegaConf.merge(lcfg, {"global_batch_size": shard, "micro_batch_size": min(lcfg.micro_batch_size, shard),
                                  "real_batch_size": math.ceil(lcfg.real_batch_size / world_size)})


def real_sample_plan(rank_cfg, num_segments: int) -> list[int]:
    """Real samples one rank draws per micro-batch in one epoch (as ``cotrain.train_step`` sizes them)."""
    sizes = [min(rank_cfg.micro_batch_size, num_segments - s) for s in range(0, num_segments, rank_cfg.micro_batch_size)]
    return [max(1, math.ceil(rank_cfg.real_batch_size * n / num_segments)) for n in sizes]


def to_device(tree, device: torch.device):
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_device(v, device) for v in tree]
    return tree


def data_parallel_train_step(model: torch.nn.Module, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             sim_shard: dict, real_batches: Optional[list[list[dict]]], rank_cfg,
                             group: dist.ProcessGroup) -> dict[str, float]:
    """``cotrain.optimizer_update`` on this rank's shard, with gradients averaged over ranks.

    ``real_batches[epoch][micro]``: the real samples of each micro-batch (None: PPO only).
    Returns the statistics of the global batch (identical on every rank)."""
    sync = GradSync(no_sync=lambda: no_grad_sync(model), any_rank=lambda flag: any_rank(flag, group),
                    reduce=lambda stats: reduce_over_ranks(stats, group), sum_over_ranks=lambda n: sum_over_ranks(n, group))
    real = (lambda epoch, micro, n: real_batches[epoch][micro]) if real_batches is not None else None
    return optimizer_update(model, policy, optimizer, sim_shard, rank_cfg, real, sync=sync)


def any_rank(flag: bool, group: dist.ProcessGroup) -> bool:
    """Whether ``flag`` is true on at least one rank of ``group`` (the same answer on every rank)."""
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def sum_over_ranks(value: float, group: dist.ProcessGroup) -> float:
    t = torch.tensor([float(value)])
    dist.all_reduce(t, group=group)
    return float(t.item())


def reduce_over_ranks(local: dict[str, float], group: dist.ProcessGroup) -> dict[str, float]:
    """Mean over ranks (equal shards), max/min for the ratio extremes."""
    keys = list(local)
    world = dist.get_world_size(group)
    values = torch.tensor([local[k] for k in keys], dtype=torch.float64)
    total = values.clone()
    dist.all_reduce(total, group=group)
    out = dict(zip(keys, (total / world).tolist()))
    for op, names in ((dist.ReduceOp.MAX, MAX_REDUCED), (dist.ReduceOp.MIN, MIN_REDUCED)):
        idx = [keys.index(k) for k in names if k in keys]
        if idx:
            extreme = values[idx].clone()
            dist.all_reduce(extreme, op=op, group=group)
            out.update(zip([keys[i] for i in idx], extreme.tolist()))
    return out


class DataParallelTrainer:
    """What every rank holds: the wrapped model, its optimiser and this rank's config.

    ddp: trains ``policy`` itself with ``optimizer`` (default: ``make_opt(policy)``). fsdp: trains a
    sharded replica of ``policy`` on ``ctx.device`` with ``make_opt(replica)`` and copies the full
    weights back into ``policy`` on rank 0 when asked (``gather``)."""

    def __init__(self, policy: torch.nn.Module, make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 lcfg, ctx: Context, optimizer: Optional[torch.optim.Optimizer] = None):
        self.policy, self.ctx = policy, ctx
        self.rank_cfg = per_rank_config(lcfg, ctx.world_size)
        self.sharded = lcfg.distributed.strategy == "fsdp"
        if self.sharded:
            self.train_policy = copy.deepcopy(policy).to(ctx.device)
            self.model = wrap(self.train_policy, lcfg.distributed)
            self.optimizer = make_opt(self.train_policy)
            if ctx.rank != 0:
                self.policy = None  # only rank 0 needs the full weights
        else:
            self.train_policy, self.optimizer = policy, optimizer or make_opt(policy)
            self.model = wrap(policy, lcfg.distributed)

    # -- rank 0 -------------------------------------------------------------------------------
    def lead(self, batch: dict, co_train: bool, replay=None, rng: Optional[np.random.Generator] = None,
             gather: bool = True) -> dict:
        """Shard a global batch, scatter it (with each rank's real samples), train on shard 0.
        ``gather`` (fsdp): refresh ``policy`` with the updated full weights (a new version follows)."""
        world = self.ctx.world_size
        shard_size = batch["reward"].shape[1] // world
        sim_shards = split_segments({k: v.cpu() for k, v in batch.items()}, shard_size)
        real = [[[] for _ in range(self.rank_cfg.update_epoch)] for _ in range(world)]
        if co_train:  # drawn in the order one rank would draw them: epoch, then rank, then micro-batch
            plan = real_sample_plan(self.rank_cfg, shard_size)
            for epoch in range(self.rank_cfg.update_epoch):
                for r in range(world):
                    real[r][epoch] = [replay.sample(n, self.policy.chunk_size, rng) for n in plan]
        commands = [(STEP, sim_shards[r], real[r] if co_train else None, gather) for r in range(world)]
        mine = self._scatter(commands)
        return self._train(mine)

    def stop_followers(self):
        self._scatter([(STOP, None, None, False)] * self.ctx.world_size)

    def _scatter(self, commands: Optional[list]) -> tuple:
        out = [None]
        dist.scatter_object_list(out, commands, src=0, group=self.ctx.data_group)
        return out[0]

    def _train(self, command: tuple) -> dict:
        _, sim, real, gather = command
        stats = data_parallel_train_step(self.model, self.train_policy, self.optimizer,
                                         to_device(sim, self.ctx.device), real, self.rank_cfg, self.ctx.data_group)
        if self.sharded and gather:
            self._gather_full_weights()
        return stats

    def _gather_full_weights(self):
        """All ranks take part; rank 0 loads the full weights into ``policy`` (on its device)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ctx.rank == 0:
            prefix = "policy."
            self.policy.load_state_dict({k[len(prefix):]: v for k, v in full.items()})

    def close(self):
        """Drop the wrapped model (DDP's C++ Reducer owns a reference to the process group): see ``shutdown``."""
        self.model = None

    # -- ranks 1..N-1 -------------------------------------------------------------------------
    def follow(self) -> int:
        """Train on every shard rank 0 scatters until it says stop; returns the number of updates."""
        updates = 0
        while True:
            command = self._scatter(None)
            if command[0] == STOP:
                return updates
            self._train(command)
            updates += 1


def broadcast_initial_state(policy: Optional[torch.nn.Module], optimizer_state: Optional[dict],
                            ctx: Context) -> tuple[torch.nn.Module, dict]:
    """Rank 0's policy (a CPU copy: architecture, weights and normaliser) and optimiser state
    (non-empty after a resume) for every rank, so that all replicas and their Adam moments agree."""
    payload = [None]
    if ctx.rank == 0:
        payload = [(copy.deepcopy(policy).cpu(), _to_cpu(optimizer_state))]
    dist.broadcast_object_list(payload, src=0, group=ctx.data_group)
    return payload[0]


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


def make_leader(trainer: Trainer, ctx: Context) -> DataParallelTrainer:
    """Make rank 0's ``trainer`` (before its ingest starts) lead the data-parallel updates, with the
    followers in ``run_follower``."""
    lcfg = trainer.cfg
    trainer.batcher = Batcher.from_config(lcfg, "cpu")  # the shards leave through a CPU scatter
    if lcfg.distributed.strategy == "fsdp":
        trainer.policy.cpu()  # the full copy that rank 0 publishes and checkpoints; training uses the shards
    broadcast_initial_state(trainer.policy, trainer.optimizer.state_dict(), ctx)
    leader = DataParallelTrainer(trainer.policy, lambda p: make_optimizer(p, lcfg), lcfg, ctx, trainer.optimizer)

    def step(batch: dict, co_train: bool, critic_only: bool, new_version: bool) -> dict:
        # critic_only is never set here: per_rank_config refuses critic_warmup_updates
        return leader.lead(batch, co_train, trainer.replay, trainer.rng, gather=new_version)

    trainer.step = step
    log.info("data-parallel learner: rank 0 of %d, %s, %s", ctx.world_size, ctx.device, lcfg.distributed.strategy)
    return leader


def run_follower(cfg: DictConfig, ctx: Context) -> int:
    # a signal stops rank 0, which then tells the followers: they must not leave a collective early
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    policy, optimizer_state = broadcast_initial_state(None, None, ctx)
    if cfg.learner.distributed.strategy == "ddp":  # fsdp: the trainer places its sharded replica
        policy = policy.to(ctx.device)
    lcfg = cfg.learner
    trainer = DataParallelTrainer(policy, lambda p: make_optimizer(p, lcfg), lcfg, ctx)
    if optimizer_state and optimizer_state.get("state") and not trainer.sharded:
        trainer.optimizer.load_state_dict(optimizer_state)
    updates = trainer.follow()
    log.info("rank %d: %d updates, stopping", ctx.rank, updates)
    return 0


def shutdown(ctx: Context, trainer: Optional[DataParallelTrainer] = None) -> None:
    """Leave the process group: every rank's last call, after its last collective.

    ``destroy_process_group`` alone can deadlock a rank for ever (no collective is waiting, so no timeout
    fires): ProcessGroupGloo's destructor waits for its worker threads, and a worker may still be releasing
    the tensors of the last collective, which takes the GIL. A Python handle on a group drops its reference
    with the GIL released; C++ owners drop theirs with the GIL held: DDP's Reducer (freed by the cyclic GC
    at any later moment: DDP sits in a reference cycle) and torch's group registry (inside
    ``destroy_process_group``). Whichever drops the last reference runs the destructor, so with a C++ owner
    last, the destructor holds the GIL the worker waits for (pytorch/pytorch#56297; seen as a test whose
    two ranks connected and then hung until pytest's timeout). Hence the order: free the DDP wrapper while
    the group is registered, destroy the group while Python handles on it are held here, then drop them."""
    if trainer is not None:
        trainer.close()
    gc.collect()  # an unreachable DDP wrapper (e.g. a returned follower's) goes now, not after the destroy
    if not dist.is_initialized():
        return
    handles = [ctx.data_group, dist.group.WORLD]
    dist.destroy_process_group()
    del handles  # the last references, released without the GIL


def run(cfg: DictConfig, learner_cls) -> int:
    """Entry point of every rank under torchrun; ``learner_cls`` is ``learner.main.Learner``."""
    ctx = init(cfg.learner.distributed, str(cfg.learner.device))
    cfg = OmegaConf.merge(cfg, {"learner": {"device": str(ctx.device)}})
    leader = None
    try:
        if ctx.rank == 0:
            learner = learner_cls(cfg)
            leader = make_leader(learner.trainer, ctx)
            try:
                return learner.run()
            finally:
                leader.stop_followers()
        return run_follower(cfg, ctx)
    finally:
        shutdown(ctx, leader)
