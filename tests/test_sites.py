"""Sites and selectors (diffattn.sites) on the tiny pipelines of every family."""
from __future__ import annotations

import pytest
import torch

from diffattn import tiny
from diffattn.errors import SelectorError, UnsupportedModelError
from diffattn.sites import (
    Site,
    describe,
    format_sites,
    match_alias,
    match_path,
    parse_ints,
    select,
    select_heads,
    sites,
    split_selector,
    summarize_names,
)

# family -> (number of sites, kinds in forward order counted, heads of each site)
EXPECTED = {
    "sd15": (14, {"self": 7, "cross": 7}, {2}),
    "sdxl": (22, {"self": 11, "cross": 11}, {2, 4}),
    "sd3": (2, {"joint": 2}, {2}),
    "sd35": (5, {"joint": 3, "self": 2}, {2}),
    "flux": (4, {"joint": 2, "single": 2}, {2}),
    "flux_kontext": (4, {"joint": 2, "single": 2}, {2}),
    "wan": (4, {"self": 2, "cross": 2}, {2}),
    "wan_i2v": (4, {"self": 2, "cross": 2}, {2}),
    "hunyuan_video": (4, {"joint": 2, "single": 2}, {2}),
}
SITE_FAMILY = {"sd15": "unet", "sdxl": "unet", "sd3": "sd3", "sd35": "sd3", "flux": "flux",
               "flux_kontext": "flux", "wan": "wan", "wan_i2v": "wan", "hunyuan_video": "hunyuan_video"}


def names(site_list):
    return [s.name for s in site_list]


# ----------------------------------------------------------------------------- enumeration


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sites_per_family(family, tiny_pipe):
    pipe = tiny_pipe(family)
    found = sites(pipe)
    count, kinds, heads = EXPECTED[family]
    assert len(found) == count
    assert {k: sum(s.kind == k for s in found) for k in kinds} == kinds
    assert {s.heads for s in found} == heads
    assert {s.family for s in found} == {SITE_FAMILY[family]}
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    # every site, once; HunyuanVideo's text-only token refiner (context_embedder.*) gets none
    keys = [k for k in model.attn_processors if not (family == "hunyuan_video" and k.startswith("context_embedder."))]
    assert sorted(s.processor_key for s in found) == sorted(keys)
    for s in found:
        assert s.module is model.get_submodule(s.local_name)
        assert s.head_dim * s.heads == s.module.to_q.out_features
        assert (s.alias is not None) == (s.family == "unet")
    # bare model: same sites, no denoiser attribute
    bare = sites(model)
    assert names(bare) == names(found) and {s.denoiser for s in bare} == {None}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sites_are_in_forward_order(family, tiny_pipe, tiny_inputs):
    """The order of sites() is the order in which a real forward pass calls the modules."""
    pipe = tiny_pipe(family)
    found = sites(pipe)
    calls = []
    hooks = [s.module.register_forward_pre_hook(lambda m, a, name=s.name: calls.append(name)) for s in found]
    try:
        pipe(**tiny_inputs(family, steps=1))
    finally:
        for h in hooks:
            h.remove()
    assert list(dict.fromkeys(calls)) == names(found)


def test_flux_kinds_and_blocks(tiny_pipe):
    found = sites(tiny_pipe("flux"))
    assert [(s.name, s.kind, s.block) for s in found] == [
        ("transformer_blocks.0.attn", "joint", 0),
        ("transformer_blocks.1.attn", "joint", 1),
        ("single_transformer_blocks.0.attn", "single", 0),
        ("single_transformer_blocks.1.attn", "single", 1),
    ]
    assert {s.head_dim for s in found} == {16}


def test_sd35_dual_attention_kinds(tiny_pipe):
    found = sites(tiny_pipe("sd35"))
    assert [(s.name, s.kind) for s in found] == [
        ("transformer_blocks.0.attn", "joint"),
        ("transformer_blocks.0.attn2", "self"),
        ("transformer_blocks.1.attn", "joint"),
        ("transformer_blocks.1.attn2", "self"),
        ("transformer_blocks.2.attn", "joint"),
    ]


def test_unet_blocks_and_aliases_sd15(tiny_pipe):
    found = sites(tiny_pipe("sd15"))
    self_sites = [s for s in found if s.kind == "self"]
    assert [s.alias for s in self_sites] == ["d0.0", "d1.0", "m0.0", "u0.0", "u1.0", "u2.0", "u3.0"]
    assert [s.block for s in self_sites] == list(range(7))
    assert [s.head_dim for s in self_sites] == [4, 8, 8, 8, 8, 4, 4]  # channels (8, 16, 16) / 2 heads


