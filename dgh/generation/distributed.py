"""Generation across processes with exact global statistics (``torch.distributed``; method.md section 1, last
paragraph: "shard the batches over workers and all-reduce the cached moment sums").

Small, pure helpers used by :func:`dgh.generation.engine.generate_images` when it runs in several processes
(``torchrun --nproc-per-node K -m dgh.cli generate ...``, or ``processes: K`` in params.yaml):

- :func:`shard`: the fixed, disjoint share of the B batches a rank owns (round robin: rank r owns r, r+K, ...).
- :func:`keyed_generator`: every random draw is keyed by ``(seed, what, iteration, global batch index)``, never by
  rank, so K processes and one process draw the same numbers (with ``schedule=synchronous``).
- :func:`pack_row` / :func:`unpack_row` and :func:`exchange_rows`: once per iteration every rank contributes one row
  per owned batch (its refreshed moments ``m_{l,b}``, ``s_{l,b}`` of every BN layer and the input, float32, plus the
  batch's loss terms and lr as float64 bit patterns) and one ``all_gather`` gives every rank the whole
  ``(B, row_width(channels))`` float32 table, so the moment cache is bit-identical on every rank. A gather copies bits (no floating-point reduction), so
  the global moments do not depend on K.
- :func:`gather_to_main`: per-batch objects (canvases, optimizer states) to rank 0 for a checkpoint or the result.
- :class:`World` / :func:`open_world`: the process group. gloo on CPU, NCCL on CUDA, plus a gloo group for Python
  objects; every collective has a timeout (``init_process_group(timeout=...)``, ``new_group(timeout=...)``,
  ``monitored_barrier(timeout=...)``).

Failures: a rank whose step raises sends a failure flag in its rows instead of moments; every rank then raises the
same one-line :class:`DistributedError` naming that rank. A rank that dies (killed, out of memory) leaves the
others' next collective to fail (peer connection closed) or time out after ``process_timeout_s``; that also ends as a
one-line :class:`DistributedError`, never a hang.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dgh.errors import first_line

N_TERMS = 4  # loss, bn, out, lr of one batch step, float64
_TERM_WIDTH = 2 * N_TERMS  # float64 values stored as pairs of float32 bit patterns
_OK, _PAD, _FAILED = 1.0, 0.0, -1.0


class DistributedError(ValueError):
    """A multi-process run cannot continue (a rank failed, died or timed out). The message is one line."""


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when absent or when a process group already exists: its size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def process_rank() -> int:
    """This process's global rank: the process group's, else ``RANK`` (torchrun), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def torchrun_command(processes: int, module: str, args: Sequence[str], python: str | None = None) -> list[str]:
    """The launch of ``python -m module *args`` in ``processes`` processes on this node:
    ``python -m torch.distributed.run --standalone --nproc-per-node K --local-ranks-filter 0 -m module *args``
    (``torchrun``; only rank 0's output reaches the console; a free port is chosen by the standalone rendezvous).

    Raises:
        ValueError: ``processes`` < 1.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "--local-ranks-filter=0", "-m", module, *map(str, args)]


def launch(processes: int, module: str, args: Sequence[str]) -> int:
    """Run :func:`torchrun_command` and wait; returns its exit status (0 = every process succeeded; a failed rank's
    one-line ``error:`` is on the console above torchrun's own summary)."""
    return subprocess.run(torchrun_command(processes, module, args), check=False).returncode


def shard(n_batches: int, rank: int, world_size: int) -> list[int]:
    """Global indices of the batches ``rank`` owns: ``[rank, rank + K, rank + 2K, ...] < n_batches``.

    Fixed for the whole run and disjoint across ranks; the union over ranks is ``range(n_batches)``.

    Raises:
        ValueError: ``rank`` is not in ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, n_batches, world_size))


def rows_per_rank(n_batches: int, world_size: int) -> int:
    """Rows every rank sends in one exchange: ``ceil(B / K)`` (ranks with fewer batches pad)."""
    return math.ceil(n_batches / world_size)


def keyed_seed(seed: int, *key: Any) -> int:
    """A 63-bit seed from ``seed`` and a key (e.g. ``("step", iteration, batch)``): BLAKE2b of their text form.

    Pure: the same arguments give the same seed in every process and on every machine.
    """
    text = ":".join(str(k) for k in (seed, *key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def keyed_generator(seed: int, *key: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`keyed_seed` ``(seed, *key)``."""
    return torch.Generator().manual_seed(keyed_seed(seed, *key))


def row_width(channels: Sequence[int]) -> int:
    """Floats in one packed row: ``2 * sum(C_l)`` moments plus ``2 * N_TERMS`` (float64 terms as float32 pairs)."""
    return 2 * sum(channels) + _TERM_WIDTH


def pack_row(means: Sequence[torch.Tensor], seconds: Sequence[torch.Tensor], terms: Sequence[float]) -> torch.Tensor:
    """One batch's row: ``cat(means) ++ cat(seconds) ++ terms`` as float32 ``(row_width,)``, on the moments' device.

    Args:
        means, seconds: per layer ``(C_l,)`` float32 moments, all on one device (the input pseudo-layer last, as
            in the engine's moment cache; the statistics files list it first).
        terms: ``N_TERMS`` python floats (loss, bn, out, lr), kept bit-exact as float64.

    Raises:
        ValueError: not ``N_TERMS`` terms.
    """
    dev = means[0].device
    t64 = torch.tensor(list(terms), dtype=torch.float64, device=dev)
    if t64.numel() != N_TERMS:
        raise ValueError(f"expected {N_TERMS} terms, got {t64.numel()}")
    parts = [m.detach().float().reshape(-1) for m in means] + [s.detach().float().reshape(-1) for s in seconds]
    return torch.cat(parts + [t64.view(torch.float32)])


def unpack_row(row: torch.Tensor, channels: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Inverse of :func:`pack_row`.

    Args:
        row: float32 ``(row_width(channels),)``.
        channels: ``C_l`` per layer, in cache order.

    Returns:
        ``(means, seconds, terms)``: per layer ``(C_l,)`` views into ``row``, and ``N_TERMS`` python floats.
    """
    out, at = [], 0
    for _ in range(2):
        group = []
        for c in channels:
            group.append(row[at : at + c])
            at += c
        out.append(group)
    terms = row[at : at + _TERM_WIDTH].contiguous().view(torch.float64).tolist()
    return out[0], out[1], terms


@dataclass
class World:
    """The processes of one run.

    Attributes:
        rank, size, local_rank: this process's global rank, the number of processes K, its rank on this node.
        group: the process group of the moment exchange (gloo on CPU, NCCL on CUDA); None when ``size == 1``.
        cpu_group: a gloo group for Python objects (checkpoint, result, error text); None when ``size == 1``.
        timeout_s: the limit of every collective.
        owned: whether :func:`open_world` created the groups (and destroys them on exit).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None
    cpu_group: Any = None
    timeout_s: float = 600.0
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """CUDA: one GPU per process (``cuda:LOCAL_RANK``, made current); CPU unchanged."""
        if device.type == "cuda" and self.size > 1:
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} present); start at most "
                    "as many processes per node as GPUs"
                )
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def _fail(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.size}: {what} failed or timed out after {self.timeout_s:g} s (another process "
            f"died, hung or raised): {first_line(exc, 200)}"
        )

    def barrier(self, what: str) -> None:
        """``monitored_barrier`` on the gloo group: names the ranks that did not arrive within the timeout."""
        if self.size == 1:
            return
        try:
            dist.monitored_barrier(group=self.cpu_group, timeout=timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as exc:
            raise self._fail(what, exc) from None


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def open_world(device: torch.device, timeout_s: float) -> Iterator[World]:
    """The run's :class:`World`.

    With ``WORLD_SIZE`` > 1 in the environment (``torchrun``) and no process group yet, creates one
    (``init_process_group(backend_for(device), timeout=timeout_s)``; env:// rendezvous) and destroys it on exit.
    With an existing group, uses it (its own timeout) and adds a gloo group for objects. Otherwise: one process.

    Raises:
        DistributedError: the rendezvous or the first barrier failed within the timeout.
    """
    size = world_size_from_env()
    if size <= 1:
        yield World(timeout_s=timeout_s)
        return
    owned = not dist.is_initialized()
    timeout = timedelta(seconds=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend_for(device), timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot join the process group of {size} processes within {timeout_s:g} s: "
                                   f"{first_line(exc, 200)}") from None
    group = dist.group.WORLD
    cpu_group = group if dist.get_backend(group) == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, group, cpu_group, timeout_s, owned)
    try:
        world.barrier("the start barrier")
        yield world
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_model(world: World, module: torch.nn.Module) -> None:
    """Every process must optimize against the same float model.

    Raises:
        DistributedError: the fingerprints (:func:`state_fingerprint`) differ, e.g. ``weights=random`` drawn
            separately in each process.
    """
    if world.size == 1:
        return
    prints = all_gather_objects(world, state_fingerprint(module))
    if len(set(prints)) > 1:
        raise DistributedError(
            f"the {world.size} processes loaded different model weights (fingerprints {', '.join(prints)}); random "
            "weights are drawn per process: save them to a file and pass that"
        )


