"""The built-in tabs, one module per method, each registering a :class:`~diffattn.app.core.TabSpec`
(``generic``: the tab of a registry method without one of its own)."""
from . import astar, headhunter, softpag, uam  # noqa: F401  (each calls register_tab)
