"""diffattn's ComfyUI node pack.

Install (ComfyUI's own Python environment)::

    pip install -e /path/to/diffattn
    ln -s /path/to/diffattn/diffattn/comfy ComfyUI/custom_nodes/diffattn_nodes

ComfyUI imports this folder's ``__init__`` and reads :data:`NODE_CLASS_MAPPINGS` (the classic
node classes). With ``DIFFATTN_COMFY_V3=1`` in the environment and ``comfy_api`` importable
the pack exports only the V3 :func:`comfy_entrypoint` (ComfyUI reads the classic mappings
first when both are there). Importing this package needs neither ComfyUI nor torch at import
time beyond what ``diffattn.workflow`` needs; the attention code loads when a node runs.

Imports are absolute (``diffattn.comfy.nodes``) so the folder works under any name in
``custom_nodes``.
"""
import os as _os

from diffattn.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint


def _v3_only() -> bool:
    if _os.environ.get("DIFFATTN_COMFY_V3", "") not in ("1", "true", "yes"):
        return False
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


if _v3_only():
    del NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["comfy_entrypoint"]
else:
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
