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

CLASSES: tuple[str, ...] = ("dotted", "leopard", "striped")
MARKER_NAME = ".imgclf-demo.json"

_VERSION = 1  # bump whenever the images change, so that older demo folders are not taken as current
_SS = 2  # supersampling factor of drawn shapes (anti-aliasing)
_GAIN = 1.4  # headroom of the 8-bit fabric shading, undone after the perspective warp
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


def _smooth(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth random field (size, size) of roughly unit amplitude with about `cells` bumps per side."""
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), _BICUBIC))


def _palette(rng: np.random.Generator, label: str) -> Palette:
    """Background, pattern and accent colours; all classes draw from the same palettes."""
    warm = rng.random() < (0.65 if label == "leopard" else 0.3)
    base = _FABRIC[rng.integers(_N_WARM if warm else len(_FABRIC))]
    luma = _FABRIC @ _LUMA
    candidates = np.flatnonzero(np.abs(luma - base @ _LUMA) > 70)
    if warm:  # dark markings on a tan base
        candidates = candidates[luma[candidates] < base @ _LUMA]
    colours = np.stack([base, _FABRIC[rng.choice(candidates)], _FABRIC[rng.integers(len(_FABRIC))]])
    return np.clip(colours * rng.uniform(0.85, 1.12, (3, 1)) + rng.normal(0, 9, (3, 3)), 0, 255)


def _grid(rng: np.random.Generator, extent: int, period: float, jitter: float, hexagonal: bool) -> np.ndarray:
    """Centres (n, 2) of a jittered square or hexagonal lattice covering a square of side `extent`."""
    dy = period * (np.sqrt(3) / 2 if hexagonal else 1.0)
    j, i = np.mgrid[-1 : int(extent / dy) + 2, -1 : int(extent / period) + 2]
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
    """Broken rings of 2-5 tapered arcs around each centre: polygons (f, 16, 2) and each arc's rosette."""
    owner = np.repeat(np.arange(len(centres)), rng.integers(2, 6, len(centres)))
    share = rng.uniform(0.6, 1.4, len(owner))
    total = np.bincount(owner, share)
    before = np.cumsum(share) - share - np.r_[0, np.cumsum(total)[:-1]][owner]  # share of earlier arcs
    start = before / total[owner] * _TAU + rng.uniform(0, _TAU, len(centres))[owner]
    span = share / total[owner] * _TAU
    fill = rng.uniform(0.5, 0.85, (len(owner), 1))
    t = np.linspace(0, 1, 8)
    theta = start[:, None] + span[:, None] * ((1 - fill) / 2 + fill * t)
    ring = radius[owner, None] * rng.normal(1, 0.04, (len(owner), 8))
    width = ring * rng.uniform(0.3, 0.5) * rng.normal(1, 0.15, (len(owner), 1)) * (0.35 + 0.65 * np.sin(np.pi * t))
    r = np.concatenate([ring + width / 2, (ring - width / 2)[:, ::-1]], axis=1)
    theta = np.concatenate([theta, theta[:, ::-1]], axis=1)
    return _place(r * np.cos(theta), r * np.sin(theta), centres[owner], aspect[owner], angle[owner]), owner


def _draw(img: Image.Image, polygons: np.ndarray, colours: np.ndarray) -> None:
    """Fill polygons (n, k, 2), in canvas pixels, with colours (n, 3) on a supersampled canvas."""
    draw = ImageDraw.Draw(img)
    flat = (polygons * _SS).reshape(len(polygons), -1).tolist()
    for poly, colour in zip(flat, np.clip(colours, 0, 255).astype(np.uint8).tolist(), strict=True):
        draw.polygon(poly, fill=tuple(colour))


def _dotted(rng: np.random.Generator, c: int, period: float, pal: Palette) -> Image.Image:
    """Polka dots on a regular or jittered lattice; sometimes irregular, two-coloured or ringed."""
    base, fg, accent = pal
    img = Image.new("RGB", (c * _SS, c * _SS), tuple(base.astype(int).tolist()))
    regular = rng.random() < 0.6
    centres = _grid(rng, c, period, rng.uniform(0, 0.05) if regular else rng.uniform(0.12, 0.22), rng.random() < 0.5)
    n = len(centres)
    radius = period * rng.uniform(0.13, 0.33) * rng.normal(1, rng.uniform(0, 0.12), n)
    aspect = rng.uniform(1, 1.4) * rng.normal(1, 0.05, n)
    angle = rng.uniform(0, np.pi) + rng.normal(0, 0.2, n)
    wobble = rng.uniform(0.1, 0.35) if rng.random() < 0.4 else 0.03
    two_tone = rng.random((n, 1)) < (0.5 if rng.random() < 0.25 else 0.0)
    if rng.random() < 0.12:  # ringed dots, easy to confuse with rosettes
        rings = _blobs(rng, centres, radius * rng.uniform(1.3, 1.6), aspect, angle, wobble)
        _draw(img, rings, np.broadcast_to(accent, (n, 3)))
    colours = np.where(two_tone, accent, fg) + rng.normal(0, 6, (n, 3))
    _draw(img, _blobs(rng, centres, radius, aspect, angle, wobble), colours)
    return img.reduce(_SS)


def _leopard(rng: np.random.Generator, c: int, period: float, pal: Palette) -> Image.Image:
    """Rosettes (broken dark rings around a tinted centre) and small spots; sometimes solid or elongated."""
    base, fg, accent = pal
    img = Image.new("RGB", (c * _SS, c * _SS), tuple(base.astype(int).tolist()))
    centres = _grid(rng, c, period, rng.uniform(0.12, 0.25), hexagonal=True)
    n = len(centres)
    radius = period * rng.uniform(0.26, 0.36) * rng.normal(1, 0.12, n)
    aspect = rng.uniform(1, 1.9 if rng.random() < 0.3 else 1.3) * rng.normal(1, 0.1, n)
    angle = rng.uniform(0, np.pi) + rng.normal(0, 0.35, n)
    dark = fg + rng.normal(0, 8, (n, 3))
    if rng.random() < 0.2:  # solid spots, easy to confuse with irregular dots
        _draw(img, _blobs(rng, centres, radius * rng.uniform(0.45, 0.7), aspect, angle, 0.35), dark)
    else:
        tint = base + (0.5 * fg + 0.5 * accent - base) * rng.uniform(0.2, 0.45)
        _draw(img, _blobs(rng, centres, radius * 0.85, aspect, angle, 0.25), tint + rng.normal(0, 8, (n, 3)))
        arcs, owner = _rings(rng, centres, radius, aspect, angle)
        _draw(img, arcs, dark[owner])
    k = int(n * rng.uniform(0.3, 1.0))
    spots = _blobs(
        rng, rng.uniform(0, c, (k, 2)), period * rng.uniform(0.04, 0.09, k), rng.uniform(1, 1.6, k),
        rng.uniform(0, np.pi, k), 0.35,
    )  # fmt: skip
    _draw(img, spots, fg + rng.normal(0, 8, (k, 3)))
    return img.reduce(_SS)


def _striped(rng: np.random.Generator, c: int, period: float, pal: Palette) -> Image.Image:
    """Parallel stripes of varying widths, sometimes multi-coloured, wavy or broken into dashes."""
    base, fg, accent = pal
    k = int(rng.choice([2, 2, 3, 4, 5, 6, 9]))
    odd = np.arange(k) % 2 == 1
    pick_accent = odd & (rng.random(k) < (0.5 if rng.random() < 0.35 else 0.0))
    colours = np.where(odd[:, None], np.where(pick_accent[:, None], accent, fg), base) + rng.normal(0, 6, (k, 3))
    widths = rng.uniform(0.3, 1.7, k) if rng.random() < 0.6 else np.ones(k)
    repeat = period * k / 2
    fine = max(int(repeat * 4), k)  # colour look-up table at 4 samples per pixel
    which = np.minimum(np.searchsorted(np.cumsum(widths) / widths.sum() * fine, np.arange(fine) + 0.5), k - 1)
    lut = np.mean([np.roll(colours[which], s, axis=0) for s in range(4)], axis=0)  # 1-pixel box filter
    lut = np.clip(lut + 0.5, 0, 255).astype(np.uint8)
    y = np.arange(c, dtype=np.float32)[:, None]
    u = np.arange(c, dtype=np.float32)[None, :] + _smooth(rng, 6, c) * repeat * rng.uniform(0, 0.05)
    if rng.random() < 0.25:
        u = u + period * rng.uniform(0.1, 0.4) * np.sin(_TAU * y / (period * rng.uniform(2, 6)) + rng.uniform(0, _TAU))
    pos = np.minimum(((u % repeat) * (fine / repeat)).astype(np.int64), fine - 1)
    rgb = lut[pos]
    if rng.random() < 0.3:  # broken stripes: dashes, easy to confuse with elongated dots
        stripe = (np.floor(u / repeat).astype(np.int64) * k + which[pos]) % 1024
        dash = period * rng.uniform(1, 4, 1024)
        gap = ((y + rng.uniform(0, 100 * period, 1024)[stripe]) % dash[stripe]) > rng.uniform(0.55, 0.85) * dash[stripe]
        rgb[gap & odd[which[pos]]] = np.clip(base + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


_PATTERNS: dict[str, Callable[[np.random.Generator, int, float, Palette], Image.Image]] = {
    "dotted": _dotted,
    "leopard": _leopard,
    "striped": _striped,
}


def _fabric_shading(rng: np.random.Generator, c: int) -> tuple[list, Image.Image]:
    """Mesh (for Image.transform) displacing a c x c canvas along folds, and the matching 8-bit shading."""
    g = 12
    grid = np.linspace(0, c, g + 1)
    xx, yy = np.meshgrid(grid, grid)
    height = np.zeros_like(xx)
    for _ in range(rng.integers(1, 4)):
        a = rng.uniform(0, np.pi)
        d = xx * np.cos(a) + yy * np.sin(a)
        if rng.random() < 0.5:  # a crease through a random point
            d0 = rng.uniform(0, c, 2) @ (np.cos(a), np.sin(a))
            height += rng.uniform(-1, 1) * np.exp(-(((d - d0) / (c * rng.uniform(0.04, 0.15))) ** 2))
        else:  # gentle waves
            height += rng.uniform(0.2, 0.8) * np.sin(_TAU * d / (c * rng.uniform(0.2, 0.6)) + rng.uniform(0, _TAU))
    height /= np.abs(height).max() + 1e-9
    gy, gx = np.gradient(height)
    light = rng.uniform(0, _TAU)
    slope = gx * np.cos(light) + gy * np.sin(light)
    shade = 1 + rng.uniform(0.1, 0.45) * slope / (np.abs(slope).max() + 1e-9) + rng.uniform(0, 0.12) * height
    tilt = rng.uniform(0, _TAU)
    shift = height * c * rng.uniform(0.005, 0.03)
    sx, sy = (xx + shift * np.cos(tilt)).tolist(), (yy + shift * np.sin(tilt)).tolist()
    e = np.round(grid).astype(int).tolist()
    mesh = [
        (
            (e[i], e[j], e[i + 1], e[j + 1]),
            (sx[j][i], sy[j][i], sx[j + 1][i], sy[j + 1][i], sx[j + 1][i + 1], sy[j + 1][i + 1], sx[j][i + 1], sy[j][i + 1]),
        )
        for j in range(g)
        for i in range(g)
    ]
    # Woven threads: a fine checker of crossings plus thicker and thinner yarns.
    t = np.arange(c, dtype=np.float32)
    w = rng.uniform(2.2, 4.0)
    weave = (1 + rng.uniform(0.02, 0.08) * np.cos(_TAU * t / w)[:, None] * np.cos(_TAU * t / w)[None, :]
             + rng.normal(0, 0.02, (c, 1)) + rng.normal(0, 0.02, (1, c)))  # fmt: skip
    shade_full = np.asarray(Image.fromarray(shade.astype(np.float32)).resize((c, c), _BICUBIC))
    return mesh, _to_image(shade_full * weave * (255 / _GAIN))


def _perspective(quad: np.ndarray, c: int) -> list[float]:
    """PERSPECTIVE coefficients mapping output pixels to the canvas, whose corners land on `quad` (4, 2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(quad, [(0, 0), (c, 0), (c, c), (0, c)], strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)).tolist()


def _background(rng: np.random.Generator, size: int, alpha: np.ndarray) -> np.ndarray:
    """A table, floor or wall (size, size, 3), darkened by the soft contact shadow of the fabric."""
    colour = _SURFACE[rng.integers(len(_SURFACE))] * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)
    shade = 1 + 0.12 * _smooth(rng, 3, size)
    if rng.random() < 0.3:  # wood grain
        y, x = np.ogrid[:size, :size]
        a = rng.uniform(0, np.pi)
        phase = _TAU * (x * np.cos(a) + y * np.sin(a)) / (size * rng.uniform(0.02, 0.06)) + 3 * _smooth(rng, 4, size)
        shade = shade * (1 + 0.08 * np.sin(phase))
    halo = _to_image(alpha * 255).filter(ImageFilter.GaussianBlur(size * rng.uniform(0.01, 0.04)))
    return colour * (shade * (1 - 0.4 * np.asarray(halo, np.float32) / 255))[..., None]


def _clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Occlude the scene with 0-3 shaded objects (buttons, cards, pencils, stones) casting soft shadows."""
    size = img.shape[0]
    y, x = np.ogrid[:size, :size]
    for _ in range(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])):
        kind = rng.integers(4)
        centre = rng.uniform(0, size, (1, 2))
        angle = rng.uniform(0, np.pi, 1)
        r = size * rng.uniform(0.06, 0.18)
        if kind in (0, 3):  # button or stone
            poly = _blobs(rng, centre, np.array([r]), rng.uniform(1, 1.5, 1), angle, 0.02 if kind == 0 else 0.3)
        else:  # card or pencil
            half = (r, r * rng.uniform(0.5, 0.9)) if kind == 1 else (size * rng.uniform(0.2, 0.4), r * 0.2)
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
            poly = _place(corners[None, :, 0], corners[None, :, 1], centre, np.ones(1), angle)
        mask = Image.new("L", (size * _SS, size * _SS))
        ImageDraw.Draw(mask).polygon((poly[0] * _SS).ravel().tolist(), fill=255)
        mask = mask.reduce(_SS)
        dx, dy = rng.uniform(-0.3, 0.3, 2) * r
        shadow = mask.filter(ImageFilter.GaussianBlur(r * 0.25)).transform(
            mask.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), _BILINEAR
        )
        m = np.asarray(mask, np.float32)[..., None] / 255
        s = np.asarray(shadow, np.float32)[..., None] / 255
        colour = _FABRIC[rng.integers(len(_FABRIC))] if rng.random() < 0.3 else rng.uniform(20, 240, 3)
        light = rng.uniform(0, _TAU)
        grad = 1 + 0.25 * ((x - centre[0, 0]) * np.cos(light) + (y - centre[0, 1]) * np.sin(light)) / r
        img = img * (1 - 0.45 * s) * (1 - m) + (colour * np.clip(grad, 0.5, 1.5)[..., None]) * m
    return img


