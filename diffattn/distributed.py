"""Multi-process launches (``torchrun``, ``accelerate launch``): one place that knows them.

HeadHunter's search and DeContext's batch protection split work over processes with
``accelerate.PartialState``; both ask the same two questions, answered here:

- :func:`launched_processes`: how many processes this one runs among (1 for a plain run);
- :func:`distributed_state`: the ``PartialState`` of a launch: gloo on a machine without an
  accelerator (or with ``ACCELERATE_USE_CPU``), one accelerator per process otherwise.
"""
from __future__ import annotations

import datetime
import os

import torch

_WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun / MPI


def launched_processes() -> int:
    """How many processes this one runs among: the process group's size when one exists, else
    what the launcher's environment says (``torchrun`` and ``accelerate launch`` set
    ``WORLD_SIZE``; MPI launchers their own variable), else 1 (a plain ``python`` run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for name in _WORLD_SIZE_ENV:
        value = os.environ.get(name, "")
        if value.strip().isdigit() and int(value) > 1:
            return int(value)
    return 1


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launcher's environment (``RANK``); True alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def distributed_state(timeout: datetime.timedelta | None = None):
    """The ``accelerate.PartialState`` of this process: a CPU state on gloo under a launch on a
    machine without an accelerator (or with ``ACCELERATE_USE_CPU``), one device per process
    otherwise (``state.device``). ``timeout``: how long the process group waits at a barrier
    (``None``: torch's default; a group that exists already keeps its own)."""
    from accelerate import PartialState

    has_accelerator = torch.cuda.is_available()
    if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "is_available"):
        has_accelerator = has_accelerator or torch.accelerator.is_available()
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not has_accelerator
    return PartialState(cpu=cpu, **({"timeout": timeout} if timeout is not None else {}))
