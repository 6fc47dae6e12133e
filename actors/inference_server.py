"""Batched policy inference for an actor's env workers (Sample Factory's policy-worker pattern).

``actor.inference=server``: instead of stepping its envs in lockstep, the actor starts
``actor.num_envs`` env worker processes and one inference server (a thread of the actor process,
owning the policy on ``actor.device``, i.e. one server per GPU when each actor gets its own GPU).

  env worker i (process)                                 inference server (thread, GPU)
   write obs into shared-memory request slot i  --b"S"-->  wait on every worker's pipe,
   (image uint8 HxWx3, state, instruction bytes)            gather all pending requests (up to
   block on its pipe                                        batch_wait_ms for more), one batch:
                                               <--b"R"--   policy.sample -> write actions, chain,
   read actions/chain/logp/value/tokens/version             logp, value, token ids, version into
   execute the first k actions of the chunk                 the slots of the batch
   ... after T chunk-steps: a whole segment  --pickle--->   queued for the actor's main thread,
                                                            which ships it (shm ring or ZeroMQ)

Workers run free of each other: a slow env never holds up the others, and the batch is whatever
is pending. New weights (``submit_weights``) are applied by the server between batches, so a
chunk is always sampled by one version; a segment carries the oldest version among its chunks.
A time-limit truncation asks the server for V(final obs) (a b"V" request, batched as well) and
adds gamma * V to that step's reward, as the lockstep actor does.

The token ids come back from the server (``policy.tokenize`` with a cache), so the workers need
no tokenizer and any policy backend works. ``benchmarks/fake_env.py:FakeTwinEnv`` stands in for the
simulator in tests and CPU benchmarks of this path (``env_factory="benchmarks.fake_env:FakeTwinEnv"``).

Throughput options (issue #20, ``actor.server.*``; the defaults are the original behaviour):
``autocast_dtype`` runs ``policy.sample`` under ``torch.autocast`` (the policy keeps its Gaussian
log-prob math in float32; truncation values stay float32); ``cpu_affinity`` pins each env worker
to one core; ``profile``
times the sections of every worker's loop (``common.laps``) and the server's, for
``bench_gpu.py --phases profile``.
"""
from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from multiprocessing.connection import wait as wait_conns
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Optional

import numpy as np
import torch

from common.device import autocast
from common.device import autocast_dtype as autocast_dtype_of
from common.imports import import_object
from common.laps import LAPS, WORKER_SECTIONS, Laps, merge
from actors.rollout import SegmentBuilder
from common.segment import SegmentSpec, policy_segment_spec
from common.weights import PendingWeights

log = logging.getLogger("tandem.inference_server")

MAX_INSTR_BYTES = 256
REQ_SAMPLE, REQ_VALUE, RESULT, STOP = b"S", b"V", b"R", b"X"
DEFAULT_ENV_FACTORY = "actors.env_pool:_SingleEnv"