def exchange_rows(
    world: World,
    rows: dict[int, torch.Tensor],
    n_batches: int,
    width: int,
    device: torch.device,
    failure: str | None = None,
) -> torch.Tensor:
    """All-gather every rank's rows into the full ``(B, width)`` float32 table (row b = batch b), on ``device``.

    Args:
        rows: this rank's rows ``{global batch index: (width,) float32}`` (its :func:`shard`; empty on failure).
        failure: this rank's one-line error, or None. Any rank's failure makes every rank raise.

    Raises:
        DistributedError: some rank reported a failure (the message names it), or the collective failed or timed
            out (a rank died).
    """
    if world.size == 1:
        if failure is not None:
            raise DistributedError(failure)
        return torch.stack([rows[b] for b in range(n_batches)]).to(device)
    per = rows_per_rank(n_batches, world.size)
    mine = torch.zeros(per, width + 1, dtype=torch.float32, device=device)
    if failure is not None:
        mine[:, -1] = _FAILED
    else:
        for j, b in enumerate(shard(n_batches, world.rank, world.size)):
            mine[j, :width] = rows[b].to(device)
            mine[j, -1] = _OK
    parts = [torch.empty_like(mine) for _ in range(world.size)]
    try:
        dist.all_gather(parts, mine, group=world.group)
    except RuntimeError as exc:
        raise world._fail("the moment all-gather", exc) from None
    failed = [r for r, p in enumerate(parts) if bool((p[:, -1] == _FAILED).any())]
    if failed:
        texts = all_gather_objects(world, failure)
        r = failed[0]
        raise DistributedError(f"rank {r}/{world.size} failed: {texts[r]}")
    table = torch.empty(n_batches, width, dtype=torch.float32, device=device)
    for r, p in enumerate(parts):
        for j, b in enumerate(shard(n_batches, r, world.size)):
            table[b] = p[j, :width]
    return table


def all_gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, CPU) on every rank, over the gloo group."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    try:
        dist.all_gather_object(out, obj, group=world.cpu_group)
    except RuntimeError as exc:
        raise world._fail("an object all-gather", exc) from None
    return out


def gather_to_main(world: World, obj: dict[int, Any]) -> dict[int, Any] | None:
    """Merge every rank's ``{global batch index: object}`` on rank 0 (CPU objects, gloo); None on other ranks."""
    if world.size == 1:
        return dict(obj)
    out: list[Any] | None = [None] * world.size if world.is_main else None
    try:
        dist.gather_object(obj, out, dst=0, group=world.cpu_group)
    except RuntimeError as exc:
        raise world._fail("the gather to rank 0", exc) from None
    if out is None:
        return None
    merged: dict[int, Any] = {}
    for part in out:
        merged.update(part)
    return merged


def moment_bytes_per_step(channels: Sequence[int], n_batches: int, bytes_per_float: int = 4) -> int:
    """Payload of one moment all-gather (scale on paper): ``B x 2 x sum(C_l)`` floats (mean and second moment per
    channel per BN layer), in bytes. Excludes the per-batch loss terms and the padding of uneven shares."""
    return n_batches * 2 * sum(channels) * bytes_per_float