def test_unet_aliases_follow_comfyui_numbering(tiny_fresh):
    """d/m/u count attention-bearing ComfyUI blocks (= diffusers .attentions.A modules) per part;
    the second number is the transformer index inside (pamparamm's parse_unet_blocks)."""
    pipe = tiny_fresh("sd15", layers_per_block=2)  # SD1.5's real layout: 2 per down level, 3 per up level
    by_alias = {s.alias: s.name.rsplit(".", 1)[0] for s in sites(pipe)}
    assert by_alias["d0.0"] == "down_blocks.0.attentions.0.transformer_blocks.0"
    assert by_alias["d1.0"] == "down_blocks.0.attentions.1.transformer_blocks.0"
    assert by_alias["d2.0"] == "down_blocks.1.attentions.0.transformer_blocks.0"
    assert by_alias["m0.0"] == "mid_block.attentions.0.transformer_blocks.0"
    assert by_alias["u0.0"] == "up_blocks.1.attentions.0.transformer_blocks.0"
    assert by_alias["u5.0"] == "up_blocks.2.attentions.2.transformer_blocks.0"
    assert len(by_alias) == 4 + 1 + 6


def test_sdxl_aliases_have_transformer_index(tiny_pipe):
    found = sites(tiny_pipe("sdxl"))
    assert [s.alias for s in found if s.kind == "self"] == [
        "d0.0", "d1.0", "d1.1", "m0.0", "m0.1", "u0.0", "u0.1", "u1.0", "u1.1", "u2.0", "u3.0"]
    assert {s.heads for s in select(found, "d1")} == {4} and {s.heads for s in select(found, "d0")} == {2}


def test_wan_two_experts_prefix(tiny_fresh):
    pipe = tiny_fresh("wan", two_experts=True)
    found = sites(pipe)
    assert len(found) == 8
    second = [s for s in found if s.denoiser == "transformer_2"]
    assert names(second) == ["transformer_2.blocks.0.attn1", "transformer_2.blocks.0.attn2",
                             "transformer_2.blocks.1.attn1", "transformer_2.blocks.1.attn2"]
    assert [s.local_name for s in second[:1]] == ["blocks.0.attn1"]
    assert second[0].module is pipe.transformer_2.blocks[0].attn1
    assert names(select(pipe, "blocks.1")) == ["blocks.1.attn1", "blocks.1.attn2"]  # first expert only
    assert names(select(pipe, "transformer_2.blocks.1.attn2")) == ["transformer_2.blocks.1.attn2"]
    assert len(select(pipe, "cross")) == 4


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="Linear.*SD3Transformer2DModel"):
        sites(torch.nn.Linear(2, 2))
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8,
                                      cross_attention_dim=16, caption_channels=16, norm_num_groups=1)
    with pytest.raises(UnsupportedModelError, match="PixArtTransformer2DModel.*FluxTransformer2DModel"):
        sites(pixart)


# ----------------------------------------------------------------------------- pure matchers


def test_parse_ints():
    assert parse_ints("3") == [3]
    assert parse_ints("2-4") == [2, 3, 4]
    assert parse_ints("0,3") == [0, 3]
    assert parse_ints("0-2,5,4") == [0, 1, 2, 4, 5]
    assert parse_ints("attn") is None and parse_ints("1-") is None and parse_ints("-1") is None
    with pytest.raises(SelectorError, match="empty"):
        parse_ints("4-2")


