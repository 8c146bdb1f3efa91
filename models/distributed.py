"""Data-parallel training on torch.distributed: the rank context, the collectives training needs, the launcher.

    lma train --data FILE --nproc 2 --out runs/dp2        # 2 processes on this machine (gloo on CPU)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
        -m models.main train --data FILE --device cuda --out runs/dp16    # every machine runs this line

Every rank holds a whole replica (the LMA memory and the MLPs are small), reads its own part of every
global batch (:func:`models.data.batches.iter_batches` with ``shard``), and DistributedDataParallel
all-reduces the gradients, so N ranks at global batch B take the same steps as one process at batch B
(up to the order of float sums). Rank 0 computes the token statistics and signatures once and
broadcasts the whole initial model; validation predictions of all ranks are gathered before the AUC
is computed; only rank 0 writes the run folder. The backend is gloo on CPU and NCCL on CUDA.

Failure is bounded: the process group has a timeout (``--dist-timeout``) on every collective, and the
launcher of ``--nproc`` watches its ranks: when one exits abnormally (an exception, a signal) it stops
the others (SIGTERM, then SIGKILL after a grace period) and raises :class:`DistributedError` naming
the rank and the cause. A rank also dies with its launcher (Linux parent-death signal). Under torchrun
its elastic agent does the watching.
"""

from __future__ import annotations

import datetime
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from models.names import DEVICES

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0  # after a rank fails: how long the others get to exit on SIGTERM before SIGKILL


class DistributedError(RuntimeError):
    """A rank of a data-parallel run failed; the whole run was stopped."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: rank, world size, local rank (on its machine), device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this rank's GPU) when one is present, else the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from the environment torchrun and :func:`launch` set."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise ValueError(f"bad torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK): {e}") from e
    if world < 1 or not 0 <= rank < world or not 0 <= local < local_world:
        raise ValueError(f"bad torch.distributed environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local, local_world


def init(device: str, timeout_s: float) -> Context:
    """Join the process group the environment describes (one process: nothing to join)."""
    rank, world, local, local_world = env_ranks()
    dev = resolve_device(device, local)
    if world == 1:
        return Context(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d (local %d) joined the %s process group on %s", rank, world, local, backend, dev)
    return Context(rank, world, local, local_world, dev)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End this rank's process now, flushing logs and stdio but skipping interpreter finalization.

    Gloo's worker threads outlive ``destroy_process_group`` (its backend is freed only at exit), and one
    may still be releasing the tensors of the last collective, which takes the GIL. A thread that asks
    for the GIL while the interpreter finalizes is ended with ``pthread_exit``, whose unwind through
    C++ aborts the whole process (SIGABRT, "terminate called without an active exception"): about one
    2-rank run in 20 here, always after the run had succeeded. A rank has written all it writes before
    it returns, so nothing is lost by not finalizing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Collectives


def broadcast_json(ctx: Context, obj: Any) -> Any:
    """Rank 0's JSON-serialisable ``obj`` on every rank (sent as UTF-8 bytes; nothing is unpickled)."""
    if not ctx.distributed:
        return obj
    payload = json.dumps(obj).encode() if ctx.main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=ctx.device)
    if ctx.main:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().numpy()).decode())


def broadcast_module(ctx: Context, module: torch.nn.Module) -> None:
    """Every parameter and buffer of rank 0's ``module`` into the others' (same architecture and shapes).

    The others load what they received through ``load_state_dict``, so modules that mirror buffers as
    Python values (hash-table seeds, read by TorchScript as constants) update those too.
    """
    if not ctx.distributed:
        return
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for tensor in state.values():
        dist.broadcast(tensor, 0)
    if not ctx.main:
        module.load_state_dict(state, strict=True)


def gather_arrays(ctx: Context, *arrays: np.ndarray) -> list[np.ndarray]:
    """Each 1-D array concatenated over all ranks in rank order (ranks may hold different lengths)."""
    if not ctx.distributed:
        return list(arrays)
    sizes = [torch.zeros(1, dtype=torch.int64, device=ctx.device) for _ in range(ctx.world)]
    dist.all_gather(sizes, torch.tensor([len(arrays[0])], dtype=torch.int64, device=ctx.device))
    counts = [int(s.item()) for s in sizes]
    out = []
    for a in arrays:
        padded = torch.zeros(max(counts), dtype=torch.float64, device=ctx.device)
        padded[: len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float64))
        parts = [torch.empty_like(padded) for _ in range(ctx.world)]
        dist.all_gather(parts, padded)
        out.append(np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts, strict=True)]))
    return out


def all_true(ctx: Context, flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------
# The launcher of `lma train --nproc N`


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its launcher dies, so no rank outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _rank_main(
    rank: int, world: int, port: int, error_dir: str, verbose: bool, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    _die_with_parent()
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
    })  # fmt: skip
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    try:
        fn(*args)
    except BaseException as e:
        report = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        Path(error_dir, f"rank{rank}.json").write_text(json.dumps(report))
        raise
    leave(0)


def launch(nproc: int, fn: Callable[..., Any], args: tuple[Any, ...], verbose: bool = False) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes forming one process group on this machine.

    Returns when all exit 0. When one fails, the others are stopped and :class:`DistributedError`
    says which rank failed and how (its exception, exit code or signal).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lma-ranks-") as error_dir:
        procs = [
            spawn.Process(target=_rank_main, args=(r, nproc, port, error_dir, verbose, fn, args), name=f"lma-rank-{r}")
            for r in range(nproc)
        ]
        for p in procs:
            p.start()
        failed: int | None = None
        try:
            pending = {p.sentinel: r for r, p in enumerate(procs)}
            while pending and failed is None:
                for sentinel in multiprocessing.connection.wait(list(pending)):
                    r = pending.pop(sentinel)  # type: ignore[call-overload,arg-type]
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        failed = r
                        break
        finally:
            _stop(procs)
        if failed is None:
            return
        raise DistributedError(_failure(failed, nproc, procs[failed].exitcode, Path(error_dir, f"rank{failed}.json")))


def _stop(procs: list[Any]) -> None:
    """SIGTERM every live process, SIGKILL what is left after the grace period; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def _failure(rank: int, world: int, exitcode: int | None, report_path: Path) -> str:
    stopped = "the other ranks were stopped" if world > 1 else "nothing else was running"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        log.error("rank %d traceback:\n%s", rank, report["traceback"])
        return f"rank {rank} of {world} failed with {report['type']}: {report['message']} ({stopped})"
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} of {world} was killed by {name} ({stopped})"
    return f"rank {rank} of {world} exited with code {exitcode} ({stopped})"
