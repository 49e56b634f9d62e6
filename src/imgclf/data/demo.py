"""Built-in demo data: procedural "photos" of patterned fabric in three classes.

The classes mirror a well-known transfer-learning tutorial (dotted, leopard and striped fabric). Every
image is drawn from a seeded numpy Generator with numpy and Pillow only, and carries the nuisances of
real photos: colour palettes shared by all classes, pattern scale, rotation, perspective, folds,
lighting, clutter, blur, noise and JPEG artefacts, plus some deliberately ambiguous samples (solid or
elongated leopard spots, irregular or ringed dots, broken stripes).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from imgclf.utils import atomic_write_bytes

CLASSES: tuple[str, ...] = ("dotted", "leopard", "striped")
MARKER_NAME = ".imgclf-demo.json"

_VERSION = 1  # bump whenever the images change, so that older demo folders are not taken as current
_SS = 2  # supersampling factor of drawn shapes (anti-aliasing)
_BILINEAR = Image.Resampling.BILINEAR
_BICUBIC = Image.Resampling.BICUBIC
_TAU = 2 * np.pi

# Fabric colours shared by all classes (RGB); the first _N_WARM are the tans typical of leopard prints.
_FABRIC = np.array(
    [
        (214, 170, 110), (196, 146, 84), (226, 190, 140), (181, 120, 62), (232, 206, 168),
        (245, 242, 232), (238, 228, 205), (24, 22, 22), (62, 60, 66), (146, 146, 150),
        (96, 62, 38), (58, 38, 26), (32, 42, 84), (176, 36, 44), (112, 28, 40), (232, 164, 176),
        (214, 172, 56), (108, 110, 58), (32, 112, 112), (146, 184, 222), (222, 122, 46), (92, 62, 120),
    ],
    dtype=np.float64,
)  # fmt: skip
_N_WARM = 5
# Surfaces the fabric lies on: wood, light wood, concrete, white table, dark table, cutting mat, wall.
_SURFACE = np.array(
    [(150, 105, 65), (200, 165, 120), (140, 140, 135), (235, 235, 230), (45, 42, 40), (40, 90, 70),
     (220, 205, 180)],
    dtype=np.float64,
)  # fmt: skip
_LUMA = np.array([0.299, 0.587, 0.114])

Palette = np.ndarray  # (3, 3): background, pattern and accent colours, RGB floats in 0-255


def _to_image(arr: np.ndarray) -> Image.Image:
    """Round, clip and wrap an (h, w[, 3]) float array as an 8-bit image."""
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _smooth(rng: np.random.Generator, cells: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth random field (h, w) for size (w, h), roughly unit amplitude, about `cells` bumps a side."""
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize(size, _BICUBIC))


def _palette(rng: np.random.Generator, label: str) -> Palette:
    """Background, pattern and accent colours; all classes draw from the same palettes."""
    warm = rng.random() < (0.65 if label == "leopard" else 0.3)
    base = _FABRIC[rng.integers(_N_WARM if warm else len(_FABRIC))]
    luma = _FABRIC @ _LUMA
    candidates = np.flatnonzero(np.abs(luma - base @ _LUMA) > 70)
    if warm:  # dark markings on a tan base
        candidates = candidates[luma[candidates] < base @ _LUMA]
    fg = _FABRIC[rng.choice(candidates)]
    fg = base + (fg - base) * rng.uniform(0.5, 1.0)  # faded prints
    colours = np.stack([base, fg, _FABRIC[rng.integers(len(_FABRIC))]])
    return np.clip(colours * rng.uniform(0.85, 1.12, (3, 1)) + rng.normal(0, 9, (3, 3)), 0, 255)


