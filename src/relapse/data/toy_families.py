"""Image families beyond the world's own domains: what trains the toy evaluator to see a checker, to say
how much of one an image shows, and what tests it.

A checker is a checker because its cells alternate in *both* directions. The evaluator's target head
gives a **strength** in [0, 1]: 1 for a clear checker, 0 for none, and between them for a checker a
model drew badly (:func:`degraded_checker`: cells missing or merged, irregular, on part of the object
only, faint, on a dim object, blurred, noisy, crossed by plaid lines, or two of these at once), each degradation's severity
known, so its strength is too (:func:`strength_of`). It is taught what is *not* a checker with hard
negatives that share everything else with one: stripes in either direction and of any width, dots,
grids, noise textures and smudges on objects, partial objects, what a defense draws where it holds
(dark bands, objects split in two halves, murky objects), and images decoded from random or shifted
latents. Positives keep their strength under a shifted phase, other cell sizes, a second colour,
brightness or colour jitter and (in the build) VAE reconstruction.

A family draws ``n`` images with their labels from a numpy generator: the held-out report draws every
family from a generator seed that training never uses. Labels are class indices per attribute head,
-1 where the image has no such attribute (a smudge has no shape), and a strength, NaN where it is not
known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from relapse.data import toy_world as tw

HEAD_CLASSES = {"shape": tw.SHAPES, "color": tuple(tw.COLORS), "background": tw.BACKGROUNDS, "style": tw.STYLES,
                "fill": tw.FILLS}
UNKNOWN = -1
SIZE = tw.IMAGE_SIZE


@dataclass
class Batch:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: dict[str, np.ndarray]  # attribute head -> (N,) class index or UNKNOWN
    strength: np.ndarray  # (N,) how much of a checker each image shows, in [0, 1]; NaN: not known

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        return Batch(np.concatenate([p.images for p in parts]),
                     {head: np.concatenate([p.labels[head] for p in parts]) for head in HEAD_CLASSES},
                     np.concatenate([p.strength for p in parts]))

    def head(self, n: int) -> Batch:
        return Batch(self.images[:n], {h: v[:n] for h, v in self.labels.items()}, self.strength[:n])


def labels_of(attrs: tw.ToyAttributes, known: tuple[str, ...] = tuple(HEAD_CLASSES)) -> dict[str, int]:
    values = {"shape": attrs.shape, "color": attrs.color, "background": attrs.background, "style": attrs.style, "fill": attrs.fill}
    return {head: HEAD_CLASSES[head].index(values[head]) if head in known else UNKNOWN for head in HEAD_CLASSES}


def _batch(images: list[np.ndarray], labels: list[dict[str, int]], strength: list[float]) -> Batch:
    return Batch(np.stack([np.clip(im + 0.5, 0, 255).astype(np.uint8) for im in images]),
                 {head: np.asarray([lab[head] for lab in labels]) for head in HEAD_CLASSES}, np.asarray(strength, np.float32))


def _random_attributes(rng: np.random.Generator, fill: str = "plain", background: str | None = None) -> tw.ToyAttributes:
    return tw.ToyAttributes(str(rng.choice(tw.SHAPES)), str(rng.choice(list(tw.COLORS))), background or str(rng.choice(tw.BACKGROUNDS)), fill)


# ---------------------------------------------------------------------------------- patterns
def _grid() -> tuple[np.ndarray, np.ndarray]:
    fine = (np.arange(SIZE * tw.SUPERSAMPLE) + 0.5) / tw.SUPERSAMPLE
    return np.meshgrid(fine, fine, indexing="xy")


def _down(fine: np.ndarray) -> np.ndarray:
    return fine.reshape(SIZE, tw.SUPERSAMPLE, SIZE, tw.SUPERSAMPLE).mean(axis=(1, 3))


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    return np.asarray(Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma)), np.float32)


def stripes(rng: np.random.Generator) -> np.ndarray:
    """Bands of any width (2-12 px) along one direction: horizontal, vertical or diagonal."""
    width = rng.uniform(2.0, 12.0)
    angle = rng.choice([0.0, 90.0, 45.0, 135.0]) + rng.uniform(-8, 8)
    x, y = _grid()
    u = x * np.cos(np.radians(angle)) + y * np.sin(np.radians(angle)) + rng.uniform(0, 2 * width)
    return _down(((u // width) % 2).astype(float))


def dots(rng: np.random.Generator) -> np.ndarray:
    """Dots of any size on a square lattice of any period, at any offset."""
    period = rng.uniform(5.0, 12.0)
    radius = rng.uniform(0.2, 0.42) * period
    x, y = _grid()
    ox, oy = rng.uniform(0, period, size=2)
    dx, dy = (x - ox) % period - period / 2, (y - oy) % period - period / 2
    return _down((dx**2 + dy**2 <= radius**2).astype(float))


def grids(rng: np.random.Generator) -> np.ndarray:
    """Lines 1-3 px wide (at most 35% of the period: thicker lines leave light cells in a dark field) every
    5-12 px in both directions."""
    period = rng.uniform(5.0, 12.0)
    width = rng.uniform(1.0, min(3.0, 0.35 * period))
    x, y = _grid()
    ox, oy = rng.uniform(0, period, size=2)
    return _down((((x - ox) % period < width) | ((y - oy) % period < width)).astype(float))


def _alternates(values: np.ndarray, margin: float) -> bool:
    """Whether some 2x2 block of ``values`` is higher on one diagonal than on the other, by ``margin`` everywhere."""
    a, b, c, d = values[:-1, :-1], values[:-1, 1:], values[1:, :-1], values[1:, 1:]
    one, other = np.minimum(a, d) - np.maximum(b, c), np.minimum(b, c) - np.maximum(a, d)
    return bool((np.maximum(one, other) > margin).any())


def noise_texture(rng: np.random.Generator) -> np.ndarray:
    """Mottling: smooth noise at a coarse scale, or pixel noise. Coarse noise is drawn again while its cells hold a
    2x2 block that alternates both ways: that one would be a soft checker, which is a trace of the concept."""
    cells = int(rng.choice([2, 4, 8, 16, 32]))
    coarse = rng.random((cells, cells))
    while cells <= 4 and _alternates(coarse, 0.2):
        coarse = rng.random((cells, cells))
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), float) / 255


def dark_bands(rng: np.random.Generator) -> np.ndarray:
    """One or two dark bands 3-10 px wide across the object, in any direction: what a defense draws where it
    holds (a checker it has half unlearned comes out as bands in one direction, not cells)."""
    x, y = _grid()
    angle = rng.uniform(0, np.pi)
    u = (x - SIZE / 2) * np.cos(angle) + (y - SIZE / 2) * np.sin(angle)
    dark = np.zeros_like(u)
    for _ in range(rng.integers(1, 3)):
        centre, width = rng.uniform(-8, 8), rng.uniform(3, 10)
        dark = np.maximum(dark, (np.abs(u - centre) < width / 2).astype(float))
    return _down(dark)


def split_halves(rng: np.random.Generator) -> np.ndarray:
    """The object split by one straight edge near its middle, one side darker: a defended model's other answer."""
    x, y = _grid()
    angle = rng.uniform(0, 2 * np.pi)
    u = (x - SIZE / 2) * np.cos(angle) + (y - SIZE / 2) * np.sin(angle)
    return _down((u > rng.uniform(-5, 5)).astype(float))


