"""The synthetic *fashion* catalogue: garment photos whose attributes a pretrained CNN can see.

Each product (garment type, colour, pattern, rips, style/fit) is drawn once as a flat garment layer
and then photographed 2-4 times with different pose, scale, rotation, background and lighting, so
grouped splits matter. Rips are dark or skin-toned irregular holes with frayed white threads and a
faded halo, large enough to be obvious at 160 px. Everything is drawn with integer coordinates from
`numpy.random.Generator(PCG64(...))` streams, so a seed fixes every byte.

Randomness is split into independent streams per product (design, rips, each photo, captions):
switching `rips` on or off changes only the pixels inside the rips, which the tests rely on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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

__all__ = [
    "FASHION_ATTRIBUTES",
    "FASHION_COLUMNS",
    "RIPS_SYNONYMS",
    "FashionProduct",
    "render_fashion",
    "render_product_photo",
]

_RGB = tuple[int, int, int]
_Poly = list[tuple[float, float]]

FASHION_COLUMNS = (
    "file_name",
    "text",
    "text_generic",
    "group",
    "garment",
    "colour",
    "pattern",
    "rips",
    "style",
)

_COLOURS: dict[str, _RGB] = {
    "red": (200, 30, 35),
    "orange": (238, 122, 20),
    "yellow": (240, 205, 40),
    "green": (40, 140, 60),
    "blue": (35, 75, 185),
    "purple": (118, 50, 152),
    "pink": (242, 128, 175),
    "brown": (112, 68, 38),
    "black": (28, 28, 30),
    "white": (242, 242, 238),
    "grey": (132, 132, 136),
}
_GARMENTS = ("jeans", "t-shirt", "dress", "jacket", "skirt", "shorts", "sweater", "coat")
_PATTERNS = ("plain", "striped", "checked", "dotted", "floral")
_STYLES = ("slim", "regular", "oversized")
_STYLE_WIDTH = {"slim": 0.76, "regular": 1.0, "oversized": 1.3}  # horizontal scale of the silhouette

FASHION_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "garment": _GARMENTS,
    "colour": tuple(_COLOURS),
    "pattern": _PATTERNS,
    "rips": ("true", "false"),
    "style": _STYLES,
}
RIPS_SYNONYMS = ("ripped", "distressed", "torn", "with tears")
_CYCLED = {"garment": _GARMENTS, "colour": tuple(_COLOURS), "pattern": _PATTERNS, "style": _STYLES}

# Caption vocabulary: (word, is_plural). Plural garments take no article ("ripped blue jeans").
_GARMENT_WORDS: dict[str, list[tuple[str, bool]]] = {
    "jeans": [("jeans", True), ("denim jeans", True)],
    "t-shirt": [("t-shirt", False), ("tee", False)],
    "dress": [("dress", False), ("summer dress", False)],
    "jacket": [("jacket", False), ("zip jacket", False)],
    "skirt": [("skirt", False), ("a-line skirt", False)],
    "shorts": [("shorts", True), ("denim shorts", True)],
    "sweater": [("sweater", False), ("jumper", False), ("pullover", False)],
    "coat": [("coat", False), ("overcoat", False)],
}
_COLOUR_WORDS = {"grey": ["grey", "gray"], "purple": ["purple", "violet"], "red": ["red", "scarlet"]}
_PATTERN_ADJ = {
    "plain": ["plain", "solid", ""],
    "striped": ["striped", "striped"],
    "checked": ["checked", "plaid", "checkered"],
    "dotted": ["polka-dot", "dotted", "spotted"],
    "floral": ["floral", "flower-print"],
}
_PATTERN_SUFFIX = {"striped": "with stripes", "dotted": "with polka dots", "floral": "with a floral print"}
_STYLE_WORDS = {
    "slim": ["slim-fit", "slim", "fitted"],
    "regular": ["regular-fit", "classic-fit", ""],
    "oversized": ["oversized", "loose-fit", "relaxed oversized"],
}
_BOTTOM_STYLE_WORDS = {"slim": ["skinny", "slim-fit"], "oversized": ["baggy", "oversized", "wide-leg"]}
_INTACT_WORDS = ["", "", "", "intact", "undamaged", "pristine"]
_PREFIXES = ["", "", "a photo of ", "product photo: ", "studio shot of "]

_SKIN = [(232, 190, 160), (205, 150, 115), (160, 110, 80), (110, 72, 50)]
_HOLE_DARK = (22, 20, 24)
_PETALS: list[_RGB] = [(236, 96, 140), (250, 200, 40), (120, 180, 240), (205, 35, 55)]
_THREAD = (238, 235, 224)
_BACKGROUNDS: list[_RGB] = [
    (228, 220, 205),  # beige
    (205, 208, 212),  # light grey
    (196, 212, 226),  # pale blue
    (200, 214, 196),  # sage
    (246, 243, 236),  # warm white
    (90, 92, 98),  # dark grey
    (176, 140, 104),  # wood
    (232, 214, 222),  # blush
]


@dataclass(frozen=True)
class FashionProduct:
    """One product: its attributes plus the seed of everything random about its look.

    Attributes:
        group: Product id (`p0042`), the `group` column: all its photos share a split.
        garment: One of `FASHION_ATTRIBUTES["garment"]`.
        colour: One of `FASHION_ATTRIBUTES["colour"]`.
        pattern: One of `FASHION_ATTRIBUTES["pattern"]`.
        rips: Whether the garment has holes/tears.
        style: Fit, one of `FASHION_ATTRIBUTES["style"]`; scales the silhouette's width.
        design_seed: Seeds the product's independent random streams (design, rips, photos, captions).
    """

    group: str
    garment: str
    colour: str
    pattern: str
    rips: bool
    style: str
    design_seed: int


# --- garment silhouettes -------------------------------------------------------------------------
# Unit coordinates (x right, y down) of the regular fit, centred on x = 0.5; style scales x about 0.5.


def _mirror(points: _Poly) -> _Poly:
    return [(1.0 - x, y) for x, y in reversed(points)]


def _silhouette(garment: str) -> _Poly:
    """The closed outline: the left half from the top centre down to the bottom centre, mirrored."""
    left = _LEFT_HALVES.get(garment)
    if left is None:
        raise ValueError(f"unknown garment '{garment}'; known: {', '.join(_GARMENTS)}")
    return left + _mirror(left)


_LEFT_HALVES: dict[str, _Poly] = {
    "jeans": [(0.5, 0.07), (0.33, 0.07), (0.31, 0.30), (0.335, 0.95), (0.475, 0.95), (0.5, 0.40)],
    "shorts": [(0.5, 0.16), (0.29, 0.16), (0.26, 0.36), (0.20, 0.72), (0.47, 0.74), (0.5, 0.47)],
    "skirt": [(0.5, 0.14), (0.34, 0.14), (0.34, 0.21), (0.18, 0.86), (0.5, 0.86)],
    "dress": [(0.5, 0.25), (0.44, 0.21), (0.42, 0.10), (0.37, 0.10), (0.36, 0.29), (0.39, 0.45), (0.19, 0.93)]
    + [(0.5, 0.93)],
    "t-shirt": [
        (0.5, 0.21),
        (0.46, 0.20),
        (0.42, 0.14),
        (0.30, 0.17),
        (0.15, 0.34),
        (0.23, 0.42),
        (0.31, 0.35),
    ]
    + [(0.31, 0.86), (0.5, 0.86)],
    "sweater": [
        (0.5, 0.19),
        (0.46, 0.18),
        (0.42, 0.13),
        (0.29, 0.17),
        (0.17, 0.50),
        (0.13, 0.80),
        (0.215, 0.82),
    ]
    + [(0.26, 0.56), (0.31, 0.38), (0.31, 0.86), (0.5, 0.86)],
    "jacket": [
        (0.5, 0.16),
        (0.42, 0.13),
        (0.28, 0.16),
        (0.16, 0.48),
        (0.13, 0.78),
        (0.215, 0.80),
        (0.26, 0.56),
    ]
    + [(0.30, 0.38), (0.30, 0.76), (0.5, 0.76)],
    "coat": [(0.5, 0.18), (0.42, 0.11), (0.28, 0.15), (0.17, 0.48), (0.13, 0.78), (0.215, 0.80), (0.27, 0.54)]
    + [(0.31, 0.36), (0.27, 0.95), (0.5, 0.95)],
}


def _details(garment: str) -> list[tuple[str, _Poly]]:
    """Seams, bands, buttons, collars: ("line"|"band"|"dot"|"dark", points) in unit coordinates."""
    d: list[tuple[str, _Poly]] = []
    if garment in ("jeans", "shorts"):
        top = 0.07 if garment == "jeans" else 0.16
        d += [("band", [(0.30, top + 0.045), (0.70, top + 0.045)])]
        d += [
            ("line", [(0.5, top + 0.05), (0.5, top + 0.20)]),
            ("line", [(0.5, top + 0.20), (0.46, top + 0.16)]),
        ]
        d += [("line", [(0.34, top + 0.06), (0.40, top + 0.12), (0.36, top + 0.15)])]
        d += [("line", [(0.66, top + 0.06), (0.60, top + 0.12), (0.64, top + 0.15)])]
        for x in (0.35, 0.5, 0.65):
            d.append(("line", [(x, top), (x, top + 0.045)]))  # belt loops
        if garment == "jeans":
            d += [("line", [(0.34, 0.915), (0.47, 0.915)]), ("line", [(0.53, 0.915), (0.66, 0.915)])]
        else:
            d += [("line", [(0.21, 0.67), (0.47, 0.69)]), ("line", [(0.53, 0.69), (0.79, 0.67)])]
    elif garment == "skirt":
        d += [("band", [(0.34, 0.205), (0.66, 0.205)]), ("dot", [(0.5, 0.175)])]
        d += [("line", [(x, 0.22), (0.5 + (x - 0.5) * 2.0, 0.85)]) for x in (0.40, 0.46, 0.54, 0.60)]
    elif garment == "dress":
        d += [("band", [(0.39, 0.45), (0.61, 0.45)])]
        d += [("line", [(x, 0.47), (0.5 + (x - 0.5) * 2.6, 0.92)]) for x in (0.43, 0.48, 0.52, 0.57)]
    elif garment == "t-shirt":
        d += [("line", [(0.42, 0.14), (0.46, 0.20), (0.5, 0.21), (0.54, 0.20), (0.58, 0.14)])]
        d += [("line", [(0.17, 0.355), (0.245, 0.425)]), ("line", [(0.83, 0.355), (0.755, 0.425)])]
        d += [("line", [(0.31, 0.83), (0.69, 0.83)])]
    elif garment == "sweater":
        d += [("band", [(0.42, 0.14), (0.46, 0.19), (0.5, 0.20), (0.54, 0.19), (0.58, 0.14)])]
        d += [("band", [(0.31, 0.83), (0.69, 0.83)])]
        d += [("line", [(x, 0.81), (x, 0.86)]) for x in (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)]
        d += [("band", [(0.135, 0.77), (0.215, 0.79)]), ("band", [(0.865, 0.77), (0.785, 0.79)])]
    elif garment == "jacket":
        d += [("dark", [(0.42, 0.13), (0.5, 0.16), (0.5, 0.30)])]
        d += [("dark", [(0.58, 0.13), (0.5, 0.16), (0.5, 0.30)])]
        d += [("band", [(0.5, 0.22), (0.5, 0.76)]), ("band", [(0.30, 0.74), (0.70, 0.74)])]
        d += [("line", [(0.34, 0.58), (0.44, 0.58)]), ("line", [(0.56, 0.58), (0.66, 0.58)])]
        d += [("band", [(0.135, 0.75), (0.215, 0.77)]), ("band", [(0.865, 0.75), (0.785, 0.77)])]
    elif garment == "coat":
        d += [
            ("dark", [(0.42, 0.11), (0.5, 0.34), (0.36, 0.30)]),
            ("dark", [(0.58, 0.11), (0.5, 0.34), (0.64, 0.30)]),
        ]
        d += [("line", [(0.5, 0.34), (0.5, 0.95)]), ("band", [(0.30, 0.56), (0.70, 0.56)])]
        d += [("dot", [(x, y)]) for x in (0.44, 0.56) for y in (0.42, 0.50, 0.64, 0.74)]
    return d


def _scale_x(points: _Poly, width: float, canvas: int) -> list[tuple[int, int]]:
    return [(round((0.5 + (x - 0.5) * width) * canvas), round(y * canvas)) for x, y in points]


# --- product layer (flat garment, RGBA, drawn at 2x for anti-aliasing) ---------------------------


def _as_rgb(values: Iterable[float]) -> _RGB:
    r, g, b = (int(v) for v in values)
    return (r, g, b)


def _shade(rgb: _RGB, factor: float) -> _RGB:
    if sum(rgb) < 150:  # black garments: details must be lighter, not darker, to be seen
        return _as_rgb(min(255, int(c + 60 * (1 - factor) + 30)) for c in rgb)
    return _as_rgb(int(c * factor) for c in rgb)


def _luma(rgb: _RGB) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _second_colour(rgb: _RGB) -> _RGB:
    return (30, 34, 60) if _luma(rgb) > 150 else (240, 238, 230)


def _pattern_layer(p: FashionProduct, base: _RGB, g: int, rng: Generator) -> Image.Image:
    """The fabric: a (g, g) RGB image of the colour with the pattern over the whole canvas."""
    second = _second_colour(base)
    if p.pattern in ("plain", "dotted", "floral"):
        fabric = Image.new("RGB", (g, g), base)
    else:
        period = int(rng.integers(g // 22, g // 14))
        yy, xx = np.arange(g)[:, None], np.arange(g)[None, :]  # (g, 1), (1, g)
        arr = np.empty((g, g, 3), np.uint8)
        arr[:] = base
        if p.pattern == "striped":
            on = (yy // period) % 3 == 0 if rng.random() < 0.6 else (xx // period) % 3 == 0
            arr[np.broadcast_to(on, (g, g))] = second
        else:  # checked: two-tone gingham, the overlap of the bands darkest
            band = period // 2
            bx, by = (xx // band) % 2 == 0, (yy // band) % 2 == 0
            mid = _as_rgb(np.array(base) * 0.55 + np.array(second) * 0.45)
            arr[bx ^ by] = mid
            arr[bx & by] = second
        fabric = Image.fromarray(arr, "RGB")
    if p.pattern in ("dotted", "floral"):
        draw = ImageDraw.Draw(fabric)
        step = int(rng.integers(g // 13, g // 9))
        r = max(3, step // (4 if p.pattern == "dotted" else 6))
        if p.pattern == "floral":  # coloured petals, never white: white blobs would read as rips
            second = max(_PETALS, key=lambda c: sum(abs(a - b) for a, b in zip(c, base, strict=True)))
        for row, y in enumerate(range(step // 2, g + step, step)):
            for x in range(step // 2 + (row % 2) * step // 2, g + step, step):
                if p.pattern == "dotted":
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
                else:
                    for k in range(5):
                        a = 2 * math.pi * k / 5
                        px, py = x + round(1.3 * r * math.cos(a)), y + round(1.3 * r * math.sin(a))
                        draw.ellipse((px - r, py - r, px + r, py + r), fill=second)
                    draw.ellipse(
                        (x - r // 2 - 1, y - r // 2 - 1, x + r // 2 + 1, y + r // 2 + 1), fill=(235, 190, 40)
                    )
    return fabric


def _draw_details(draw: ImageDraw.ImageDraw, p: FashionProduct, base: _RGB, g: int) -> None:
    width = _STYLE_WIDTH[p.style]
    line_c, band_c = _shade(base, 0.55), _shade(base, 0.72)
    for kind, pts in _details(p.garment):
        xy = _scale_x(pts, width, g)
        if kind == "line":
            draw.line(xy, fill=line_c, width=max(2, g // 110))
        elif kind == "band":
            draw.line(xy, fill=band_c, width=max(4, g // 40))
        elif kind == "dot":
            r = max(3, g // 75)
            x, y = xy[0]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_shade(base, 0.4))
        else:  # "dark": a collar/lapel shape
            draw.polygon(xy, fill=_shade(base, 0.7), outline=line_c)


def _inside(mask: np.ndarray, x: int, y: int) -> bool:
    g = mask.shape[0]
    return 0 <= x < g and 0 <= y < g and bool(mask[y, x])


def _draw_rips(layer: Image.Image, mask: np.ndarray, p: FashionProduct, rng: Generator) -> None:
    """Cut 2-4 holes or shredded patches into the garment: worn halo, hole, loose threads, fringe."""
    g = layer.size[0]
    # Skin or darkness shows through; only fills that contrast with the fabric are eligible.
    fills = [c for c in (*_SKIN, _HOLE_DARK) if abs(_luma(c) - _luma(_COLOURS[p.colour])) > 70]
    hole = fills[int(rng.integers(len(fills)))]
    n_rips = int(rng.integers(2, 5))
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(80):  # rejection-sample centres whose whole rip lies on the garment
        if len(placed) == n_rips:
            break
        rx = int(g * rng.uniform(0.07, 0.11))
        ry = int(rx * rng.uniform(0.4, 0.6))
        cx, cy = int(rng.integers(0, g)), int(rng.integers(0, g))
        corners = [(cx, cy), (cx - rx, cy), (cx + rx, cy), (cx, cy - ry), (cx, cy + ry)]
        far = all(abs(cx - qx) > rx + qrx or abs(cy - qy) > 2 * (ry + qry) for qx, qy, qrx, qry in placed)
        if far and all(_inside(mask, x, y) for x, y in corners):
            placed.append((cx, cy, rx, ry))
    fade = Image.new("L", (g, g), 0)
    holes: list[tuple[list[tuple[int, int]], int, int, int, int]] = []
    for cx, cy, rx, ry in placed:
        if rng.random() < 0.3:  # shredded: three parallel slits
            for k in (-1, 0, 1):
                srx = int(rx * rng.uniform(0.6, 1.0))
                holes.append(
                    (_jagged(rng, cx, cy + int(k * ry * 0.9), srx, max(3, ry // 3)), cx, cy, srx, ry // 3)
                )
        else:
            holes.append((_jagged(rng, cx, cy, rx, ry), cx, cy, rx, ry))
    fade_draw = ImageDraw.Draw(fade)
    for pts, cx, cy, _, _ in holes:  # worn, paler fabric around each hole
        fade_draw.polygon([(cx + (x - cx) * 13 // 10, cy + (y - cy) * 15 // 10) for x, y in pts], fill=80)
    layer.paste(Image.new("RGB", (g, g), (236, 232, 222)), (0, 0), fade)
    draw = ImageDraw.Draw(layer)
    thread_w = max(2, g // 150)
    for pts, cx, cy, rx, ry in holes:
        draw.polygon(pts, fill=hole)
        n_threads = 1 if ry < 6 else int(rng.integers(3, 6))
        for k in range(n_threads):  # loose weft threads spanning the hole, sagging a little
            y = cy + round((k + 0.5) / n_threads * 1.4 * ry - 0.7 * ry) + int(rng.integers(-1, 2))
            sag = int(rng.integers(0, max(2, ry // 4)))
            span = int(rx * rng.uniform(0.75, 1.0))
            draw.line([(cx - span, y), (cx, y + sag), (cx + span, y)], fill=_THREAD, width=thread_w)
        for x, y in pts:  # fringe: short fibres hanging from the rim into the hole
            ln = int(rng.integers(3, max(4, ry // 2 + 1)))
            to_x = x + int(rng.integers(-ln // 2, ln // 2 + 1))
            to_y = y + (ln if y < cy else -ln)
            draw.line([(x, y), (to_x, to_y)], fill=_THREAD, width=thread_w)


def _jagged(rng: Generator, cx: int, cy: int, rx: int, ry: int) -> list[tuple[int, int]]:
    n_vert = 22
    radii = rng.uniform(0.65, 1.2, size=n_vert)
    return [
        (
            cx + round(rx * radii[k] * math.cos(2 * math.pi * k / n_vert)),
            cy + round(ry * radii[k] * math.sin(2 * math.pi * k / n_vert)),
        )
        for k in range(n_vert)
    ]


def _product_layer(p: FashionProduct, size: int) -> Image.Image:
    """The flat garment as an RGBA (size, size) image: fabric, shading, details, outline, rips.

    Drawn at 2x and box-reduced once per product, so edges, threads and seams are anti-aliased and
    each photo only has to warp a small layer.
    """
    g = 2 * size
    rng = seeded_rng(p.design_seed, 0)
    jitter = rng.integers(-10, 11, size=3)
    base = _as_rgb(np.clip(np.array(_COLOURS[p.colour]) + jitter, 0, 255))
    outline = _silhouette(p.garment)
    xy = _scale_x(outline, _STYLE_WIDTH[p.style], g)

    mask_img = Image.new("L", (g, g), 0)
    ImageDraw.Draw(mask_img).polygon(xy, fill=255)
    fabric = _pattern_layer(p, base, g, rng)

    # Soft cylindrical shading so the garment reads as cloth, not a flat sticker.
    arr = np.asarray(fabric, dtype=np.float32)  # (g, g, 3)
    xs = np.abs(np.arange(g, dtype=np.float32) / g - 0.5) * 2.0  # (g,)
    shaded = arr * (1.0 - 0.18 * xs**2)[None, :, None]
    fabric = Image.fromarray(np.rint(shaded).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(fabric)
    _draw_details(draw, p, base, g)
    if p.rips:
        _draw_rips(fabric, np.asarray(mask_img) > 0, p, seeded_rng(p.design_seed, 1))
    draw.line([*xy, xy[0]], fill=_shade(base, 0.45), width=max(2, g // 100))

    layer = fabric.convert("RGBA")  # RGB under alpha 0 is still fabric: no dark fringe after reducing
    layer.putalpha(mask_img)
    return layer.reduce(2)


# --- photos ---------------------------------------------------------------------------------------


def _background(rng: Generator, g: int, garment_rgb: _RGB) -> Image.Image:
    far = [c for c in _BACKGROUNDS if sum(abs(a - b) for a, b in zip(c, garment_rgb, strict=True)) > 110]
    colour = np.array(far[int(rng.integers(len(far)))], dtype=np.float32)  # (3,)
    texture = int(rng.integers(4))
    ys = np.arange(g)[:, None]  # (g, 1)
    xs = np.arange(g)[None, :]  # (1, g)
    shade: npt.NDArray[np.floating[Any]]  # float64 in three branches, float32 in the noise one
    if texture == 0:  # smooth studio gradient
        shade = 1.0 + 0.10 * (0.5 - ys / g) + 0 * xs
    elif texture == 1:  # coarse noise (paper, plaster)
        low = Image.fromarray(rng.normal(0.0, 0.05, size=(12, 12)).astype(np.float32), "F")
        shade = 1.0 + np.asarray(low.resize((g, g), Image.Resampling.BILINEAR))
    elif texture == 2:  # floor boards
        board = int(rng.integers(g // 8, g // 4))
        tone = rng.uniform(-0.06, 0.06, size=g // board + 2)
        shade = 1.0 + tone[xs // board] - 0.12 * (xs % board < 2) + 0 * ys
    else:  # tiles
        tile = int(rng.integers(g // 6, g // 3))
        shade = 1.0 - 0.10 * ((xs % tile < 2) | (ys % tile < 2))
    return Image.fromarray(_tinted(shade.astype(np.float32), colour), "RGB")


def _tinted(gain: np.ndarray, rgb: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) = clip(round(gain * rgb[c] [* base[..., c]])); one channel at a time (fast)."""
    out = np.empty((*gain.shape, 3), np.uint8)
    for k in range(3):
        channel = gain * np.float32(rgb[k]) if base is None else gain * np.float32(rgb[k]) * base[..., k]
        out[..., k] = np.rint(np.minimum(channel, 255.0))
    return out


