"""VMix's trained parts: the aesthetic embedding (AesEmb), its projection and the value weights.

Paper: "VMix: Improving Text-to-Image Diffusion Model with Cross-Attention Mixing Control"
(arXiv 2412.20800), §3.2 (AesEmb), §3.3 (value-mixed cross-attention); the method note is
``../shared/reference/vmix_repulsion_decontext.md`` §1.

**AesEmb** (§1.1). N aesthetic dimensions, each with a positive label y_a,i (a phrase, e.g.
"with shadows") and a negative ŷ_a,i that is a *rare-token identifier* (DreamBooth-style), so
the text encoder's prior says nothing about it. Each label goes through the model's own frozen
text encoder(s) and the pooled token is kept: the table f_aes ∈ R^{2N×d} (rows 0..N-1 positive,
N..2N-1 negative) is computed once (:func:`aesthetic_table`) and stored in the adapter file.
The rare tokens are added to a *copy* of the tokenizer and, where the vocabulary lacks them,
to the encoder through ``resize_token_embeddings`` for the encoding only: the original
embedding module is put back afterwards, so the base model never sees them. The new rows are
drawn from a seeded normal with the mean and spread of the existing embedding rows.
Pooled token: CLIP's EOS state (``pooler_output``) or its projection (``text_embeds`` of a
``CLIPTextModelWithProjection``); with two CLIP encoders (SD3, SDXL) both, concatenated (SD3's
``pooled_prompt_embeds``; for SDXL a choice of ours); FLUX: its one CLIP encoder (T5 has no
pooled token).

**Projection** (§1.2). Per image the label row of each dimension (positive if the image has
the attribute, else negative): f_t ∈ R^{N×d}; F = Linear over the *token axis* N → C (C = the
text length, so the aesthetic tokens align position by position with the content tokens),
then LayerNorm over d; Z a zero-initialised Linear d → d_in (d_in: the input width of the
sites' value projections; d_in = d on SD1.5): f_a = Z(F(f_t)) ∈ R^{C×d_in}, ≡ 0 at init.

**Value weights** (§1.3). One W_V^a per site, initialised as a copy of the weight of the site's
text-value projection (Fig. 2: "Copy"): ``to_v`` of a UNet cross-attention, ``add_v_proj`` of
an MMDiT joint attention (SD3, FLUX double blocks), ``to_v`` of a FLUX single block. Its bias
is *not* copied: V_a = W_V^a f_a must vanish with f_a for the zero-init guarantee.

**File**: one safetensors file; its metadata key ``diffattn.vmix`` holds the JSON
:class:`VMixConfig` (the base model's fingerprint, the sites, the labels, the sizes). Loading
refuses pickle files, checks every tensor's name and shape against the config and builds a
fresh module, so a bad file never leaves a half-loaded adapter.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ...errors import ControlError, ModelLoadError, PathError, UnsupportedModelError

FORMAT = "diffattn.vmix"
VERSION = 1
NEGATIVE_TOKEN = "<vmix-no-{label}>"  # the rare-token identifier of a dimension's negative label


# ----------------------------------------------------------------------------- the base model


def model_fingerprint(model: nn.Module) -> dict:
    """The base model an adapter belongs to: its class name and a hash of its architecture
    config (diffusers' ``model.config`` without the ``_``-private keys). Weights are not
    hashed: an adapter fits every checkpoint of the architecture (the paper applies it to
    community fine-tunes of SD1.5)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no diffusers config; VMix adapters belong to "
                                    f"diffusers denoisers (UNet2DConditionModel, SD3Transformer2DModel, ...)")
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    blob = json.dumps(public, sort_keys=True, default=str)  # tuples and lists both as JSON lists
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def value_projection(module: nn.Module, kind: str) -> nn.Linear:
    """The projection that makes a site's *text* values: ``to_v`` (UNet cross-attention, FLUX
    single block), ``add_v_proj`` (MMDiT joint attention)."""
    if getattr(module, "fused_projections", False):
        raise UnsupportedModelError("this attention module runs fused projections (to_qkv); call "
                                    "model.unfuse_qkv_projections() before building or attaching a VMix adapter")
    name = {"cross": "to_v", "joint": "add_v_proj", "single": "to_v"}.get(kind)
    proj = getattr(module, name, None) if name else None
    if proj is None or not hasattr(proj, "weight"):
        raise UnsupportedModelError(f"VMix mixes text values: a site of kind {kind!r} has none (use cross-attention "
                                    f"sites on UNets, joint sites on SD3 / FLUX)")
    return proj


