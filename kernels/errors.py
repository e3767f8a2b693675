"""The kernels' typed error (re-exported as ``diffattn.kernels.KernelError``)."""
from __future__ import annotations

from diffattn.errors import DiffattnError


class KernelError(DiffattnError, ValueError):
    """Bad input to an attention kernel (shapes, dtypes, head dims, an impossible option).

    The message says what was wrong and what to pass instead.
    """
