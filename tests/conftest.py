"""Shared fixtures: tiny offline pipelines of every family (diffattn.tiny).

- ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub: no test may reach the Hub.
- torch runs single-threaded (override with ``DIFFATTN_TEST_THREADS``): on the 2 shared, busy
  cores of the dev machine, 2 OpenMP threads made the tiny UNet ~100x slower than 1 thread.
- ``tiny_pipe(family, **kw)`` builds a tiny pipeline once per session and per (family, kw).
  The pipeline is shared: a test that attaches processors must detach them (use the handle as
  a context manager). Use ``tiny_fresh`` for a private copy.
- ``tiny_inputs(family, **overrides)`` gives call kwargs with a fresh seeded generator.
"""
from __future__ import annotations

import os
import sys

# The repository's top-level kernels/ folder installs as diffattn.kernels; with the repository
# root on sys.path (``python -m pytest``) it would shadow the PyPI package ``kernels`` that
# diffusers probes for. Tests import the installed package only.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DIFFATTN_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_pipe():
    """Factory: ``tiny_pipe("flux", num_layers=3)`` -> cached tiny pipeline (shared, do not mutate)."""
    from diffattn.tiny import tiny_pipeline

    cache: dict[str, object] = {}

    def get(family: str, **kw):
        key = family + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = tiny_pipeline(family, **kw)
        return cache[key]

    return get


@pytest.fixture
def tiny_fresh():
    """Factory: a newly built tiny pipeline, private to the test."""
    from diffattn.tiny import tiny_pipeline

    return tiny_pipeline


@pytest.fixture
def tiny_inputs():
    """Factory: ``tiny_inputs("sd3", size=32)`` -> kwargs for ``pipe(**kwargs)`` (2 steps, seeded)."""
    from diffattn.tiny import tiny_call_kwargs

    return tiny_call_kwargs
