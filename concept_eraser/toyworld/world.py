"""The ToyWorld: one coloured shape on a patterned background, rendered procedurally, and captions.

Every image is a pure function of its `Scene` (shape, colour, background, centre, radius), rendered
with 4×4 supersampling so edges are anti-aliased and deterministic. Captions come from templates
with synonyms, so one concept has several wordings: the eraser is given the canonical word and the
benchmark attacks it with the others (`SHAPE_WORDS[...][1:]`, `IMPLICIT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 16  # image side in pixels
SUPERSAMPLE = 4
RADIUS = (5.0, 7.0)  # object radius range in pixels: large enough that shapes survive 16×16
JITTER = 1.5  # centre offset range in pixels around the image centre

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("plain", "stripes", "dots", "checks")

RGB = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.62, 0.18, 0.85),
}

# Wordings: the first entry is the canonical word the eraser is given.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape", "ball"),
    "square": ("square", "box", "block", "tile"),
    "triangle": ("triangle", "pyramid", "wedge", "three-sided shape"),
    "cross": ("cross", "plus sign", "plus", "x-shape"),
    "ring": ("ring", "donut", "hoop", "loop"),
    "diamond": ("diamond", "rhombus", "lozenge", "kite"),
}
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "navy"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
}
BACKGROUND_WORDS = {  # adjectives used as "on a <word> background"
    "plain": ("plain", "blank", "solid", "empty"),
    "stripes": ("striped", "stripy", "lined", "zebra"),
    "dots": ("dotted", "spotted", "speckled", "polka-dot"),
    "checks": ("checked", "checkered", "chequered", "chessboard"),
}
BACKGROUND_NOUNS = {"plain": "grey", "stripes": "stripes", "dots": "dots", "checks": "checks"}
# Words that imply a shape and a colour at once ("a sun" is a yellow circle): implicit concepts.
IMPLICIT = {
    "sun": ("circle", "yellow"),
    "coin": ("circle", "yellow"),
    "cherry": ("circle", "red"),
    "plum": ("circle", "purple"),
    "brick": ("square", "red"),
    "lifebuoy": ("ring", "red"),
    "leaf": ("diamond", "green"),
}
NEUTRAL_NOUNS = ("shape", "object", "thing")
FILLER = ("a", "an", "one", "the", "on", "over", "in", "with", "background", "backdrop", "picture", "of")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain (multi-word phrases split on spaces), sorted."""
    words = set(FILLER) | set(NEUTRAL_NOUNS) | set(IMPLICIT) | set(BACKGROUND_NOUNS.values())
    for table in (SHAPE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS):
        for wordings in table.values():
            for phrase in wordings:
                words.update(phrase.split())
    return tuple(sorted(words))


