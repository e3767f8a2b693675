"""The diffattn command on the built-in testbed model (offline)."""
from __future__ import annotations

import json

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


def test_headhunt_writes_a_preset(tmp_path):
    out = tmp_path / "preset.json"
    main(["headhunt", "--prompt", "a red circle", "--seeds", "1", "--steps", "2", "--top-k", "1", "--out", str(out),
          "--heatmap", str(tmp_path / "h.png"), "--guidance", "0", "--candidates", "transformer_blocks.1",
          "--scale", "2.5"])
    assert out.exists() and (tmp_path / "h.png").exists()
    preset = json.loads(out.read_text())
    assert [h[0] for h in preset["heads"]] == ["transformer_blocks.1.attn"] and preset["scale"] == 2.5
