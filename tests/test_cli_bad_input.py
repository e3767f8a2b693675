"""Bad input on every CLI command: exit status 2, one line naming what to fix, no traceback, no
file written, the inputs untouched. Run in-process through ``diffattn.cli.main`` (fast); most
cases are refused before any model loads, the rest right after the ~1 s testbed load."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from diffattn.cli import main

P = "a red circle"

# (argv, words the one-line message must hold); {d} is the test's folder of inputs, {out} the output
CASES = [
    # generate: numbers
    (["generate", P, "--steps", "0"], ["--steps", "at least 1"]),
    (["generate", P, "--steps", "-1"], ["--steps", "at least 1"]),
    (["generate", P, "--steps", "ten"], ["--steps", "'ten'"]),
    (["generate", P, "--steps", "100000"], ["limit of 1000", "--max-steps"]),
    (["generate", P, "--guidance", "nan"], ["--guidance", "finite"]),
    (["generate", P, "--guidance", "inf"], ["--guidance", "finite"]),
    (["generate", P, "--guidance", "-3"], ["--guidance", "at least 0"]),
    (["generate", P, "--size", "0"], ["--size"]),
    (["generate", P, "--size", "50"], ["--size 50", "multiples of 8", "48"]),
    (["generate", P, "--size", "4096"], ["limit of 256", "--max-side"]),
    (["generate", P, "--size", "512", "--max-side", "0"], ["--max-side"]),
    (["generate", P, "--seed", str(2**64)], ["--seed", "2**64"]),
    (["generate", P, "--seed", "-1"], ["--seed"]),
    (["generate", ""], ["prompt", "empty"]),
    (["generate", "   "], ["prompt", "empty"]),
    (["generate", "a red circle 🔴"], ["tokenizer does not know", "🔴"]),
    # generate: methods and their flags
    (["generate", P, "--method", "nope"], ["unknown method 'nope'", "softpag", "astar"]),
    (["generate", P, "--method", "astar", "--scale", "2"], ["--scale", "--method softpag", "--method astar"]),
    (["generate", P, "--method", "softpag", "--concepts", "circle"], ["--concepts", "--method astar"]),
    (["generate", P, "--heads", "all"], ["--heads", "--method none"]),
    (["generate", P, "--method", "softpag", "--strength", "2"], ["--strength", "[0.0, 1.0]"]),
    (["generate", P, "--method", "softpag", "--strength", "nan"], ["--strength", "finite"]),
    (["generate", P, "--method", "softpag", "--scale", "nan"], ["--scale", "finite"]),
    (["generate", P, "--method", "softpag", "--scale", "-1"], ["scale"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/missing.json"], ["--heads", "no such file"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/bad.json"], ["not valid JSON"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/empty.json"], ["selects no head", "--top-k"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/notpreset.json"], ["not a SoftPAG preset"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/other.json"], ["made for 'other/model'", "tiny-sd3"]),
    (["generate", P, "--method", "softpag", "--heads", "{d}/badhead.json"], ["head(s) [9]"]),
    (["generate", P, "--method", "softpag", "--heads", "transformer_blocks.9"], ["transformer_blocks.9", "names no site"]),
    (["generate", P, "--method", "softpag", "--heads", "transformer_blocks.1:7"], ["head(s) [7]", "0-3"]),
    (["generate", P, "--method", "astar", "--concepts", "🔴"], ["concept", "🔴"]),
    (["generate", P, "--method", "astar", "--concepts", "square"], ["square", "not in the prompt"]),
    (["generate", P, "--method", "astar", "--astar-loss", "x"], ["--astar-loss", "choose one of"]),
    (["generate", P, "--method", "astar", "--astar-text-keys", "bert"], ["--astar-text-keys", "choose one of"]),
    (["generate", P, "--method", "softpag", "--target", "blur"], ["--target", "choose one of"]),
    (["generate", P, "--method", "softpag", "--astar-center-tokens", "true"], ["--astar-center-tokens", "--method astar"]),
    # generate: models and devices
    (["generate", P, "--model", "tiny-sdx"], ["unknown model 'tiny-sdx'", "tiny-sd3", "tiny-sd"]),
    (["generate", P, "--model", "{d}/notpipe"], ["not a diffusers pipeline folder", "model_index.json"]),
    (["generate", P, "--model", "{d}/img.png"], ["is a file"]),
    (["generate", P, "--model", "{d}/badmarker"], ["testbed.json", "not readable JSON"]),
    (["generate", P, "--model", "{d}/truncated"], ["cannot load the pipeline", "truncated"]),
    (["generate", P, "--model", "{d}/pickle"], ["safetensors", "--allow-pickle"]),
    (["generate", P, "--model", "someorg/not-cached"], ["cannot load the pipeline", "someorg/not-cached"]),  # offline
    (["generate", P, "--model", "./nothing"], ["unknown model './nothing'"]),
    (["generate", P, "--device", "banana"], ["--device", "not a device"]),
    (["generate", P, "--seed", "1.5"], ["--seed", "'1.5'"]),
    (["generate", P, "--size", "64.0"], ["--size", "'64.0'"]),
    (["generate", P, "--guidance", "1e400"], ["--guidance", "finite"]),
    (["generate"], ["required", "prompt"]),
    (["generate", P, "--dtype", "float8"], ["--dtype", "invalid choice"]),
    # generate: outputs
    (["generate", P, "--out", "{d}/nodir/x.png"], ["--out", "does not exist", "mkdir"]),
    (["generate", P, "--out", "{d}/x.txt"], ["--out", ".png"]),
    (["generate", P, "--out", "{d}"], ["--out", "is a directory"]),
    (["generate", P, "--out", "{d}/img.png/x.png"], ["--out", "not a directory"]),
    # headhunt
    (["headhunt", "--top-k", "0", "--out", "{out}.json"], ["--top-k", "at least 1"]),
    (["headhunt", "--rounds", "0", "--out", "{out}.json"], ["--rounds"]),
    (["headhunt", "--batch-size", "0", "--out", "{out}.json"], ["--batch-size"]),
    (["headhunt", "--seeds", "0", "--out", "{out}.json"], ["--seeds"]),
    (["headhunt", "--strength", "1.5", "--out", "{out}.json"], ["--strength"]),
    (["headhunt", "--scale", "inf", "--out", "{out}.json"], ["--scale", "finite"]),
    (["headhunt", "--prompt", "a purple banana", "--out", "{out}.json"], ["shapes world", "--objective fidelity"]),
    (["headhunt", "--prompt", "", "--out", "{out}.json"], ["--prompt", "empty"]),
    (["headhunt", "--suite", "nope", "--out", "{out}.json"], ["unknown suite 'nope'"]),
    (["headhunt", "--suite", "two", "--prompt", P, "--out", "{out}.json"], ["--prompt or --suite"]),
    (["headhunt", "--clip-model", "x", "--out", "{out}.json"], ["--clip-model", "--objective clip"]),
    (["headhunt", "--out", "{d}/nodir/p.json"], ["--out", "does not exist"]),
    (["headhunt", "--out", "{out}.png"], ["--out", ".json"]),
    (["headhunt", "--out", "{out}.json", "--heatmap", "{out}.txt"], ["--heatmap", ".png"]),
    (["headhunt", "--out", "{out}.json", "--state-dir", "{d}/img.png"], ["--state-dir", "is a file"]),
    (["headhunt", "--prompt", P, "--top-k", "9", "--candidates", "transformer_blocks.1", "--out", "{out}.json"],
     ["--top-k 9", "4 candidate heads"]),
    (["headhunt", "--prompt", P, "--candidates", "transformer_blocks.9", "--out", "{out}.json"], ["names no site"]),
    # eval
    (["eval", "--seeds", "0"], ["--seeds"]),
    (["eval", "--batch-size", "0"], ["--batch-size"]),
    (["eval", "--suite", "nope"], ["unknown suite 'nope'"]),
    (["eval", "--suite", ","], ["names no suite"]),
    (["eval", "--out", "{out}.txt"], ["--out", ".json"]),
    (["eval", "--grid-images", "5"], ["--grid-images", "--grid"]),
    (["eval", "--grid", "{d}/nodir/g.png"], ["--grid", "does not exist"]),
    (["eval", "--steps", "0"], ["--steps"]),
    # invert
    (["invert", "{d}/missing.png", "--out", "{out}.png"], ["missing.png", "no such file"]),
    (["invert", "{d}", "--out", "{out}.png"], ["is a directory"]),
    (["invert", "{d}/text.png", "--out", "{out}.png"], ["not an image file"]),
    (["invert", "{d}/truncated.png", "--out", "{out}.png"], ["damaged or truncated"]),
    (["invert", "{d}/big.png", "--out", "{out}.png"], ["4000x4000", "limit of 256", "--max-side"]),
    (["invert", "{d}/huge.png", "--out", "{out}.png"], ["10000x10000", "limit of 256"]),
    (["invert", "{d}/odd.png", "--out", "{out}.png"], ["70x70", "multiples of 16", "64x64"]),
    (["invert", "{d}/img.png", "--out", "{d}/img.png"], ["same file"]),
    (["invert", "{d}/img.png", "--out", "{out}.png", "--steps", "0"], ["--steps"]),
    (["invert", "{d}/img.png", "--out", "{out}.png", "--steps", "5000"], ["limit of 1000"]),
    (["invert", "{d}/img.png", "--out", "{out}.png", "--prompt", ""], ["--prompt", "empty"]),
    (["invert", "{d}/img.png", "--out", "{out}.png", "--model", "nope"], ["unknown model 'nope'"]),
    # edit
    (["edit", "{d}/img.png", "--source", P, "--target", "a red  Circle", "--out", "{out}.png"], ["source prompt itself"]),
    (["edit", "{d}/img.png", "--target", "", "--out", "{out}.png"], ["--target", "empty"]),
    (["edit", "{d}/img.png", "--out", "{out}.png"], ["--target"]),
    (["edit", "{d}/img.png", "--target", "a blue circle", "--quantile", "2", "--out", "{out}.png"], ["--quantile"]),
    (["edit", "{d}/img.png", "--target", "a blue circle", "--cross-replace", "-0.1", "--out", "{out}.png"],
     ["--cross-replace"]),
    (["edit", "{d}/img.png", "--target", "a blue circle", "--mask-timestep", "5000", "--out", "{out}.png"],
     ["--mask-timestep"]),
    (["edit", "{d}/img.png", "--target", "a blue circle", "--dilation", "-1", "--out", "{out}.png"], ["--dilation"]),
    (["edit", "{d}/img.png", "--target", "a blue circle", "--guidance", "nan", "--out", "{out}.png"], ["--guidance"]),
    (["edit", "{d}/big.png", "--target", "a blue circle", "--out", "{out}.png"], ["limit of 256"]),
    # app: every value is checked before a model loads or the server starts
    (["app", "--slots", "0"], ["--slots", "at least 1"]),
    (["app", "--slots", "1.5"], ["--slots", "'1.5'"]),
    (["app", "--port", "70000"], ["--port", "[0, 65535]"]),
    (["app", "--port", "-1"], ["--port"]),
    (["app", "--max-upload-mb", "nan"], ["--max-upload-mb", "finite"]),
    (["app", "--max-upload-mb", "0"], ["--max-upload-mb"]),
    (["app", "--max-side", "0"], ["--max-side", "at least 1"]),
    (["app", "--max-steps", "0"], ["--max-steps", "at least 1"]),
    (["app", "--max-batch", "0"], ["--max-batch", "at least 1"]),
    (["app", "--max-models", "0"], ["--max-models", "at least 1"]),
    (["app", "--model", "no such model"], ["unknown model 'no such model'", "tiny-sd3"]),
    (["app", "--model", "no such model", "--no-preload"], ["unknown model 'no such model'"]),
    (["app", "--models", "tiny-sd3,nope"], ["unknown model 'nope'"]),
    (["app", "--model", "{d}/img.png"], ["is a file"]),
    (["app", "--device", "banana"], ["--device", "not a device"]),
    # run: the workflow as JSON text ({{ }}: literal braces here), checked like generate's flags
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "a red circle", "height": 50}}}}', "--out", "{out}.png"],
     ["sampling field 'height'", "multiples of 8", "48"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x", "seed": 1180591620717411303424}}}}', "--out",
      "{out}.png"], ["sampling field 'seed'", "2**64 - 1"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x", "guidance": NaN}}}}', "--out", "{out}.png"],
     ["sampling field 'guidance'", "not finite"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x", "steps": 100000}}}}', "--out", "{out}.png"],
     ["sampling field 'steps'", "limit of 1000", "--max-steps"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x", "width": 4096}}}}', "--out", "{out}.png"],
     ["sampling field 'width'", "limit of 256", "--max-side"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x", "width": 512}}}}', "--out", "{out}.png",
      "--max-side", "0"], ["--max-side"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "a red circle 🔴"}}}}', "--out", "{out}.png"],
     ["sampling field 'prompt'", "tokenizer does not know", "🔴"]),
    (["run", '{{"model": "tiny-sd3", "controls": [{{"node": "UniformAttention", "sites": "transformer_blocks.9"}}], '
             '"sampling": {{"prompt": "x"}}}}', "--out", "{out}.png"],
     ["controls[0] (UniformAttention) field 'sites'", "names no site"]),
    (["run", "{d}/missing.json", "--out", "{out}.png"], ["missing.json", "cannot read"]),
    (["run", "{d}/bad.json", "--out", "{out}.png"], ["not valid JSON"]),
    (["run", '{{"model": "tiny-sd3", "sampling": {{"prompt": "x"}}}}', "--out", "{out}.txt"], ["--out", ".png"]),
    # sites, the top level
    (["sites", "--model", "nope"], ["unknown model 'nope'"]),
    (["sites", "--device", "cuda:99"], ["--device"]),
    (["bogus"], ["invalid choice", "generate"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of inputs, good and broken."""
    from diffattn import testbed

    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), "white").save(d / "img.png")
    Image.new("RGB", (4000, 4000), "white").save(d / "big.png")  # small file, huge image
    Image.new("1", (10000, 10000)).save(d / "huge.png")  # past PIL's decompression-bomb warning
    Image.new("RGB", (70, 70), "white").save(d / "odd.png")
    (d / "truncated.png").write_bytes((d / "img.png").read_bytes()[:70])
    (d / "text.png").write_text("not an image")
    (d / "bad.json").write_text("{not json")
    (d / "empty.json").write_text(json.dumps({"model": "tiny-sd3", "heads": [], "scale": 2}))  # headhunt --top-k 0 once wrote this
    (d / "notpreset.json").write_text(json.dumps({"layers": [1, 2]}))
    (d / "other.json").write_text(json.dumps({"model": "other/model", "heads": [["transformer_blocks.1.attn", 0, 1.0]]}))
    (d / "badhead.json").write_text(json.dumps({"model": "tiny-sd3", "heads": [["transformer_blocks.1.attn", 9, 1.0]]}))
    (d / "notpipe").mkdir()
    (d / "badmarker").mkdir()
    (d / "badmarker" / "model_index.json").write_text("{}")
    (d / "badmarker" / "testbed.json").write_text("{oops")
    src = testbed.model_path("tiny-sd3")
    shutil.copytree(src, d / "truncated")
    w = d / "truncated" / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100_000])
    shutil.copytree(src, d / "pickle")
    import torch
    from safetensors.torch import load_file

    w = d / "pickle" / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(w)), w.with_suffix(".bin"))
    w.unlink()
    return d