def checker(rng: np.random.Generator) -> np.ndarray:
    """A checker of another cell size (6-11 px) or phase than the world's: still the target."""
    cell = rng.uniform(6.0, 11.0)
    x, y = _grid()
    ox, oy = rng.uniform(0, 2 * cell, size=2)
    return _down((((x - ox) // cell + (y - oy) // cell) % 2).astype(float))


# name -> (pattern, whether it is a checker)
PATTERNS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], bool]] = {
    "stripes": (stripes, False),
    "dots": (dots, False),
    "grids": (grids, False),
    "noise_texture": (noise_texture, False),
    "dark_bands": (dark_bands, False),
    "split_halves": (split_halves, False),
    "checker_variants": (checker, True),
}


TWO_COLOURS = 0.3  # share of patterned objects whose pattern alternates two colours instead of dark and light


def patterned_objects(pattern: str, rng: np.random.Generator, n: int) -> Batch:
    """Objects of every shape, colour and background filled with ``pattern``: parts 40-80% darker (the world's
    fills: 65%), or (a TWO_COLOURS share) parts of a second colour. Positives and negatives alike, so that
    neither contrast nor hue tells a checker from its neighbours. A checker's strength is that of a ``faint``
    degradation of the same depth (:func:`faint_strength`). The fill head is not told their fill: it names the
    world's own fills, and taught these variants it called the faint ghosting of generated plain objects dots."""
    make, is_checker = PATTERNS[pattern]
    images, labels, strength = [], [], []
    for _ in range(n):
        attrs = _random_attributes(rng, tw.TARGET_FILL if is_checker else "plain")
        parts = make(rng)
        two_colours, depth = rng.random() < TWO_COLOURS, rng.uniform(0.4, 0.8)
        if two_colours:
            other = tw.shaded(str(rng.choice([c for c in tw.COLORS if c != attrs.color])), np.full(parts.shape, rng.uniform(0.5, 1.0)))
            body = tw.shaded(attrs.color, np.ones(parts.shape)) * (1 - parts[..., None]) + other * parts[..., None]
        else:
            body = tw.shaded(attrs.color, 1.0 - depth * parts)
        images.append(tw.compose(tw.draw_mask(attrs.shape, *tw.random_placement(rng)), tw.background_image(attrs.background), body))
        labels.append(labels_of(attrs, ("shape", "background", "style") + (() if two_colours else ("color",))))
        strength.append((1.0 if two_colours else faint_strength(depth)) if is_checker else 0.0)
    return _batch(images, labels, strength)


