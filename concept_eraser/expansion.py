"""Concept expansion: erase a target's neighbourhood, not one wording. An option every method offers.

A closed-form edit erases the wordings it is given: "circle" goes, "disc" and "ball" still draw one.
With `expand=N`, before the method runs, up to N wordings per target that the model itself treats like
the target are added as extra targets (with the target's guide). They are searched in the text
encoder's own space:

- single words of the tokenizer's vocabulary (for CLIP's 49k-token vocabulary, the `POOL` words whose
  input token embeddings are nearest the target's are encoded; ToyWorld's small vocabulary whole),
- short phrases: a multi-word target with one word replaced by one of that word's nearest words
  ("striped background" → "stripy background"),
- templates around those ("a photo of {}", "in the style of {}", ...; for a word-level vocabulary
  only the templates it can spell).

Each wording is represented by what the methods edit: the cross-attention K/V outputs of its last
word token and its EOS token, over every K/V matrix W_l. Distances are measured there,

    dist(a, b)² = Σ_tokens Σ_l ‖W_l (c_a − c_b)‖² = Σ_tokens (c_a − c_b)ᵀ G (c_a − c_b),  G = Σ_l W_lᵀ W_l,

and reported relative to the target's own distance from the empty prompt (0: same K/V outputs as the
target; 1: as far from it as "nothing" is). A wording is added only if every preserved concept, every
guide and the empty prompt is at least `expand_separation` times farther from it than its target (the
`margin` reported is that gap), so nothing closer to what must be kept is ever erased; the N nearest
per target are taken, one form per word (the nearest of "disc", "a disc", "a photo of disc"). The
default separation 1.25 comes from ToyWorld: every trained synonym and implicit word of its 15 values
is found at ratios 1.1–2.1, while the filler-word phrases it would add otherwise ("a in", "striped with")
sit at 1.0–1.25 and, added at 1.0, cost the circle task 38 points of preservation. Wordings listed in
`expand_exclude` are never added (a user's veto). Deterministic: no sampling, ties broken by text.

The vocabulary's features are cached in memory per text encoder (keyed by a fingerprint of its
output), so a host that erases several times encodes each word once.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .concepts import Concepts, same_prompt
from .editable import EditableModel, Progress
from .errors import InvalidParameterError
from .linalg import gram_sum
from .models.arch import EncoderSpec
from .params import Param, Values
from .tokenizer import WordTokenizer, clip_tokenizer, tokenizer_for

EXPANSION_PARAMS = (
    Param("expand", int, 0, "add up to N wordings per target that the model treats like it (vocabulary words, "
          "short phrases, templates), nearest in K/V output and never nearer a preserved concept, a guide or the "
          "empty prompt; 0 = off", min=0, max=64, step=1),
    Param("expand_separation", float, 1.25, "expansion: add a wording only if the nearest preserved concept, guide "
          "or empty prompt is at least this many times farther from it (in K/V output) than its target; 1 = merely "
          "nearer the target", min=1.0, max=10.0, step=0.05),
    Param("expand_exclude", str, "", "wordings the expansion must not add (a veto), separated by commas or new "
          "lines"),
)

TEMPLATES = ("a {}", "the {}", "a photo of {}", "a picture of {}", "a painting of {}", "in the style of {}",
             "art by {}", "{} style")
POOL = 256  # vocabulary words per target word encoded, chosen by input token embedding (large vocabularies)
NEIGHBOURS = 8  # nearest words per target word used to build phrases and templates
BATCH = 16  # prompts per encoder call, and a progress (cancel) point: a host's encoder runs one whole window each
_CACHE: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # fingerprint → wording → [2, d] features
_CACHE_ENCODERS = 4


@dataclass(frozen=True)
class Wording:
    text: str
    target: str
    distance: float  # K/V-output distance to the target, relative to the target's distance from the empty prompt
    margin: float  # distance to the nearest preserved concept / guide / empty prompt minus `distance` (> 0)
    nearest_kept: str  # that nearest preserved concept, guide or "" (the empty prompt)


@dataclass(frozen=True)
class Expansion:
    concepts: Concepts  # the targets followed by the added wordings, each with its target's guide
    added: tuple[Wording, ...]
    vetoed: tuple[Wording, ...]  # wordings `exclude` kept out that would have been added
    candidates: int
    seconds: float

    def as_report(self) -> dict:
        def row(w: Wording) -> dict:
            return {"text": w.text, "target": w.target, "distance": round(w.distance, 4), "margin": round(w.margin, 4),
                    "nearest_kept": w.nearest_kept}

        return {"added": [row(w) for w in self.added], "vetoed": [row(w) for w in self.vetoed],
                "candidates": self.candidates, "seconds": round(self.seconds, 3)}


def describe_expansion(report: Mapping[str, Any]) -> str:
    """The report's `expansion` entry as lines of text (command line, ComfyUI's Erasure Report)."""
    lines = [(f"expansion: {len(report['added'])} wordings added (of {report['candidates']} candidates; distance "
              "to the target relative to the empty prompt's, margin to the nearest kept concept)")]
    lines += [f"  + {w['text']!r} for {w['target']!r}: distance {w['distance']:.3f}, margin {w['margin']:.3f}"
              for w in report["added"]]
    lines += [f"  - {w['text']!r} vetoed" for w in report["vetoed"]]
    return "\n".join(lines)


def parse_exclude(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(same_prompt(t) for t in re.split(r"[,\n]", text or "") if t.strip()))


def with_expansion(model: EditableModel, concepts: Concepts, values: Values,
                   progress: Progress) -> tuple[Concepts, Expansion | None]:
    """`concepts` with the expansion's wordings added when `expand` > 0; called by `api.erase`."""
    if not values.expand:
        return concepts, None
    expansion = expand(model, concepts, values.expand, parse_exclude(values.expand_exclude),
                       values.expand_separation, progress)
    return expansion.concepts, expansion


