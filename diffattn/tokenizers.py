"""Tokenizers built offline, with no hub access.

``clip_tokenizer`` builds a real ``transformers.CLIPTokenizer`` (byte-pair encoding) whose
vocabulary holds the letters a-z and, optionally, whole words: merges are generated so that
each listed word encodes as a single token, and any other word falls back to letters.
``t5_tokenizer`` trains a small sentencepiece unigram model in memory.
"""
from __future__ import annotations

import io
import json
import os
import string
import tempfile
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bpe_segments(word_symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply byte-pair merges (lowest rank first) to a symbol list, as CLIP's BPE does."""
    symbols = list(word_symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, first = min(pairs)
        a, b = symbols[first], symbols[first + 1]
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_vocab_and_merges(words: Iterable[str] = (), extra_words: Iterable[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of ``words`` is one token.

    Merges are appended word by word: each word is first segmented with the merges made so
    far, then its segments are merged left to right. New merges rank after old ones, so
    earlier words keep their single-token encoding.

    ``extra_words`` are added the same way after BOS and EOS: a vocabulary grown from an
    older one (world v2 from v1) keeps every id of the older one, BOS and EOS included, and
    EOS is then not the top id (CLIP text models with the configured ``eos_token_id`` pool at
    the first EOS, so that is fine).
    """
    symbols = list(string.ascii_lowercase) + list(string.digits) + list(",.;:!?'-")
    vocab_tokens = symbols + [c + "</w>" for c in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(ws, tokens):
        for word in ws:
            word = word.lower()
            chars = list(word[:-1]) + [word[-1] + "</w>"]
            segments = _bpe_segments(chars, ranks)
            while len(segments) > 1:
                pair = (segments[0], segments[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    tokens.append(pair[0] + pair[1])
                segments = [pair[0] + pair[1]] + segments[2:]

    add(words, vocab_tokens)
    vocab_tokens = list(dict.fromkeys(vocab_tokens))
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)  # EOS last: CLIP text models pool at argmax(ids) on legacy configs
    extra: list[str] = []
    add(extra_words, extra)
    for tok in extra:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def clip_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 77,
                   extra_words: Iterable[str] = ()) -> CLIPTokenizer:
    """An offline ``CLIPTokenizer``; each word in ``words`` and ``extra_words`` encodes as one
    token (``extra_words`` get ids after BOS and EOS: see ``clip_vocab_and_merges``)."""
    vocab, merges = clip_vocab_and_merges(words or (), extra_words)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            vocab_file,
            merges_file,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=EOS,
            pad_token=EOS,
            model_max_length=model_max_length,
        )


def t5_tokenizer(sentences: Iterable[str] | None = None, vocab_size: int = 64):
    """An offline ``T5TokenizerFast`` from a sentencepiece unigram model trained in memory.

    transformers 5 ignores ``vocab_file=`` for T5TokenizerFast, so the vocabulary is passed
    as (piece, score) pairs.
    """
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    sentences = list(sentences or ["a red circle and a blue square", "the quick brown fox jumps over the lazy dog"])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)
