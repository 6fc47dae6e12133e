"""Transport benchmark: memcpy vs shared-memory ring vs raw pyzmq vs Tandem's protocol.

    python -m benchmarks.bench_transport [--quick] [--json results.json]

Every two-process measurement runs the receiving side in a separate (spawned) process and
times it in steady state, after warm-up messages; each two-process run is repeated (raw and
protocol interleaved) and the best run kept, since a shared machine adds noise. Targets, printed PASS/FAIL:
  - ring handoff >= 50% of single-thread memcpy bandwidth
  - Tandem protocol >= 80% of raw pyzmq throughput for messages >= 1 MiB
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import zmq

from common.protocol import Limits, Message, decode, encode
from common.segment import SegmentSpec

MiB = 1 << 20
RING_TARGET = 0.5
PROTOCOL_TARGET = 0.8
PROTOCOL_TARGET_MIN_BYTES = MiB
# A realistic segment: 16 chunk-steps of 640x480 RGB (about 16 MB per slot).
RING_SEGMENT = SegmentSpec(steps=16, image_hw=(480, 640), token_len=32, state_dim=8,
                           num_denoise_steps=10, chunk_size=16)


@dataclass
class Settings:
    memcpy_bytes: int
    memcpy_repeats: int
    ring_segments: int
    ring_slots: int
    zmq_bytes_per_run: int  # per message size and transport
    small_messages: int
    warmup_messages: int
    repeats: int  # two-process runs are repeated, interleaving raw and protocol; best run kept

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(64 * MiB, 5, 32, 4, 128 * MiB, 3000, 8, 3)
        return cls(256 * MiB, 10, 96, 4, 384 * MiB, 20000, 16, 5)


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# memcpy


def bench_memcpy(s: Settings) -> float:
    """Median bandwidth of single np.copyto calls of a large buffer (bytes/s)."""
    src = np.random.default_rng(0).integers(0, 255, s.memcpy_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(s.memcpy_repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return s.memcpy_bytes / float(np.median(times))


# ----------------------------------------------------------------------------------------------
# shared-memory ring: writer process fills slots, this process reads and copies out


def _ring_writer(prefix: str, endpoint: str, count: int, slots: int) -> None:
    from common.channels import DataSender
    from common.shm_ring import ShmRingWriter, notice_message
    spec = RING_SEGMENT.arrays()
    rng = np.random.default_rng(1)
    source = {k: rng.integers(0, 255, size=shape).astype(dtype) for k, (dtype, shape) in spec.items()}
    with ShmRingWriter(None, spec, slots, full_policy="wait", wait_timeout_s=60, prefix=prefix) as ring, \
            DataSender(endpoint, hwm=slots * 2) as notices:
        for _ in range(count):
            slot = ring.acquire()
            for name, a in source.items():
                np.copyto(slot[name], a)
            notices.send(notice_message(ring.commit(slot, policy_version=0)), timeout_ms=60_000)
        time.sleep(0.5)  # let the last notices go out before the ring is unlinked


def bench_ring(s: Settings) -> tuple[float, int]:
    from common.channels import DataReceiver
    from common.shm_ring import ShmRingReader
    spec = RING_SEGMENT.arrays()
    nbytes = RING_SEGMENT.nbytes()
    out = {k: np.empty(shape, dtype) for k, (dtype, shape) in spec.items()}
    warmup = 2 * s.ring_slots
    ctx = mp.get_context("spawn")
    with DataReceiver(_ipc_endpoint()) as rx:
        proc = ctx.Process(target=_ring_writer,
                           args=("tandem_bench_", rx.endpoint, warmup + s.ring_segments, s.ring_slots))
        proc.start()
        reader, t0 = None, None
        for i in range(warmup + s.ring_segments):
            if i == warmup:
                t0 = time.perf_counter()
            msg = rx.recv(timeout_ms=60_000)
            if msg is None:
                raise RuntimeError("ring writer stopped sending notices")
            if reader is None:
                reader = ShmRingReader.attach(msg.meta["ring"], spec, s.ring_slots)
            views = reader.read(msg.meta)
            for name, v in views.items():
                np.copyto(out[name], v)
            reader.release(msg.meta)
        elapsed = time.perf_counter() - t0
        proc.join(30)
        reader.close()
    return nbytes * s.ring_segments / elapsed, nbytes


# ----------------------------------------------------------------------------------------------
# ZeroMQ PUSH/PULL: raw frames vs Tandem's protocol


def _zmq_receiver(endpoint: str, mode: str, warmup: int, count: int, hwm: int, conn) -> None:
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    conn.send(_bind(sock, endpoint))
    limits = Limits()
    for i in range(warmup + count):
        if i == warmup:
            t0 = time.perf_counter()
        frames = sock.recv_multipart(copy=False)
        if mode == "protocol":
            decode(frames, limits)
    conn.send(time.perf_counter() - t0)
    sock.close()


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _recv(conn, proc, timeout_s: float = 120.0):
    """The next value from a child's pipe; an error if the child died or stalled instead."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"benchmark process {proc.pid} exited ({proc.exitcode}) or stalled")
    return conn.recv()


