"""ComfyUI nodes built from the control-node registry (``diffattn.workflow.CONTROL_NODES``).

Each node takes a ``MODEL``, clones the model patcher and installs its patch through
ComfyUI's own mechanisms (Comfy-Org/ComfyUI @ 82997188568abe525d2b961fa2d4feae8f98f843):

- attention on UNet sites: ``ModelPatcher.set_model_attn1_replace`` / ``set_model_attn2_replace``
  (``(block name, id, transformer index)`` keys); on DiT sites an
  ``optimized_attention_override`` in ``model_options["transformer_options"]`` that acts at
  the chosen ``(block_type, block_index)`` and hands every other call to ComfyUI's own
  attention;
- guidance terms (SoftPAG): ``ModelPatcher.set_model_sampler_post_cfg_function`` as
  ComfyUI's ``PerturbedAttentionGuidance`` does: the post-CFG function runs the perturbed
  pass with ``comfy.samplers.calc_cond_batch`` on ``model_options`` carrying the perturbed
  attention (``comfy.model_patcher.set_model_options_patch_replace``) and adds
  ``s·(cond - perturbed)``.

Nothing in ComfyUI is monkeypatched. Both node conventions come from one record: the classic
``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` / ``CATEGORY`` classes
(:data:`NODE_CLASS_MAPPINGS`) and V3 ``io.ComfyNode`` classes (:func:`v3_nodes`, built when
``comfy_api`` is importable). A new control node is a ``ControlNode`` record in
``diffattn.workflow`` (and, for a new kind of ComfyUI input such as a ``MASK``, one entry in
:data:`INPUT_KINDS`).
"""
from __future__ import annotations

from ..workflow import CONTROL_NODES, ControlNode

CATEGORY = "diffattn"
PREFIX = "Diffattn"  # node ids: DiffattnSoftPAG, DiffattnUniformAttention (no clash with ComfyUI's own nodes)

# Param type -> (classic ComfyUI type name, V3 io class name)
INPUT_KINDS = {float: ("FLOAT", "Float"), int: ("INT", "Int"), str: ("STRING", "String"), bool: ("BOOLEAN", "Boolean")}

# hooks a test (or a ComfyUI-less run) may replace; None: import ComfyUI's own function at use
calc_cond_batch = None
set_model_options_patch_replace = None


def _comfy_calc_cond_batch():
    if calc_cond_batch is not None:
        return calc_cond_batch
    import comfy.samplers

    return comfy.samplers.calc_cond_batch


def _comfy_patch_replace():
    if set_model_options_patch_replace is not None:
        return set_model_options_patch_replace
    import comfy.model_patcher

    return comfy.model_patcher.set_model_options_patch_replace


# ----------------------------------------------------------------------------- input specs


def input_spec(p) -> tuple:
    """The classic ComfyUI input tuple of a :class:`~diffattn.methods.registry.Param`."""
    opts = {"tooltip": p.help}
    if p.choices is not None:
        return (list(p.choices), {"default": p.default, **opts})
    kind = INPUT_KINDS[p.type][0]
    if p.default is not None:
        opts["default"] = p.default
    if p.type in (int, float):
        lo, hi = p.range or (None, None)
        opts["min"] = lo if lo is not None else (0.0 if p.type is float else 0)
        opts["max"] = hi if hi is not None else (100.0 if p.type is float else 10_000)
        if p.type is float:
            opts["step"] = 0.01
    if p.type is str:
        opts.setdefault("default", "")
        opts["multiline"] = False
    return (kind, opts)


def input_types(node: ControlNode) -> dict:
    return {"required": {"model": ("MODEL",), **{p.name: input_spec(p) for p in node.params}}}


# ----------------------------------------------------------------------------- patching


def _diffusion_model(model):
    get = getattr(model, "get_model_object", None)
    if get is not None:
        return get("diffusion_model")
    return model.model.diffusion_model


def build_engine(node: ControlNode, model, values: dict):
    """The control of ``node`` with ``values`` on the sites of ComfyUI ``model``, resolved
    (:class:`~diffattn.comfy.adapter.ComfyEngine`)."""
    from .adapter import ComfyEngine, comfy_selector, comfy_sites

    csites = comfy_sites(_diffusion_model(model))
    values = dict(values)
    for key in ("heads", "sites"):
        if isinstance(values.get(key), str):
            values[key] = comfy_selector(values[key])
    control = node.build([c.site for c in csites], translate=_preset_translator(csites, _diffusion_model(model)),
                         **values)
    return ComfyEngine(csites, [control]).attach(), control


