"""How many CPU threads torch uses in a ``cai`` command (``cai.cli.main`` applies the policy before any stage runs).

Nothing else sets torch's thread count, so by default torch starts one intra-op thread per core. On a small shared
machine that is the slow choice: on a 2-core VM with another busy process, ``cai sl-data`` on the tiny config took
64-74 s with torch's default of two threads and 4.6 s with one, because every matrix product waits for the thread
that shares its core with the other process. The policy, in order:

1. ``CAI_THREADS=N`` (N >= 1) wins: torch uses N threads, and ``OMP_NUM_THREADS`` is set to N for child processes.
2. Otherwise an explicit ``OMP_NUM_THREADS`` wins: torch already read it at import, and it is left as it is.
3. Otherwise, on a machine without CUDA (a CPU run), one thread: ``torch.set_num_threads(1)``, and
   ``OMP_NUM_THREADS=1`` (and ``TOKENIZERS_PARALLELISM=false``, unless set) in the environment, so that
   subprocesses and DDP/FSDP worker processes inherit it.
4. Otherwise (a GPU machine) torch's default is kept: the CPU only feeds the accelerator.

To give a CPU run more threads on a machine of your own, set ``CAI_THREADS`` (or ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os

from models.errors import UserError

ENV = "CAI_THREADS"
"""The variable that sets the number of torch threads of a ``cai`` command."""


def _positive_int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{name}={value!r}: must be a whole number of threads, at least 1")
    return n


def apply_thread_policy(cuda: bool | None = None) -> int:
    """Set torch's intra-op thread count by the policy above and return it.

    Args:
        cuda: Whether the run uses a GPU; None asks ``torch.cuda.is_available()``.

    Returns:
        The number of threads torch uses afterwards.
    """
    import torch

    if os.environ.get(ENV, "").strip():
        n = _positive_int(ENV, os.environ[ENV].strip())
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        pass  # the user's choice; torch read it when it started
    elif not (torch.cuda.is_available() if cuda is None else cuda):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(1)
    return torch.get_num_threads()
