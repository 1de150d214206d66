"""The synthetic *art* catalogue: abstract originals, generated derivatives of each, and triplets.

An original is a list of shapes (circles, rectangles, triangles, lines, blobs) in a 2-4 colour
palette on a neutral background, sometimes with a texture. Its derivatives are the kind of copies an
art-provenance model must still match: a palette shift (hue rotation), a re-composition (shapes moved,
resized, turned), a texture/noise overlay, a crop resized back, a mirror image. Descriptions are
generated from the content actually drawn, so a palette shift changes the colour words and a crop
drops the shapes it cut away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.random import Generator
from PIL import Image, ImageDraw

from cliptune.data.synthetic.common import (
    clear_stale_images,
    make_contact_sheet,
    progress_iter,
    save_png,
    seeded_rng,
    with_article,
    write_csv,
)

__all__ = ["ART_COLUMNS", "ART_TRANSFORMS", "TRIPLET_COLUMNS", "render_art"]

_RGB = tuple[int, int, int]

ART_COLUMNS = ("file_name", "text", "group", "kind", "transform")
TRIPLET_COLUMNS = ("anchor", "positive", "negative")
ART_TRANSFORMS = ("palette_shift", "recompose", "texture", "crop", "mirror")

# The hue wheel, in order: a palette shift moves every shape colour k steps round it.
_HUES: dict[str, _RGB] = {
    "red": (212, 45, 45),
    "orange": (238, 135, 35),
    "yellow": (242, 202, 48),
    "green": (58, 152, 70),
    "teal": (28, 148, 150),
    "blue": (45, 85, 195),
    "purple": (126, 60, 162),
    "pink": (232, 118, 172),
}
_BACKGROUNDS: dict[str, _RGB] = {
    "cream": (246, 236, 212),
    "white": (250, 250, 247),
    "black": (24, 24, 28),
    "navy": (24, 34, 72),
    "grey": (150, 150, 152),
    "sand": (216, 196, 152),
}
_KINDS = ("circle", "rectangle", "triangle", "line", "blob")
_TEXTURES = ("none", "grain", "hatch", "dots")
_TEXTURE_PHRASE = {
    "none": "",
    "grain": "a grainy texture",
    "hatch": "hatched lines",
    "dots": "a dotted overlay",
}
_TRANSFORM_PHRASE = {
    "palette_shift": "colour-shifted variation",
    "recompose": "re-arranged variation",
    "texture": "textured variation",
    "crop": "cropped detail",
    "mirror": "mirrored variation",
}
_NUMBER = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str  # a key of _HUES
    cx: float  # unit coordinates of the centre
    cy: float
    size: float  # radius-like extent, unit
    angle: float  # radians
    aspect: float  # rectangles: height / width; lines: thickness / size
    wobble: tuple[float, ...]  # blobs: (amp2, phase2, amp3, phase3, amp4, phase4)


@dataclass(frozen=True)
class _Composition:
    background: str
    shapes: tuple[_Shape, ...]
    texture: str  # a key of _TEXTURE_PHRASE; descriptions also accept 'a+b' for layered textures


def _composition(rng: Generator) -> _Composition:
    hue_names = list(_HUES)
    palette = [
        hue_names[int(i)] for i in rng.choice(len(hue_names), size=int(rng.integers(2, 5)), replace=False)
    ]
    shapes = []
    for _ in range(int(rng.integers(3, 8))):
        kind = _KINDS[int(rng.integers(len(_KINDS)))]
        shapes.append(
            _Shape(
                kind=kind,
                colour=palette[int(rng.integers(len(palette)))],
                cx=float(rng.uniform(0.18, 0.82)),
                cy=float(rng.uniform(0.18, 0.82)),
                size=float(rng.uniform(0.09, 0.28)),
                angle=float(rng.uniform(0, 2 * math.pi)),
                aspect=float(rng.uniform(0.4, 1.0)) if kind != "line" else float(rng.uniform(0.12, 0.22)),
                wobble=tuple(
                    float(v) for v in rng.uniform([0, 0, 0, 0, 0, 0], [0.25, 6.3, 0.2, 6.3, 0.12, 6.3])
                ),
            )
        )
    background = list(_BACKGROUNDS)[int(rng.integers(len(_BACKGROUNDS)))]
    texture = _TEXTURES[1 + int(rng.integers(len(_TEXTURES) - 1))] if rng.random() < 0.5 else "none"
    return _Composition(background, tuple(sorted(shapes, key=lambda s: -s.size)), texture)


def _rotated(
    cx: float, cy: float, points: list[tuple[float, float]], angle: float, g: int
) -> list[tuple[int, int]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(round((cx + x * c - y * s) * g), round((cy + x * s + y * c) * g)) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape, g: int) -> None:
    fill = _HUES[shape.colour]
    r = shape.size
    if shape.kind == "circle":
        x0, y0, x1, y1 = (round(v * g) for v in (shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r))
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "rectangle":
        h = r * shape.aspect
        draw.polygon(
            _rotated(shape.cx, shape.cy, [(-r, -h), (r, -h), (r, h), (-r, h)], shape.angle, g), fill=fill
        )
    elif shape.kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(_rotated(shape.cx, shape.cy, pts, shape.angle, g), fill=fill)
    elif shape.kind == "line":
        ends = _rotated(shape.cx, shape.cy, [(-r * 1.3, 0.0), (r * 1.3, 0.0)], shape.angle, g)
        draw.line(ends, fill=fill, width=max(2, round(r * shape.aspect * g)))
    else:  # blob: a circle whose radius wobbles with 2nd-4th harmonics
        a2, p2, a3, p3, a4, p4 = shape.wobble
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            rad = r * (1 + a2 * math.cos(2 * t + p2) + a3 * math.cos(3 * t + p3) + a4 * math.cos(4 * t + p4))
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        draw.polygon(_rotated(shape.cx, shape.cy, pts, shape.angle, g), fill=fill)


def _apply_texture(image: Image.Image, texture: str, rng: Generator, strength: float) -> Image.Image:
    """Overlay grain, hatching or dots; `strength` ~1 for an original's texture, ~2 for a derivative's."""
    if texture == "none":
        return image
    size = image.size[0]
    arr = np.asarray(image, np.float32)  # (S, S, 3)
    if texture == "grain":
        noise = rng.normal(0.0, 12.0 * strength, size=(size, size, 1)).astype(np.float32)
        arr = arr + noise
    else:
        overlay = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(overlay)
        step = int(rng.integers(5, 9))
        if texture == "hatch":
            for x in range(-size, size, step):
                draw.line([(x, 0), (x + size, size)], fill=255, width=1)
        else:
            for y in range(step // 2, size, step):
                for x in range(step // 2, size, step):
                    draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=255)
        ink = np.asarray(overlay, np.float32)[..., None] / 255.0 * min(0.9, 0.3 * strength)  # (S, S, 1)
        target = 255.0 if texture == "dots" else 0.0
        arr = arr * (1.0 - ink) + target * ink
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _render(comp: _Composition, size: int, texture_rng: Generator) -> Image.Image:
    g = 2 * size  # draw at 2x and box-reduce: anti-aliased edges at no cost in determinism
    canvas = Image.new("RGB", (g, g), _BACKGROUNDS[comp.background])
    draw = ImageDraw.Draw(canvas)
    for shape in comp.shapes:
        _draw_shape(draw, shape, g)
    return _apply_texture(canvas.reduce(2), comp.texture, texture_rng, strength=1.0)


def _describe(comp: _Composition, shapes: tuple[_Shape, ...] | None = None) -> str:
    """ "abstract composition of a large red circle, two blue lines and a teal blob on a cream background"."""
    shapes = comp.shapes if shapes is None else shapes
    groups: dict[tuple[str, str], list[_Shape]] = {}
    for s in shapes:
        groups.setdefault((s.colour, s.kind), []).append(s)
    ranked = sorted(groups.items(), key=lambda kv: -sum(s.size for s in kv[1]))[:4]
    phrases = []
    for (colour, kind), members in ranked:
        if len(members) == 1:
            adjective = "large " if members[0].size > 0.22 else ""
            word = f"{adjective}{colour} {kind}"
            phrases.append(with_article(word))
        else:
            phrases.append(f"{_NUMBER.get(len(members), 'several')} {colour} {kind}s")
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    textures = [_TEXTURE_PHRASE[t] for t in comp.texture.split("+") if t != "none"]
    finish = (" with " + " and ".join(textures)) if textures else ""
    return f"abstract composition of {listing} on a {comp.background} background{finish}"


def _derive(
    comp: _Composition, original: Image.Image, transform: str, rng: Generator, size: int
) -> tuple[Image.Image, str]:
    """Apply one transform; return the derivative and its description (own content + transform)."""
    if transform == "palette_shift":
        names, step = list(_HUES), int(rng.integers(2, 7))
        shift = {name: names[(i + step) % len(names)] for i, name in enumerate(names)}
        new = replace(comp, shapes=tuple(replace(s, colour=shift[s.colour]) for s in comp.shapes))
        return _render(new, size, rng), f"{_TRANSFORM_PHRASE[transform]}: {_describe(new)}"
    if transform == "recompose":
        moved = []
        for s in comp.shapes:
            dx, dy = rng.uniform(-0.14, 0.14, size=2)
            moved.append(
                replace(
                    s,
                    cx=float(np.clip(s.cx + dx, 0.12, 0.88)),
                    cy=float(np.clip(s.cy + dy, 0.12, 0.88)),
                    size=float(s.size * rng.uniform(0.75, 1.3)),
                    angle=float(s.angle + rng.uniform(-0.8, 0.8)),
                )
            )
        new = replace(comp, shapes=tuple(sorted(moved, key=lambda s: -s.size)))
        return _render(new, size, rng), f"{_TRANSFORM_PHRASE[transform]}: {_describe(new)}"
    if transform == "texture":
        texture = [t for t in _TEXTURES if t not in ("none", comp.texture)][int(rng.integers(2))]
        image = _apply_texture(original, texture, rng, strength=2.0)
        layered = texture if comp.texture == "none" else f"{comp.texture}+{texture}"  # both are visible
        return image, f"{_TRANSFORM_PHRASE[transform]}: {_describe(replace(comp, texture=layered))}"
    if transform == "crop":
        side = float(rng.uniform(0.55, 0.75))
        x0, y0 = (float(v) for v in rng.uniform(0.0, 1.0 - side, size=2))
        box = (round(x0 * size), round(y0 * size), round((x0 + side) * size), round((y0 + side) * size))
        image = original.crop(box).resize((size, size), Image.Resampling.BICUBIC)
        kept = tuple(
            s
            for s in comp.shapes
            if x0 - s.size / 2 < s.cx < x0 + side + s.size / 2
            and y0 - s.size / 2 < s.cy < y0 + side + s.size / 2
        )
        return image, f"{_TRANSFORM_PHRASE[transform]}: {_describe(comp, kept or comp.shapes)}"
    if transform == "mirror":
        image = original.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, f"{_TRANSFORM_PHRASE[transform]}: {_describe(comp)}"
    raise ValueError(f"unknown transform '{transform}'; known: {', '.join(ART_TRANSFORMS)}")


def render_art(
    out: Path, n: int = 200, seed: int = 0, size: int = 160, derivatives: int = 3, progress: bool = False
) -> Path:
    """Render the art catalogue: `n` originals with `derivatives` derivatives each, plus triplets.

    `n` counts originals, so the catalogue holds `n * (1 + derivatives)` images; an original and its
    derivatives share a `group` (`a0007`), so grouped splits keep a work and its copies together.
    Each original's derivatives use distinct transforms while there are transforms left
    (`ART_TRANSFORMS`, in a seeded order), then reuse them with new random parameters.

    Writes `images/`, `metadata.csv` (`file_name, text, group, kind, transform`), `triplets.csv`
    (`anchor, positive, negative`: one row per derivative; anchor = the original, positive = the
    derivative, negative = an image of another group) and `contact_sheet.png`.

    Args:
        out: Catalogue folder (earlier renders' images there are replaced).
        n: Number of originals, >= 2 (triplets need another group for negatives).
        seed: The same seed, `n`, `size` and `derivatives` give byte-identical files.
        size: Side of the square images in pixels, >= 32.
        derivatives: Derivatives per original, >= 1.
        progress: Show a progress bar on stderr.

    Returns:
        `out`, the catalogue folder.

    Example:
        >>> render_art(Path("data/art"), n=2, derivatives=3, size=32)
        PosixPath('data/art')
    """
    if n < 2:
        raise ValueError(f"n (originals) must be >= 2 so triplets have negatives, got {n}")
    if derivatives < 1:
        raise ValueError(f"derivatives must be >= 1, got {derivatives}")
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    out = Path(out)
    clear_stale_images(out / "images", r"a\d{4,}_\d+\.png")
    rows: list[list[str]] = []
    members: list[list[str]] = []  # file names per group, original first
    for i in progress_iter(range(n), progress, "art"):
        group = f"a{i:04d}"
        comp = _composition(seeded_rng(seed, 0, i))
        original = _render(comp, size, seeded_rng(seed, 1, i))
        files = [f"images/{group}_0.png"]
        save_png(original, out / files[0])
        rows.append([files[0], _describe(comp), group, "original", "none"])
        order = [ART_TRANSFORMS[int(k)] for k in seeded_rng(seed, 2, i).permutation(len(ART_TRANSFORMS))]
        for j in range(1, derivatives + 1):
            transform = order[(j - 1) % len(order)]
            image, text = _derive(comp, original, transform, seeded_rng(seed, 3, i, j), size)
            files.append(f"images/{group}_{j}.png")
            save_png(image, out / files[-1])
            rows.append([files[-1], text, group, "derivative", transform])
        members.append(files)
    write_csv(out / "metadata.csv", ART_COLUMNS, rows)
    write_csv(out / "triplets.csv", TRIPLET_COLUMNS, _triplets(members, seeded_rng(seed, 4)))
    sheet = [(r[0], r[2], r[3] if r[3] == "original" else r[4]) for r in rows]
    make_contact_sheet(out, sheet, out / "contact_sheet.png")
    return out


def _triplets(members: list[list[str]], rng: Generator) -> list[list[str]]:
    triplets = []
    for gi, files in enumerate(members):
        for positive in files[1:]:
            other = int(rng.integers(len(members) - 1))
            other += other >= gi  # uniform over the other groups
            negatives = members[other]
            triplets.append([files[0], positive, negatives[int(rng.integers(len(negatives)))]])
    return triplets