def _grid(rng: np.random.Generator, size: tuple[int, int], period: float, jitter: float, hexagonal: bool) -> np.ndarray:
    """Centres (n, 2) of a jittered square or hexagonal lattice covering a canvas of size (w, h)."""
    dy = period * (np.sqrt(3) / 2 if hexagonal else 1.0)
    j, i = np.mgrid[-1 : int(size[1] / dy) + 2, -1 : int(size[0] / period) + 2]
    pts = np.stack([((i + 0.5 * (j % 2) * hexagonal) * period).ravel(), (j * dy).ravel()], axis=1)
    return pts + rng.normal(0, jitter * period, pts.shape)


def _place(x: np.ndarray, y: np.ndarray, centres: np.ndarray, aspect: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Stretch local shape coordinates (n, k) by `aspect`, rotate by `angle`, move to `centres`: (n, k, 2)."""
    x = x * aspect[:, None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([centres[:, :1] + cos * x - sin * y, centres[:, 1:] + sin * x + cos * y], axis=-1)


def _blobs(
    rng: np.random.Generator,
    centres: np.ndarray,
    radius: np.ndarray,
    aspect: np.ndarray,
    angle: np.ndarray,
    wobble: float,
) -> np.ndarray:
    """Polygons (n, 24, 2) of ellipses whose outline wobbles with low harmonics of relative size `wobble`."""
    n = len(centres)
    t = np.linspace(0, _TAU, 24, endpoint=False)
    harmonics = np.arange(1, 4)[:, None]
    amp = wobble * rng.uniform(0, 1, (n, 3, 1)) / harmonics
    bumps = amp * np.cos(harmonics * t + rng.uniform(0, _TAU, (n, 3, 1)))
    r = radius[:, None] * (1 + bumps.sum(axis=1))
    return _place(r * np.cos(t), r * np.sin(t), centres, aspect, angle)


def _rings(
    rng: np.random.Generator, centres: np.ndarray, radius: np.ndarray, aspect: np.ndarray, angle: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Broken rings of 2-4 tapered arcs around each centre: polygons (f, 16, 2) and each arc's rosette."""
    owner = np.repeat(np.arange(len(centres)), rng.integers(2, 5, len(centres)))
    share = rng.uniform(0.6, 1.4, len(owner))
    total = np.bincount(owner, share)
    before = np.cumsum(share) - share - np.r_[0, np.cumsum(total)[:-1]][owner]  # share of earlier arcs
    start = before / total[owner] * _TAU + rng.uniform(0, _TAU, len(centres))[owner]
    span = share / total[owner] * _TAU
    fill = rng.uniform(0.55, 0.9, (len(owner), 1))
    t = np.linspace(0, 1, 8)
    theta = start[:, None] + span[:, None] * ((1 - fill) / 2 + fill * t)
    ring = radius[owner, None] * rng.normal(1, 0.04, (len(owner), 8))
    width = ring * rng.uniform(0.35, 0.6) * rng.normal(1, 0.15, (len(owner), 1)) * (0.3 + 0.7 * np.sin(np.pi * t))
    r = np.concatenate([ring + width / 2, (ring - width / 2)[:, ::-1]], axis=1)
    theta = np.concatenate([theta, theta[:, ::-1]], axis=1)
    return _place(r * np.cos(theta), r * np.sin(theta), centres[owner], aspect[owner], angle[owner]), owner


def _draw(img: Image.Image, polygons: np.ndarray, colours: np.ndarray) -> None:
    """Fill polygons (n, k, 2), in canvas pixels, with colours (n, 3) on a supersampled canvas."""
    draw = ImageDraw.Draw(img)
    flat = (polygons * _SS).reshape(len(polygons), -1).tolist()
    for poly, colour in zip(flat, np.clip(colours, 0, 255).astype(np.uint8).tolist(), strict=True):
        draw.polygon(poly, fill=tuple(colour))


def _blank(size: tuple[int, int], colour: np.ndarray) -> Image.Image:
    """A supersampled canvas filled with `colour`."""
    fill = tuple(np.clip(colour, 0, 255).astype(int).tolist())
    return Image.new("RGB", (size[0] * _SS, size[1] * _SS), fill)


def _dotted(rng: np.random.Generator, size: tuple[int, int], period: float, pal: Palette) -> Image.Image:
    """Polka dots on a regular or jittered lattice; sometimes irregular, two-coloured or ringed."""
    base, fg, accent = pal
    img = _blank(size, base)
    regular = rng.random() < 0.6
    jitter = rng.uniform(0, 0.05) if regular else rng.uniform(0.12, 0.22)
    centres = _grid(rng, size, period, jitter, rng.random() < 0.5)
    n = len(centres)
    radius = period * rng.uniform(0.13, 0.33) * rng.normal(1, rng.uniform(0, 0.12), n)
    aspect = rng.uniform(1, 1.4) * rng.normal(1, 0.05, n)
    angle = rng.uniform(0, np.pi) + rng.normal(0, 0.2, n)
    wobble = rng.uniform(0.1, 0.35) if rng.random() < 0.4 else 0.03
    two_tone = rng.random((n, 1)) < (0.5 if rng.random() < 0.25 else 0.0)
    if rng.random() < 0.18:  # ringed dots, easy to confuse with rosettes
        rings = _blobs(rng, centres, radius * rng.uniform(1.3, 1.6), aspect, angle, wobble)
        _draw(img, rings, np.broadcast_to(accent, (n, 3)))
    colours = np.where(two_tone, accent, fg) + rng.normal(0, 6, (n, 3))
    _draw(img, _blobs(rng, centres, radius, aspect, angle, wobble), colours)
    return img.reduce(_SS)


def _leopard(rng: np.random.Generator, size: tuple[int, int], period: float, pal: Palette) -> Image.Image:
    """Rosettes (broken dark rings around a darker centre) and small spots; sometimes solid or elongated."""
    base, fg, accent = pal
    img = _blank(size, base)
    centres = _grid(rng, size, period, rng.uniform(0.12, 0.25), hexagonal=True)
    n = len(centres)
    radius = period * rng.uniform(0.26, 0.36) * rng.normal(1, 0.12, n)
    aspect = rng.uniform(1, 1.9 if rng.random() < 0.3 else 1.3) * rng.normal(1, 0.1, n)
    angle = rng.uniform(0, np.pi) + rng.normal(0, 0.35, n)
    dark = fg + rng.normal(0, 8, (n, 3))
    if rng.random() < 0.25:  # solid spots, easy to confuse with irregular dots
        _draw(img, _blobs(rng, centres, radius * rng.uniform(0.45, 0.7), aspect, angle, 0.35), dark)
    else:
        tint = base * rng.uniform(0.6, 0.85) + (accent - base) * rng.uniform(0, 0.2)
        _draw(img, _blobs(rng, centres, radius * 0.85, aspect, angle, 0.25), tint + rng.normal(0, 8, (n, 3)))
        arcs, owner = _rings(rng, centres, radius, aspect, angle)
        _draw(img, arcs, dark[owner])
    k = int(n * rng.uniform(0.3, 1.0))
    spots = _blobs(
        rng, rng.uniform(0, 1, (k, 2)) * size, period * rng.uniform(0.04, 0.09, k), rng.uniform(1, 1.6, k),
        rng.uniform(0, np.pi, k), 0.35,
    )  # fmt: skip
    _draw(img, spots, fg + rng.normal(0, 8, (k, 3)))
    return img.reduce(_SS)


def _striped(rng: np.random.Generator, size: tuple[int, int], period: float, pal: Palette) -> Image.Image:
    """Parallel stripes of varying widths, sometimes multi-coloured, wavy or broken into dashes."""
    base, fg, accent = pal
    k = int(rng.choice([2, 2, 3, 4, 5, 6, 9]))
    odd = np.arange(k) % 2 == 1
    pick_accent = odd & (rng.random(k) < (0.5 if rng.random() < 0.35 else 0.0))
    ink = np.where(pick_accent[:, None], accent, fg)
    colours = np.where(odd[:, None], ink, base) + rng.normal(0, 6, (k, 3))
    widths = rng.uniform(0.3, 1.7, k) if rng.random() < 0.6 else np.ones(k)
    repeat = period * k / 2
    fine = max(int(repeat * 4), k)  # colour look-up table at 4 samples per pixel
    which = np.minimum(np.searchsorted(np.cumsum(widths) / widths.sum() * fine, np.arange(fine) + 0.5), k - 1)
    lut = np.mean([np.roll(colours[which], s, axis=0) for s in range(4)], axis=0)  # 1-pixel box filter
    lut = np.clip(lut + 0.5, 0, 255).astype(np.uint8)
    y = np.arange(size[1], dtype=np.float32)[:, None]
    wobble = np.float32(repeat * rng.uniform(0, 0.05))
    u = np.arange(size[0], dtype=np.float32) + _smooth(rng, 6, size) * wobble
    if rng.random() < 0.2:  # wavy
        amp, wavelength = period * rng.uniform(0.05, 0.25), period * rng.uniform(3, 8)
        u += (amp * np.sin(_TAU * y / wavelength + rng.uniform(0, _TAU))).astype(np.float32)
    pos = np.minimum(((u % repeat) * (fine / repeat)).astype(np.int64), fine - 1)
    rgb = lut[pos]
    if rng.random() < 0.3:  # broken stripes: dashes, easy to confuse with elongated dots
        stripe = (np.floor(u / repeat).astype(np.int64) * k + which[pos]) % 1024
        dash = period * rng.uniform(1.5, 5, 1024)[stripe]
        phase = rng.uniform(0, 100 * period, 1024)[stripe]
        gap = (y + phase) % dash < period * rng.uniform(0.1, 0.3)
        breakable = odd & (widths <= widths.mean())  # narrow stripes only: wide ones would look like bricks
        rgb[gap & breakable[which[pos]]] = np.clip(base + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


_PATTERNS: dict[str, Callable[[np.random.Generator, tuple[int, int], float, Palette], Image.Image]] = {
    "dotted": _dotted,
    "leopard": _leopard,
    "striped": _striped,
}


def _weave(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Darkening by woven threads (a fine checker of crossings and uneven yarns) as an RGB image."""
    p = rng.uniform(2.2, 4.0)
    cx, cy = (np.cos(np.arange(n, dtype=np.float32) * np.float32(_TAU / p)) for n in size)
    yarn_x, yarn_y = (rng.uniform(0, 0.04 * 255, n).astype(np.float32) for n in size)
    depth = np.float32(rng.uniform(0.03, 0.1) * 255 / 2)
    weave = 255 - depth * (1 - cy[:, None] * cx) - yarn_y[:, None] - yarn_x
    return _to_image(weave).convert("RGB")


def _folds(rng: np.random.Generator, size: int) -> tuple[list, np.ndarray]:
    """Mesh (for Image.transform) displacing the fabric along random folds, and their shading (size, size)."""
    grid = np.linspace(0, size, 33)
    xx, yy = np.meshgrid(grid, grid)
    height = np.zeros_like(xx)
    for _ in range(rng.integers(1, 4)):
        a = rng.uniform(0, np.pi)
        d = xx * np.cos(a) + yy * np.sin(a)
        if rng.random() < 0.5:  # a crease through a random point
            d0 = rng.uniform(0, size, 2) @ (np.cos(a), np.sin(a))
            height += rng.uniform(-1, 1) * np.exp(-(((d - d0) / (size * rng.uniform(0.04, 0.15))) ** 2))
        else:  # gentle waves
            wavelength = size * rng.uniform(0.3, 0.8)
            height += rng.uniform(0.2, 0.8) * np.sin(_TAU * d / wavelength + rng.uniform(0, _TAU))
    height /= np.abs(height).max() + 1e-9
    gy, gx = np.gradient(height)
    light = rng.uniform(0, _TAU)
    slope = gx * np.cos(light) + gy * np.sin(light)
    shade = 1 + rng.uniform(0.1, 0.45) * slope / (np.abs(slope).max() + 1e-9) + rng.uniform(0, 0.12) * height
    shift = height[::4, ::4] * size * rng.uniform(0.003, 0.012)
    shift[[0, -1]] = shift[:, [0, -1]] = 0  # keep the frame edges in place
    tilt = rng.uniform(0, _TAU)
    src = np.stack([xx[::4, ::4] + shift * np.cos(tilt), yy[::4, ::4] + shift * np.sin(tilt)], axis=-1)
    # Each 8 x 8 target cell samples the quad (upper left, lower left, lower right, upper right) of src.
    quads = np.concatenate([src[:-1, :-1], src[1:, :-1], src[1:, 1:], src[:-1, 1:]], axis=-1).reshape(-1, 8)
    e = np.round(grid[::4]).astype(int)
    boxes = np.stack(np.broadcast_arrays(e[None, :-1], e[:-1, None], e[None, 1:], e[1:, None]), axis=-1)
    mesh = list(zip(map(tuple, boxes.reshape(-1, 4).tolist()), map(tuple, quads.tolist()), strict=True))
    return mesh, np.asarray(Image.fromarray(shade.astype(np.float32)).resize((size, size), _BICUBIC))


def _perspective(quad: np.ndarray, side: float) -> np.ndarray:
    """PERSPECTIVE coefficients mapping output pixels to a fabric canvas whose corners land on `quad`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(quad, [(0, 0), (side, 0), (side, side), (0, side)], strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))


def _background(rng: np.random.Generator, size: int, alpha: np.ndarray) -> np.ndarray:
    """A table, floor or wall (size, size, 3), darkened by the soft contact shadow of the fabric."""
    colour = _SURFACE[rng.integers(len(_SURFACE))] * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)
    colour = colour.astype(np.float32)
    shade = 1 + np.float32(0.12) * _smooth(rng, 3, (size, size))
    if rng.random() < 0.3:  # wood grain
        y, x = np.ogrid[:size, :size]
        a = rng.uniform(0, np.pi)
        phase = (_TAU * (x * np.cos(a) + y * np.sin(a)) / (size * rng.uniform(0.02, 0.06))).astype(np.float32)
        shade = shade * (1 + np.float32(0.08) * np.sin(phase + 3 * _smooth(rng, 4, (size, size))))
    halo = _to_image(alpha * 255).filter(ImageFilter.GaussianBlur(size * rng.uniform(0.01, 0.04)))
    return colour * (shade * (1 - np.asarray(halo, np.float32) * np.float32(0.4 / 255)))[..., None]


def _clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Occlude the scene with 0-3 shaded objects (buttons, cards, pencils, stones) casting soft shadows."""
    size = img.shape[0]
    for _ in range(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])):
        kind = rng.integers(4)
        centre = rng.uniform(0, size, (1, 2))
        angle = rng.uniform(0, np.pi, 1)
        r = size * rng.uniform(0.06, 0.18)
        if kind in (0, 3):  # button or stone
            wobble = 0.02 if kind == 0 else 0.3
            poly = _blobs(rng, centre, np.array([r]), rng.uniform(1, 1.5, 1), angle, wobble)[0]
        else:  # card or pencil
            half = (r, r * rng.uniform(0.5, 0.9)) if kind == 1 else (size * rng.uniform(0.2, 0.4), r * 0.2)
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
            poly = _place(corners[None, :, 0], corners[None, :, 1], centre, np.ones(1), angle)[0]
        shift = rng.uniform(-0.3, 0.3, 2) * r
        # Work inside the box that holds the object and its shadow.
        pad = np.abs(shift) + r * 0.75
        x0, y0 = np.clip(np.floor(poly.min(axis=0) - pad), 0, size).astype(int)
        x1, y1 = np.clip(np.ceil(poly.max(axis=0) + pad), 0, size).astype(int)
        mask = Image.new("L", ((x1 - x0) * _SS, (y1 - y0) * _SS))
        ImageDraw.Draw(mask).polygon(((poly - (x0, y0)) * _SS).ravel().tolist(), fill=255)
        mask = mask.reduce(_SS)
        # Soft shadow, blurred at quarter resolution and shifted away from the light.
        shadow = (
            mask.reduce(4)
            .filter(ImageFilter.GaussianBlur(r / 16))
            .transform(mask.size, Image.Transform.AFFINE, (0.25, 0, -shift[0] / 4, 0, 0.25, -shift[1] / 4), _BILINEAR)
        )
        m = np.asarray(mask, np.float32)[..., None] * np.float32(1 / 255)
        s = np.asarray(shadow, np.float32)[..., None] * np.float32(0.45 / 255)
        colour = _FABRIC[rng.integers(len(_FABRIC))] if rng.random() < 0.3 else rng.uniform(20, 240, 3)
        light = rng.uniform(0, _TAU)
        y, x = np.ogrid[y0:y1, x0:x1]
        grad = 1 + 0.25 * ((x - centre[0, 0]) * np.cos(light) + (y - centre[0, 1]) * np.sin(light)) / r
        paint = colour.astype(np.float32) * np.clip(grad, 0.5, 1.5).astype(np.float32)[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - s) * (1 - m) + paint * m
    return img


def _lighting(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Apply a lighting gradient, vignette, optional hot spot, exposure and white balance."""
    y, x = np.mgrid[-0.5:0.5:33j, -0.5:0.5:33j]  # smooth, so computed coarse and upsampled
    a = rng.uniform(0, _TAU)
    ramp = 1 + rng.uniform(0, 0.7) * (x * np.cos(a) + y * np.sin(a))
    field = ramp * (1 - rng.uniform(0, 0.9) * (x**2 + y**2))
    if rng.random() < 0.3:  # hot spot
        x0, y0 = rng.uniform(-0.4, 0.4, 2)
        spot = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / rng.uniform(0.01, 0.05))
        field = field + rng.uniform(0.1, 0.35) * spot
    field = np.asarray(Image.fromarray(field.astype(np.float32)).resize(img.shape[1::-1], _BICUBIC))
    gain = (rng.uniform(0.7, 1.15) * rng.normal(1, 0.04, 3)).astype(np.float32)  # exposure and white balance
    return img * field[..., None] * gain