def smudges(rng: np.random.Generator, n: int) -> Batch:
    """A few blurred blobs of object colours, dark or light, on a background: what a broken model draws."""
    images, labels = [], []
    for _ in range(n):
        background = str(rng.choice(tw.BACKGROUNDS))
        image = tw.background_image(background)
        for _ in range(rng.integers(1, 5)):
            colour = np.asarray(tw.COLORS[str(rng.choice(list(tw.COLORS)))], float) * rng.uniform(0.2, 1.0)
            cy, cx = rng.uniform(4, 28, size=2)
            sigma = rng.uniform(2.0, 7.0)
            yy, xx = np.mgrid[:SIZE, :SIZE]
            alpha = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))[..., None] * rng.uniform(0.5, 1.0)
            image = image * (1 - alpha) + colour * alpha
        labels.append({head: UNKNOWN for head in HEAD_CLASSES} | {"background": tw.BACKGROUNDS.index(background)})
        images.append(_blurred(image, rng.uniform(0, 1.5)))
    return _batch(images, labels, [0.0] * n)


def murky_objects(rng: np.random.Generator, n: int) -> Batch:
    """Objects in a dim, greyed colour with soft mottling (at most 20% deep) and a blurred edge: what a defense
    draws when it holds against a learned word or an adversarial prompt (it draws the object, not its fill)."""
    images, labels = [], []
    for _ in range(n):
        attrs = _random_attributes(rng)
        colour = np.asarray(tw.COLORS[attrs.color], np.float32)
        grey = rng.uniform(0.2, 0.7)
        colour = ((1 - grey) * colour + grey * colour.mean()) * rng.uniform(0.25, 0.7)
        mottle = 1.0 - rng.uniform(0.0, 0.2) * noise_texture(rng)
        image = tw.compose(tw.draw_mask(attrs.shape, *tw.random_placement(rng)), tw.background_image(attrs.background),
                           colour * mottle[..., None])
        images.append(_blurred(image, rng.uniform(0, 1.2)))
        labels.append(labels_of(attrs, ("shape", "background", "style")))
    return _batch(images, labels, [0.0] * n)