# ---- shared-memory request slots --------------------------------------------------------------
def slot_layout(num_slots: int, image_hw: tuple[int, int], state_dim: int, token_len: int, chunk_size: int,
                num_denoise_steps: int, action_dim: int = 7) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every array of the request slots, slot index first."""
    N, (h, w), H, A = num_slots, image_hw, chunk_size, action_dim
    return {
        # written by env workers
        "image": ("uint8", (N, h, w, 3)),
        "state": ("float32", (N, state_dim)),
        "instr": ("uint8", (N, MAX_INSTR_BYTES)),
        "instr_len": ("int32", (N,)),
        # written by the server
        "actions": ("float32", (N, H, A)),
        "chain": ("float32", (N, num_denoise_steps + 1, H, A)),
        "logp": ("float32", (N,)),
        "value": ("float32", (N,)),
        "tokens": ("int32", (N, token_len)),
        "version": ("int64", (N,)),
        # running totals written by env workers: env steps executed, and with profile its sections
        "env_steps": ("int64", (N,)),
        "lap_s": ("float64", (N, len(WORKER_SECTIONS))),
        "lap_n": ("int64", (N, len(WORKER_SECTIONS))),
    }


class RequestSlots:
    """Numpy views of one shared-memory block laid out by ``slot_layout``."""

    def __init__(self, shm: SharedMemory, layout: dict, owner: bool):
        self.shm, self.layout, self.owner = shm, layout, owner
        self.arrays: dict[str, np.ndarray] = {}
        off = 0
        for name, (dtype, shape) in layout.items():
            dt = np.dtype(dtype)
            off = (off + 63) // 64 * 64
            n = int(np.prod(shape)) * dt.itemsize
            self.arrays[name] = np.ndarray(shape, dt, buffer=shm.buf, offset=off)
            off += n

    @staticmethod
    def nbytes(layout: dict) -> int:
        off = 0
        for dtype, shape in layout.values():
            off = (off + 63) // 64 * 64 + int(np.prod(shape)) * np.dtype(dtype).itemsize
        return max(off, 1)

    @classmethod
    def create(cls, layout: dict) -> "RequestSlots":
        return cls(SharedMemory(create=True, size=cls.nbytes(layout)), layout, owner=True)

    @classmethod
    def attach(cls, name: str, layout: dict) -> "RequestSlots":
        return cls(SharedMemory(name=name), layout, owner=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def close(self):
        self.arrays = {}
        try:
            self.shm.close()
        except BufferError:  # a view still alive somewhere: leave the mapping to the process exit
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def worker_cores(spec: Any, num_workers: int, allowed: list[int]) -> list[Optional[list[int]]]:
    """The core each env worker is pinned to (``actor.server.cpu_affinity``). None: None for every
    worker (the OS schedules); "auto": worker i on the i-th of the ``allowed`` cores, wrapping; a
    list of core ids: worker i on list[i % len]."""
    if spec is None:
        return [None] * num_workers
    if spec == "auto":
        cores = sorted(allowed)
    elif isinstance(spec, str) or not len(spec):
        raise ValueError(f"actor.server.cpu_affinity must be null, 'auto' or a list of core ids, got {spec!r}")
    else:
        cores = [int(c) for c in spec]
    return [[cores[i % len(cores)]] for i in range(num_workers)]


# ---- env worker process -----------------------------------------------------------------------
def _env_worker(conn, index: int, env_cfg: Any, real_proxy: bool, seed: int, env_factory: str, seg: dict):
    """One env; requests its chunks from the server; sends whole segments back."""
    env = None
    torch.set_num_threads(1)  # one env per process: no intra-op thread pools fighting over the cores
    if seg["cores"]:  # before the simulator starts its threads, which inherit the mask
        os.sched_setaffinity(0, seg["cores"])
    LAPS.enabled = seg["profile"]
    try:
        if isinstance(env_cfg, str):
            from omegaconf import OmegaConf
            env_cfg = OmegaConf.create(env_cfg)
        env = import_object(env_factory)(env_cfg, real_proxy, seed)
        obs, instr = env.reset()
        conn.send(("hello", {"image_hw": tuple(obs["image"].shape[:2]), "state_dim": int(obs["state"].shape[0]),
                             "cores": sorted(os.sched_getaffinity(0))}))
        msg = conn.recv()
        if msg == STOP or msg[0] != "attach":
            return
        slots = RequestSlots.attach(msg[1], msg[2])
        spec = SegmentSpec(**msg[3])
        k, gamma, reward_scale = int(seg["exec_horizon"]), float(seg["gamma"]), float(seg["reward_scale"])
        img, st, ins, ins_len = slots["image"][index], slots["state"][index], slots["instr"][index], slots["instr_len"]
        lap_s, lap_n, steps_done = slots["lap_s"][index], slots["lap_n"][index], slots["env_steps"]

        def request(o: dict, instruction: str, kind: bytes) -> bool:
            t = time.perf_counter()
            np.copyto(img, o["image"])
            np.copyto(st, o["state"])
            b = instruction.encode("utf-8")[:MAX_INSTR_BYTES]
            ins[: len(b)] = np.frombuffer(b, np.uint8)
            ins_len[index] = len(b)
            if LAPS.enabled:
                LAPS.publish(lap_s, lap_n)
            conn.send_bytes(kind)
            t = LAPS.lap("ipc_send", t)
            ok = conn.recv_bytes() == RESULT
            LAPS.lap("wait_server", t)
            return ok

        builder = SegmentBuilder(spec, gamma, index, reward_scale)
        while True:
            if not request(obs, instr, REQ_SAMPLE):
                break
            t0 = time.perf_counter()
            if builder.full:  # this observation (and its tokens) is the segment's bootstrap: ship it
                conn.send_bytes(pickle.dumps(("segment", *builder.finish(obs, slots["tokens"][index])),
                                             protocol=pickle.HIGHEST_PROTOCOL))
                t0 = LAPS.lap("segment_send", t0)
            builder.record_sample(obs, slots["tokens"][index], slots["chain"][index], float(slots["logp"][index]),
                                  float(slots["value"][index]), int(slots["version"][index]))
            actions = slots["actions"][index, :k].copy()
            LAPS.lap("bookkeeping", t0)
            r = env.run_chunk(actions)
            final_value = None
            if r.truncated:  # V(final obs), batched by the server like a sample
                if not request(r.final_obs, instr, REQ_VALUE):
                    break
                final_value = float(slots["value"][index])
            builder.record_result(r, final_value)
            steps_done[index] += r.env_steps
            obs, instr = r.obs, r.instruction
    except (EOFError, BrokenPipeError, KeyboardInterrupt, ConnectionResetError):
        pass
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if env is not None:
            env.close()


# ---- CUDA graphs of policy.sample ------------------------------------------------------------
class GraphedSampler:
    """``policy.sample`` captured as one CUDA graph per padded batch size (1, 2, 4, ...).

    A compact VLA's sample at small batches is bound by kernel launches (hundreds of small kernels
    over the K denoising steps); replaying a graph launches them at once. Inputs are copied into the
    graph's static tensors (rows past the live batch keep stale data and are ignored); weights are
    updated in place by ``set_weights``, so graphs stay valid across versions. The noise comes from
    the default CUDA generator (graph-safe), seeded once: reproducible runs but not the same numbers
    as an eager ``sample`` with a ``torch.Generator``."""

    def __init__(self, policy, image_hw: tuple[int, int], state_dim: int, max_batch: int, seed: int = 0,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.policy, dev = policy, policy.device
        self.sizes = [1]
        while self.sizes[-1] < max_batch:
            self.sizes.append(self.sizes[-1] * 2)
        torch.cuda.manual_seed(seed)
        self.graphs = {}
        pool = None
        for B in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            inp = {"image": torch.zeros(B, *image_hw, 3, dtype=torch.uint8, device=dev),
                   "state": torch.zeros(B, state_dim, device=dev),
                   "tokens": torch.ones(B, policy.token_len, dtype=torch.long, device=dev)}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad(), autocast(dev, autocast_dtype, cache=False):
                for _ in range(2):
                    policy.sample(inp)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(g, pool=pool), autocast(dev, autocast_dtype, cache=False):
                out = policy.sample(inp)
            pool = g.pool()
            self.graphs[B] = (g, inp, out)
        torch.cuda.synchronize()

    def __call__(self, obs: dict):
        n = obs["image"].shape[0]
        B = next(b for b in self.sizes if b >= n)
        g, inp, out = self.graphs[B]
        for k in ("image", "state", "tokens"):
            inp[k][:n].copy_(obs[k])
        g.replay()
        from common.policy.base import SampleOutput
        return SampleOutput(actions=out.actions[:n], chain=out.chain[:n], log_prob=out.log_prob[:n],
                            value=out.value[:n])


# ---- the server -------------------------------------------------------------------------------
@dataclass
class ServerStats:
    batches: int = 0
    requests: int = 0
    value_requests: int = 0
    segments: int = 0
    env_steps: int = 0
    infer_s: float = 0.0
    batch_sizes: list = field(default_factory=list)  # of sample batches, the last 10000
    sample_batches: int = 0  # sample batches ever (batch_sizes keeps the last of them)
    infer_by_size: dict = field(default_factory=dict)  # sample batch size -> [seconds, batches]
    laps: dict = field(default_factory=dict)  # the server thread's sections (common.laps), with profile
    # the server thread updates under it and snapshot() copies under it: a reader on another thread
    # never sees a batch counted in one field and not yet in another
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> "ServerStats":
        with self.lock:
            return ServerStats(**copy.deepcopy({f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}))

    def window_batch_sizes(self, earlier: "ServerStats") -> list:
        """The sample batch sizes since ``earlier`` (a snapshot of the same stats; at most the last 5000)."""
        n = self.sample_batches - earlier.sample_batches
        return self.batch_sizes[len(self.batch_sizes) - min(n, len(self.batch_sizes)):] if n else []

    def summary(self) -> dict:
        """The heartbeat's scalars (batch sizes over the last 10000 sample batches)."""
        b = np.asarray(self.batch_sizes or [0])
        return {"batches": self.batches, "requests": self.requests, "value_requests": self.value_requests,
                "segments": self.segments, "env_steps": self.env_steps,
                "batch_mean": float(b.mean()), "batch_p50": float(np.median(b)), "batch_max": int(b.max()),
                "infer_ms_per_batch": 1000 * self.infer_s / max(self.batches, 1)}