def _lighting(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Apply a lighting gradient, vignette, optional hot spot, exposure and white balance."""
    size = img.shape[0]
    y, x = ((g.astype(np.float32) + 0.5) / size - 0.5 for g in np.ogrid[:size, :size])
    a = rng.uniform(0, _TAU)
    field = (1 + rng.uniform(0, 0.7) * (x * np.cos(a) + y * np.sin(a))) * (1 - rng.uniform(0, 0.9) * (x**2 + y**2))
    if rng.random() < 0.3:
        x0, y0 = rng.uniform(-0.4, 0.4, 2)
        field = field + rng.uniform(0.1, 0.35) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / rng.uniform(0.01, 0.05))
    return img * field[..., None] * (rng.uniform(0.7, 1.15) * rng.normal(1, 0.04, 3))


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
    quad = centre + half * local @ rot.T
    c = int(min(2 * half, 3 * size))  # about one canvas pixel per output pixel
    period = size * rng.uniform(0.07, 0.2) * c / (2 * half)

    canvas = _PATTERNS[label](rng, c, period, _palette(rng, label))
    mesh, shading = _fabric_shading(rng, c)
    canvas = ImageChops.multiply(canvas, Image.merge("RGB", [shading] * 3))
    canvas.putalpha(255)
    fabric = canvas.convert("RGBa").transform((c, c), Image.Transform.MESH, mesh, _BILINEAR, fillcolor=(0,) * 4)
    fabric = fabric.transform((size, size), Image.Transform.PERSPECTIVE, _perspective(quad, c), _BILINEAR,
                              fillcolor=(0,) * 4)  # fmt: skip
    rgba = np.asarray(fabric, np.float32)  # premultiplied alpha
    alpha = rgba[..., 3:] / 255
    img = rgba[..., :3] * _GAIN + _background(rng, size, alpha[..., 0]) * (1 - alpha)
    img = _lighting(rng, _clutter(rng, img))

    # Camera: optical blur, sensor noise, JPEG compression.
    img = np.asarray(_to_image(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.3) * size / 256)), np.float32)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1, 7)
    buf = io.BytesIO()
    _to_image(img).save(buf, format="JPEG", quality=int(rng.integers(35, 93)))
    return Image.open(buf).convert("RGB")


def _read_marker(path: Path) -> object:
    """The parsed marker file, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_demo_dataset(
    out_dir: str | os.PathLike, n_per_class: int = 60, seed: int = 0, size: int = 256, *, progress: bool = True
) -> Path:
    """Write out_dir/<class>/<class>_<i:04d>.jpg for every class; return out_dir as a Path.

    Deterministic: image i of class k comes from its own generator, SeedSequence(seed, spawn_key=(k, i)).
    Refuses (FileExistsError) to write into an existing folder unless it is empty; returns at once when it
    already holds a complete demo set with the same parameters (the marker file is written last).
    """
    if n_per_class < 1 or size < 32:
        raise ValueError(f"need n_per_class >= 1 and size >= 32, got {n_per_class} and {size}")
    out = Path(out_dir)
    params = {"generator": "imgclf.data.demo", "version": _VERSION, "classes": list(CLASSES),
              "n_per_class": n_per_class, "seed": seed, "size": size}  # fmt: skip
    marker = out / MARKER_NAME
    if out.exists():
        found = _read_marker(marker)
        if found == params:
            return out
        if not out.is_dir() or any(out.iterdir()):
            why = f"it holds a demo set made with other parameters ({found})" if found else "it is not empty"
            raise FileExistsError(
                f"refusing to write demo data into {out}: {why}. Choose a new or empty folder, "
                f"or delete {out} yourself if it only holds an older demo set."
            )
    with tqdm(total=len(CLASSES) * n_per_class, desc="demo data", unit="img", disable=not progress) as bar:
        for k, label in enumerate(CLASSES):
            (out / label).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, i)))
                buf = io.BytesIO()
                render_texture(label, rng, size).save(buf, format="JPEG", quality=95)
                _write_atomic(out / label / f"{label}_{i:04d}.jpg", buf.getvalue())
                bar.update()
    _write_atomic(marker, (json.dumps(params, indent=2) + "\n").encode())
    return out