_ipc_dir: str | None = None  # made on first use (in the parent process only), removed by main()


def _ipc_endpoint() -> str:
    global _ipc_dir
    if _ipc_dir is None:
        _ipc_dir = tempfile.mkdtemp(prefix="tandem_bench_")
    return f"ipc://{_ipc_dir}/{uuid.uuid4().hex[:8]}"


def _endpoint(transport: str) -> str:
    return _ipc_endpoint() if transport == "ipc" else "tcp://127.0.0.1:*"


def bench_zmq(transport: str, mode: str, size: int, count: int, warmup: int) -> float:
    """Messages per second of ``size``-byte payloads, PUSH (here) -> PULL (another process)."""
    hwm = max(4, (64 * MiB) // max(size, 1))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_zmq_receiver, args=(_endpoint(transport), mode, warmup, count, hwm, child))
    proc.start()
    endpoint = _recv(parent, proc)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    payload = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8)
    raw_header = b"h" * 64  # the same frame count as a protocol message
    for _ in range(warmup + count):
        if mode == "protocol":
            sock.send_multipart(encode(Message("segment", sender="bench", policy_version=1,
                                               arrays={"data": payload})), copy=False)
        else:
            sock.send_multipart([raw_header, payload], copy=False)
    elapsed = _recv(parent, proc)
    proc.join(10)
    sock.close()
    return count / elapsed


