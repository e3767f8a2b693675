"""The Gradio app (diffattn.app) through ``gradio_client``, against a real server launched here
on a free local port: every endpoint returns images of the right size on the testbed models,
invalid input comes back as the library's (or the limit's) one-line message, two concurrent
requests equal their runs alone, and the server binds 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

PROMPT = "a red circle left of a blue square"
STEPS = 4
SIZE = (64, 64)  # both testbed models' native size


@pytest.fixture(scope="module")
def server():
    """The app on a free port, two pipeline copies per model, tight upload limits."""
    from diffattn.app.core import AppContext
    from diffattn.app.launcher import launch
    from diffattn.app.serving import Limits, PipelinePool

    ctx = AppContext(pool=PipelinePool(2), limits=Limits(max_upload_mb=0.05, max_side=256, max_steps=20, max_batch=2))
    demo, url = launch(ctx, port=0, block=False, quiet=True)
    client = gradio_client.Client(url, verbose=False)
    yield ctx, demo, url, client
    client.close() if hasattr(client, "close") else None
    demo.close()


def _softpag(client, seed=0, **kw):
    args = dict(model="tiny-sd3", prompt=PROMPT, seed=seed, randomize=False, steps=STEPS, guidance=None, images=1,
                heads="mid", preset=None, strength=1.0, scale=2.0, target="identity", semantics="joint",
                preset_values=True)
    args.update(kw)
    return client.predict(*args.values(), api_name="/softpag")


def _astar(client, seed=0, concepts=("circle", "square"), prompt=PROMPT, text_keys="auto", center_tokens=False):
    return client.predict("tiny-sd3", prompt, seed, False, STEPS, None, 1, list(concepts), "astar", None, text_keys,
                          center_tokens, api_name="/astar")


def _image(item) -> Image.Image:
    path = item["image"] if isinstance(item, dict) else item
    path = path["path"] if isinstance(path, dict) else path
    with Image.open(path) as im:
        return im.convert("RGB")


def _pixels(gallery) -> list[np.ndarray]:
    return [np.asarray(_image(x)) for x in gallery]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(Exception) as info:  # gradio_client.exceptions.AppError
        fn(*args, **kwargs)
    return str(info.value)


def test_every_tab_has_named_endpoints(server):
    from diffattn.app.core import all_tabs

    *_, client = server
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    expected = {"/" + e for spec in all_tabs() for e in spec.endpoints}
    assert {"/softpag", "/softpag_heads", "/headhunt", "/astar", "/uam_sample", "/uam_reconstruct", "/uam_edit"} <= expected
    assert expected <= set(api)


def test_softpag_endpoint(server):
    *_, client = server
    gallery, heatmap, info, seed = _softpag(client, images=2)
    assert [g["caption"] for g in gallery] == ["baseline", "SoftPAG s=2"] * 2
    assert all(_image(g).size == SIZE for g in gallery)
    assert seed == 0 and "SoftPAG" in info
    base, ctrl = _pixels(gallery)[:2]
    assert not np.array_equal(base, ctrl)  # the guidance changed the image
    assert Image.open(heatmap).size[0] > 0


def test_softpag_shipped_preset_and_heads_view(server):
    from diffattn.app.tabs.softpag import shipped_presets

    *_, client = server
    presets = shipped_presets()
    assert "preset:tiny-sd3-fidelity-nocfg" in presets
    gallery, *_ = _softpag(client, heads="preset:tiny-sd3-fidelity-nocfg", guidance=0)
    assert all(_image(g).size == SIZE for g in gallery)
    # a selector with heads: the heat map marks exactly those heads (6 layers x 4 heads on tiny-sd3)
    hm = client.predict("tiny-sd3", "transformer_blocks.2:0,3", None, 1.0, 2.0, "identity", "joint", True,
                        api_name="/softpag_heads")
    assert Image.open(hm).size[1] == 16 + 6 * 20


def test_softpag_bad_input_messages(server, tmp_path):
    *_, client = server
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "tiny-sd3", "heads": [["transformer_blocks.99.attn", 0, 1.0]], "scale": 2}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cases = [  # (inputs, what the one-line message says)
        ({"preset": gradio_client.handle_file(str(bad))}, "no attention site named 'transformer_blocks.99.attn'"),
        ({"preset": gradio_client.handle_file(str(broken))}, "not valid JSON"),
        ({"heads": "nonsense_blocks.3"}, "no site"),
        ({"heads": "preset:../../etc/passwd"}, "no shipped preset"),
        ({"steps": 21}, "limit of 20 steps"),
        ({"images": 3}, "limit of 2 images"),
        ({"target": "blur"}, "not in the list of choices"),  # the dropdown's choices: the registry's
        # a slider's own bounds: Gradio's one-line message
        ({"strength": 1.5, "heads": "all"}, "greater than maximum value 1"),
    ]
    for inputs, words in cases:
        msg = _error(_softpag, client, **inputs)
        assert words in msg, (inputs, msg)
        assert "Traceback" not in msg and "internal error" not in msg and "\n" not in msg.strip(), (inputs, msg)


def test_unknown_model_is_refused_clearly(server):
    *_, client = server
    msg = _error(_softpag, client, model="nobody/no-such-model")
    assert "nobody/no-such-model" in msg and ("offline" in msg.lower() or "cached" in msg)  # the loader's message
    assert "not a testbed model" in _error(_softpag, client, model="no such thing")


def test_astar_endpoint(server):
    *_, client = server
    gallery, maps, info, _ = _astar(client)
    assert [g["caption"] for g in gallery] == ["baseline", "A-STAR"]
    assert all(_image(g).size == SIZE for g in gallery)
    assert [m["caption"] for m in maps] == ["baseline: circle", "baseline: square", "A-STAR: circle", "A-STAR: square"]
    assert all(_image(m).size == SIZE for m in maps)
    words = client.predict("a green square below a purple heart", api_name="/astar_concepts")
    assert "square" in json.dumps(words) and "heart" in json.dumps(words)


def test_optional_numbers_empty_means_default(server):
    """Guidance and temperature left empty (as the browser sends them) take the defaults; text is refused."""
    *_, client = server
    empty = client.predict("tiny-sd3", PROMPT, 0, False, STEPS, "", 1, ["circle"], "astar", "", "auto", False,
                           api_name="/astar")
    given = client.predict("tiny-sd3", PROMPT, 0, False, STEPS, None, 1, ["circle"], "astar", None, "auto", False,
                           api_name="/astar")
    for a, b in zip(_pixels(empty[1]), _pixels(given[1])):
        np.testing.assert_array_equal(a, b)
    assert "temperature='hot': expected a number" in _error(
        client.predict, "tiny-sd3", PROMPT, 0, False, STEPS, "", 1, ["circle"], "astar", "hot", "auto", False,
        api_name="/astar")


def test_astar_concept_missing_from_prompt(server):
    *_, client = server
    msg = _error(_astar, client, concepts=("hexagon",))
    assert "concept 'hexagon' is not in the prompt" in msg  # the library's ConceptError, one line
    assert "\n" not in msg.strip()


def test_uam_endpoints(server):
    *_, client = server
    sample, caption = client.predict(3, api_name="/uam_sample")
    assert Image.open(sample).size == SIZE and caption
    gallery, mask, table, psnr = client.predict("tiny-sd", gradio_client.handle_file(sample), caption, STEPS,
                                                api_name="/uam_reconstruct")
    assert [g["caption"].split(" ·")[0] for g in gallery] == ["input", "source prompt", "empty prompt",
                                                              "uniform maps (UAM)"]
    assert all(_image(g).size == SIZE for g in gallery)
    assert set(psnr) == {"source", "empty", "uniform"} and all(v > 15 for v in psnr.values())
    assert "PSNR" in table
    words = caption.split()
    colour = words[1]
    target = caption.replace(colour, "green" if colour != "green" else "red", 1)
    gallery, mask, info, _ = client.predict("tiny-sd", gradio_client.handle_file(sample), caption, target, STEPS, None,
                                            "target", "code", 1000, 0.5, 1, api_name="/uam_edit")
    assert [g["caption"] for g in gallery] == ["input", "prompt-to-prompt", "p2p + UAM", "uniform branch"]
    assert all(_image(g).size == SIZE for g in gallery)
    assert Image.open(mask).size == SIZE


def test_uam_upload_limits(server, tmp_path):
    *_, client = server
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"  # ~190 KB of noise: over the fixture's 0.05 MB
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(big)
    msg = _error(client.predict, "tiny-sd", gradio_client.handle_file(str(big)), "", STEPS, api_name="/uam_reconstruct")
    assert "limit is 0.05 MB" in msg
    wide = tmp_path / "wide.png"  # small file, sides over the fixture's 256 px
    Image.new("RGB", (320, 64), "white").save(wide)
    msg = _error(client.predict, "tiny-sd", gradio_client.handle_file(str(wide)), "", STEPS, api_name="/uam_reconstruct")
    assert "sides up to 256 pixels" in msg
    odd = tmp_path / "odd.png"  # the library's own check: sides multiples of its unit
    Image.new("RGB", (70, 64), "white").save(odd)
    msg = _error(client.predict, "tiny-sd", gradio_client.handle_file(str(odd)), "a red circle", STEPS,
                 api_name="/uam_reconstruct")
    assert "multiples of 16 pixels" in msg
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    msg = _error(client.predict, "tiny-sd", gradio_client.handle_file(str(text)), "", STEPS,
                 api_name="/uam_reconstruct")
    assert msg == ("cannot read the upload as an image: it is no image format PIL can decode (PNG, JPEG, WebP...)"), msg
    assert not msg.startswith("internal error") and str(tmp_path) not in msg  # no server path either


def test_headhunt_endpoint(server):
    from diffattn.methods.softpag import SoftPAG

    *_, client = server
    heatmap, preset, info = client.predict("tiny-sd3", "fidelity", "a red circle and a blue square",
                                           "transformer_blocks.2", 2, 1, 1, 2.0, 0.5, STEPS, 0.0, api_name="/headhunt")
    assert Image.open(heatmap).size == (4 * 24, 6 * 24)  # layers x heads of tiny-sd3
    with open(preset) as f:
        data = json.load(f)
    assert data["model"] == "tiny-sd3" and len(data["heads"]) == 1 and data["heads"][0][2] == 0.5
    SoftPAG(data)  # the preset loads as SoftPAG heads
    assert "selected" in info
    msg = _error(client.predict, "tiny-sd3", "fidelity", "a red circle", "all", 9, 1, 1, 2.0, 1.0, STEPS, 0.0,
                 api_name="/headhunt")
    assert "limit of 8" in msg


def test_ir_tab_shows_its_own_panels_and_the_subject_masks(server):
    """/ir (the generic tab of a method with its own baseline): references | vanilla scene | IR
    scene in the gallery, each with its subject masks overlaid under it; two subjects come from
    one text field, one per line."""
    _, _, _, client = server
    gallery, maps, info, _ = client.predict("tiny-sd3", PROMPT, 0, False, STEPS, None, 1,
                                            "a striped red circle\na dotted blue square", "", True, True, True, 0.9,
                                            0.5, api_name="/ir")
    captions = [x.get("caption") if isinstance(x, dict) else None for x in gallery]
    assert captions == ["reference 1", "reference 2", "vanilla scene", "IR scene"]
    assert len(maps) == 4 and all(_image(x).size == SIZE for x in gallery + maps)
    magenta = [(np.asarray(_image(x)) == [255, 0, 255]).all(-1).any() for x in maps]
    assert magenta == [True, False, True, True]  # subject 1's mask: on its reference and on both scenes


def test_concurrent_requests_equal_their_runs_alone(server):
    """SoftPAG and A-STAR at the same time on the same model (two pipeline copies) give exactly
    what each gives alone: no control leaks from one request into the other."""
    ctx, _, _, client = server
    steps = 12  # long enough that the two runs overlap
    alone_pag = _pixels(client.predict(*_softpag_args(seed=5, steps=steps), api_name="/softpag")[0])
    astar_args = ["tiny-sd3", PROMPT, 5, False, steps, None, 1, ["circle", "square"], "astar", None, "auto", False]
    alone = client.predict(*astar_args, api_name="/astar")
    alone_astar, alone_maps = _pixels(alone[0]), _pixels(alone[1])
    model = ctx.pool.model("tiny-sd3")
    model.peak = 0
    for _ in range(2):
        jobs = [client.submit(*_softpag_args(seed=5, steps=steps), api_name="/softpag"),
                client.submit(*astar_args, api_name="/astar")]
        pag, astar = [j.result(timeout=120) for j in jobs]
        for a, b in zip(_pixels(pag[0]), alone_pag):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(_pixels(astar[0]), alone_astar):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(_pixels(astar[1]), alone_maps):
            np.testing.assert_array_equal(a, b)
    assert model.peak == 2  # the two requests did run at the same time, on the two copies


def _softpag_args(seed=0, steps=STEPS):
    return ["tiny-sd3", PROMPT, seed, False, steps, None, 1, "mid", None, 1.0, 2.0, "identity", "joint", True]


def test_pool_gives_each_concurrent_request_its_own_copy():
    """Two threads holding slots of one model hold different pipeline objects; a third waits."""
    from diffattn.app.serving import PipelinePool

    pool = PipelinePool(2, loader=lambda name: {"name": name, "weights": [1, 2, 3]})
    ex = ThreadPoolExecutor(1)

    def third():
        with pool.acquire("m") as c:
            return c

    try:
        with pool.acquire("m") as a, pool.acquire("m") as b:
            assert a is not b and a == b
            waiting = ex.submit(third)
            time.sleep(0.2)
            assert not waiting.done()  # both copies are lent: the third request waits
        assert waiting.result(timeout=5) in (a, b)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_tab_registry_takes_a_new_method_without_core_edits():
    """A registry method without a tab gets a generic one; a TabSpec adds a tab and its endpoint."""
    from diffattn.app import core
    from diffattn.app.serving import PipelinePool
    from diffattn.app.tabs.generic import generic_tab
    from diffattn.methods.registry import Method, Param

    fake = Method(name="fakemethod", label="Fake", summary="a test method", kind="control",
                  params=(Param("amount", float, 0.5, "how much", range=(0.0, 1.0)),
                          Param("mode", str, "a", "which", choices=("a", "b"))))
    core.register_tab(generic_tab(fake))
    try:
        demo = core.build_app(core.AppContext(pool=PipelinePool(1)))
        names = {getattr(fn, "api_name", None) for fn in demo.fns.values()}
        assert {"fakemethod", "softpag", "astar", "uam_edit", "headhunt"} <= names
    finally:
        core._TABS.pop("fakemethod")


def _endpoint_params(client, name: str) -> dict:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    return {p["parameter_name"]: p for p in api["/" + name]["parameters"]}


@pytest.mark.parametrize("method_name,endpoint_name", [("softpag", "softpag"), ("astar", "astar")])
def test_every_registry_param_is_an_input_of_its_tab(server, method_name, endpoint_name):
    """The tab's endpoint takes every Param of the method's registry record, with its choices."""
    from diffattn.methods.registry import get_method

    *_, client = server
    inputs = _endpoint_params(client, endpoint_name)
    method = get_method(method_name)
    missing = [p.name for p in method.params if p.name not in inputs]
    assert not missing, f"/{endpoint_name} lacks the registry params {missing}; its inputs: {list(inputs)}"
    for p in method.params:
        if p.choices is not None:  # a dropdown / radio of exactly the registry's choices
            shown = json.dumps(inputs[p.name]["type"])
            assert all(json.dumps(c) in shown for c in p.choices), (p.name, shown)
        if p.default is not None and inputs[p.name].get("parameter_has_default"):
            assert inputs[p.name]["parameter_default"] == p.default, (p.name, inputs[p.name])


def test_astar_text_keys_and_center_tokens_reach_the_method(server):
    *_, client = server
    plain = _pixels(_astar(client)[0])
    centred = _pixels(_astar(client, center_tokens=True)[0])
    assert np.array_equal(plain[0], centred[0])  # the baseline does not update latents
    assert not np.array_equal(plain[1], centred[1])  # centring changes A-STAR's loss, so its image
    msg = _error(_astar, client, text_keys="bert")
    assert "not in the list of choices" in msg and "Traceback" not in msg


def test_generic_tab_runs_a_registered_method():
    """A method registered without a tab of its own is served by the generic tab: ``/<name>``
    returns baseline | method pixel-equal to the pipeline and ``method.build(...)`` run directly."""
    import torch

    from diffattn import testbed
    from diffattn.app.core import AppContext, all_tabs
    from diffattn.app.launcher import launch
    from diffattn.app.serving import PipelinePool
    from diffattn.methods import registry

    name = "softpag_generic_test"
    base = registry.get_method("softpag")
    method = registry.register_method(
        registry.Method(name=name, label="SoftPAG (generic)", summary="SoftPAG through the generic tab",
                        kind=base.kind, params=base.params, factory=base.factory), replace=True)
    demo = None
    try:
        spec = {s.name: s for s in all_tabs()}[name]
        assert spec.endpoints == (name,)
        demo, url = launch(AppContext(pool=PipelinePool(1)), port=0, block=False, quiet=True)
        client = gradio_client.Client(url, verbose=False)
        inputs = _endpoint_params(client, name)
        assert [p.name for p in method.params] == list(inputs)[7:]  # the standard inputs, then the Params
        values = {"heads": "mid", "scale": "3", "strength": 0.5, "target": "identity", "semantics": "joint"}
        gallery, maps, info, seed = client.predict("tiny-sd3", PROMPT, 7, False, STEPS, "", 1,
                                                   *[values[p.name] for p in method.params], api_name="/" + name)
        assert seed == 7 and [g["caption"] for g in gallery] == ["baseline", "softpag s=3 u=0.5"], gallery
        served = _pixels(gallery)

        pipe = testbed.load("tiny-sd3")
        pipe.set_progress_bar_config(disable=True)
        direct_base = pipe(PROMPT, generator=torch.Generator().manual_seed(7), num_inference_steps=STEPS).images[0]
        run = method.build(pipe, heads="mid", scale=3.0, strength=0.5, target="identity", semantics="joint")
        direct = run(PROMPT, generator=torch.Generator().manual_seed(7), num_inference_steps=STEPS).images[0]
        np.testing.assert_array_equal(served[0], np.asarray(direct_base.convert("RGB")))
        np.testing.assert_array_equal(served[1], np.asarray(direct.convert("RGB")))
        assert not np.array_equal(served[0], served[1])  # the method did something
        # the registry's checks reach the generic tab's caller as one line
        msg = _error(client.predict, "tiny-sd3", PROMPT, 7, False, STEPS, "", 1,
                     *[{**values, "scale": "-1"}[p.name] for p in method.params], api_name="/" + name)
        assert "scale=-1.0: must lie in [0.0, ]" in msg and not msg.startswith("internal error"), msg
    finally:
        registry._METHODS.pop(name, None)
        if demo is not None:
            demo.close()
    assert name not in {s.name for s in all_tabs()}


# ----------------------------------------------------------------------------- model lock, model cap, limits


def _args(*argv):
    from diffattn.cli import build_parser

    return build_parser().parse_args(["app", *argv])


def test_models_are_locked_off_loopback():
    """Off loopback (or with --share) only --models and the default may load; 127.0.0.1 keeps any name."""
    from diffattn.app.launcher import make_context
    from diffattn.errors import DiffattnError, ModelLoadError

    loaded = []
    for argv, lock in [((), False), (("--host", "localhost"), False), (("--host", "0.0.0.0"), True),
                       (("--host", "192.168.1.5"), True), (("--share",), True),
                       (("--host", "0.0.0.0", "--no-lock-models"), False), (("--lock-models",), True)]:
        ctx = make_context(_args(*argv, "--models", "tiny-sd"))
        assert ctx.lock_models is lock, argv
        assert ctx.pool.allowed == (("tiny-sd3", "tiny-sd") if lock else None), argv
    ctx = make_context(_args("--host", "0.0.0.0", "--model", "tiny-sd", "--models", "tiny-sd3"))
    ctx.pool.loader = lambda name: loaded.append(name) or {"name": name}
    with ctx.pool.acquire("tiny-sd3") as pipe:  # a listed model and the default load
        assert pipe == {"name": "tiny-sd3"}
    ctx.pool.model("tiny-sd")
    with pytest.raises(ModelLoadError) as e:
        ctx.pool.model("someone/any-model")
    assert isinstance(e.value, DiffattnError)
    assert str(e.value) == ("model 'someone/any-model' is not served here: this server loads only its listed models "
                            "(tiny-sd, tiny-sd3; set with --models, the default with --model)")
    assert loaded == ["tiny-sd3", "tiny-sd"]  # the refused name never reached the loader
    open_ctx = make_context(_args())
    open_ctx.pool.loader = lambda name: {"name": name}
    assert open_ctx.pool.model("someone/any-model").copies == [{"name": "someone/any-model"}]


def test_locked_model_picker_takes_no_custom_name():
    from diffattn.app.core import AppContext
    from diffattn.app.serving import PipelinePool

    ctx = AppContext(pool=PipelinePool(1, allowed=("tiny-sd3",)), models=("tiny-sd3",), lock_models=True)
    with __import__("gradio").Blocks():
        picker = ctx.model_picker()
    assert picker.allow_custom_value is False and picker.choices == [("tiny-sd3", "tiny-sd3")]


def test_pool_caps_the_models_it_holds():
    """max_models: loading one more evicts the least recently used idle model; a model in use is
    never evicted (all in use: the request is refused); a failed load evicts nothing."""
    from diffattn.app.serving import AppLimitError, PipelinePool
    from diffattn.errors import ModelLoadError

    def loader(name):
        if name == "broken":
            raise ModelLoadError("cannot load model 'broken'")
        return {"name": name}

    pool = PipelinePool(1, loader=loader, max_models=2)
    pool.model("a")
    pool.model("b")
    with pool.acquire("a"):  # a: the most recently used now
        pass
    pool.model("c")
    assert pool.loaded() == ["a", "c"] and pool.evicted == ["b"]
    with pytest.raises(ModelLoadError):
        pool.model("broken")
    assert pool.loaded() == ["a", "c"]  # a failed load evicted nothing
    with pool.acquire("a"), pool.acquire("c"):
        with pytest.raises(AppLimitError) as e:
            pool.model("d")  # both held by requests: nothing can go
        assert "holds 2 model(s) at once and all are in use" in str(e.value) and "--max-models" in str(e.value)
    with pool.acquire("c"):
        pool.model("d")  # a is idle: it goes, c (in use) stays
    assert pool.loaded() == ["c", "d"] and pool.evicted == ["b", "a"]
    for _ in range(10):  # requests naming model after model never hold more than the cap
        for name in ("x", "y", "z"):
            with pool.acquire(name):
                assert len(pool.loaded()) <= 2


def test_limits_refuse_non_integers_and_bad_settings():
    from diffattn.app.serving import AppInputError, Limits
    from diffattn.errors import DiffattnError, LimitError, UsageError

    lim = Limits(max_steps=20, max_batch=2)
    assert lim.steps(3) == 3 and lim.steps(3.0) == 3 and lim.steps("3") == 3 and lim.steps("") is None
    for bad in (2.7, "2.7", "two", True):
        with pytest.raises(AppInputError, match="expected a whole number"):
            lim.steps(bad)
    with pytest.raises(AppInputError, match="expected a whole number"):
        lim.batch(1.5)
    with pytest.raises(AppInputError, match="expected a whole number"):
        lim.count(2.7, 8, "rounds")
    with pytest.raises(LimitError, match="--max-steps"):
        lim.steps(21)
    assert issubclass(AppInputError, DiffattnError)
    for kw in ({"max_upload_mb": float("nan")}, {"max_upload_mb": 0}, {"max_steps": 0}, {"max_side": 0},
               {"max_batch": -1}):
        with pytest.raises(UsageError):
            Limits(**kw)
    with pytest.raises(UsageError, match="--slots"):
        __import__("diffattn.app.serving", fromlist=["x"]).PipelinePool(0)


def test_pick_seed_refuses_fractions():
    from diffattn.app.serving import AppInputError
    from diffattn.app.widgets import pick_seed

    assert pick_seed(5, False) == 5 and pick_seed(5.0, False) == 5 and pick_seed(None, False) == 0
    with pytest.raises(AppInputError, match="seed=2.7: expected a whole number"):
        pick_seed(2.7, False)


def test_headhunt_presets_do_not_pile_up(tmp_path, monkeypatch):
    """Each search writes its preset to a file of its own; files older than the TTL are removed."""
    from diffattn.app.tabs import headhunter

    monkeypatch.setattr(headhunter, "_preset_dir", tmp_path)
    first = headhunter.write_preset({"heads": [1]})
    second = headhunter.write_preset({"heads": [2]})
    assert first != second and json.loads(first.read_text()) == {"heads": [1]}
    os.utime(first, (time.time() - 2 * headhunter.PRESET_TTL_S,) * 2)
    third = headhunter.write_preset({"heads": [3]})
    assert sorted(tmp_path.iterdir()) == sorted([second, third])


def test_no_pickle_in_the_app():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "app"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name in ("pickle", "dill", "cloudpickle") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("pickle", "dill", "cloudpickle"), path
            if isinstance(node, ast.Attribute) and node.attr == "load":
                assert getattr(node.value, "id", "") not in ("torch", "pickle"), path


# ----------------------------------------------------------------------------- binding and start-up


def test_cli_defaults_bind_localhost_without_share():
    from diffattn.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.share is False and args.slots == 1


def _outside_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_server_binds_localhost_unless_told(server):
    _, demo, url, _ = server
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    port = demo.server_port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to check the refusal on")
    with pytest.raises(OSError):
        socket.create_connection((outside, port), timeout=2).close()


def test_app_starts_in_a_few_seconds(tmp_path):
    """``python -m diffattn.app`` on the testbed model (preloaded) answers HTTP within seconds."""
    from diffattn.app.launcher import free_port

    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "diffattn.app", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        elapsed = None
        while time.perf_counter() - t0 < 90:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        elapsed = time.perf_counter() - t0
                        break
            except OSError:
                time.sleep(0.2)
        assert elapsed is not None, "the app did not answer within 90 s"
        print(f"\napp start-up (process start to first HTTP 200, tiny-sd3 preloaded): {elapsed:.1f} s")
        assert elapsed < 45  # a few seconds idle; generous on the shared 2-core box
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