def default_sites(all_sites) -> list:
    """VMix's default sites: every cross-attention (UNet, the paper's attn2), else every joint
    attention (MMDiT: SD3, FLUX double blocks)."""
    for kind in ("cross", "joint"):
        chosen = [s for s in all_sites if s.kind == kind]
        if chosen:
            return chosen
    raise UnsupportedModelError("this model has no cross-attention or joint-attention sites; VMix needs text keys")


# ----------------------------------------------------------------------------- AesEmb


def clip_encoders(pipe) -> list[tuple[object, nn.Module]]:
    """``(tokenizer, text encoder)`` of each CLIP text encoder of a pipeline, in order
    (``text_encoder``, ``text_encoder_2``): the encoders AesEmb pools."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    found = []
    for suffix in ("", "_2"):
        tok, enc = getattr(pipe, "tokenizer" + suffix, None), getattr(pipe, "text_encoder" + suffix, None)
        if tok is not None and isinstance(enc, (CLIPTextModel, CLIPTextModelWithProjection)):
            found.append((tok, enc))
    if not found:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no CLIP text encoder; AesEmb pools CLIP's EOS token "
                                    f"(pass a pipeline with tokenizer/text_encoder)")
    return found


def _seeded_rows(weight: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` new embedding rows [n, d] from a seeded normal with the per-channel mean and std
    of the existing rows ``weight`` [V, d] (deterministic, unlike the encoder's own init)."""
    g = torch.Generator().manual_seed(seed)
    w = weight.detach().float().cpu()
    rows = w.mean(0) + w.std(0) * torch.randn(n, w.shape[1], generator=g)  # [n, d]
    return rows.to(weight.dtype)


@torch.no_grad()
def pooled_embeddings(tokenizer, encoder: nn.Module, texts: Sequence[str], rare: Sequence[str] = (),
                      seed: int = 0) -> torch.Tensor:
    """Pooled CLIP embeddings [len(texts), d] of ``texts`` (fp32, on the encoder's device).

    ``rare``: tokens the texts may use that must be one token each; those the vocabulary lacks
    are added to a copy of the tokenizer and, for this call only, to the encoder
    (``resize_token_embeddings``, seeded rows); the encoder's original embedding module and
    vocabulary size are restored before returning, whatever happens."""
    tok = copy.deepcopy(tokenizer)
    vocab = tok.get_vocab()
    new = [t for t in rare if t not in vocab]
    if new:
        tok.add_tokens(list(new))
    for t in rare:
        if len(tok(t, add_special_tokens=False).input_ids) != 1:
            raise ControlError(f"the rare token {t!r} does not encode as one token; pick another identifier")
    old_emb, old_vocab = encoder.get_input_embeddings(), encoder.config.vocab_size
    was_training = encoder.training
    try:
        if len(tok) > old_emb.num_embeddings:
            encoder.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = encoder.get_input_embeddings()
            emb.weight[old_emb.num_embeddings:] = _seeded_rows(old_emb.weight, len(tok) - old_emb.num_embeddings,
                                                                seed).to(emb.weight.device)
        encoder.eval()
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(encoder.device)  # [n, L]
        out = encoder(ids)
        pooled = out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None else out.pooler_output
        return pooled.float()  # [n, d]
    finally:
        encoder.set_input_embeddings(old_emb)
        encoder.config.vocab_size = old_vocab
        encoder.train(was_training)


def negative_tokens(labels: Sequence[str]) -> list[str]:
    """The rare-token identifier of each dimension's negative label."""
    return [NEGATIVE_TOKEN.format(label=label) for label in labels]


