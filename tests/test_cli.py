"""The diffattn command on the built-in testbed model (offline)."""
from __future__ import annotations

import json

import numpy as np

from PIL import Image

from diffattn.cli import main


def test_sites_lists_the_default_model(capsys):
    main(["sites"])
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn" in out and "transformer_blocks.5.attn" in out and "joint" in out


def test_generate_with_softpag_writes_baseline_beside_guided(tmp_path, capsys):
    out = tmp_path / "result.png"
    main(["generate", "a red circle left of a blue square", "--method", "softpag", "--steps", "3", "--out", str(out)])
    img = Image.open(out)
    assert img.width == 2 * 64 * 4  # two panels, upscaled 4x
    assert "baseline | softpag" in capsys.readouterr().out


def test_generate_num_images_writes_a_row_of_the_batch_per_run(tmp_path, capsys):
    """--num-images B: one batch of B from the seed per run (the pipeline's num_images_per_prompt),
    the baseline's row above the method's; the baseline row is the pipeline's own batch."""
    import numpy as np
    import torch

    from diffattn import testbed

    out = tmp_path / "grid.png"
    main(["generate", "a circle", "--method", "repulsion", "--num-images", "3", "--steps", "2", "--repulsion-tau", "1",
          "--repulsion-inner", "1", "--out", str(out), "--no-progress"])
    grid = np.asarray(Image.open(out).convert("RGB"))
    label_h, panel = 14, 64 * 4
    assert grid.shape == (2 * (panel + label_h), 3 * panel, 3)
    pipe = testbed.load("tiny-sd3")
    want = pipe("a circle", num_images_per_prompt=3, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0)).images
    for i, im in enumerate(want):  # the top row, downscaled back (nearest upscaling is exact)
        got = grid[label_h : label_h + panel, i * panel : (i + 1) * panel][::4, ::4]
        assert np.array_equal(got, np.asarray(im)), i
    assert "baseline | repulsion" in capsys.readouterr().out


import pytest as _pytest


@_pytest.mark.parametrize("method, flags, label", [
    ("repulsion", ["--eta", "2", "--repulsion-tau", "2", "--repulsion-inner", "2"], "repulsion"),
    ("cads", ["--cads-scale", "0.5"], "CADS"),
    ("particle", ["--pg-coeff", "300"], "particle"),
    ("interval", ["--interval-hi", "0.6"], "CFG on σ ∈ (0.28, 0.6]"),
], ids=["repulsion", "cads", "particle", "interval"])
def test_generate_diversity_methods_write_the_baseline_and_method_batches(tmp_path, capsys, method, flags, label):
    """Each diversity method of issue 24 from the command line (the issue's --eta spelling for
    repulsion): two rows of B = 3, the method's row differs from the baseline's."""
    import numpy as np

    out = tmp_path / "grid.png"
    main(["generate", "a circle", "--method", method, "--num-images", "3", "--steps", "2", *flags, "--out", str(out),
          "--no-progress"])
    grid = np.asarray(Image.open(out).convert("RGB"))
    label_h, panel = 14, 64 * 4
    assert grid.shape == (2 * (panel + label_h), 3 * panel, 3)
    top, bottom = grid[label_h:label_h + panel], grid[2 * label_h + panel:]
    assert not np.array_equal(top, bottom)
    assert label.lower() in capsys.readouterr().out.lower()


