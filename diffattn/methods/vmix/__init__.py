"""VMix: value-mixed cross-attention aesthetic adapters (arXiv 2412.20800).

    from diffattn.methods.vmix import VMixAdapter, ValueMix, load_adapter
    adapter = VMixAdapter.build(pipe, {"shadow": "with shadows", "light": "in soft light"})
    # ... train it (diffattn.methods.vmix.train.train_vmix, or `diffattn train-vmix`) ...
    adapter.save("vmix.safetensors")
    with da.attach(pipe, da.ValueMix(load_adapter("vmix.safetensors", pipe), aesthetics=["shadow"], scale=1.5)):
        image = pipe("a red circle").images[0]

``adapter.py``: AesEmb, the projection, the per-site value weights, files; ``mix.py``: the
value-mixing math and the control; ``train.py``: the training loop (family losses, LoRA,
checkpoints and resume).
"""
from __future__ import annotations

from .adapter import VMixAdapter, VMixConfig, aesthetic_table, load_adapter, model_fingerprint, read_config
from .mix import JOINT_MODES, UNCOND_POLICIES, ValueMix, check_lambda, joint_rows, merged_rows, mix_values

__all__ = ["VMixAdapter", "VMixConfig", "ValueMix", "aesthetic_table", "load_adapter", "model_fingerprint",
           "read_config", "mix_values", "joint_rows", "merged_rows", "check_lambda", "UNCOND_POLICIES",
           "JOINT_MODES"]