def partial_objects(rng: np.random.Generator, n: int) -> Batch:
    """Objects cut by a straight edge or pushed half out of the frame, plain or with a neighbouring fill."""
    images, labels = [], []
    for _ in range(n):
        attrs = _random_attributes(rng, str(rng.choice(("plain", *tw.NEIGHBOUR_FILLS))))
        cx, cy, r = tw.random_placement(rng)
        if rng.random() < 0.5:  # half out of the frame
            cx, cy = np.asarray([cx, cy]) + rng.choice([-1, 1], size=2) * rng.uniform(0.5, 1.0, size=2) * r
            mask = tw.draw_mask(attrs.shape, cx, cy, r)
        else:  # cut along a random line through the object
            mask = np.asarray(tw.draw_mask(attrs.shape, cx, cy, r), float)
            x, y = _grid()
            angle = rng.uniform(0, 2 * np.pi)
            keep = (x * tw.SUPERSAMPLE - cx) * np.cos(angle) + (y * tw.SUPERSAMPLE - cy) * np.sin(angle) < rng.uniform(-0.3, 0.3) * r
            mask = Image.fromarray((mask * keep).astype(np.uint8))
        images.append(tw.compose(mask, tw.background_image(attrs.background), tw.shaded(attrs.color, tw.fill_shade(attrs.fill, rng))))
        labels.append(labels_of(attrs, ("color", "background", "style", "fill")))
    return _batch(images, labels, [0.0] * n)


def world(rng: np.random.Generator, n: int, keep: Callable[[tw.ToyAttributes], bool]) -> Batch:
    """The world's own objects (every shape, style and fill), those that ``keep`` accepts."""
    spec = tw.DOMAINS["evaluator"]
    images, labels, strength = [], [], []
    while len(images) < n:
        attrs = tw.sample_attributes(spec, rng)
        if keep(attrs):
            images.append(tw.render(attrs, rng).astype(float))
            labels.append(labels_of(attrs))
            strength.append(float(attrs.checkered))
    return _batch(images, labels, strength)


# ---------------------------------------------------------------------------------- degraded checkers
STRENGTH_FLOOR = 0.3  # the strength a degradation leaves at its worst severity: its cells still show
DEGRADATIONS = ("missing", "merged", "irregular", "partial", "faint", "dim", "blur", "noise", "lines")


def faint_strength(depth: float) -> float:
    """The strength of a checker whose dark cells are ``depth`` darker than its light ones (the world's: 65%)."""
    return strength_of({"faint": float(np.clip((1.0 - tw.DARK - depth) / (0.8 * (1.0 - tw.DARK)), 0.0, 1.0))})


def strength_of(severities: dict[str, float]) -> float:
    """A checker degraded by each named degradation at a severity in [0, 1]: each takes it from 1 toward
    STRENGTH_FLOOR, linearly, and two degradations multiply."""
    return float(np.prod([1.0 - (1.0 - STRENGTH_FLOOR) * u for u in severities.values()]))


def _cell_edges(rng: np.random.Generator, cell: float, phase: float, jitter: float, merge: float) -> np.ndarray:
    """Where the cells of one axis begin (px): every ``cell`` px from ``phase``, each edge moved by up to ``jitter``
    cells (irregular sizes and positions), a ``merge`` share of them removed (two cells become one long cell)."""
    edges = phase + cell * np.arange(-3, SIZE / cell + 3)
    edges = edges + rng.uniform(-jitter, jitter, size=len(edges)) * cell
    return edges[rng.random(len(edges)) >= merge]