@functools.lru_cache(maxsize=4)
def _vocabulary(spec: EncoderSpec) -> list[tuple[str, int]]:
    """(word, token id) for every whole-word token a prompt can be made of."""
    if spec.tokenizer == "word":
        tokenizer = WordTokenizer(spec.vocab, spec.window)
        return [(w, i) for w, i in tokenizer.index.items() if w not in WordTokenizer.SPECIAL]
    word = re.compile(r"[a-z][a-z\-]+</w>")
    return sorted(((t[:-4], i) for t, i in clip_tokenizer().get_vocab().items() if word.fullmatch(t)),
                  key=lambda w: w[1])


def _word_ids(spec: EncoderSpec, text: str) -> list[int]:
    tokens = tokenizer_for(spec)(text)
    return list(tokens.ids[1:tokens.length - 1])


def _spellable(spec: EncoderSpec, text: str) -> bool:
    """Whether every word of `text` is in the vocabulary (always for CLIP's byte-level BPE)."""
    return spec.tokenizer != "word" or all(w in spec.vocab for w in WordTokenizer.split(text))


def _nearest_by_embedding(model: EditableModel, spec: EncoderSpec, vocab: list[tuple[str, int]],
                          word: str) -> list[str]:
    """The `POOL` vocabulary words whose input token embeddings are nearest (cosine) `word`'s mean embedding."""
    if len(vocab) <= POOL:
        return [w for w, _ in vocab]
    name = "embeddings.token_embedding.weight" if spec.layout == "hf" else "token_embedding.weight"
    table = model.weight(spec.prefix + name).float()
    ids = _word_ids(spec, word)
    if not ids:
        return []
    query = table[ids].mean(0)
    rows = table[[i for _, i in vocab]]
    score = rows @ query / (rows.norm(dim=1) * query.norm()).clamp_min(1e-12)
    order = torch.argsort(-score, stable=True)[:POOL]  # ties: vocabulary order
    return [vocab[j][0] for j in order.tolist()]


def _fingerprint(model: EditableModel) -> str:
    words = " ".join(w for w, _ in _vocabulary(model.arch.encoders[0])[:4])  # in every vocabulary: no unknown word
    probe = model.text_encoder.encode(["", words]).features
    return hashlib.sha256(probe.float().cpu().numpy().round(4).tobytes()).hexdigest()


def _features(model: EditableModel, texts: Sequence[str], progress: Progress) -> dict[str, torch.Tensor]:
    """text → [2, d] float32 features of its last word token and its EOS token (the empty prompt: BOS, EOS)."""
    key = _fingerprint(model)
    cache = _CACHE.pop(key, {})
    _CACHE[key] = cache
    while len(_CACHE) > _CACHE_ENCODERS:
        _CACHE.popitem(last=False)
    # shortest first: a batch of similar lengths runs fewer positions (the checkpoint's own encoder runs only up to
    # the longest EOS of a batch; a host's runs its whole window)
    missing = sorted((t for t in dict.fromkeys(texts) if t not in cache), key=lambda t: (len(t), t))
    encode = getattr(model.text_encoder, "encode_through_eos", model.text_encoder.encode)
    for start in range(0, len(missing), BATCH):
        progress(start, len(missing), "expansion: encoding wordings")
        encoded = encode(missing[start:start + BATCH])
        for i, text in enumerate(encoded.prompts):
            end = encoded.lengths[i] - 1
            cache[text] = encoded.features[i, [max(end - 1, 0), end]].float().cpu()
    return {t: cache[t] for t in texts}


def _metric_root(model: EditableModel) -> torch.Tensor:
    """G^½ for G = Σ_l W_lᵀ W_l over every cross-attention K/V: ‖G^½ c‖ = the K/V outputs' joint norm."""
    gram = gram_sum((model.weight(key) for key in model.arch.map_keys()), model.device)
    values, vectors = torch.linalg.eigh(gram)
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).float().cpu()


