"""HeadHunter: greedy rounds, cache and resume, presets into SoftPAG, heat map."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import diffattn as da
from diffattn.errors import ControlError
from diffattn.methods.headhunter import HeadHunter
from diffattn.testbed.objectives import oracle_style


def brightness(images, prompts):
    """A deterministic, head-sensitive objective: mean brightness of the image."""
    return [float(np.asarray(im).mean()) for im in images]


def counting(objective, calls):
    """The same objective (same name), recording each call."""
    @functools.wraps(objective)
    def wrapped(images, prompts):
        calls.append(1)
        return objective(images, prompts)
    return wrapped


def test_greedy_rounds_pick_the_best_heads_and_resume(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=2, height=16, width=16, guidance_scale=1.0)
    hunt = HeadHunter(pipe, brightness, ["a red circle"], [0, 1], top_k=2, rounds=2, scale=3.0, state_dir=str(tmp_path), progress=False, **kw)
    result = hunt.run()
    n = sum(s.heads for s in da.sites(pipe) if s.kind == "joint")
    assert len(result.rounds[0]) == n and len(result.rounds[1]) == n - 2 and len(result.selected) == 4
    # round 1 picks the top-2 heads by their own scores
    top = sorted(result.rounds[0], key=lambda k: -result.rounds[0][k])[:2]
    assert [f"{s}:{h}" for s, h in result.selected[:2]] == top
    # each score is the mean objective of a real guided run with that head set
    site, head = result.selected[0]
    with da.attach(pipe, da.SoftPAG([(site, head)], strength=1.0, scale=3.0)):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        imgs = pipe(["a red circle"] * 2, generator=gens, **kw).images  # batched as the search does
    assert abs(np.mean(brightness(imgs, None)) - result.rounds[0][f"{site}:{head}"]) < 1e-6
    # resume: a new hunter on the same state dir recomputes nothing and returns the same
    calls = []
    again = HeadHunter(pipe, counting(brightness, calls), ["a red circle"], [0, 1], top_k=2, rounds=2,
                       scale=3.0, state_dir=str(tmp_path), progress=False, **kw).run()
    assert again.selected == result.selected and not calls
    # presets load into SoftPAG; heat map has one row per site
    path = tmp_path / "preset.json"
    result.save_preset(str(path), strength=0.5)
    preset = json.loads(path.read_text())
    assert preset["heads"][0][2] == 0.5
    with da.attach(pipe, da.SoftPAG(str(path))):
        pipe("a red circle", **kw)
    heat = result.heatmap(cell=4)
    assert heat.size == (4 * max(result.layout.values()), 4 * len(result.layout))


def test_stop_without_gain_ends_the_search_and_resumes_stopped(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=2, height=16, width=16, guidance_scale=1.0)

    def constant(images, prompts):  # no head can beat the baseline
        return [1.0] * len(images)

    hunt = HeadHunter(pipe, constant, ["a red circle"], [0], top_k=1, rounds=3, state_dir=str(tmp_path),
                      progress=False, stop_without_gain=True, **kw)
    result = hunt.run()
    assert result.selected == [] and len(result.rounds) == 1  # one round scored, nothing added, stopped
    calls = []
    again = HeadHunter(pipe, counting(constant, calls), ["a red circle"], [0], top_k=1, rounds=3,
                       state_dir=str(tmp_path), progress=False, stop_without_gain=True, **kw).run()
    assert again.selected == [] and len(again.rounds) == 1 and not calls
    # without the rule the paper's algorithm adds the top head every round
    plain = HeadHunter(pipe, constant, ["a red circle"], [0], top_k=1, rounds=2, progress=False, **kw).run()
    assert len(plain.selected) == 2


def test_bad_candidates_are_errors(tiny_pipe):
    with pytest.raises(ControlError, match="does not exist"):
        HeadHunter(tiny_pipe("sd3"), brightness, ["a"], [0], candidates=[("transformer_blocks.0.attn", 99)])


# ---------------------------------------------------------------------------- CLIP objectives


def _save_tiny_clip(path, seed: int = 0, flip_text: bool = False):
    """A tiny random CLIP (transformers) with the offline BPE tokenizer and an image processor,
    saved as safetensors. ``flip_text`` negates the text projection (cosines change sign)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffattn.tokenizers import clip_tokenizer

    tok = clip_tokenizer(["red", "blue", "circle", "square"], model_max_length=77)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    if flip_text:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    model.save_pretrained(str(path))  # safetensors
    tok.save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return _save_tiny_clip(root / "a"), _save_tiny_clip(root / "b", flip_text=True)