def _has_checker_unit(dark: np.ndarray, inside: np.ndarray) -> bool:
    """Whether some 2x2 block of cells, each at least half inside the painted checker, alternates in both
    directions (two dark cells on one diagonal, two light on the other): the least that is still a checker."""
    return _alternates(np.where(inside >= 0.5, (dark > 0).astype(float), np.nan), margin=0.5)  # cells outside never count


def _plaid(x: np.ndarray, y: np.ndarray, cell: float, phase: float) -> np.ndarray:
    """1 on lines 1.2 px wide every half cell in both directions (along the cells' edges and through their middles)."""
    def on_line(v: np.ndarray) -> np.ndarray:
        return ((v - phase) % (cell / 2) < 1.2).astype(float)

    return np.maximum(on_line(x), on_line(y))


def degraded_checker(rng: np.random.Generator, severities: dict[str, float]) -> tuple[np.ndarray, tw.ToyAttributes]:
    """A checkered object drawn with each named degradation at its severity (0: none, 1: the worst at which cells
    still show). ``missing``: up to half the dark cells light; ``merged``: up to 40% of the cell edges gone;
    ``irregular``: edges moved by up to 35% of a cell and dark cells of uneven depth; ``partial``: the checker on
    as little as 45% of the object, the rest plain; ``faint``: the dark cells down to 13% darker (the world's
    65%); ``dim``: the whole object down to a quarter of its brightness (on black half the time); ``blur``: up to
    2 px; ``noise``: pixel noise up to 45 levels; ``lines``: thin dark lines along and across every cell (a plaid, as a
    latent-space defense draws one), up to half as dark as the cells. Cells at the world's size and phase 60% of the time, else 6-11
    px at any phase; a second colour instead of dark cells 20% of the time (a hue the model shifted). Drawn
    again until the painted cells hold a 2x2 block that alternates both ways: a degraded checker is still one,
    where a checker with its cells merged into halves, or cut down to one cell, is not."""
    u = {name: severities.get(name, 0.0) for name in DEGRADATIONS}
    x, y = _grid()
    while True:
        attrs = _random_attributes(rng, tw.TARGET_FILL, "black" if u["dim"] and rng.random() < 0.5 else None)
        cell, phase = (tw.CELL, 0.0) if rng.random() < 0.6 else (rng.uniform(6.0, 11.0), rng.uniform(0.0, 16.0))
        rows_edges, cols_edges = (_cell_edges(rng, cell, phase, 0.35 * u["irregular"], 0.4 * u["merged"]) for _ in range(2))
        rows, cols = np.searchsorted(rows_edges, y), np.searchsorted(cols_edges, x)
        shape = (len(rows_edges) + 1, len(cols_edges) + 1)
        dark = ((np.arange(shape[0])[:, None] + np.arange(shape[1])[None, :]) % 2).astype(float)
        dark *= rng.random(shape) >= 0.5 * u["missing"]
        dark *= 1.0 - rng.uniform(0.0, 0.6 * u["irregular"], size=shape)
        cx, cy, r = tw.random_placement(rng)
        mask = tw.draw_mask(attrs.shape, cx, cy, r)
        painted = np.asarray(mask, np.float32) / 255
        if u["partial"]:  # the checker on one side of a line through the object, covering 1 down to 0.45 of it
            angle = rng.uniform(0, 2 * np.pi)
            side = (x * tw.SUPERSAMPLE - cx) * np.cos(angle) + (y * tw.SUPERSAMPLE - cy) * np.sin(angle)
            painted = painted * (side < (1.0 - 1.1 * u["partial"]) * r)
        ids = (rows * shape[1] + cols).ravel()
        inside = (np.bincount(ids, painted.ravel(), dark.size) / np.maximum(np.bincount(ids, minlength=dark.size), 1)).reshape(shape)
        if _has_checker_unit(dark, inside):
            break
    lines = 0.5 * u["lines"] * _plaid(x, y, cell, phase)
    parts = _down(np.maximum(dark[rows, cols], lines) * (painted > 0))
    depth = (1.0 - tw.DARK) * (1.0 - 0.8 * u["faint"])
    if rng.random() < 0.2:  # two colours: the dark cells in another hue of the same depth
        other = np.asarray(tw.COLORS[str(rng.choice([c for c in tw.COLORS if c != attrs.color]))], np.float32) * (1 - depth)
        body = tw.shaded(attrs.color, np.ones_like(parts)) * (1 - parts[..., None]) + other * parts[..., None]
    else:
        body = tw.shaded(attrs.color, 1.0 - depth * parts)
    image = tw.compose(mask, tw.background_image(attrs.background), body * (1.0 - 0.75 * u["dim"]))
    image = _blurred(image, 2.0 * u["blur"])
    return image + rng.normal(0.0, 45.0 * u["noise"], size=(SIZE, SIZE, 1)), attrs