def aesthetic_table(pipe, texts: Sequence[str], negatives: Sequence[str], seed: int = 0) -> torch.Tensor:
    """f_aes [2N, d] (§1.1): the pooled embeddings of the N positive label texts (rows 0..N-1)
    and of the N rare-token negatives (rows N..2N-1), the pipeline's CLIP encoders concatenated
    along d. fp32 on the CPU."""
    parts = [pooled_embeddings(tok, enc, list(texts) + list(negatives), negatives, seed + i).cpu()
             for i, (tok, enc) in enumerate(clip_encoders(pipe))]
    return torch.cat(parts, dim=-1)  # [2N, d]


def aesthetic_tokens(table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f_t (§1.2 step 1): per row and dimension i, the positive embedding where ``mask`` holds,
    else the negative one. table [2N, d], mask [B, N] bool -> [B, N, d]."""
    n = mask.shape[-1]
    pos, neg = table[:n], table[n:]  # [N, d] each
    return torch.where(mask.unsqueeze(-1), pos, neg)  # [B, N, d]


# ----------------------------------------------------------------------------- the adapter


@dataclass
class VMixConfig:
    """What an adapter file describes (stored as JSON in its safetensors metadata).

    base:        :func:`model_fingerprint` of the denoiser it was built for (+ ``name``: a label);
    sites:       the site names, in order; kinds: their kinds; inner: each W_V^a's output width;
    labels:      the aesthetic dimensions' names; texts: their positive label strings;
    negatives:   their rare-token identifiers;
    text_length: C, the text tokens f_a covers (the first C of a call's text keys);
    embed_dim:   d, the pooled width; input_dim: d_in, the sites' value-projection input width.
    """

    base: dict
    sites: list[str]
    kinds: list[str]
    inner: list[int]
    labels: list[str]
    texts: list[str]
    negatives: list[str]
    text_length: int
    embed_dim: int
    input_dim: int
    format: str = FORMAT
    version: int = VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VMixConfig":
        """Parse and validate a config (a :class:`ModelLoadError` names what is wrong)."""
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"the VMix adapter's config is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ModelLoadError(f"not a VMix adapter (its metadata has no {FORMAT!r} config)")
        if raw.get("version") != VERSION:
            raise ModelLoadError(f"VMix adapter format version {raw.get('version')!r}; this diffattn reads {VERSION}")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(raw) - {"extra"})
        if missing or set(raw) - names:
            raise ModelLoadError(f"the VMix adapter's config lacks {missing} or has unknown fields "
                                 f"{sorted(set(raw) - names)}")
        config = cls(**raw)
        n, s = len(config.labels), len(config.sites)
        ints = (config.text_length, config.embed_dim, config.input_dim, *config.inner)
        if (len(config.texts) != n or len(config.negatives) != n or n == 0 or len(config.kinds) != s
                or len(config.inner) != s or s == 0 or len(set(config.sites)) != s or len(set(config.labels)) != n
                or not all(isinstance(x, int) and x > 0 for x in ints)
                or not isinstance(config.base, dict) or "class" not in config.base):
            raise ModelLoadError("the VMix adapter's config is inconsistent (label / site lists of different lengths, "
                                 "duplicates, or sizes that are not positive integers)")
        return config


def site_key(name: str) -> str:
    """A site name as a module key (``.`` is not allowed in ``nn.ModuleDict`` keys)."""
    return name.replace(".", "__")


class VMixAdapter(nn.Module):
    """AesEmb table + projection (F, Z) + one W_V^a per site (module docstring).

    ``adapter(mask)`` -> f_a [B, C, d_in] for aesthetic masks [B, N] (bool);
    ``adapter.site_values(name, f_a, heads)`` -> V_a [B, H, C, D] of one site.
    Build one from a pipeline with :meth:`build`, load one with :func:`load_adapter`.
    """

    def __init__(self, config: VMixConfig):
        super().__init__()
        self.config = config
        n, c, d, d_in = len(config.labels), config.text_length, config.embed_dim, config.input_dim
        self.register_buffer("aes_table", torch.zeros(2 * n, d))  # f_aes [2N, d], frozen
        self.token_proj = nn.Linear(n, c)  # F's linear, over the token axis N -> C
        self.norm = nn.LayerNorm(d)  # F's LayerNorm
        self.zero = nn.Linear(d, d_in)  # Z, zero-initialised
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.values = nn.ModuleDict({site_key(name): nn.Linear(d_in, inner, bias=False)
                                     for name, inner in zip(config.sites, config.inner)})

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, pipe, labels: Mapping[str, str], *, sites=None, seed: int = 0,
              text_length: int | None = None, name: str | None = None) -> "VMixAdapter":
        """A fresh (untrained: the base model exactly) adapter for ``pipe``.

        labels:      ``{dimension name: positive label text}`` (e.g. ``{"shadow": "with shadows"}``);
        sites:       a selector of the denoiser's sites (default :func:`default_sites`);
        text_length: C (default: the first CLIP tokenizer's ``model_max_length``);
        seed:        F's initialisation and the rare tokens' embedding rows.
        """
        from ...sites import denoisers, select
        from ...sites import sites as list_sites

        if not labels:
            raise ControlError("VMix needs at least one aesthetic dimension: labels={'name': 'positive label text'}")
        names, texts = [str(k) for k in labels], [str(v) for v in labels.values()]
        all_sites = list_sites(pipe)
        chosen = default_sites(all_sites) if sites is None else select(all_sites, sites)
        projections = [value_projection(s.module, s.kind) for s in chosen]
        d_in = {p.in_features for p in projections}
        if len(d_in) != 1:
            raise UnsupportedModelError(f"the chosen sites' value projections take inputs of widths {sorted(d_in)}; "
                                        f"VMix shares one f_a across sites: choose sites of one width")
        denoiser = dict(denoisers(pipe))
        model = denoiser.get(chosen[0].denoiser) if chosen[0].denoiser in denoiser else next(iter(denoiser.values()))
        negatives = negative_tokens(names)
        table = aesthetic_table(pipe, texts, negatives, seed)  # [2N, d]
        c = int(text_length or clip_encoders(pipe)[0][0].model_max_length)
        base = dict(model_fingerprint(model), name=str(name or getattr(model.config, "_name_or_path", "") or ""))
        config = VMixConfig(base=base, sites=[s.name for s in chosen], kinds=[s.kind for s in chosen],
                            inner=[int(p.out_features) for p in projections], labels=names, texts=texts,
                            negatives=negatives, text_length=c, embed_dim=int(table.shape[1]), input_dim=d_in.pop())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = cls(config)
        with torch.no_grad():
            adapter.aes_table.copy_(table)
            for s, p in zip(chosen, projections):
                adapter.values[site_key(s.name)].weight.copy_(p.weight.detach().float().cpu())  # W_V^a = copy of W_V^c
        return adapter

    # ------------------------------------------------------------------ the math
    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def label_mask(self, aesthetics) -> torch.Tensor:
        """``[N]`` bool mask of a list of dimension names (unknown names: :class:`ControlError`)."""
        unknown = [a for a in aesthetics if a not in self.config.labels]
        if unknown:
            raise ControlError(f"unknown aesthetic label(s) {unknown}; this adapter knows {self.config.labels}")
        return torch.tensor([label in set(aesthetics) for label in self.config.labels], dtype=torch.bool)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """f_a = Z(LayerNorm(F(f_t)ᵀ)) (§1.2). mask [B, N] bool -> [B, C, d_in]."""
        f_t = aesthetic_tokens(self.aes_table, mask.to(self.aes_table.device))  # [B, N, d]
        f = self.token_proj(f_t.transpose(1, 2)).transpose(1, 2)  # [B, d, N] -> [B, d, C] -> [B, C, d]
        return self.zero(self.norm(f))  # [B, C, d_in]

    def site_values(self, name: str, f_a: torch.Tensor, heads: int) -> torch.Tensor:
        """V_a = W_V^a f_a of site ``name``, split into heads: f_a [B, C, d_in] -> [B, H, C, D]."""
        va = self.values[site_key(name)](f_a)  # [B, C, H*D]
        return va.view(va.shape[0], va.shape[1], heads, -1).transpose(1, 2)  # [B, H, C, D]

    # ------------------------------------------------------------------ compatibility
    def check_model(self, model: nn.Module, all_sites, error=ControlError) -> None:
        """Raise ``error`` unless ``model`` is the architecture this adapter was built for and
        every site exists there with the same kind and value-projection shape."""
        got, want = model_fingerprint(model), self.config.base
        if got["class"] != want.get("class") or got["config_sha256"] != want.get("config_sha256"):
            raise error(f"this VMix adapter was built for a {want.get('class')} with config hash "
                        f"{want.get('config_sha256')} ({want.get('name') or 'unnamed'}); the model is a {got['class']} "
                        f"with config hash {got['config_sha256']}: train or build an adapter for this model")
        by_name = {s.name: s for s in all_sites}
        missing = [n for n in self.config.sites if n not in by_name]
        if missing:
            raise error(f"the model has no site(s) {missing[:3]}{'...' if len(missing) > 3 else ''} of this adapter")
        for name, kind in zip(self.config.sites, self.config.kinds):
            s = by_name[name]
            proj = value_projection(s.module, s.kind)
            w = self.values[site_key(name)].weight
            if s.kind != kind or tuple(proj.weight.shape) != tuple(w.shape):
                raise error(f"site {name}: the adapter expects a {kind} site with a value projection of shape "
                            f"{tuple(w.shape)}; the model's is {s.kind} {tuple(proj.weight.shape)}")

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write the adapter as one safetensors file, the config in its metadata (atomic)."""
        from safetensors.torch import save_file

        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise PathError(f"cannot write {path}: the folder {folder} does not exist")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={FORMAT: self.config.to_json()})
        os.replace(tmp, path)


PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip, raw pickle


def read_config(path: str) -> VMixConfig:
    """The :class:`VMixConfig` of an adapter file (nothing else is read)."""
    return _open(path)[0]


def _open(path: str):
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PathError(f"VMix adapter {path!r} not found; pass the .safetensors file a VMix training wrote")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header's "{"; a header length can start
    # with a pickle protocol byte pair, so the "{" decides
    if head[8:9] != b"{" and head.startswith(PICKLE_MAGIC):
        raise ModelLoadError(f"{path} is a pickle / torch.save file; diffattn loads VMix adapters from safetensors only "
                             f"(a pickle can run code when loaded)")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())})") from None
    if FORMAT not in metadata:
        raise ModelLoadError(f"{path} is a safetensors file without a VMix config (metadata key {FORMAT!r})")
    return VMixConfig.from_json(metadata[FORMAT]), handle