def _reference_cosines(path, images, prompts):
    """The formula by hand: cosine of the projected CLIP image and text features."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = ((img / img.norm(dim=-1, keepdim=True)) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    return cos, float(model.logit_scale.detach().exp())


def _images(n=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle", "a blue square", "red", "blue circle", "a square"]


def test_clip_score_and_pick_score_equal_the_formula(tiny_clip):
    from diffattn.methods.headhunter import clip_score, pick_score

    images = _images()
    clipped = 0
    for path in tiny_clip:
        cos, logit_scale = _reference_cosines(path, images, PROMPTS)
        objective = clip_score(path, batch_size=2)  # batched: 2 + 2 + 1
        assert objective._model is None  # lazy
        got = torch.tensor(objective(images, PROMPTS))
        want = (100 * cos).clamp(min=0)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got, want)
        clipped += int((cos < 0).sum())
        got = torch.tensor(pick_score(path)(images, PROMPTS))  # one batch, as the reference
        assert torch.equal(got, torch.tensor([float(x) for x in logit_scale * cos])), (got, logit_scale * cos)
        assert torch.equal(torch.tensor(clip_score(path)(images, PROMPTS)), torch.tensor([float(x) for x in want]))
        # a pipeline's output_type="pt" batch scores as its PIL images do
        batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
        assert torch.allclose(torch.tensor(objective(batch, PROMPTS)), want, atol=1e-4)
    assert 0 < clipped < 2 * len(images)  # the flipped model makes both branches of max(·, 0) run
    templated = clip_score(tiny_clip[0], template="A photo depicts {prompt}")
    cos, _ = _reference_cosines(tiny_clip[0], images, [f"A photo depicts {p}" for p in PROMPTS])
    assert torch.allclose(torch.tensor(templated(images, PROMPTS)), (100 * cos).clamp(min=0), atol=1e-4)


def test_objective_errors(tiny_clip, tmp_path):
    import shutil

    from diffattn.cli import build_parser
    from diffattn.errors import DiffattnError
    from diffattn.methods.headhunter import ObjectiveError, clip_score, make_objective, pick_score

    with pytest.raises(ObjectiveError, match="unknown objective 'nope'.*pickscore"):
        make_objective("nope")
    with pytest.raises(SystemExit):  # the command line rejects it too
        build_parser().parse_args(["headhunt", "--objective", "nope"])
    unsafe = tmp_path / "unsafe"
    shutil.copytree(tiny_clip[0], unsafe)
    (unsafe / "model.safetensors").rename(unsafe / "pytorch_model.bin")
    with pytest.raises(ObjectiveError, match="no safetensors weights.*pytorch_model.bin"):
        clip_score(str(unsafe))
    with pytest.raises(ObjectiveError, match="no safetensors"):
        make_objective("pickscore", clip_model=str(unsafe))
    missing = pick_score("diffattn-tests/no-such-model")  # hub id: checked when loaded (offline here)
    with pytest.raises(ObjectiveError, match="cannot load the pickscore model"):
        missing(_images(1), ["a"])
    with pytest.raises(ObjectiveError, match="{prompt}"):
        clip_score(tiny_clip[0], template="A photo")
    assert issubclass(ObjectiveError, DiffattnError) and issubclass(ObjectiveError, ValueError)
    assert make_objective("clip", clip_model=tiny_clip[0]).kind == "clip"


def test_a_state_dir_of_other_settings_is_refused(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=1, height=16, width=16, guidance_scale=1.0)
    cands = [("transformer_blocks.0.attn", 0)]
    HeadHunter(pipe, brightness, ["a red circle"], [0], candidates=cands, top_k=1, scale=3.0, state_dir=str(tmp_path),
               progress=False, **kw).run()
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["scale"] == 3.0 and saved["objective"] == "brightness" and saved["call_kwargs"]["guidance_scale"] == 1.0
    other_kw = dict(kw, guidance_scale=5.0)
    for objective, scale, call in [(brightness, 2.0, kw), (brightness, 3.0, other_kw), (oracle_style("dark"), 3.0, kw)]:
        with pytest.raises(ControlError, match="other settings"):
            HeadHunter(pipe, objective, ["a red circle"], [0], candidates=cands, scale=scale, state_dir=str(tmp_path),
                       progress=False, **call)
    # the same settings resume (prompts, seeds, top_k and rounds may change: scores are keyed by them)
    HeadHunter(pipe, brightness, ["a red circle"], [0, 1], candidates=cands, top_k=1, rounds=2, scale=3.0,
               state_dir=str(tmp_path), progress=False, **kw)


def test_a_search_over_other_pairs_starts_its_rounds_over(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=1, height=16, width=16, guidance_scale=1.0)
    cands = [("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1)]
    common = dict(candidates=cands, top_k=1, scale=3.0, progress=False, **kw)
    HeadHunter(pipe, brightness, ["a red circle"], [0], state_dir=str(tmp_path / "a"), **common).run()
    calls = []
    wider = HeadHunter(pipe, counting(brightness, calls), ["a red circle"], [0, 1], state_dir=str(tmp_path / "a"),
                       **common).run()
    fresh = HeadHunter(pipe, brightness, ["a red circle"], [0, 1], state_dir=str(tmp_path / "b"), **common).run()
    assert wider.rounds == fresh.rounds and wider.selected == fresh.selected  # not the one-seed selection
    assert len(calls) == 3  # only seed 1 was generated: baseline and the two candidates


# ---------------------------------------------------------------------------- distribution


def test_shares_of_an_interrupted_distributed_round_are_reused(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=1, height=16, width=16, guidance_scale=1.0)
    cands = [("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1)]
    first = HeadHunter(pipe, brightness, ["a red circle"], [0], candidates=cands, top_k=1, state_dir=str(tmp_path / "a"),
                       progress=False, **kw).run()
    # what process 1 of an interrupted launch left: its share, and no cache.json / state.json
    cache = json.loads((tmp_path / "a" / "cache.json").read_text())
    share = {k: v for k, v in cache.items() if k.startswith("transformer_blocks.1")}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cache.rank1.json").write_text(json.dumps(share))
    calls = []
    again = HeadHunter(pipe, lambda i, p: calls.append(len(i)) or brightness(i, p), ["a red circle"], [0], candidates=cands,
                       top_k=1, state_dir=str(tmp_path / "b"), progress=False, **kw).run()
    assert len(calls) == 2  # baseline and the head of the share-less process only
    assert again.rounds == first.rounds and again.selected == first.selected
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["cache.json", "settings.json", "state.json"]  # share merged
    assert json.loads((tmp_path / "b" / "cache.json").read_text()) == cache


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_find_what_one_process_finds(tiny_clip, tmp_path):
    """A real 2-process launch (torchrun, gloo on the CPU) of `diffattn headhunt` with the
    PickScore objective gives byte-identical presets, heat maps and caches to one process.
    The processes split the candidates through accelerate's ``PartialState``, which reads
    torchrun's environment as it reads `accelerate launch --multi_gpu`'s. The launcher is
    torchrun because `accelerate launch` on one CPU machine starts a single process unless
    MPI is set up."""
    import os
    import subprocess
    import sys

    from diffattn import testbed

    testbed.model_path("tiny-sd3")  # the testbed model is shipped in assets/
    args = ["-m", "diffattn.cli", "headhunt", "--objective", "pickscore", "--clip-model", tiny_clip[0], "--prompt",
            "a red circle", "--seeds", "2", "--steps", "2", "--top-k", "2", "--rounds", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # torchrun gives each process 1 thread too

    def run(n):
        out = tmp_path / f"n{n}"
        out.mkdir()  # the CLI checks --out's directory before the search
        launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                                      "127.0.0.1", "--master_port", str(_free_port())]
        cmd = [sys.executable, *launcher, *args, "--state-dir", str(out / "state"), "--out", str(out / "preset.json"),
               "--heatmap", str(out / "heads.png")]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    one, two = run(1), run(2)
    preset = json.loads((one / "preset.json").read_text())
    assert len(preset["heads"]) == 4 and len(preset["rounds"]) == 2 and len(set(preset["rounds"][0].values())) > 1
    assert (two / "preset.json").read_bytes() == (one / "preset.json").read_bytes()  # same heads, same scores
    assert (two / "heads.png").read_bytes() == (one / "heads.png").read_bytes()
    assert json.loads((two / "state" / "cache.json").read_text()) == json.loads((one / "state" / "cache.json").read_text())
    assert sorted(p.name for p in (two / "state").iterdir()) == ["cache.json", "settings.json", "state.json"]
