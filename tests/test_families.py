"""The family registry and the pipeline adapters (diffattn.families): a toy family added
through the registry alone works end to end; every supported pipeline gets its adapter;
prompt groups of the per-forward context; per-run state under concurrency; callbacks."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import Attention

import diffattn as da
from diffattn.errors import UnsupportedModelError
from diffattn.families import Family, adapter_for, families, get_family, register_family, unregister_family
from diffattn.families.sd3 import LatentInfo
from diffattn.families.unet import UNetProcessor

# ----------------------------------------------------------------------------- a toy family


class ToyProcessor(UNetProcessor):
    """``PixArtTransformer2DModel`` (PixArt-α/Σ, a family diffattn does not ship) runs
    ``AttnProcessor2_0`` on diffusers ``Attention``, the computation the UNet processor
    mirrors: reuse it under a new family."""

    family = "toy-dit"


class ToyDiTFamily(Family):
    name = "toy-dit"
    description = "PixArtTransformer2DModel (a test-local family)"
    mirrored = ("AttnProcessor2_0",)
    processor = ToyProcessor

    def owns(self, model, module) -> bool:
        return isinstance(model, PixArtTransformer2DModel) and isinstance(module, Attention)

    def kind(self, module) -> str:
        return "cross" if module.is_cross_attention else "self"

    def forward_info(self, config, arguments, cache):
        return LatentInfo(tuple(arguments["hidden_states"].shape[-2:]), int(config.patch_size))


def _toy_dit():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                     caption_channels=16, use_additional_conditions=False)
    return model.eval()


def _toy_inputs(batch=1):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                timestep=torch.tensor([500] * batch),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


@pytest.fixture
def toy_family():
    family = register_family(ToyDiTFamily())
    yield family
    unregister_family(family.name)


def test_unknown_denoiser_is_refused_until_its_family_is_registered(toy_family):
    unregister_family(toy_family.name)
    with pytest.raises(UnsupportedModelError, match="no diffattn processor family"):
        da.sites(_toy_dit())
    register_family(toy_family)
    assert toy_family in families() and get_family("toy-dit") is toy_family
    with pytest.raises(UnsupportedModelError, match="registered already"):
        register_family(ToyDiTFamily())


def test_toy_family_end_to_end(toy_family):
    """Registered through the registry alone (no edit of any diffattn file): sites, the swap at
    zero strength equals stock, a perturbation guidance control changes the output exactly as
    the hand-computed cond + s·(cond − perturbed), and detach restores the model bit for bit."""
    model = _toy_dit()
    sites = da.sites(model)
    assert {s.family for s in sites} == {"toy-dit"} and {s.kind for s in sites} == {"self", "cross"}
    inputs = _toy_inputs()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with da.attach(model, da.SoftPAG("all", strength=0.0, scale=0.0)) as handle:
            assert all(isinstance(p, ToyProcessor) for p in model.attn_processors.values())
            same = model(**inputs)[0]
            assert handle.context is None
        torch.testing.assert_close(same, stock, rtol=0, atol=1e-6)

        with da.attach(model, da.SoftPAG("all", strength=1.0, scale=2.0, target="identity")):
            guided = model(**inputs)[0]
        with da.attach(model, da.SoftPAG("all", strength=1.0, scale=0.0, target="identity")) as h, \
                h.branches({"perturbed": slice(0, 1)}):
            perturbed = model(**inputs)[0]
        torch.testing.assert_close(guided, stock + 2.0 * (stock - perturbed), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided, stock)
        assert torch.equal(model(**inputs)[0], stock)
    assert not any(isinstance(p, ToyProcessor) for p in model.attn_processors.values())


def test_toy_family_per_forward_record_reaches_the_layout(toy_family):
    """The family's forward_info is what the processor's layout reads (the patch grid)."""
    model = _toy_dit()
    seen = []

    class Look(da.Control):
        def edit_spec(self, call):
            if call.site.kind == "self":
                seen.append((call.context.family, call.context.info.patch, call.layout.q("image").shape))

    with torch.no_grad(), da.attach(model, Look(sites="self")):
        model(**_toy_inputs())
    assert seen and all(s == ("toy-dit", 2, (4, 4)) for s in seen)


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("family,adapter", [("sd15", "sd"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux")])
def test_every_supported_pipeline_gets_its_adapter(tiny_pipe, family, adapter):
    pipe = tiny_pipe(family)
    a = adapter_for(pipe)
    assert a.name == adapter and a.pipe is pipe and a.denoiser is (pipe.unet if adapter in ("sd", "sdxl")
                                                                  else pipe.transformer)
    h, w = a.native_size()
    assert h % a.size_unit == 0 and w % a.size_unit == 0
    cond, uncond = a.encode_prompt(["a cat"], cfg=not a.distilled)
    assert (uncond is None) == a.distilled and cond["encoder_hidden_states"].shape[0] == 1


def test_adapter_refuses_other_pipelines_naming_the_supported_ones(tiny_pipe):
    with pytest.raises(UnsupportedModelError, match="StableDiffusionPipeline.*FluxPipeline"):
        adapter_for(tiny_pipe("wan"), method="this loop")


def test_call_defaults_follow_a_subclass_declaration(tiny_pipe):
    """A pipeline subclass may declare ``default_call_kwargs`` (the testbed's do); the stock
    class's signature gives the rest."""
    from diffusers import StableDiffusionPipeline

    class Mine(StableDiffusionPipeline):
        default_call_kwargs = {"num_inference_steps": 7}

    pipe = tiny_pipe("sd15")
    mine = Mine(**pipe.components)
    assert adapter_for(mine).call_defaults()["num_inference_steps"] == 7
    assert adapter_for(pipe).call_defaults()["num_inference_steps"] == 50  # StableDiffusionPipeline's own


# ----------------------------------------------------------------------------- the context


def test_prompt_groups_and_block_hooks_read_the_context(tiny_pipe, tiny_inputs):
    """Two prompts × 2 images under CFG: the cond branch holds two groups of two rows; a block
    hook reads the same context through the public ``Control.context``."""
    pipe = tiny_pipe("sd3")
    seen = {}

    class Groups(da.Control):
        def block_hooks(self, model):
            from diffusers.hooks import ModelHook

            control = self

            class Hook(ModelHook):
                def new_forward(self, module, *args, **kwargs):
                    ctx = control.context
                    seen.setdefault("hook", (ctx.step.index, ctx.prompt_groups("cond")))
                    return self.fn_ref.original_forward(*args, **kwargs)

            return [("transformer_blocks.0", Hook())]

        def edit_spec(self, call):
            seen.setdefault("call", call.context.prompt_groups("cond"))
            seen.setdefault("uncond", call.context.prompt_groups("uncond"))

    kw = tiny_inputs("sd3")
    kw.update(prompt=["a cat", "a dog"], num_images_per_prompt=2)
    with da.attach(pipe, Groups()):
        pipe(**kw)
    assert seen["call"] == [[4, 5], [6, 7]]
    assert seen["hook"] == (0, [[4, 5], [6, 7]])
    assert len(seen["uncond"]) == 1  # the empty negative prompt: one group of four
    assert Groups().context is None


# ----------------------------------------------------------------------------- run state


def _testbed_pair():
    from diffattn import testbed

    return testbed.load("tiny-sd3"), testbed.load("tiny-sd3")


def test_two_threads_two_pipelines_equal_each_alone():
    """Two copies of the testbed model, different controls and different loops (the stock
    pipeline with SoftPAG; AStarPipeline with its own run state) at the same time in two
    threads give exactly what each gives alone."""
    from diffattn.pipelines import AStarPipeline

    first, second = _testbed_pair()
    prompt = "a red circle and a blue square"

    def softpag(pipe):
        with da.attach(pipe, da.SoftPAG({"transformer_blocks.2.attn": "all"}, strength=1.0, scale=2.0)):
            out = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np")
        return out.images

    def astar(pipe):
        out = AStarPipeline(pipe, temperature=1000.0)(prompt, ["circle", "square"], num_inference_steps=4,
                                                       generator=torch.Generator().manual_seed(5), output_type="np",
                                                       progress=False)
        return out.images

    alone = [softpag(first), astar(second)]
    results: dict[int, np.ndarray] = {}
    errors = []

    def work(i, fn, pipe):
        try:
            for _ in range(2):  # overlap both ways round
                results[i] = fn(pipe)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(0, softpag, first)),
               threading.Thread(target=work, args=(1, astar, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert np.array_equal(results[0], alone[0]) and np.array_equal(results[1], alone[1])
    assert not any(type(p).__module__.startswith("diffattn") for p in first.transformer.attn_processors.values())


def test_attaching_twice_keeps_its_clear_error(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with da.attach(pipe, da.SoftPAG("all", scale=1.0)):
        with pytest.raises(da.ControlError, match="already attached"):
            da.attach(pipe, da.SoftPAG("all", scale=1.0))


# ----------------------------------------------------------------------------- callbacks

KEYS = {"step", "timestep", "latents", "x0", "total", "stage"}


def _collector():
    calls = []
    return calls, calls.append


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_astar_callback_once_per_step(tiny_pipe, family):
    from diffattn.pipelines import AStarPipeline

    pipe = tiny_pipe(family)
    calls, cb = _collector()
    AStarPipeline(pipe)("a cat and a dog", ["cat", "dog"], num_inference_steps=3, height=32, width=32,
                        generator=torch.Generator().manual_seed(0), callback=cb, progress=False,
                        return_attention_maps=True, output_type="latent")
    assert [c["step"] for c in calls] == [0, 1, 2]
    assert all(KEYS <= set(c) and c["total"] == 3 and c["stage"] == "A-STAR" for c in calls)
    assert all(torch.is_tensor(c["latents"]) and len(c["attention_maps"]) == 1 for c in calls)


def _swap_pair(pipe):
    """A word swap of equal token counts under every tokenizer of the tiny pipeline."""
    from diffattn.pipelines.uam import check_word_swap, word_swap_tokenizers

    for a, b in (("a cat", "a dog"), ("a red cat", "a blue cat"), ("a cat", "a car"), ("a cat", "a hat"),
                 ("a red circle", "a blue circle"), ("a cat", "a bat"), ("one cat", "two cat")):
        try:
            check_word_swap(word_swap_tokenizers(pipe), a, b)
            return a, b
        except da.DiffattnError:
            continue
    pytest.fail("no word swap of equal token counts among the candidates")


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_uam_callbacks_once_per_step(tiny_pipe, family):
    from diffattn.pipelines import UAMPipeline

    pipe = tiny_pipe(family)
    uam = UAMPipeline(pipe, progress=False)
    size = uam.size_unit * -(-16 // uam.size_unit)  # ssim needs 11 pixels a side
    image = np.full((size, size, 3), 0.5, np.float32)
    calls, cb = _collector()
    uam.reconstruct(image, "a cat", "source", num_inference_steps=3, callback=cb)
    assert [(c["stage"], c["step"]) for c in calls] == [("invert (source)", i) for i in (2, 1, 0)] + \
        [("reconstruct (source)", i) for i in (0, 1, 2)]
    assert all(KEYS <= set(c) and c["total"] == 3 and c["x0"].shape == c["latents"].shape for c in calls)
    calls.clear()
    source, target = _swap_pair(pipe)
    uam.edit(image, source, target, num_inference_steps=3, callback=cb)
    edit = [c for c in calls if c["stage"] == "edit (uam)"]
    assert [c["step"] for c in edit] == [0, 1, 2] and all(c["latents"].shape[0] == 2 for c in edit)