def load_adapter(path: str, model: nn.Module | None = None, *, device=None) -> VMixAdapter:
    """Load an adapter file; with ``model`` (a pipeline or denoiser) also check it belongs to it.

    Every tensor's name, shape and finiteness is checked against the config before a fresh
    module is filled, so a bad file raises :class:`ModelLoadError` (a missing one
    :class:`PathError`) and nothing is half-loaded."""
    from safetensors import SafetensorError

    config, handle = _open(path)
    adapter = VMixAdapter(config)
    want = adapter.state_dict()
    keys = set(handle.keys())
    if keys != set(want):
        raise ModelLoadError(f"{path}: tensors {sorted(keys ^ set(want))[:4]} do not match the config's sites "
                             f"and sizes")
    try:
        tensors = {k: handle.get_tensor(k) for k in want}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot read its tensors ({' '.join(str(e).split())})") from None
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(want[k].shape) or not v.dtype.is_floating_point:
            raise ModelLoadError(f"{path}: tensor {k} is {tuple(v.shape)} {v.dtype}; the config says "
                                 f"{tuple(want[k].shape)} floating point")
        if not torch.isfinite(v).all():
            raise ModelLoadError(f"{path}: tensor {k} holds NaN or infinite values")
    adapter.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()})
    if model is not None:
        from ...sites import denoisers, sites

        models = [m for _, m in denoisers(model)]
        fitting = [m for m in models if model_fingerprint(m) == {k: config.base.get(k) for k in ("class", "config_sha256")}]
        adapter.check_model(fitting[0] if fitting else models[0], sites(model), error=ModelLoadError)
    if device is not None:
        adapter.to(device)
    return adapter
