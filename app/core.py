"""The app's core: a registry of tabs and the Blocks builder that reads it.

A tab is a :class:`TabSpec`: its name (the tab id and the prefix of its API endpoints), its
label, the registry methods it covers and ``build(ctx)``, which lays out its components inside
the open ``gr.Tab`` and wires its events (each with an ``api_name``). The built-in tabs live in
``app/tabs/`` (one module per method, each calling :func:`register_tab`); a method registered in
:mod:`diffattn.methods.registry` without a tab of its own gets a generic tab built from its
:class:`~diffattn.methods.registry.Param` list (``app/tabs/generic.py``). Adding a method's tab
is registering a TabSpec, never editing this file::

    from diffattn.app.core import TabSpec, register_tab
    register_tab(TabSpec("mymethod", "My method", build=my_build, methods=("mymethod",)))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .serving import Limits, PipelinePool


@dataclass(frozen=True)
class TabSpec:
    """One tab. ``build(ctx: AppContext)`` is called inside ``with gr.Tab(...)``."""

    name: str
    label: str
    build: Callable
    methods: tuple = ()        # registry method names this tab covers (no generic tab for them)
    endpoints: tuple = ()      # the api_names it registers (documentation, tests)
    order: int = 100


_TABS: dict[str, TabSpec] = {}


def register_tab(spec: TabSpec, *, replace: bool = False) -> TabSpec:
    if spec.name in _TABS and _TABS[spec.name] != spec and not replace:
        raise ValueError(f"tab {spec.name!r} is registered already; pass replace=True to override it")
    _TABS[spec.name] = spec
    return spec


def tabs() -> list[TabSpec]:
    """The registered tabs (the built-in ones imported first), by order then name."""
    from . import tabs as _builtin  # noqa: F401  (registers the built-in tabs)

    return sorted(_TABS.values(), key=lambda s: (s.order, s.name))


@dataclass
class AppContext:
    """What every tab's builder and functions share."""

    pool: PipelinePool
    limits: Limits = field(default_factory=Limits)
    default_model: str = "tiny-sd3"
    models: tuple = ("tiny-sd3", "tiny-sd")  # the model picker's choices (any other name may be typed)
    lock_models: bool = False                # only ``models`` may be loaded (the pool's ``allowed`` enforces it;
                                             # ``diffattn app`` locks by default off loopback)

    def model_picker(self, default: str | None = None):
        import gradio as gr

        choices = list(dict.fromkeys([default or self.default_model, *self.models]))
        info = ("one of this server's models (--models)" if self.lock_models
                else "a testbed model, a local diffusers folder or a Hub id")
        return gr.Dropdown(choices, value=choices[0], label="model", allow_custom_value=not self.lock_models,
                           info=info)


def all_tabs() -> list[TabSpec]:
    """The registered tabs plus a generic tab for each registry method no tab covers."""
    from diffattn.methods.registry import methods

    from .tabs.generic import generic_tab

    specs = tabs()
    covered = {m for s in specs for m in s.methods}
    return specs + [generic_tab(m) for m in methods() if m.name not in covered]


def build_app(ctx: AppContext):
    """The ``gr.Blocks`` app: one tab per :class:`TabSpec`, queued (the pool's slots per model)."""
    import gradio as gr

    # delete_cache: Gradio's copies of uploads and results older than an hour go, checked hourly
    with gr.Blocks(title="diffattn", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## diffattn: attention control for diffusers\nEach tab shows the baseline beside the "
                    "controlled result of the same seed. Every button is also an API endpoint (see *Use via API*).")
        with gr.Tabs():
            for spec in all_tabs():
                with gr.Tab(spec.label, id=spec.name, elem_id=f"tab-{spec.name}"):
                    spec.build(ctx)
    # every event waits in one queue; a model's PipelinePool slots bound its concurrency, and
    # the queue's limit lets requests for two models (or two slots of one) run side by side
    demo.queue(max_size=64, default_concurrency_limit=max(2, 2 * ctx.pool.slots))
    return demo