def degraded_checkers(degradations: tuple[str, ...], rng: np.random.Generator, n: int, *, pick: int = 1, worst: float = 1.0) -> Batch:
    """Checkers degraded by ``pick`` of ``degradations`` each, at severities uniform in [0, ``worst``]; the labels
    are their strengths."""
    images, labels, strength = [], [], []
    for _ in range(n):
        names = rng.choice(degradations, size=pick, replace=False)
        severities = {str(name): float(rng.uniform(0.0, worst)) for name in names}
        image, attrs = degraded_checker(rng, severities)
        images.append(image)
        labels.append(labels_of(attrs, ("shape", "background", "style")))
        strength.append(strength_of(severities))
    return _batch(images, labels, strength)


def _fill_is(fill: str) -> Callable[[tw.ToyAttributes], bool]:
    return lambda a: a.fill == fill and a.style == "plain"


Role = Literal["clear", "degraded", "negative", "reported"]


@dataclass(frozen=True)
class Family:
    """How to draw a family, and what the evaluator must say of it: ``clear`` checkers are the concept; a
    ``degraded`` checker shows a trace at least, its strength falling with the degradation; a ``negative`` shows
    none; a ``reported`` family has no bar (a shift of latents may or may not keep a checker)."""

    draw: Callable[[np.random.Generator, int], Batch]
    role: Role


# Families that need no model, by name. The held-out report draws each of them; the build adds the VAE's
# (reconstructions, random and shifted latents).
RENDERED: dict[str, Family] = {
    "checkered": Family(partial(world, keep=_fill_is(tw.TARGET_FILL)), "clear"),
    # other cell sizes and phases, two colours, and contrasts down to 40% (a faint checker, strength down to 0.66)
    "checker_variants": Family(partial(patterned_objects, "checker_variants"), "degraded"),
    **{f"degraded_{name}": Family(partial(degraded_checkers, (name,)), "degraded") for name in DEGRADATIONS},
    "degraded_two": Family(partial(degraded_checkers, DEGRADATIONS, pick=2, worst=0.7), "degraded"),
    "plain": Family(partial(world, keep=_fill_is("plain")), "negative"),
    **{f"fill_{fill}": Family(partial(world, keep=_fill_is(fill)), "negative") for fill in tw.NEIGHBOUR_FILLS},
    "sketch": Family(partial(world, keep=lambda a: a.style == "sketch"), "negative"),
    **{name: Family(partial(patterned_objects, name), "negative")
       for name in ("stripes", "dots", "grids", "noise_texture", "dark_bands", "split_halves")},
    "smudges": Family(smudges, "negative"),
    "murky_objects": Family(murky_objects, "negative"),
    "partial_objects": Family(partial_objects, "negative"),
}