def bench_codec(n: int) -> float:
    """Seconds per encode+decode of a whole segment message in one process (no socket)."""
    seg = RING_SEGMENT.empty()
    msg = Message("segment", sender="bench", policy_version=3, meta={"env": 0}, arrays=seg)
    t0 = time.perf_counter()
    for _ in range(n):
        decode(encode(msg))
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(quick: bool) -> dict:
    s = Settings.make(quick)
    results: dict = {"quick": quick, "cpus": os.cpu_count()}

    progress("memcpy")
    memcpy = bench_memcpy(s)
    ring, seg_bytes = 0.0, RING_SEGMENT.nbytes()
    for rep in range(s.repeats):
        progress(f"ring handoff ({fmt_size(seg_bytes)} segments) x{s.ring_segments}, run {rep + 1}")
        ring = max(ring, bench_ring(s)[0])
    results.update(memcpy_GBps=memcpy / 1e9, ring_GBps=ring / 1e9, ring_segment_bytes=seg_bytes,
                   ring_ratio=ring / memcpy)

    rows = []
    for transport in ("ipc", "tcp"):
        for size in (64 << 10, MiB, 16 * MiB):
            count = max(32, s.zmq_bytes_per_run // size)
            rates = {"raw": 0.0, "protocol": 0.0}
            for rep in range(s.repeats):
                for mode in rates:
                    progress(f"zmq {transport} {fmt_size(size)} {mode} x{count}, run {rep + 1}")
                    rates[mode] = max(rates[mode], bench_zmq(transport, mode, size, count,
                                                             s.warmup_messages))
            rows.append({"transport": transport, "size": size, "raw_GBps": rates["raw"] * size / 1e9,
                         "protocol_GBps": rates["protocol"] * size / 1e9,
                         "ratio": rates["protocol"] / rates["raw"]})
    small = []
    for transport in ("ipc", "tcp"):
        rates = {"raw": 0.0, "protocol": 0.0}
        for rep in range(s.repeats):
            for mode in rates:
                progress(f"zmq {transport} 64 B {mode} x{s.small_messages}, run {rep + 1}")
                rates[mode] = max(rates[mode], bench_zmq(transport, mode, 64, s.small_messages,
                                                         s.warmup_messages * 10))
        small.append({"transport": transport, "raw_us": 1e6 / rates["raw"],
                      "protocol_us": 1e6 / rates["protocol"]})
    codec_s = bench_codec(200 if quick else 2000)
    results.update(zmq=rows, small=small, codec_us_per_segment=codec_s * 1e6)

    print()
    load = os.getloadavg()[0]
    results["load_average"] = load
    print(f"Tandem transport benchmark ({'quick' if quick else 'full'}; {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the end: other processes share these figures' CPUs)")
    print(f"{'measurement':<44}{'GB/s':>8}")
    print(f"(two-process figures: best of {s.repeats} runs; memcpy: median of {s.memcpy_repeats} copies)")
    print(f"{'memcpy, one thread (np.copyto ' + fmt_size(s.memcpy_bytes) + ')':<44}{memcpy / 1e9:>8.2f}")
    print(f"{'shm ring handoff, 2 processes (' + fmt_size(seg_bytes) + ' segs)':<44}{ring / 1e9:>8.2f}")
    ring_ok = ring / memcpy >= RING_TARGET
    print(f"ring / memcpy = {ring / memcpy:.2f}   target >= {RING_TARGET:.2f}   {verdict(ring_ok)}")
    print()
    print(f"{'PUSH/PULL':<10}{'message':>9}{'raw GB/s':>10}{'Tandem GB/s':>13}{'ratio':>7}   target")
    proto_ok = True
    for r in rows:
        target = ""
        if r["size"] >= PROTOCOL_TARGET_MIN_BYTES:
            ok = r["ratio"] >= PROTOCOL_TARGET
            proto_ok &= ok
            target = f">= {PROTOCOL_TARGET:.2f} {verdict(ok)}"
        print(f"{r['transport']:<10}{fmt_size(r['size']):>9}{r['raw_GBps']:>10.2f}"
              f"{r['protocol_GBps']:>13.2f}{r['ratio']:>7.2f}   {target}")
    print()
    print(f"{'small (64 B array)':<20}{'raw us/msg':>11}{'Tandem us/msg':>15}{'overhead us':>13}")
    for r in small:
        print(f"{r['transport']:<20}{r['raw_us']:>11.1f}{r['protocol_us']:>15.1f}"
              f"{r['protocol_us'] - r['raw_us']:>13.1f}")
    print(f"encode+decode of one {fmt_size(seg_bytes)} segment message (9 arrays, no socket): "
          f"{codec_s * 1e6:.1f} us")
    print()
    print(f"ring >= {RING_TARGET:.0%} memcpy: {verdict(ring_ok)};  "
          f"protocol >= {PROTOCOL_TARGET:.0%} raw pyzmq for >= 1 MiB: {verdict(proto_ok)}")
    results.update(ring_pass=ring_ok, protocol_pass=proto_ok)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        results = run(args.quick)
    finally:
        if _ipc_dir is not None:
            shutil.rmtree(_ipc_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if results["ring_pass"] and results["protocol_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