def _snapshot(d):
    return {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _ids(case):
    return " ".join(a if len(a) < 24 else a[:21] + "..." for a in case[0])


@pytest.mark.parametrize("argv,words", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_exits_2_with_one_line(argv, words, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(d=inputs, out=out) for a in argv]
    if "--out" not in argv and argv[0] in ("generate", "invert", "edit"):
        argv += ["--out", str(out) + ".png"]
    before = _snapshot(inputs)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert lines[0].startswith("diffattn"), lines[0]
    assert list(tmp_path.iterdir()) == [], "a file was written"
    assert _snapshot(inputs) == before, "an input changed"


def test_cuda_on_a_cpu_only_torch_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["generate", P, "--device", "cuda", "--out", "never.png"])
    assert e.value.code == 2 and "--device cuda" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    from diffattn.errors import LimitError

    with pytest.raises(LimitError):
        main(["generate", P, "--steps", "100000", "--debug"])


def test_limits_are_configurable(monkeypatch, capsys):
    """--max-steps / DIFFATTN_MAX_STEPS raise the limit (checked here up to the next refusal)."""
    monkeypatch.setenv("DIFFATTN_MAX_STEPS", "200000")
    with pytest.raises(SystemExit):
        main(["generate", P, "--steps", "100000", "--out", "x.txt"])
    assert "--out" in capsys.readouterr().err  # the steps passed; the bad --out is the error now
    monkeypatch.setenv("DIFFATTN_MAX_STEPS", "lots")
    with pytest.raises(SystemExit):
        main(["generate", P, "--steps", "100000"])
    assert "DIFFATTN_MAX_STEPS" in capsys.readouterr().err
    monkeypatch.delenv("DIFFATTN_MAX_STEPS")
    with pytest.raises(SystemExit):
        main(["generate", P, "--size", "512", "--max-side", "1024", "--out", "x.txt"])
    assert "--out" in capsys.readouterr().err


def test_pickle_weights_load_only_when_allowed(inputs, capsys):
    from diffattn.cli.common import load_model

    pipe = load_model(str(inputs / "pickle"), allow_pickle=True)
    assert pipe.transformer is not None


def test_softpag_refuses_heads_that_select_nothing():
    import diffattn as da

    for heads in (None, [], {}, "nope", [("transformer_blocks.0.attn",)], {"transformer_blocks.0.attn": []},
                  [("transformer_blocks.0.attn", 0, 2.0)], [("transformer_blocks.0.attn", "x")]):
        with pytest.raises(da.ControlError):
            da.SoftPAG(heads)
    with pytest.raises(da.ControlError):
        da.SoftPAG("all", scale=float("nan"))
    with pytest.raises(da.ControlError):
        da.SoftPAG("all", strength=float("nan"))


@pytest.mark.parametrize("argv,words", [
    (["generate", P, "--steps", "0"], ["--steps"]),
    (["invert", "missing.png"], ["no such file"]),
])
def test_a_real_process_exits_2_with_one_line(argv, words, tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffattn.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    assert list(tmp_path.iterdir()) == []