def expand(model: EditableModel, concepts: Concepts, count: int, exclude: Sequence[str] = (),
           separation: float = 1.25, progress: Progress = lambda *a: None) -> Expansion:
    """Up to `count` wordings per target that the model treats like it; see the module docstring."""
    if count < 1:
        raise InvalidParameterError("expand", f"{count} wordings: give at least 1 (0 turns expansion off)")
    start = time.perf_counter()
    spec = model.arch.encoders[0]
    if spec.tokenizer == "t5" or not spec.context:
        raise InvalidParameterError("expand", f"the expansion searches a CLIP vocabulary for wordings; "
                                    f"{model.arch.title} reads prompts through {spec.name}: turn it off")
    vocab = _vocabulary(spec)
    vetoed_texts = {same_prompt(t) for t in exclude}
    target_words = {t: [w for w in re.findall(r"\S+", t)] for t in concepts.targets}
    kept = tuple(dict.fromkeys(concepts.preserve + concepts.guides + ("",)))
    known = {same_prompt(t) for t in concepts.targets + concepts.preserve + concepts.guides}

    singles: dict[str, list[str]] = {}  # target word → candidate words
    for words in target_words.values():
        for word in words:
            singles.setdefault(word, [w for w in _nearest_by_embedding(model, spec, vocab, word) if w != word])
    texts = list(dict.fromkeys([*concepts.targets, *kept, *singles, *(w for ws in singles.values() for w in ws)]))
    root = _metric_root(model)

    def embed(features: dict[str, torch.Tensor], items: Sequence[str]) -> torch.Tensor:
        return torch.stack([features[t] for t in items]) @ root  # [n, 2, d] in K/V-output units

    feats = _features(model, texts, progress)

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [n, 2, d] × [m, 2, d] → [n, m]
        return torch.cdist(a.flatten(1).double(), b.flatten(1).double())

    # Phrases: every target word's nearest words alone, in the target in its place, and in templates.
    forms: dict[str, str] = {}  # candidate text → its new content (one form per content is kept)
    for target, words in target_words.items():
        for i, word in enumerate(words):
            pool = singles[word]
            near = dist(embed(feats, [word]), embed(feats, pool))[0] if pool else torch.zeros(0)
            order = sorted(range(len(pool)), key=lambda j: (float(near[j]), pool[j]))
            for w in pool:
                forms.setdefault(w, w)
            for j in order[:NEIGHBOURS]:
                content = " ".join(words[:i] + [pool[j]] + words[i + 1:])
                for text in (content, *(t.format(content) for t in TEMPLATES)):
                    if _spellable(spec, text):
                        forms.setdefault(text, content)
        for text in (t.format(target) for t in TEMPLATES):
            if _spellable(spec, text):
                forms.setdefault(text, target)
    forms = {t: c for t, c in forms.items() if same_prompt(c) not in known and same_prompt(t) not in known}
    feats.update(_features(model, list(forms), progress))
    candidates = sorted(forms)
    progress(0, 1, "expansion: ranking")

    cand = embed(feats, candidates)
    to_targets = dist(cand, embed(feats, concepts.targets))
    scale = dist(embed(feats, concepts.targets), embed(feats, [""]))[:, 0].clamp_min(1e-12)
    to_targets = to_targets / scale
    owner = to_targets.argmin(1)
    to_kept = dist(cand, embed(feats, kept))
    best: dict[tuple[str, str], Wording] = {}  # (target, content) → nearest form
    for i, text in enumerate(candidates):
        t = int(owner[i])
        target = concepts.targets[t]
        # closeness to what is kept, in the units of this target
        relative_kept = to_kept[i] / scale[t]
        k = int(relative_kept.argmin())
        wording = Wording(text, target, float(to_targets[i, t]), float(relative_kept[k] - to_targets[i, t]), kept[k])
        if wording.margin <= 0 or wording.margin + wording.distance < separation * wording.distance:
            continue
        slot = (target, same_prompt(forms[text]))
        if slot not in best or (wording.distance, text) < (best[slot].distance, best[slot].text):
            best[slot] = wording
    added, vetoed = [], []
    for target in concepts.targets:
        ranked = sorted((w for (t, _), w in best.items() if t == target), key=lambda w: (w.distance, w.text))
        taken = 0
        for w in ranked:
            if taken == count:
                break
            if same_prompt(w.text) in vetoed_texts or same_prompt(forms[w.text]) in vetoed_texts:
                vetoed.append(w)
                continue
            added.append(w)
            taken += 1
    guide_of = dict(zip(concepts.targets, concepts.guides))
    expanded = replace(concepts, targets=concepts.targets + tuple(w.text for w in added),
                       guides=concepts.guides + tuple(guide_of[w.target] for w in added))
    progress(1, 1, "expansion: ranking")
    return Expansion(expanded, tuple(added), tuple(vetoed), len(candidates), time.perf_counter() - start)