def test_generate_num_images_is_checked_before_the_model_loads(tmp_path, capsys):
    import pytest

    out = tmp_path / "never.png"
    for argv, words in [(["--num-images", "0"], ["--num-images", "1 to 16"]),
                        (["--num-images", "2", "--method", "astar", "--concepts", "circle"],
                         ["--method astar", "--num-images 1", "softpag"])]:
        with pytest.raises(SystemExit) as e:
            main(["generate", "a red circle", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), err
    assert not out.exists()


def test_headhunt_writes_a_preset(tmp_path):
    out = tmp_path / "preset.json"
    main(["headhunt", "--prompt", "a red circle", "--seeds", "1", "--steps", "2", "--top-k", "1", "--out", str(out),
          "--heatmap", str(tmp_path / "h.png"), "--guidance", "0", "--candidates", "transformer_blocks.1",
          "--scale", "2.5"])
    assert out.exists() and (tmp_path / "h.png").exists()
    preset = json.loads(out.read_text())
    assert [h[0] for h in preset["heads"]] == ["transformer_blocks.1.attn"] and preset["scale"] == 2.5


def test_generate_rejects_flags_of_another_method_and_unknown_methods(tmp_path, capsys):
    import pytest

    out = tmp_path / "never.png"
    for argv, words in [(["--method", "softpag", "--concepts", "circle"], ["--concepts", "--method astar"]),
                        (["--heads", "all"], ["--heads", "--method softpag", "--method none"]),
                        (["--method", "nope"], ["unknown method 'nope'", "softpag", "astar"])]:
        with pytest.raises(SystemExit) as e:
            main(["generate", "a red circle", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), err
    assert not out.exists()


def test_generate_flags_come_from_the_method_registry():
    from diffattn.cli import build_parser
    from diffattn.methods.registry import methods

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {p.cli_flag for m in methods() for p in m.params} <= flags
    assert {"--heads", "--scale", "--strength", "--concepts", "--astar-loss"} <= flags


def test_help_imports_no_pipeline_and_python_m_works():
    import subprocess
    import sys

    code = ("import sys; from diffattn.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'scipy') "
            "or m.startswith(('diffattn.pipelines', 'diffattn.testbed.evaluate', 'diffattn.methods.headhunter'))))")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]"
    helped = subprocess.run([sys.executable, "-m", "diffattn.cli", "headhunt", "--help"], capture_output=True,
                            text=True, check=True).stdout
    assert "torchrun" in helped and "fidelity" in helped and "pickscore" in helped


def test_edit_flags_match_uam_config():
    from diffattn.cli import edit
    from diffattn.methods.uniform import MASK_CONVENTIONS
    from diffattn.pipelines.uam import BLENDS, UAMConfig

    assert edit.MASK_CONVENTIONS == tuple(MASK_CONVENTIONS) and edit.BLENDS == tuple(BLENDS)
    assert all(getattr(UAMConfig, k) == v for k, v in edit.DEFAULTS.items())


def test_load_model_stays_importable_from_the_cli():
    from diffattn.cli import load_model
    from diffattn.cli.common import load_model as common_load_model

    assert callable(load_model) and callable(common_load_model)


def test_help_imports_no_torch():
    """`diffattn --help` / `diffattn sites --help` stay well under a second: building the parser
    (and `import diffattn`) imports no torch; `da.sites` is still the function."""
    import subprocess
    import sys

    code = ("import sys, diffattn; from diffattn.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, callable(diffattn.sites))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    helped = subprocess.run([sys.executable, "-m", "diffattn.cli", "sites", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--model" in helped.stdout


def test_generate_shows_a_denoising_progress_bar(tmp_path, capsys):
    main(["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "a.png")])
    assert "baseline" in capsys.readouterr().err  # the tqdm bar, labelled
    main(["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "b.png"), "--no-progress"])
    assert "baseline" not in capsys.readouterr().err


def test_heads_takes_the_selector_syntax(tmp_path, capsys):
    from diffattn.cli.common import load_model
    from diffattn.cli.generate import heads_flag

    pipe = load_model(None)
    assert heads_flag(pipe, "transformer_blocks.1-2") == {"transformer_blocks.1.attn": "all",
                                                          "transformer_blocks.2.attn": "all"}
    assert heads_flag(pipe, "transformer_blocks.1:0,3") == {"transformer_blocks.1.attn": "0,3"}
    assert heads_flag(pipe, "mid") == "mid" and heads_flag(pipe, "all") == "all"
    out = tmp_path / "r.png"
    main(["generate", "a red circle", "--method", "softpag", "--heads", "transformer_blocks.1:0,3", "--steps", "1",
          "--out", str(out), "--no-progress"])
    assert out.exists()


def test_invert_converts_grayscale_and_rgba(tmp_path, capsys):
    from diffattn.testbed import world

    image = world.render(world.sample_scene(3))
    for mode in ("L", "RGBA"):
        src = tmp_path / f"in-{mode}.png"
        image.convert(mode).save(src)
        out = tmp_path / f"out-{mode}.png"
        main(["invert", str(src), "--steps", "1", "--out", str(out), "--prompt", "a red circle"])
        assert Image.open(out).width == 4 * 64 * 4 and "PSNR" in capsys.readouterr().out


def test_console_script_prints_no_return_value(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["diffattn", "sites"])
    assert main() is None  # `sys.exit(main())` of the console script would print a returned object


def test_eval_grid_has_the_prompts_under_the_images(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    main(["eval", "--suite", "single", "--seeds", "2", "--steps", "1", "--grid", str(grid), "--no-progress"])
    img = Image.open(grid)
    assert img.width == 2 * 128 and img.height > 128  # two 2x images, captions underneath
    below = img.crop((0, 128, 128, img.height)).convert("L")
    assert below.getextrema()[0] < 128  # dark text pixels under the image


def test_generate_ir_writes_references_vanilla_and_ir_scene_with_masks(tmp_path, capsys):
    import pytest

    out = tmp_path / "ir.png"
    main(["generate", "a circle left of a square", "--method", "ir", "--subject", "a striped red circle",
          "--subject", "a dotted blue square", "--steps", "2", "--out", str(out), "--no-progress"])
    img = Image.open(out).convert("RGB")
    assert img.width == 4 * 64 * 4 and img.height >= 2 * (64 * 4 + 14)  # four panels, the mask overlays under them
    assert "reference 1 | reference 2 | vanilla scene | IR scene" in capsys.readouterr().out
    overlay_row = np.asarray(img.crop((0, 64 * 4 + 14, img.width, img.height)))
    magenta = (overlay_row == np.array([255, 0, 255])).all(-1)  # subject 1's mask border
    cyan = (overlay_row == np.array([0, 255, 255])).all(-1)  # subject 2's
    quarter = img.width // 4
    assert magenta[:, :quarter].any() and not cyan[:, :quarter].any()  # reference 1: its own mask only
    assert cyan[:, quarter:2 * quarter].any() and not magenta[:, quarter:2 * quarter].any()  # reference 2: its own
    assert magenta[:, 3 * quarter:].any() and cyan[:, 3 * quarter:].any()  # the IR scene: both subjects
    for argv, words in [([], ["needs the subjects", "--subject"]),
                        (["--subject", "a red triangle"], ["triangle", "subject_words"])]:
        with pytest.raises(SystemExit) as e:
            main(["generate", "a circle left of a square", "--method", "ir", "--out", str(tmp_path / "x.png"), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), err
    with pytest.raises(SystemExit):
        main(["generate", "a circle", "--method", "softpag", "--subject", "a red circle", "--out", str(tmp_path / "y.png")])
    assert "--method ir" in capsys.readouterr().err