DIT_BLOCKS = {  # diffusers DiT block list -> the ComfyUI block lists it may be, by model kind
    "transformer_blocks": ("joint_blocks", "double_blocks"),  # SD3 (MMDiT) / FLUX double-stream
    "single_transformer_blocks": ("single_blocks",),  # FLUX single-stream
}


def _preset_translator(csites, dm=None):
    """Preset site names (diffusers paths) -> ComfyUI site names.

    UNet presets by the standard UNet layout both share: diffusers ``down_blocks.L.attentions.A``
    is ComfyUI input block ``1 + sum_{l<L}(res_l + 1) + A``, ``up_blocks.L.attentions.A``
    output block ``sum_{l<L}(res'_l + 1) + A`` (``res``: ComfyUI's ``num_res_blocks`` per
    level), and ``mid_block.attentions.0`` the middle block. DiT presets by block index:
    ``transformer_blocks.i.attn`` is ComfyUI's ``joint_blocks.i`` on SD3 and
    ``double_blocks.i`` on FLUX (whichever the model has), ``single_transformer_blocks.i.attn``
    FLUX's ``single_blocks.i``. ComfyUI names pass unchanged."""
    names = {c.site.name for c in csites}
    res = list(getattr(dm, "num_res_blocks", None) or [])

    def translate(name: str):
        if name in names:
            return name
        comps = name.split(".")
        if len(comps) >= 2 and comps[0] in DIT_BLOCKS and comps[1].isdigit() and comps[2:] in ([], ["attn"]):
            for block in DIT_BLOCKS[comps[0]]:
                if f"{block}.{comps[1]}" in names:
                    return f"{block}.{comps[1]}"
            return None
        if not ("attentions" in comps and "transformer_blocks" in comps and res):
            return None
        a = int(comps[comps.index("attentions") + 1])
        tail = ".transformer_blocks." + ".".join(comps[comps.index("transformer_blocks") + 1:])
        if comps[0] == "down_blocks":
            level = int(comps[1])
            prefix = f"input_blocks.{1 + sum(r + 1 for r in res[:level]) + a}."
        elif comps[0] == "up_blocks":
            level = int(comps[1])
            prefix = f"output_blocks.{sum(r + 1 for r in res[::-1][:level]) + a}."
        elif comps[0] == "mid_block":
            prefix = "middle_block."
        else:
            return None
        for n in names:
            if n.startswith(prefix) and n.endswith(tail):
                return n
        return None

    return translate


def _refuse_on_dit(node: ControlNode, control, dit) -> None:
    """What ComfyUI's DiT attention call cannot serve: it carries no text length, so a joint
    call cannot be split into its text and image tokens. A control that needs that split
    (UniformAttention's segment-uniform maps, SoftPAG's ``semantics`` ``image`` /
    ``image-self``) is refused rather than silently acting on the whole joint sequence."""
    from ..errors import ControlError

    if not dit:
        return
    where = f"the ComfyUI DiT site(s) {', '.join(c.site.name for c in dit[:3])}{'...' if len(dit) > 3 else ''}"
    if node.name == "UniformAttention":
        raise ControlError(f"UniformAttention on {where} needs the text length of each joint call, which ComfyUI's "
                           f"attention call does not carry; use it on UNet models (cross attention) for now")
    semantics = getattr(control, "semantics", "joint")
    if semantics != "joint":
        raise ControlError(f"{node.name} semantics={semantics!r} on {where} needs the text/image split of each joint "
                           f"call, which ComfyUI's attention call does not carry; set semantics to 'joint' (the default) "
                           f"on DiT models")


def patch_model(node: ControlNode, model, **values):
    """Clone ``model`` (a ComfyUI ``ModelPatcher``) and install ``node``'s control. Returns the clone."""
    values = node.resolve(values, node.name)
    m = model.clone()
    engine, control = build_engine(node, m, values)
    active = engine.active_sites()
    _refuse_on_dit(node, control, [c for c in active if c.dit_key is not None])
    if node.guidance:
        _install_guidance(m, engine, control, active)
    else:
        _install_attention(m, engine, active, node)
    return m