def test_match_path_strict_integers():
    assert match_path("blocks.1", "blocks.1.attn1")
    assert not match_path("blocks.1", "blocks.10.attn1")
    assert not match_path("blocks.1", "blocks.11.attn1")
    assert not match_path("transformer_blocks.1", "single_transformer_blocks.1.attn")
    assert match_path("blocks.1.attn1", "blocks.1.attn1")
    assert not match_path("blocks.1.attn", "blocks.1.attn1")  # components are whole words
    assert match_path("blocks.0-2", "blocks.2.attn2") and not match_path("blocks.0-2", "blocks.12.attn2")
    assert match_path("blocks.0,3", "blocks.3.attn2") and not match_path("blocks.0,3", "blocks.1.attn2")
    assert match_path("blocks.*.attn2", "blocks.7.attn2") and not match_path("blocks.*.attn2", "blocks.7.attn1")
    assert match_path("blocks.*.attn*", "blocks.7.attn1")
    assert match_path("**.attn2", "down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    assert match_path("**.attn2", "attn2")
    assert not match_path("**.attn2", "down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert not match_path("blocks.1.attn1.x", "blocks.1.attn1")


def test_match_alias():
    assert match_alias("d2", "d2.0") and match_alias("d2", "d2.7")
    assert match_alias("d2.1", "d2.1") and not match_alias("d2.1", "d2.10")
    assert match_alias("u1.0-2", "u1.2") and not match_alias("u1.0-2", "u1.3")
    assert match_alias("d0-1.1", "d1.1") and not match_alias("d0-1.1", "d2.1")
    assert not match_alias("m0", "d0.0") and not match_alias("m0", None)
    assert match_alias("m", "m0.3")


def test_split_selector():
    assert split_selector("m0,u0.4") == ["m0", "u0.4"]
    assert split_selector("m0, u0.4  d1") == ["m0", "u0.4", "d1"]
    assert split_selector("blocks.0,3") == ["blocks.0,3"]
    assert split_selector("transformer_blocks.1,2,single_transformer_blocks.0-1") == [
        "transformer_blocks.1,2", "single_transformer_blocks.0-1"]
    assert split_selector("u1.0,2") == ["u1.0,2"]
    with pytest.raises(SelectorError, match="transformer_blocks.3"):
        split_selector("3")


def test_summarize_names():
    assert summarize_names([f"transformer_blocks.{i}.attn" for i in range(11)]) == ["transformer_blocks.{0-10}.attn"]
    assert summarize_names(["a.0.b.0.x", "a.0.b.1.x", "a.1.b.0.x", "t.3", "t.4", "t.6", "top"]) == [
        "a.0.b.{0-1}.x", "a.1.b.0.x", "t.{3-4,6}", "top"]


# ----------------------------------------------------------------------------- select


@pytest.fixture(scope="module")
def sd3_11(tiny_pipe):
    return tiny_pipe("sd3", num_layers=11)


def test_blocks_1_never_matches_blocks_10(sd3_11):
    assert names(select(sd3_11, "transformer_blocks.1")) == ["transformer_blocks.1.attn"]
    assert names(select(sd3_11, "transformer_blocks.10")) == ["transformer_blocks.10.attn"]
    assert names(select(sd3_11, "transformer_blocks.1.attn")) == ["transformer_blocks.1.attn"]


def test_ranges_lists_globs(sd3_11):
    assert [s.block for s in select(sd3_11, "transformer_blocks.2-4")] == [2, 3, 4]
    assert [s.block for s in select(sd3_11, "transformer_blocks.0,3")] == [0, 3]
    assert [s.block for s in select(sd3_11, "transformer_blocks.0-1,9")] == [0, 1, 9]
    assert len(select(sd3_11, "transformer_blocks.*")) == 11
    assert len(select(sd3_11, "transformer_blocks.*.attn")) == 11
    assert len(select(sd3_11, "all")) == len(select(sd3_11, None)) == 11


def test_kinds(tiny_pipe):
    flux = tiny_pipe("flux")
    assert names(select(flux, "single")) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert names(select(flux, "joint")) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert names(select(tiny_pipe("sd35"), "self")) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert names(select(tiny_pipe("sd35"), "**.attn2")) == names(select(tiny_pipe("sd35"), "self"))
    assert all(s.name.endswith("attn2") for s in select(tiny_pipe("sd15"), "cross"))
    with pytest.raises(SelectorError, match="Kinds: joint, single"):
        select(flux, "cross")


def test_aliases_select(tiny_pipe):
    sd = tiny_pipe("sd15")
    assert names(select(sd, "m0")) == ["mid_block.attentions.0.transformer_blocks.0.attn1",
                                       "mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert names(select(sd, "mid")) == names(select(sd, "m0")) == names(select(sd, "mid_block"))
    assert {s.alias for s in select(sd, "u1-2")} == {"u1.0", "u2.0"}
    assert {s.alias for s in select(sd, "d")} == {"d0.0", "d1.0"} == {s.alias for s in select(sd, "down")}
    xl = tiny_pipe("sdxl")
    assert [s.alias for s in select(xl, "u0.0-1") if s.kind == "self"] == ["u0.0", "u0.1"]
    assert [s.name for s in select(xl, "d1.1")] == ["down_blocks.2.attentions.0.transformer_blocks.1.attn1",
                                                   "down_blocks.2.attentions.0.transformer_blocks.1.attn2"]
    with pytest.raises(SelectorError, match="aliases exist only on UNet"):
        select(tiny_pipe("flux"), "m0")


def test_union_order_and_intersection(tiny_pipe):
    xl = tiny_pipe("sdxl")
    union = select(xl, ["m0", "d0", "mid"])  # forward order, no duplicates
    assert [s.alias for s in union] == ["d0.0", "d0.0", "m0.0", "m0.0", "m0.1", "m0.1"]
    assert names(select(xl, "m0,d0")) == names(union)
    assert [s.kind for s in select(select(xl, "m0"), "self")] == ["self", "self"]
    flux = tiny_pipe("flux")
    mixed = select(flux, ["single_transformer_blocks.1", lambda s: s.kind == "joint" and s.block == 0])
    assert names(mixed) == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert names(select(flux, sites(flux)[2])) == ["single_transformer_blocks.0.attn"]
    assert names(select(flux, "transformer_blocks.1,single_transformer_blocks.0")) == [
        "transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]


def test_selector_errors_list_what_exists(sd3_11, tiny_pipe):
    with pytest.raises(SelectorError) as err:
        select(sd3_11, "transformer_blocks.11")
    assert "transformer_blocks.{0-10}.attn" in str(err.value) and "'transformer_blocks.11'" in str(err.value)
    with pytest.raises(SelectorError, match="'blocks.1' names no site"):  # one bad item fails the list
        select(sd3_11, ["transformer_blocks.1", "blocks.1"])
    with pytest.raises(SelectorError, match="names no site"):
        select(sd3_11, lambda s: False)
    with pytest.raises(SelectorError, match="cannot select"):
        select(sd3_11, 3.5)
    with pytest.raises(SelectorError):
        select(sd3_11, [])
    with pytest.raises(SelectorError) as err:
        select(tiny_pipe("sdxl"), "d7")
    assert "Aliases: d0.0, d1.0-1, m0.0-1" in str(err.value)
    assert isinstance(err.value, KeyError)  # SelectorError is also a KeyError


# ----------------------------------------------------------------------------- heads


def test_select_heads():
    site = Site("transformer_blocks.0.attn", "sd3", "joint", 0, heads=4, head_dim=8)
    assert select_heads(site) == select_heads(site, "all") == select_heads(site, None) == [0, 1, 2, 3]
    assert select_heads(site, 2) == [2]
    assert select_heads(site, [3, 1, 1]) == [1, 3]
    assert select_heads(site, "0-2") == [0, 1, 2]
    assert select_heads(site, "0,3") == [0, 3]
    assert select_heads(site, range(1, 3)) == [1, 2]
    assert select_heads(site, torch.tensor([0, 2])) == [0, 2]
    assert select_heads(4, "1-3") == [1, 2, 3]
    for bad in (4, -1, "0-4", [0, 9]):
        with pytest.raises(SelectorError, match=r"'transformer_blocks.0.attn' has 4 heads \(valid: 0-3"):
            select_heads(site, bad)
    for bad in ("first", True, [], "x-y", object()):
        with pytest.raises(SelectorError, match="valid: 0-3"):
            select_heads(site, bad)


# ----------------------------------------------------------------------------- display


def test_format_sites(tiny_pipe):
    found = sites(tiny_pipe("sd15"))
    table = format_sites(found)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "family", "kind", "block", "heads", "head_dim", "alias"]
    assert len(lines) == 2 + len(found) + 1 and lines[-1] == f"{len(found)} sites"
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert lines[2].split() == [first, "unet", "self", "0", "2", "4", "d0.0"]
    flux_table = format_sites(sites(tiny_pipe("flux")))
    assert "single_transformer_blocks.1.attn  flux    single" in flux_table


def test_describe_mentions_kinds_and_aliases(tiny_pipe):
    text = describe(sites(tiny_pipe("sd15")))
    assert "Sites (14)" in text and "Kinds: self, cross" in text and "m0.0" in text


def test_site_equality_ignores_module(tiny_pipe):
    a = sites(tiny_pipe("flux"))[0]
    b = Site(a.name, a.family, a.kind, a.block, a.heads, a.head_dim, a.alias, module=None, denoiser=a.denoiser)
    assert a == b and hash(a) == hash(b)
