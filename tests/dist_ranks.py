"""Gloo process groups for the multi-process tests: :func:`spawn` runs a worker as every
rank of a group of CPU processes on this machine, as ``torchrun`` would start them.

A worker is a module-level function of a test module, ``worker(rank, *args)``. The
spawned processes import that module and this one by name: multiprocessing's spawn gives
them the parent's ``sys.path``, where pytest put ``tests/``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: how long a collective waits for the other ranks: a rank that hangs fails its test
#: (gloo's default, 30 minutes, would block the suite)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
#: how long the parent waits for the ranks to end before it kills them and fails
JOIN_TIMEOUT_S = 600.0


def spawn(worker: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes, each a rank of one gloo
    group (on a rendezvous file of its own: a job never meets an earlier one's), and wait
    for them. A worker that raises fails the call with its traceback (torch's
    ``ProcessRaisedException``)."""
    with tempfile.TemporaryDirectory(prefix="lurker-gloo-") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_rank, args=(world, store, worker, args), nprocs=world, join=False)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} ranks of {worker.__name__} did not end")


def _rank(rank: int, world: int, store: str, worker: Callable[..., None], args: tuple) -> None:
    """One rank: join the group, run the worker, leave the group, and exit at once."""
    torch.set_num_threads(1)  # the ranks share this machine's cores
    if sys.platform == "linux":  # every rank is on this machine, whatever its name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()
    # without the interpreter's teardown: gloo's threads, after a group that ended on an
    # error, can abort it ("terminate called without an active exception"), a race in gloo
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
