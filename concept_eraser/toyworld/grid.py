"""Preview grids: rows of 16×16 samples, upscaled, each with a label and optional per-image verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SCALE = 4  # 16 px → 64 px per sample
LABEL_WIDTH = 130
CAPTION_HEIGHT = 32  # room for three lines of verdicts


def save_grid(rows: Sequence[tuple[str, torch.Tensor, Sequence[str] | None]], path: str | Path,
              title: str = "") -> Path:
    """`rows`: (label, images [n, 3, 16, 16] in [0, 1], per-image captions or None); writes a PNG."""
    from PIL import Image, ImageDraw

    side = rows[0][1].shape[-1] * SCALE
    columns = max(len(images) for _, images, _ in rows)
    row_h = side + (CAPTION_HEIGHT if any(c for _, _, c in rows) else 4)
    top = 18 if title else 2
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * (side + 4), top + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, (label, images, captions) in enumerate(rows):
        y = top + r * row_h
        draw.text((4, y + side // 2 - 6), label, fill="black")
        pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for c, array in enumerate(pixels):
            x = LABEL_WIDTH + c * (side + 4)
            canvas.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
            if captions:
                for line, text in enumerate(captions[c].split("\n")[:3]):
                    draw.text((x, y + side + line * 10), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