def render_texture(label: str, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """One RGB image of the given class: a photo-like view of a patterned fabric, `size` pixels square."""
    if label not in CLASSES:
        raise ValueError(f"unknown demo class {label!r}; expected one of {CLASSES}")
    # Where the fabric lands: a rotated, perspective-tilted square that covers the frame or part of it.
    theta = rng.uniform(0, _TAU)
    tilt = rng.uniform(-0.25, 0.25)
    span = (abs(np.cos(theta)) + abs(np.sin(theta))) / (1 - abs(tilt) - 0.06)
    cover = rng.random() < 0.7
    half = size / 2 * span * (rng.uniform(1.0, 1.2) if cover else rng.uniform(0.5, 0.85))
    centre = size / 2 + (0 if cover else rng.uniform(-0.3, 0.3, 2) * size)
    local = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    local[:, 0] *= 1 - tilt * local[:, 1]
    local += rng.normal(0, 0.03, (4, 2))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    side = 2 * half  # fabric canvas side: about one canvas pixel per output pixel
    a, b, c, d, e, f, g, h = _perspective(centre + half * local @ rot.T, side)
    # Render only the visible part of the fabric: the bounding box of the frame's preimage.
    fx, fy = np.array([0, size, size, 0]), np.array([0, 0, size, size])
    den = g * fx + h * fy + 1
    u, v = (a * fx + b * fy + c) / den, (d * fx + e * fy + f) / den
    u0, v0 = max(int(u.min()) - 2, 0), max(int(v.min()) - 2, 0)
    box = (min(int(u.max()) + 3, int(side)) - u0, min(int(v.max()) + 3, int(side)) - v0)
    coeffs = (a - u0 * g, b - u0 * h, c - u0, d - v0 * g, e - v0 * h, f - v0, g, h)

    period = size * rng.uniform(0.07, 0.2) * side / (2 * half)
    canvas = _PATTERNS[label](rng, box, period, _palette(rng, label))
    canvas = ImageChops.multiply(canvas, _weave(rng, box))
    canvas.putalpha(255)
    mesh, shade = _folds(rng, size)
    fabric = canvas.transform((size, size), Image.Transform.PERSPECTIVE, coeffs, _BILINEAR)
    fabric = fabric.transform((size, size), Image.Transform.MESH, mesh, _BILINEAR)
    # Opaque canvas, transparent black fill: the interpolated colours come out premultiplied by alpha.
    rgba = np.asarray(fabric, np.float32)
    alpha = rgba[..., 3:] * np.float32(1 / 255)
    img = rgba[..., :3] * shade[..., None]
    if alpha.min() < 1:  # part of the table, floor or wall shows
        img += _background(rng, size, alpha[..., 0]) * (1 - alpha)
    img = _lighting(rng, _clutter(rng, img))

    # Camera: optical blur, sensor noise, JPEG compression.
    blurred = _to_image(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.3) * size / 256))
    img = np.asarray(blurred, np.float32)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1, 7))
    buf = io.BytesIO()
    _to_image(img).save(buf, format="JPEG", quality=int(rng.integers(35, 93)))
    return Image.open(buf).convert("RGB")


