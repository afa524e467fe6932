"""ErasePro — zero-residual concept erasure by progressive alignment (Chen et al., arXiv 2508.04472).

Every edited linear map gets the smallest change that sends the target's features exactly onto the
anchor's (paper eq. 4–5, App. A; `linalg.zero_residual_factors`):

    min_W ‖W − W_o‖²_F  s.t.  W X = W_o Y    ⇒    W* = W_o + W_o (Y − X)(XᵀX)⁻¹Xᵀ

| here                         | paper                                          |
|------------------------------|------------------------------------------------|
| X (d × N), target columns    | X = [x_1 … x_N], target concept features       |
| Y (d × N), anchor columns    | Y = [y_1 … y_N], anchor concept features       |
| guide                        | anchor concept                                 |
| W_o: the weight as given     | W_o, pretrained weights of the layer           |
| block i (1-based here)       | layer i of Algorithm 1                         |

Progressive (Algorithm 1). In each text encoder, the q, k and v projections of every self-attention
block from `start_layer` to the last block the U-Net reads, in order; then every U-Net
cross-attention K and V. X at block i is the input of its q/k/v (the block's first layer-norm
output) computed through the blocks already edited — exactly as the saved, rounded weights compute
it; Y is the anchors' input of the same block in the original model, computed once. q, k and v read
the same X, so they share one SVD; OpenCLIP (SD2's ViT-H, SDXL's bigG) stores them as rows of one
fused `attn.in_proj_weight`, and one edit of the fused matrix is exactly the three edits, kept
under the checkpoint's own key. All K/V of the U-Net read the same context, so they share one too.

Flux.1 and SD3 (MMDiT): the same walk over the encoders the architecture lists, by their layout. T5 (T5-XXL:
24 blocks, 4096 wide) is stepped through with transformers' own `T5Block`s (`models.layerwise`): X at block i
is its first RMSNorm's output (no biases), with block 0's relative position bias added in every block and no
attention mask over the padding, as ComfyUI's T5 features for Flux and SD3 are computed. The last stage, the
denoiser's CONTEXT map (`txt_in`, `context_embedder`), reads the context assembled as the hosts assemble it:
SD3's [CLIP-L ⊕ CLIP-G | T5] along the tokens, each segment's columns at its own tokenizer's positions. The
CLIP encoders are edited as for SD wherever their output is read: Flux's CLIP-L only through its pooled output
(all its blocks), SD3's CLIP-L and CLIP-G through both. POOLED maps (`vector_in`, `y_embedder`, SDXL's
`label_emb`) are not edited here: their input follows the edited encoders (exactly where the pooled EOS position
pairs target with guide: prompts of one length); `pooled_edit` (auto: on for Flux and SD3) edits them after. T5
has no absolute position embedding, so at its first block a token's feature is the same wherever it stands: pairs
that send one token (EOS) to different anchors — a guide shorter or longer than its target beside a preserved
prompt — cannot all be met there (a residual warning);
from block 2 on attention mixes in the context. Memory on the device for T5-XXL (computed for Flux dev, 512
tokens, one target and the empty prompt, all_tokens: 1024 columns): the embedding as stored (0.26 GB in fp16),
one block in float32 (0.77 GB), the anchors' q/k/v inputs of all 24 blocks (0.4 GB), the low-rank edits (3 ups
and 1 shared down of 4096 × rank per block, ≤ 1.6 GB), activations and position bias (~0.4 GB): about 3.5 GB;
the edited q/k/v themselves wait in main memory (2.4 GB in fp16). The probe that follows every method builds
the float32 T5 of the feature path (`T5TextEncoder`, 19 GB) while those edits are held: ~21 GB at the peak.

Choices the paper leaves open, as implemented:
- Biases (q/k/v have them) are kept: the constraint is on the whole map, W x_i + b = W_o y_i + b,
  which is W x_i = W_o y_i. X, Y are the layer-norm outputs (its affine part included).
- Pseudo-inverse. X⁺ from the SVD, singular values below rcond · s_max dropped; rcond defaults to
  max(d, N) · eps of `feature_dtype` (`linalg.default_rcond`): with full column rank this is exactly
  (XᵀX)⁻¹Xᵀ; otherwise (N > d, repeated columns such as BOS in every prompt) the minimum-norm
  least-squares solution, still zero residual when the constraints agree. Each stage reports its
  rank, the target–anchor distance ‖X − Y‖/‖Y‖ before the edit (the paper's Fig. 3a) and the
  residual ‖W X − W_o Y‖/‖W_o Y‖ of the edit as stored (float32 factors; writing a half-precision
  checkpoint adds its own rounding, about 1e-4). X itself is always computed with the rounded
  weights the checkpoint will hold.
- Which blocks: only those whose output reaches the U-Net. SD2 and SDXL read the penultimate
  block, so the last block of SD2's ViT-H and of SDXL's CLIP-L is left alone; SDXL's bigG last
  block is edited, since the pooled embedding passes through it. SDXL: both encoders, each along
  its own blocks; the U-Net K/V see the concatenation of their features.
- Tokens (`token_policy`), paired position by position between a target and its guide:
  ``all_tokens`` (default) all 77 positions — "the input sequence to this layer" (§3.1); BOS and,
  at the first block, identical padding pair with themselves and are simply kept.
  ``prompt_tokens``: positions 0 … max(len_target, len_guide) − 1 (BOS, words and EOS of both).
  ``first_k``: positions 0 … k − 1, the paper's implicit-nudity variants: ErasePro-w = k 5 from
  block 5, ErasePro-s = k 8 from block 1, guide "" (with ``progressive=false``, see below).
- Preserved prompts (not in the paper) are their own anchors: their current features must give the
  original outputs — the same hard constraint, added as columns. With `preserve_empty` (default) the
  empty prompt is one of them: it is the unconditional branch of classifier-free guidance, and an edit
  that moves it away from the target lets guidance add the target back (ToyWorld, red → "": erased
  29 % without it, 62 % with it; the paper's setting is ``preserve_empty=false``).
- ``progressive=false`` is the paper's Algorithm 2 ("ErasePro-modified", used for its implicit runs)
  as we read it: there X^i is computed through block i before that block's update, so every
  stage sees the original model's target features.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from ..concepts import Concepts, token_positions
from ..editable import EditableModel, Progress
from ..errors import InvalidParameterError
from ..linalg import default_rcond, right_update_edits, zero_residual_factors
from ..models.arch import CLIP_WINDOW, ArchSpec, EncoderSpec
from ..models.layerwise import blocks_reaching_unet, layerwise_encoder
from ..params import Param, Values
from ..patch import Edit, LowRankEdit, compute_dtype
from ..tokenizer import tokenizer_for
from .base import ErasureMethod, MethodOutput

DTYPES = {"float32": torch.float32, "float64": torch.float64}
RESIDUAL_WARNING = 1e-2
STAGE_NAMES = {"unet": "unet cross-attention K/V", "mmdit": "transformer context maps"}

ERASEPRO_PARAMS = (
    Param("start_layer", int, 1, "first text-encoder block edited, 1-based (1 = the first; the paper's -w variant "
          "starts at 5); every block from here to the last one the U-Net reads is edited", min=1, max=64, step=1),
    Param("token_policy", str, "all_tokens",
          "token positions that form the constraints, target and guide paired position by position: all_tokens "
          "(all 77), prompt_tokens (BOS, words, EOS of both prompts), first_k (the first k; the paper's "
          "implicit-nudity variants)", choices=("all_tokens", "prompt_tokens", "first_k")),
    Param("k", int, 5, "with token_policy=first_k: how many leading tokens, BOS included (paper: -w 5, -s 8)",
          min=1, max=CLIP_WINDOW, step=1),
    Param("progressive", bool, True, "target features of each block computed through the blocks already edited "
          "(the paper's Algorithm 1); false: from the original model (its Algorithm 2, used for implicit nudity)"),
    Param("edit_unet", bool, True, "also edit the denoiser's text maps, the last stage of the progression: the "
          "U-Net cross-attention K/V, Flux's txt_in, SD3's context_embedder"),
    Param("preserve_empty", bool, True,
          "also hold the empty prompt (the negative of classifier-free guidance) to its original features; off (the "
          "paper), guidance adds back what the edit pushed out of it (ToyWorld: red erased 29 % off, 62 % on)"),
    Param("rcond", float, None, "pseudo-inverse cut-off, relative to the largest singular value of X; "
          "empty = max(d, N)·eps of feature_dtype", min=0.0, max=1.0, nullable=True),
    Param("feature_dtype", str, "float32", "precision of the text-encoder passes (float64 for exact checks)",
          choices=tuple(DTYPES)),
    Param("solve_dtype", str, "float64", "precision of the SVD and the update (written in the model's dtype)",
          choices=tuple(DTYPES)),
)


def _columns(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """d × N feature columns from [n, tokens, d] states."""
    return hidden[rows, positions].T


def _pair_columns(spec: EncoderSpec, pairs, current: list[str], anchors: list[str], values: Values,
                  device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(current rows, anchor rows, positions) of one encoder's constraint columns, pair by pair."""
    tokenize = tokenizer_for(spec)
    rows_c, rows_a, positions = [], [], []
    for target, anchor in pairs:
        # this method's policies pair a target's positions with the same positions of its guide
        pos, _ = token_positions(values.token_policy, tokenize(target).length, tokenize(anchor).length,
                                 spec.window, values.k)
        rows_c += [current.index(target)] * len(pos)
        rows_a += [anchors.index(anchor)] * len(pos)
        positions += pos
    return tuple(torch.tensor(v, device=device, dtype=torch.long) for v in (rows_c, rows_a, positions))