def _install_attention(m, engine, active, node):
    from .adapter import attention_override, replace_patch

    unet = [c for c in active if c.patch_key is not None]
    dit = [c for c in active if c.dit_key is not None]
    for c in unet:
        setter = m.set_model_attn1_replace if c.attn == "attn1" else m.set_model_attn2_replace
        setter(replace_patch(engine, c), *c.patch_key)
    if dit:
        to = m.model_options.setdefault("transformer_options", {})
        to["optimized_attention_override"] = attention_override(engine, previous=to.get("optimized_attention_override"))


def _install_guidance(m, engine, control, active):
    from ..controls import StepState
    from .adapter import attention_override, replace_patch

    scale = control.guidance_scale(StepState())
    unet = [c for c in active if c.patch_key is not None]
    dit = [c for c in active if c.dit_key is not None]
    patches = [(replace_patch(engine, c, branch="perturbed"), c) for c in unet]

    def post_cfg_function(args):
        cfg_result = args["denoised"]
        if scale == 0 or not active:
            return cfg_result
        model_options = args["model_options"].copy()
        set_replace = _comfy_patch_replace()
        for patch, c in patches:
            model_options = set_replace(model_options, patch, c.attn, *c.patch_key)
        if dit:
            to = dict(model_options.get("transformer_options", {}))
            to["optimized_attention_override"] = attention_override(engine, branch="perturbed",
                                                                    previous=to.get("optimized_attention_override"))
            model_options["transformer_options"] = to
        (perturbed,) = _comfy_calc_cond_batch()(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                 model_options)
        return cfg_result + (args["cond_denoised"] - perturbed) * scale

    m.set_model_sampler_post_cfg_function(post_cfg_function, disable_cfg1_optimization=True)


# ----------------------------------------------------------------------------- classic nodes


def classic_node(node: ControlNode) -> type:
    """A classic ComfyUI node class for ``node``."""

    def patch(self, model, **values):
        return (patch_model(node, model, **values),)

    return type(PREFIX + node.name, (), {
        "INPUT_TYPES": classmethod(lambda cls: input_types(node)),
        "RETURN_TYPES": ("MODEL",),
        "RETURN_NAMES": ("model",),
        "FUNCTION": "patch",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": node.summary,
        "patch": patch,
        "diffattn_node": node,
        "__doc__": f"{node.label}: {node.summary}",
    })


NODE_CLASS_MAPPINGS = {PREFIX + n.name: classic_node(n) for n in CONTROL_NODES.values()}
NODE_DISPLAY_NAME_MAPPINGS = {PREFIX + n.name: n.label for n in CONTROL_NODES.values()}


# ----------------------------------------------------------------------------- V3 nodes


def v3_inputs(io, node: ControlNode) -> list:
    """The V3 ``io`` inputs of ``node`` (``io.Model.Input("model")`` first)."""
    out = [io.Model.Input("model")]
    for p in node.params:
        if p.choices is not None:
            out.append(io.Combo.Input(p.name, options=list(p.choices), default=p.default, tooltip=p.help))
            continue
        spec = input_spec(p)[1]
        kw = {k: v for k, v in spec.items() if k in ("default", "min", "max", "step", "tooltip", "multiline")}
        out.append(getattr(io, INPUT_KINDS[p.type][1]).Input(p.name, **kw))
    return out


def v3_node(io, node: ControlNode) -> type:
    """A V3 ``io.ComfyNode`` subclass for ``node`` (``define_schema`` / ``execute``)."""

    def define_schema(cls):
        return io.Schema(node_id=PREFIX + node.name, display_name=node.label, category=CATEGORY,
                         description=node.summary, inputs=v3_inputs(io, node), outputs=[io.Model.Output()])

    def execute(cls, model, **values):
        return io.NodeOutput(patch_model(node, model, **values))

    return type(PREFIX + node.name, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "diffattn_node": node,
    })


def v3_nodes(io=None) -> list[type]:
    """The V3 node classes (``io``: ``comfy_api.latest.io``, imported when not given)."""
    if io is None:
        from comfy_api.latest import io
    return [v3_node(io, n) for n in CONTROL_NODES.values()]


def v3_extension(api=None):
    """A ``ComfyExtension`` listing the V3 nodes (``api``: the ``comfy_api.latest`` module)."""
    if api is None:
        import comfy_api.latest as api
    nodes = v3_nodes(api.io)

    class DiffattnExtension(api.ComfyExtension):
        async def get_node_list(self):
            return nodes

    return DiffattnExtension()


async def comfy_entrypoint():
    """The V3 entry point ComfyUI calls (needs ``comfy_api``)."""
    return v3_extension()
