"""sidpt's kernels: one file per op (``kernels/<op>.py``: the Triton kernel(s), a launcher, an
``autograd.Function`` and a float64 torch reference), and the one dispatch switch.

``backend(device)``:

    "triton"     compiled Triton, on a CUDA device with triton installed
    "interpret"  the same kernel code under Triton's interpreter on CPU tensors
                 (``TRITON_INTERPRET=1`` set before triton is imported: the tests, ``kernels.check``)
    "torch"      the torch path of each op (the same chunking, no Triton)

``SIDPT_KERNELS=torch`` forces the torch path everywhere (a kernel bug is then one variable away).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend(device: torch.device) -> str:
    """Which implementation runs an op's tensors on ``device`` (module docstring)."""
    if os.environ.get("SIDPT_KERNELS") == "torch" or not _triton_ok():
        return "torch"
    if device.type == "cuda":
        return "triton"
    return "interpret" if interpreting() else "torch"