def _photo(layer: Image.Image, p: FashionProduct, photo: int) -> tuple[Image.Image, np.ndarray]:
    g = size = layer.size[0]
    rng = seeded_rng(p.design_seed, 2, photo)
    garment = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.3 else layer
    scale = float(rng.uniform(0.80, 0.98))
    angle = math.radians(float(rng.uniform(-9.0, 9.0)))
    dx, dy = (int(v) for v in rng.integers(-g // 16, g // 16 + 1, size=2))
    # One affine pass (output -> input): scale by `scale` and turn by `angle` about the centre, then shift.
    c = g / 2
    a, b = math.cos(angle) / scale, math.sin(angle) / scale
    coeffs = (a, b, c - a * (c + dx) - b * (c + dy), -b, a, c + b * (c + dx) - a * (c + dy))
    garment = garment.transform((g, g), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    alpha = garment.getchannel("A")

    canvas = _background(rng, g, _COLOURS[p.colour])
    shadow = alpha.point(lambda v: v * 35 // 100)
    canvas.paste((0, 0, 0), (g // 60, g // 40, g + g // 60, g + g // 40), shadow)
    canvas.paste(garment, (0, 0), garment)

    img = canvas
    mask = np.asarray(alpha) > 127  # (size, size)

    # Lighting: global brightness, a linear gradient in a random direction and a colour temperature tint.
    brightness, amp, theta = rng.uniform(0.86, 1.12), rng.uniform(0.0, 0.14), rng.uniform(0, 2 * math.pi)
    tint = rng.uniform(-0.04, 0.04)
    ramp = np.arange(size, dtype=np.float64) / size - 0.5  # (size,)
    light = brightness * (
        1.0 + 2.0 * amp * (ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta))
    )
    channel = np.array([1 + tint, 1.0, 1 - tint], np.float32)  # (3,)
    lit = _tinted(light.astype(np.float32), channel, np.asarray(img, np.float32))  # (size, size, 3)
    return Image.fromarray(lit, "RGB"), mask


def render_product_photo(
    product: FashionProduct, photo: int, size: int = 160
) -> tuple[Image.Image, np.ndarray]:
    """Render one photo of a product, and where the garment is in it.

    The product layer and the photo's pose/background/lighting come from independent streams keyed by
    `product.design_seed` (and `photo`), so the same product with `rips` toggled is pixel-identical
    outside its rips: useful for tests and for looking at what a rip adds.

    Args:
        product: The product to draw.
        photo: Index of the photo (0, 1, ...); each index is a different pose, background and light.
        size: Output side in pixels (>= 128 so rips stay visible).

    Returns:
        `(image, mask)`: the RGB `size` x `size` photo and a bool array, True on the garment.

    Shapes:
        mask: (size, size)

    Example:
        >>> p = FashionProduct("p0000", "jeans", "blue", "plain", True, "slim", design_seed=7)
        >>> image, mask = render_product_photo(p, photo=0)
    """
    if size < 128:
        raise ValueError(f"size must be >= 128 px so the attributes stay visible, got {size}")
    return _photo(_product_layer(product, size), product, photo)


# --- catalogue ------------------------------------------------------------------------------------


def _shuffled_cycle(rng: Generator, values: tuple[object, ...]) -> Iterator[object]:
    while True:  # every value once per block, blocks in fresh random orders
        yield from (values[int(i)] for i in rng.permutation(len(values)))


def _products(n: int, seed: int) -> list[tuple[FashionProduct, int]]:
    """Split n photos into products of 2-4 photos each, with balanced, independent attributes.

    Each attribute cycles through its values in shuffled blocks (every value once per block), so all
    values appear as soon as there are as many products as values; rips come in shuffled blocks of
    20 products with exactly 7 ripped (35%).
    """
    rng = seeded_rng(seed)
    cycles = {
        name: _shuffled_cycle(seeded_rng(seed, 5, i), values)
        for i, (name, values) in enumerate(_CYCLED.items())
    }
    rips = _shuffled_cycle(seeded_rng(seed, 6), (True,) * 7 + (False,) * 13)
    out: list[tuple[FashionProduct, int]] = []
    remaining = n
    while remaining > 0:
        k = remaining if remaining <= 4 else int(rng.integers(2, 5))
        if remaining - k == 1:  # never leave a single photo for the last product
            k -= 1
        product = FashionProduct(
            group=f"p{len(out):04d}",
            garment=str(next(cycles["garment"])),
            colour=str(next(cycles["colour"])),
            pattern=str(next(cycles["pattern"])),
            rips=bool(next(rips)),
            style=str(next(cycles["style"])),
            design_seed=int(rng.integers(0, 2**62)),
        )
        out.append((product, k))
        remaining -= k
    return out


def _pick(rng: Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _captions(p: FashionProduct, photo: int) -> tuple[str, str]:
    """(attribute-rich caption, generic caption); the generic one is garment + colour only."""
    rng = seeded_rng(p.design_seed, 3, photo)
    noun, plural = _GARMENT_WORDS[p.garment][int(rng.integers(len(_GARMENT_WORDS[p.garment])))]
    colour = _pick(rng, _COLOUR_WORDS.get(p.colour, [p.colour]))
    is_bottom = p.garment in ("jeans", "shorts")
    style_opts = (
        _BOTTOM_STYLE_WORDS.get(p.style, _STYLE_WORDS[p.style]) if is_bottom else _STYLE_WORDS[p.style]
    )
    style = _pick(rng, style_opts)
    rips_word = _pick(rng, list(RIPS_SYNONYMS)) if p.rips else _pick(rng, _INTACT_WORDS)
    use_suffix = p.pattern in _PATTERN_SUFFIX and rng.random() < 0.4
    pattern = "" if use_suffix else _pick(rng, _PATTERN_ADJ[p.pattern])
    suffixes = [_PATTERN_SUFFIX[p.pattern]] if use_suffix else []
    if rips_word == "with tears":
        suffixes.append("with tears")
        rips_word = ""
    order = [rips_word, style, colour, pattern] if rng.random() < 0.5 else [rips_word, colour, pattern, style]
    words = [w for w in order if w] + [noun]
    tail = (" " + " and ".join(suffixes)) if suffixes else ""
    prefix = _pick(rng, _PREFIXES)

    def article(phrase: str) -> str:
        return phrase if plural else with_article(phrase)

    rich = prefix + article(" ".join(words)) + tail
    generic = ("a pair of " + f"{colour} {noun}") if plural else article(f"{colour} {noun}")
    return rich, generic


def render_fashion(out: Path, n: int = 1500, seed: int = 0, size: int = 160, progress: bool = False) -> Path:
    """Render the fashion catalogue: `n` product photos, `metadata.csv`, `contact_sheet.png` and `suite.yaml`.

    Products get 2-4 photos each (the `group` column), so a split grouped by product cannot leak a
    garment's look from train into test. Each attribute cycles through its values in shuffled
    blocks, independently of the others, so every value appears once there are 11 products (the
    number of colours); exactly 7 of every 20 products (35%) have rips.

    Args:
        out: Catalogue folder; `images/`, `metadata.csv` and `contact_sheet.png` are written in it.
            Earlier renders' images there are replaced.
        n: Number of photos (not products), >= 2.
        seed: The same seed and `n` give byte-identical files.
        size: Side of the square photos in pixels, >= 128.
        progress: Show a progress bar on stderr.

    Returns:
        `out`, the catalogue folder.

    Example:
        >>> render_fashion(Path("data/fashion"), n=4, seed=0)
        PosixPath('data/fashion')
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (each product has at least 2 photos), got {n}")
    if size < 128:
        raise ValueError(f"size must be >= 128 px so the attributes stay visible, got {size}")
    out = Path(out)
    clear_stale_images(out / "images", r"\d{6}\.png")
    rows: list[list[str]] = []
    for product, k in progress_iter(_products(n, seed), progress, "fashion"):
        layer = _product_layer(product, size)
        for photo in range(k):
            file_name = f"images/{len(rows):06d}.png"
            image, _ = _photo(layer, product, photo)
            save_png(image, out / file_name)
            rich, generic = _captions(product, photo)
            rips = "true" if product.rips else "false"
            p = product
            rows.append([file_name, rich, generic, p.group, p.garment, p.colour, p.pattern, rips, p.style])
    write_csv(out / "metadata.csv", FASHION_COLUMNS, rows)
    sheet = [(r[0], f"{r[4]} {r[5]}" + (" RIPS" if r[7] == "true" else ""), f"{r[6]} {r[8]}") for r in rows]
    make_contact_sheet(out, sheet, out / "contact_sheet.png")
    from cliptune.data.synthetic.suite import write_fashion_suite  # reads metadata.csv back: no import cycle

    write_fashion_suite(out)
    return out