def _read_marker(path: Path) -> object:
    """The parsed marker file, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_demo_dataset(
    out_dir: str | os.PathLike,
    n_per_class: int = 60,
    seed: int = 0,
    size: int = 256,
    *,
    progress: bool = True,
) -> Path:
    """Write out_dir/<class>/<class>_<i:04d>.jpg for every class; return out_dir as a Path.

    Deterministic: image i of class k comes from its own generator, SeedSequence(seed, spawn_key=(k, i)),
    so the same seed gives the same bytes whatever the order or count. Returns at once (cached) when
    out_dir holds a complete demo set made with the same parameters, recognised by the marker file
    completed last; finishes one interrupted with the same parameters; otherwise refuses (FileExistsError)
    any existing out_dir that is not an empty folder.
    Each image is written to a temporary file in its folder, then moved into place.
    """
    if n_per_class < 1 or size < 32:
        raise ValueError(f"need n_per_class >= 1 and size >= 32, got {n_per_class} and {size}")
    out = Path(out_dir)
    params = {"generator": "imgclf.data.demo", "version": _VERSION, "classes": list(CLASSES),
              "n_per_class": n_per_class, "seed": seed, "size": size}  # fmt: skip
    marker = out / MARKER_NAME
    unfinished = {**params, "complete": False}  # written first: an interrupted run is taken up again
    if out.exists():
        found = _read_marker(marker)
        if found == params:
            return out
        if found != unfinished and (not out.is_dir() or any(out.iterdir())):
            why = f"it holds a demo set made with other parameters ({found})" if found else "it is not empty"
            raise FileExistsError(
                f"refusing to write demo data into {out}: {why}. Choose a new or empty folder, "
                f"or delete {out} yourself if it only holds an older demo set."
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, (json.dumps(unfinished, indent=2) + "\n").encode())
    with tqdm(total=len(CLASSES) * n_per_class, desc="demo data", unit="img", disable=not progress) as bar:
        for k, label in enumerate(CLASSES):
            (out / label).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, i)))
                buf = io.BytesIO()
                render_texture(label, rng, size).save(buf, format="JPEG", quality=95)
                atomic_write_bytes(out / label / f"{label}_{i:04d}.jpg", buf.getvalue())
                bar.update()
    atomic_write_bytes(marker, (json.dumps(params, indent=2) + "\n").encode())
    return out