def random_scenes(gen: torch.Generator, n: int, shape=None, colour=None, background=None) -> list[Scene]:
    """`n` scenes with uniformly drawn attributes (or the ones given), centres and radii."""
    def pick(values, fixed):
        return [fixed] * n if fixed else [values[i] for i in torch.randint(len(values), (n,), generator=gen)]

    shapes, colours, backgrounds = pick(SHAPES, shape), pick(COLOURS, colour), pick(BACKGROUNDS, background)
    geo = torch.rand(n, 3, generator=gen)
    centre = SIZE / 2 + (2 * geo[:, :2] - 1) * JITTER
    radius = RADIUS[0] + geo[:, 2] * (RADIUS[1] - RADIUS[0])
    return [Scene(s, c, b, float(x), float(y), float(r))
            for s, c, b, (x, y), r in zip(shapes, colours, backgrounds, centre.tolist(), radius.tolist())]


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Inside-test of one shape on supersampled offsets from its centre (y grows downwards)."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if shape == "square":
        return torch.maximum(ax, ay) <= 0.8 * r
    if shape == "diamond":
        return ax + ay <= 1.05 * r
    if shape == "cross":
        arm = 0.32 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "triangle":  # apex up, base at 0.75 r below the centre
        return (dy <= 0.75 * r) & (dy >= -r) & (ax <= 0.58 * (dy + r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def background_layer(style: str, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Grey-level pattern on pixel coordinates: neutral tones, so every colour stands out on it."""
    dark, light = 0.30, 0.62
    if style == "plain":
        return torch.full_like(px, 0.46)
    if style == "stripes":  # horizontal stripes two pixels wide
        on = (py.floor().long() // 2) % 2 == 0
    elif style == "checks":  # two-pixel checkerboard
        on = ((px.floor().long() // 2) + (py.floor().long() // 2)) % 2 == 0
    elif style == "dots":  # a light dot every four pixels on dark
        fx, fy = px % 4 - 2.0, py % 4 - 2.0
        on = fx**2 + fy**2 <= 1.0
    else:
        raise ValueError(f"unknown background {style!r}; expected one of {', '.join(BACKGROUNDS)}")
    return torch.where(on, torch.full_like(px, light), torch.full_like(px, dark))


def supersampled_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (x, y) of the supersampled grid, in output-pixel units."""
    side = SIZE * SUPERSAMPLE
    coords = (torch.arange(side, dtype=torch.float64) + 0.5) / SUPERSAMPLE
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    return px, py


def object_mask(scene: Scene, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """The object's coverage (0 or 1) on the supersampled grid."""
    return _shape_mask(scene.shape, px - scene.cx, py - scene.cy, scene.radius).double()


def composite(grey: torch.Tensor, mask: torch.Tensor, rgb: tuple[float, float, float]) -> torch.Tensor:
    """Paint `rgb` over the grey background with coverage `mask`, then average down to SIZE × SIZE."""
    colour = torch.tensor(rgb, dtype=torch.float64)[:, None, None]
    image = grey[None] * (1 - mask[None]) + colour * mask[None]
    return torch.nn.functional.avg_pool2d(image[None], SUPERSAMPLE)[0].float()


def render(scenes: list[Scene]) -> torch.Tensor:
    """Images [n, 3, SIZE, SIZE] in [0, 1]."""
    px, py = supersampled_grid()
    out = torch.empty(len(scenes), 3, SIZE, SIZE)
    for i, s in enumerate(scenes):
        out[i] = composite(background_layer(s.background, px, py), object_mask(s, px, py), RGB[s.colour])
    return out


def caption(scene: Scene, gen: torch.Generator, keep: float = 0.85) -> str:
    """A random wording of `scene`; each attribute is mentioned with probability `keep`, so the model
    also learns what an unmentioned attribute looks like (the empty prompt's neighbourhood)."""
    u = torch.rand(8, generator=gen).tolist()
    choose = lambda options, x: options[min(int(x * len(options)), len(options) - 1)]  # noqa: E731
    implicit = [w for w, (shape, colour) in IMPLICIT.items() if (shape, colour) == (scene.shape, scene.colour)]
    if implicit and u[0] < 0.25:
        colour_word, noun = "", choose(implicit, u[1])
    else:
        colour_word = choose(COLOUR_WORDS[scene.colour], u[1]) if u[2] < keep else ""
        noun = choose(SHAPE_WORDS[scene.shape], u[3]) if u[4] < keep else choose(NEUTRAL_NOUNS, u[3])
    background = ""
    if u[5] < keep:
        if u[6] < 0.3:
            background = f"on {BACKGROUND_NOUNS[scene.background]}"
        else:
            adjective = choose(BACKGROUND_WORDS[scene.background], u[7])
            background = f"{choose(('on', 'over'), u[6])} a {adjective} background"
    article = "an" if (colour_word or noun)[0] in "aeiou" else "a"
    return " ".join(w for w in (article, colour_word, noun, background) if w)


def describe(shape: str | None = None, colour: str | None = None, background: str | None = None,
             shape_word: str | None = None) -> str:
    """The canonical prompt for the given attributes, e.g. "a red circle on a striped background"."""
    noun = shape_word or (SHAPE_WORDS[shape][0] if shape else "shape")
    colour_word = COLOUR_WORDS[colour][0] if colour else ""
    words = [colour_word, noun] if colour_word else [noun]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article, *words])
    if background:
        text += f" on a {BACKGROUND_WORDS[background][0]} background"
    return text


def _phrases() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value) for every wording, longest phrase first so "round shape" wins over "shape"."""
    rows = [(p, "shape", v) for v, ws in SHAPE_WORDS.items() for p in ws]
    rows += [(p, "colour", v) for v, ws in COLOUR_WORDS.items() for p in ws]
    rows += [(p, "background", v) for v, ws in BACKGROUND_WORDS.items() for p in ws]
    rows += [(p, "background", v) for v, p in BACKGROUND_NOUNS.items()]
    rows += [(p, "implicit", p) for p in IMPLICIT]
    return sorted(rows, key=lambda r: -len(r[0]))


def parse(text: str) -> dict[str, str | None]:
    """The attributes a prompt asks for: {"shape", "colour", "background"} → value or None."""
    found: dict[str, str | None] = {"shape": None, "colour": None, "background": None}
    rest = f" {' '.join(text.lower().split())} "
    for phrase, attribute, value in _phrases():
        if f" {phrase} " in rest:
            rest = rest.replace(f" {phrase} ", " | ")
            if attribute == "implicit":
                shape, colour = IMPLICIT[value]
                found["shape"], found["colour"] = found["shape"] or shape, found["colour"] or colour
            else:
                found[attribute] = found[attribute] or value
    return found
