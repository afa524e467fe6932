"""ToyWorld: a miniature text-to-image diffusion model trained here, so that erasure can be measured.

- `world`: procedural images (a coloured shape on a patterned background) and captions with synonyms;
- `unet`, `text`, `diffusion`: the model (LDM-layout U-Net, small transformers CLIP text encoder,
  cosine-schedule ε-prediction, DDIM with classifier-free guidance);
- `build`: the reproducible, resumable training command; `export`: the single-file checkpoint;
- `judge`: the classifier that reads shape, colour and background (or "none") from a sample;
- ToyWorld-Flux, the same world on a small Flux-style MMDiT: `mmdit` (BFL key names), `flow` (rectified
  flow: loss and Euler sampler), `build_flux` (its resumable training command, ToyWorld's text encoder frozen);
- `pipeline`: sampling a checkpoint file (either model, by its denoiser's own sampler) with an erasure patch applied;
- `benchmark`: every method × erasure tasks, judged; `demo`: `python -m concept_eraser demo`.

The trained weights are in `weights/` (package data). Modules are imported on use, so importing
this package stays cheap.
"""
