"""Build ToyWorld-Flux: `python -m concept_eraser.toyworld.build_flux --out DIR [--install]`.

ToyWorld's world and captions, ToyWorld's frozen text encoder (read from the shipped `toyworld.safetensors`,
as Flux reuses pre-trained encoders), and a small Flux-style MMDiT (`mmdit.ToyFlux`) trained by rectified
flow (`flow`) on the same batches as the U-Net (`build.captioned_batch`, caption dropout for guidance):
per-token features → `txt_in`, the pooled embedding (final-normed EOS state, Flux's CLIP-L pooled output)
→ `vector_in`. Resumable like `build`: the model and its EMA are saved every `--save-every` steps to
`flux.pt`, every batch is drawn from a generator seeded by the step, so a resumed run is identical to an
uninterrupted one. The judge is ToyWorld's (it reads images, whatever drew them). Export:
`toyworld_flux.safetensors` into DIR; `--install` also copies it into the package's `weights/` folder.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from . import build, export, flow, text
from .mmdit import FluxConfig, ToyFlux
from .pipeline import CHECKPOINT

FLUX = FluxConfig(hidden=96, heads=3, depth=2, depth_single=2, axes_dim=(8, 12, 12),
                  context_dim=text.WIDTH, vec_dim=text.WIDTH)


def frozen_text_encoder(checkpoint: Path = CHECKPOINT):
    """ToyWorld's pre-trained CLIP text model, from its checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    model = text.new_text_model(build.tokenizer(), seed=0)
    missing, unexpected = model.load_state_dict(
        {k[len(export.TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(export.TEXT_PREFIX)}, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"{checkpoint} has no complete ToyWorld text encoder (missing {missing[:3]})")
    return model.eval().requires_grad_(False)


def encode(encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token features [n, window, d], pooled [n, d]): the last layer, final-normed, and its EOS state."""
    ids = torch.tensor([build.tokenizer()(c).ids for c in captions])
    out = encoder(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def stage_flux(out: Path, seed: int, steps: int, save_every: int, encoder, log, config: FluxConfig = FLUX) -> ToyFlux:
    torch.manual_seed(seed)

    def step_loss(model, step):
        x0, captions, gen = build.captioned_batch(step, seed)
        with torch.no_grad():
            context, pooled = encode(encoder, captions)
        return flow.loss(model, x0, context, pooled, gen)

    return build.train_denoiser(ToyFlux(config), out / "flux.pt", steps, save_every, step_loss, log)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser.toyworld.build_flux",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder: the training state, log and the exported file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="MMDiT training steps")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--install", action="store_true", help="copy the exported weights into the package")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = build._log(out)
    start = time.time()
    encoder = frozen_text_encoder()
    model = stage_flux(out, args.seed, args.steps, args.save_every, encoder, log)
    path = export.write_flux_checkpoint(out / "toyworld_flux.safetensors", encoder, model, build.tokenizer(), FLUX)
    log(f"exported {path}; this run took {time.time() - start:.0f} s")
    if args.install:
        shutil.copy(path, Path(__file__).parent / "weights" / path.name)
        log("installed into the package")


if __name__ == "__main__":
    main()