def _context_columns(arch: ArchSpec, features: dict[EncoderSpec, torch.Tensor], columns, side: int) -> torch.Tensor:
    """The CONTEXT maps' feature columns (side 0: current prompts, 1: anchors), as the hosts assemble the context:
    the encoders of a segment concatenated along the features and zero-padded to the maps' width, each segment's
    columns at its own encoder's positions (SD3: [CLIP-L ⊕ CLIP-G | T5])."""
    segments: dict[int, list[EncoderSpec]] = {}
    for spec in features:
        segments.setdefault(spec.segment, []).append(spec)
    parts = []
    for segment in sorted(segments):
        specs = segments[segment]
        hidden = torch.cat([features[s] for s in specs], -1)
        hidden = torch.nn.functional.pad(hidden, (0, arch.context_dim - hidden.shape[-1]))
        rows, positions = columns[specs[0].name][side], columns[specs[0].name][2]
        parts.append(_columns(hidden, rows, positions))
    return torch.cat(parts, 1)


class ErasePro(ErasureMethod):
    name = "erasepro"
    title = "ErasePro"
    summary = ("Zero-residual, progressive: exact target→guide mapping at every text-encoder q/k/v (CLIP, T5) and "
               "cross-attention K/V (MMDiT: the context map), shallow to deep; edits the text encoder too")
    params = ERASEPRO_PARAMS

    def run(self, model: EditableModel, concepts: Concepts, values: Values,
            progress: Progress) -> MethodOutput:
        start = values.start_layer - 1
        plan = {spec.name: range(start, blocks_reaching_unet(spec)) for spec in model.arch.encoders}
        blocks = sum(len(r) for r in plan.values())
        if not blocks:  # not one text-encoder block: not ErasePro any more
            deepest = max(blocks_reaching_unet(s) for s in model.arch.encoders)
            raise InvalidParameterError("start_layer", f"{values.start_layer} is past the last block the denoiser "
                                        f"reads ({deepest}): no text-encoder block would be edited")
        feature_dtype = DTYPES[values.feature_dtype]

        # Constraint columns: (current row, anchor row, position). Targets pair with their guides,
        # preserved prompts with themselves.
        preserve = tuple(dict.fromkeys(concepts.preserve + (("",) if values.preserve_empty else ())))
        current = list(dict.fromkeys(concepts.targets + preserve))
        anchors = list(dict.fromkeys(concepts.guides + preserve))
        pairs = list(zip(concepts.targets, concepts.guides)) + [(p, p) for p in preserve]
        # per encoder: its own tokenizer's lengths and window (CLIP BPE 77, T5 256 / 77, ToyWorld's words)
        columns = {spec.name: _pair_columns(spec, pairs, current, anchors, values, model.device)
                   for spec in model.arch.encoders}

        edits: dict[str, tuple[Edit, ...]] = {}
        stages: list[dict] = []
        total = blocks + (len(model.arch.map_keys()) if values.edit_unet else 0)
        done = 0
        context_c, context_a = {}, {}  # spec → per-token features the CONTEXT maps read
        clock, building = time.perf_counter(), 0.0
        for spec in model.arch.encoders:
            progress(done, total, f"building {spec.name}")
            built = time.perf_counter()
            encoder = layerwise_encoder(spec, model.keys(), model.weight, model.device, feature_dtype)
            building += time.perf_counter() - built
            edited = plan[spec.name]
            rows_c, rows_a, positions = columns[spec.name]
            ids_c, _ = encoder.tokens(current)
            ids_a, _ = encoder.tokens(anchors)

            # Y^{i−1}: the anchors' input to every edited block, in the original model, computed once.
            hidden, anchor_inputs = encoder.embed(ids_a), {}
            for i in range(encoder.depth):
                if i in edited:
                    anchor_inputs[i] = _columns(encoder.attention_input(i, hidden), rows_a, positions)
                hidden = encoder.run_layer(i, hidden)
                if i + 1 == encoder.context_depth and spec.context:
                    context_a[spec] = encoder.context(hidden)

            # X^{i−1}: the targets' input, through the blocks edited so far (Algorithm 1).
            hidden = encoder.embed(ids_c)
            for i in range(encoder.depth):
                if i in edited:
                    X = _columns(encoder.attention_input(i, hidden), rows_c, positions)
                    block_edits, info = self._solve(model, encoder.qkv_keys(i), X, anchor_inputs.pop(i), values)
                    stages.append({"stage": f"{spec.name} block {i + 1}", **info})
                    for key, edit in block_edits.items():
                        edits[key] = (edit,)
                        if values.progressive:
                            # the weights as they will be written (rounded to the model's dtype)
                            encoder.set_weight(key, edit.apply(model.weight(key)))
                    done += 1
                    progress(done, total, f"editing {spec.name} block {i + 1}")
                hidden = encoder.run_layer(i, hidden)
                if i + 1 == encoder.context_depth and spec.context:
                    context_c[spec] = encoder.context(hidden)
            del encoder, hidden
        # text_encoders: both passes and the solves, after building the encoders from the weights
        seconds = {"build_text_encoders": round(building, 4),
                   "text_encoders": round(time.perf_counter() - clock - building, 4)}

        if values.edit_unet:
            clock = time.perf_counter()
            X, Y = (_context_columns(model.arch, features, columns, side) for side, features in
                    ((0, context_c), (1, context_a)))
            unet_edits, info = self._solve(
                model, model.arch.map_keys(), X, Y, values,
                lambda i, n: progress(done + i, total, "editing the denoiser's text maps"))
            stages.append({"stage": STAGE_NAMES[model.arch.denoiser], **info})
            edits.update({key: (edit,) for key, edit in unet_edits.items()})
            seconds["unet"] = round(time.perf_counter() - clock, 4)

        worst = max(stages, key=lambda s: s["residual"])
        cut = values.rcond is not None and worst["rank"] < min(worst["columns"], worst["width"])
        if worst["residual"] > RESIDUAL_WARNING and cut:  # the user's rcond dropped directions, not the columns
            warnings.warn(
                f"ErasePro could not meet its constraints at {worst['stage']} (relative residual "
                f"{worst['residual']:.2e}): rcond={values.rcond:g} kept rank {worst['rank']} of its "
                f"{worst['columns']} columns; lower rcond or leave it empty (max(d, N)·eps)", stacklevel=2)
        elif worst["residual"] > RESIDUAL_WARNING:
            warnings.warn(
                f"ErasePro could not meet its constraints exactly at {worst['stage']} (relative residual "
                f"{worst['residual']:.2e}, {worst['columns']} columns, rank {worst['rank']}): there are more or "
                "conflicting token columns than the feature width allows; use token_policy=prompt_tokens or "
                "first_k, or fewer concepts", stacklevel=2)
        headline = {"columns": max(s["columns"] for s in stages), "max_residual": worst["residual"]}
        return MethodOutput(edits, {**headline, "stages": stages, "seconds_by_phase": seconds},
                            summary={**headline, "text_encoder_blocks": blocks})

    @staticmethod
    def _solve(model: EditableModel, keys: Sequence[str], X: torch.Tensor, Y: torch.Tensor,
               values: Values, progress=None) -> tuple[dict[str, Edit], dict]:
        """The zero-residual edits of the matrices `keys`, which all read features X (anchors Y)."""
        d, n = X.shape
        rcond = values.rcond if values.rcond is not None else default_rcond(d, n, X.dtype)
        A, B = zero_residual_factors(X, Y, rcond, DTYPES[values.solve_dtype])
        weights = {key: model.weight(key) for key in keys}
        edits = right_update_edits(weights, A, B, progress)
        residual = 0.0
        for key, weight in weights.items():
            # ‖W X − W_o Y‖ / ‖W_o Y‖ of the edit as stored, at float32 (float64 for float64 models)
            dtype, edit = compute_dtype(weight.dtype), edits[key]
            x, y, w = X.to(dtype), Y.to(dtype), weight.to(dtype)
            if isinstance(edit, LowRankEdit):
                # W X − W_o Y = up (down X) − W_o (Y − X): one product with W_o for both norms
                moved, wanted = (w @ torch.cat([y - x, y], 1)).split(x.shape[1], 1)
                error = edit.up.to(dtype) @ (edit.down.to(dtype) @ x) - moved
            else:
                wanted = w @ y
                error = edit.apply(weight).to(dtype) @ x - wanted
            residual = max(residual, float(error.norm() / wanted.norm()))
        return edits, {
            "keys": len(keys),
            "columns": n,
            "width": d,
            "rank": A.shape[1],
            "distance": float((X - Y).norm() / Y.norm()),
            "residual": residual,
        }
