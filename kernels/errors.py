"""The kernels' typed error (defined in :mod:`diffattn.errors`; re-exported as ``diffattn.kernels.KernelError``)."""
from diffattn.errors import KernelError  # noqa: F401
