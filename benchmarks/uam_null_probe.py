"""How much do uniform attention maps change a testbed model's prediction, per text?

    python benchmarks/uam_null_probe.py --models tiny-sd,tiny-sd3 --threads 2

The UAM paper reconstructs under the null prompt "" with uniform maps. Uniform maps can only
differ from the stock maps where the text tokens' values differ, so this prints, per model and
text: the spread of the text tokens (mean ‖e_j − ē‖ / mean ‖e_j‖ over the positions of the
encoder output the attention sees) and ‖ε_uniform − ε‖ / ‖ε‖ of the denoiser at a few
timesteps (random latents, ``--samples`` of them; ``UniformAttention()`` with its defaults:
every cross-attention site on UNets, segment-uniform joint sites on MMDiTs).
"""
from __future__ import annotations

import argparse

import torch

import diffattn as da
from diffattn import testbed

TEXTS = ("", "a red circle and a blue square")


def token_spread(tokens: torch.Tensor) -> float:
    """mean_j ‖e_j − ē‖ / mean_j ‖e_j‖ over the positions of ``tokens`` [L, D]."""
    return float((tokens - tokens.mean(0)).norm(dim=-1).mean() / tokens.norm(dim=-1).mean())


def predict(pipe, latents, t, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoiser output, the text tokens it attends to [L, D]) for one text, unguided."""
    n = latents.shape[0]
    if hasattr(pipe, "transformer"):
        emb, _, pooled, _ = pipe.encode_prompt(text, text, text, device="cpu", do_classifier_free_guidance=False)
        out = pipe.transformer(hidden_states=latents, timestep=t.expand(n), encoder_hidden_states=emb.repeat(n, 1, 1),
                               pooled_projections=pooled.repeat(n, 1)).sample
        return out, emb[0]
    emb = pipe.encode_prompt(text, "cpu", 1, False)[0]
    return pipe.unet(latents, t, encoder_hidden_states=emb.repeat(n, 1, 1)).sample, emb[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-sd,tiny-sd3")
    p.add_argument("--timesteps", default="900,500,100")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.timesteps.split(",")]
    print("| model | text | token spread | " + " | ".join(f"t = {t}" for t in steps) + " |")
    print("|---|---|---:|" + "---:|" * len(steps))
    for name in args.models.split(","):
        pipe = testbed.load(name.strip())
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        c, s = denoiser.config.in_channels, pipe.default_sample_size if hasattr(pipe, "transformer") else denoiser.config.sample_size
        latents = torch.randn(args.samples, c, s, s, generator=torch.Generator().manual_seed(0))  # [n, C, h, w]
        for text in TEXTS:
            cells = []
            with torch.no_grad():
                for t in steps:
                    stock, tokens = predict(pipe, latents, torch.tensor(float(t)), text)
                    with da.attach(pipe, da.UniformAttention()):
                        uniform, _ = predict(pipe, latents, torch.tensor(float(t)), text)
                    cells.append(f"{float((uniform - stock).norm() / stock.norm()):.3f}")
            print(f"| {name} | {text!r} | {token_spread(tokens):.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