def server_options(scfg: Any) -> dict:
    """``InferenceServer`` keyword arguments from ``actor.server`` (configs/actor/default.yaml)."""
    affinity = scfg.cpu_affinity
    return dict(batch_wait_ms=float(scfg.batch_wait_ms), full_batch=bool(scfg.full_batch),
                env_factory=scfg.env_factory, cuda_graphs=bool(scfg.cuda_graphs),
                autocast_dtype=scfg.autocast_dtype, profile=bool(scfg.profile),
                cpu_affinity=list(affinity) if affinity is not None and not isinstance(affinity, str) else affinity)


class InferenceServer:
    """``num_envs`` env worker processes and one batching inference thread around ``policy``.

    ``segments()`` / ``get_segment(timeout)`` hand out finished segments as
    ``(arrays, meta)`` with meta = env_index, version, env_steps, episodes, successes, returns.
    """

    def __init__(self, policy, env_cfg: Any, num_envs: int, *, rollout_steps: int, gamma: float,
                 reward_scale: float = 1.0, real_proxy: bool = False, seed: int = 0, generator_seed: int = 0,
                 batch_wait_ms: float = 1.0, full_batch: bool = False, env_factory: Optional[str] = None,
                 start_timeout_s: float = 300.0, max_queued_segments: int = 256, cuda_graphs: bool = False,
                 autocast_dtype: Optional[str] = None, cpu_affinity: Any = None, profile: bool = False):
        self.policy = policy
        self.device = policy.device
        self.autocast_dtype = autocast_dtype_of(autocast_dtype)
        self.laps = Laps()
        self.laps.enabled = bool(profile)
        self.num_envs = int(num_envs)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.full_batch = bool(full_batch)
        self.generator = torch.Generator(device=self.device).manual_seed(int(generator_seed))
        self.weights = PendingWeights(policy)
        self.stats = ServerStats()
        self.segment_queue: queue.Queue = queue.Queue(maxsize=max_queued_segments)
        self.errors: list[str] = []
        self._token_cache: dict[bytes, np.ndarray] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.slots: Optional[RequestSlots] = None

        try:
            from omegaconf import DictConfig, OmegaConf
            if isinstance(env_cfg, DictConfig):
                env_cfg = OmegaConf.to_yaml(env_cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        seg = {"exec_horizon": policy.exec_horizon, "gamma": gamma, "reward_scale": float(reward_scale),
               "profile": bool(profile)}
        ctx = mp.get_context("spawn")
        seeds = [seed + 100_003 * i for i in range(self.num_envs)]  # as EnvPool: disjoint episode seeds
        cores = worker_cores(cpu_affinity, self.num_envs, sorted(os.sched_getaffinity(0)))
        self.conns, self.procs = [], []
        for i, s in enumerate(seeds):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_env_worker, daemon=True, name=f"env-worker-{i}",
                            args=(child, i, env_cfg, real_proxy, s, env_factory or DEFAULT_ENV_FACTORY,
                                  dict(seg, cores=cores[i])))
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        hellos = []
        deadline = time.time() + start_timeout_s
        try:
            for i, c in enumerate(self.conns):
                if not c.poll(max(0.0, deadline - time.time())):
                    raise RuntimeError(f"env worker {i} did not start within {start_timeout_s:.0f} s")
                msg = c.recv()
                if msg[0] != "hello":
                    raise RuntimeError(f"env worker {i} failed to start:\n{msg[1]}")
                hellos.append(msg[1])
        except BaseException:
            self.close()
            raise
        if len({(h["image_hw"], h["state_dim"]) for h in hellos}) != 1:
            self.close()
            raise RuntimeError(f"env workers disagree on observation shapes: {hellos}")
        self.worker_cores = [h["cores"] for h in hellos]
        h = hellos[0]
        self.spec = policy_segment_spec(policy, rollout_steps, h["image_hw"], h["state_dim"])
        layout = slot_layout(self.num_envs, self.spec.image_hw, self.spec.state_dim, policy.token_len,
                             policy.chunk_size, policy.num_denoise_steps, self.spec.action_dim)
        self.slots = RequestSlots.create(layout)
        import dataclasses
        self.graphed = None
        if cuda_graphs and self.device.type == "cuda":
            try:
                t0 = time.time()
                self.graphed = GraphedSampler(policy, self.spec.image_hw, self.spec.state_dim, self.num_envs,
                                              seed=int(generator_seed), autocast_dtype=self.autocast_dtype)
                log.info("captured CUDA graphs of policy.sample for batches %s in %.1f s",
                         self.graphed.sizes, time.time() - t0)
            except Exception:  # a policy that cannot be captured runs eagerly
                log.exception("CUDA graph capture failed: sampling eagerly")
                self.graphed = None
        elif cuda_graphs:
            log.warning("cuda_graphs needs a CUDA policy (device %s): sampling eagerly", self.device)
        for c in self.conns:
            c.send(("attach", self.slots.shm.name, layout, dataclasses.asdict(self.spec)))
        self._alive = [True] * self.num_envs

    # -- weights ---------------------------------------------------------------------------------
    def submit_weights(self, weights: dict, version: int):
        """Applied by the server thread before its next batch (so never inside a chunk)."""
        self.weights.offer(weights, version)

    @property
    def version(self) -> int:
        return self.weights.version

    def set_version(self, version: int):
        """The version of the weights the policy already holds (before the server starts)."""
        self.weights.version = int(version)

    # -- inference --------------------------------------------------------------------------------
    def _tokens(self, idx: int) -> np.ndarray:
        n = int(self.slots["instr_len"][idx])
        key = self.slots["instr"][idx, :n].tobytes()
        tok = self._token_cache.get(key)
        if tok is None:
            tok = self.policy.tokenize([key.decode("utf-8", errors="replace")])[0].cpu().numpy().astype(np.int32)
            self._token_cache[key] = tok
        return tok

    @torch.no_grad()
    def infer(self, sample_idx: list[int], value_idx: list[int]):
        """Run one batch over the given slots and write the results into them."""
        s, laps = self.slots, self.laps
        for idxs, kind in ((sample_idx, REQ_SAMPLE), (value_idx, REQ_VALUE)):
            if not idxs:
                continue
            t = time.perf_counter()
            ix = np.asarray(idxs)
            tokens = np.stack([self._tokens(i) for i in idxs])
            obs = {"image": torch.from_numpy(s["image"][ix]).to(self.device, non_blocking=True),
                   "state": torch.from_numpy(s["state"][ix]).to(self.device, non_blocking=True),
                   "tokens": torch.from_numpy(tokens).long().to(self.device, non_blocking=True)}
            if kind == REQ_SAMPLE:
                t = laps.lap("prep", t)
                if self.graphed is not None:
                    out = self.graphed(obs)
                else:
                    with autocast(self.device, self.autocast_dtype):
                        out = self.policy.sample(obs, generator=self.generator)
                if laps.enabled and self.device.type == "cuda":  # split the GPU time from the copies back
                    torch.cuda.synchronize(self.device)
                t = laps.lap("sample", t)
                s["actions"][ix] = out.actions.float().cpu().numpy()
                s["chain"][ix] = out.chain.float().cpu().numpy()
                s["logp"][ix] = out.log_prob.float().cpu().numpy()
                s["value"][ix] = out.value.float().cpu().numpy()
                s["tokens"][ix] = tokens
                s["version"][ix] = self.version
                laps.lap("writeback", t)
            else:  # a truncation's bootstrap value enters the reward: float32, not autocast
                s["value"][ix] = self.policy.value(obs).float().cpu().numpy()
                laps.lap("value", t)

    def _receive(self, conn, i: int, sample: list, value: list):
        """Read every message waiting on worker ``i``'s pipe."""
        while conn.poll():
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                self._alive[i] = False
                return
            if data == REQ_SAMPLE:
                sample.append(i)
            elif data == REQ_VALUE:
                value.append(i)
            else:
                msg = pickle.loads(data)
                if msg[0] == "segment":
                    _, arrays, meta = msg
                    with self.stats.lock:
                        self.stats.segments += 1
                        self.stats.env_steps += int(meta["env_steps"])
                    try:
                        self.segment_queue.put_nowait((arrays, meta))
                    except queue.Full:  # the actor is not keeping up: drop the oldest
                        try:
                            self.segment_queue.get_nowait()
                        except queue.Empty:
                            pass
                        self.segment_queue.put_nowait((arrays, meta))
                elif msg[0] == "error":
                    self.errors.append(msg[1])
                    log.error("env worker %d failed:\n%s", i, msg[1])
                    self._alive[i] = False
                    return

    def step(self, timeout: float = 0.05) -> int:
        """Gather pending requests (waiting up to ``timeout`` for the first), run one batch, answer.
        Returns the number of requests served. The server thread calls this in a loop."""
        live = [c for c, a in zip(self.conns, self._alive) if a]
        if not live:
            time.sleep(timeout)
            return 0
        index = {id(c): i for i, c in enumerate(self.conns)}
        sample, value = [], []
        t = time.perf_counter()
        for c in wait_conns(live, timeout):
            self._receive(c, index[id(c)], sample, value)
        t = self.laps.lap("wait", t)
        if not sample and not value:
            with self.stats.lock:
                merge(self.stats.laps, self.laps.take())
            return 0
        n_live = sum(self._alive)
        deadline = None if self.full_batch else time.perf_counter() + self.batch_wait_s
        while len(sample) + len(value) < n_live and not self._stop.is_set():
            rem = 0.05 if deadline is None else deadline - time.perf_counter()
            if rem <= 0:
                break
            pending = set(sample) | set(value)
            rest = [c for i, c in enumerate(self.conns) if self._alive[i] and i not in pending]
            for c in wait_conns(rest, rem):
                self._receive(c, index[id(c)], sample, value)
            n_live = sum(self._alive)
        t = self.laps.lap("gather", t)
        self.weights.apply()
        t0 = time.perf_counter()
        self.infer(sorted(sample), sorted(value))
        dt = time.perf_counter() - t0
        t = time.perf_counter()
        for i in sample + value:
            try:
                self.conns[i].send_bytes(RESULT)
            except (BrokenPipeError, OSError):
                self._alive[i] = False
        self.laps.lap("answer", t)
        s = self.stats
        with s.lock:
            s.infer_s += dt
            merge(s.infer_by_size, {len(sample): [dt, 1]})
            merge(s.laps, self.laps.take())
            s.batches += 1
            s.requests += len(sample) + len(value)
            s.value_requests += len(value)
            if sample:
                s.sample_batches += 1
                s.batch_sizes.append(len(sample))
                if len(s.batch_sizes) > 10000:
                    del s.batch_sizes[:5000]
        return len(sample) + len(value)

    def _loop(self):
        try:
            while not self._stop.is_set():
                self.step()
        except Exception:
            self.errors.append(traceback.format_exc())
            log.exception("inference server failed")

    def start(self) -> "InferenceServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="inference-server", daemon=True)
            self._thread.start()
        return self

    def pause(self):
        """Stop serving (env workers block on their next request); ``start`` resumes."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._stop.clear()

    def get_segment(self, timeout: Optional[float] = None):
        """The next finished segment ``(arrays, meta)`` or None after ``timeout`` seconds."""
        if self.errors and not any(self._alive):
            raise RuntimeError("every env worker failed; first error:\n" + self.errors[0])
        try:
            return self.segment_queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def worker_totals(self) -> tuple[int, dict[str, list]]:
        """Env steps executed by all workers so far, and (with profile) their sections summed:
        {section: [seconds, count]} as of each worker's latest request."""
        s = self.slots
        laps = {k: [float(s["lap_s"][:, i].sum()), int(s["lap_n"][:, i].sum())] for i, k in enumerate(WORKER_SECTIONS)}
        return int(s["env_steps"].sum()), {k: v for k, v in laps.items() if v[1]}

    @property
    def alive(self) -> int:
        return sum(getattr(self, "_alive", []))

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for c in self.conns:
            try:
                c.send_bytes(STOP)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        if self.slots is not None:
            self.slots.close()
            self.slots = None
