"""`python -m concept_eraser demo`: erase "circle" (→ "square") from the bundled ToyWorld model.

Runs the real command line (`erase` writes an erased checkpoint file), then samples the original
and the erased file with the same seeds, has the judge read every sample, prints the figures and
writes a preview grid with the verdicts.
"""

from __future__ import annotations

from pathlib import Path

from . import judge as judge_module
from . import world
from .grid import save_grid
from .pipeline import CHECKPOINT, ToyWorldPipeline

TARGET, GUIDE = "circle", "square"
SAMPLES = 10  # per prompt set: every sample appears in the grid with its verdict
SEED = 0


def _verdict_caption(v: dict) -> str:
    return f"{v['shape']}\n{v['colour']}"


def run(folder: Path, main) -> int:
    """Erase with `main` (the CLI entry point, so the demo shows the command a user would type)."""
    folder.mkdir(parents=True, exist_ok=True)
    erased_path = folder / "toyworld-no-circle.safetensors"
    preserve = [w for w in world.SHAPES if w not in (TARGET, GUIDE)]
    argv = ["erase", str(CHECKPOINT), "--erase", TARGET, "--guide", GUIDE,
            *[arg for word in preserve for arg in ("--preserve", word)],
            "--out", str(erased_path), "--report", str(folder / "report.json"), "--overwrite"]
    print("python -m concept_eraser " + " ".join(argv))
    code = main(argv)
    if code != 0:
        return code
    main(["inspect", str(erased_path)])
    judge = judge_module.load()
    prompts = {
        "circle": [world.describe("circle", c, b) for c, b in zip(world.COLOURS * 4, world.BACKGROUNDS * 5)][:SAMPLES],
        "others": [world.describe(s, c, b) for s, c, b in zip(world.SHAPES[1:] * 4, world.COLOURS * 4,
                                                             world.BACKGROUNDS * 5)][:SAMPLES],
    }
    rows, figures = [], {}
    for label, path in (("original", CHECKPOINT), ("erased", erased_path)):
        pipe = ToyWorldPipeline.from_file(path)
        for name, texts in prompts.items():
            images = pipe.sample(texts, SEED)
            verdicts = judge.verdicts(images)
            wanted = [world.parse(t) for t in texts]
            figures[label, name, "circle"] = sum(v["shape"] == TARGET for v in verdicts) / len(texts)
            figures[label, name, "square"] = sum(v["shape"] == GUIDE for v in verdicts) / len(texts)
            right = [all(v[k] == w[k] for k in w) for v, w in zip(verdicts, wanted)]
            figures[label, name, "right"] = sum(right) / len(texts)
            rows.append((f"{label}: {name}", images, [_verdict_caption(v) for v in verdicts]))
    grid = save_grid(rows, folder / "toyworld-demo.png", title=f"erase '{TARGET}' -> '{GUIDE}' (uce); judge verdicts")
    pct = lambda key: f"{100 * figures[key]:.0f}%"  # noqa: E731
    print(f"circle prompts judged circle: {pct(('original', 'circle', 'circle'))} before, "
          f"{pct(('erased', 'circle', 'circle'))} after ({pct(('erased', 'circle', 'square'))} now squares)")
    print(f"other shapes fully right: {pct(('original', 'others', 'right'))} before, "
          f"{pct(('erased', 'others', 'right'))} after")
    print(f"preview grid: {grid}")
    return 0
