"""Image families beyond the world's own domains: what trains the toy evaluator to see a checker, and
what tests it.

A checker is a checker because its cells alternate in *both* directions. The evaluator's target head is
taught that with hard negatives that share everything else with it: stripes in either direction and
of any width, dots, grids, noise textures and smudges on objects, partial objects, and images decoded
from random or shifted latents (what a broken or defended model draws). Positives stay checkered under
a shifted phase, other cell sizes and contrasts, blur and brightness or colour jitter (and, in the
build, under VAE reconstruction).

A family draws ``n`` images with their labels from a numpy generator: the held-out report draws every
family from a generator seed that training never uses. Labels are class indices per evaluator head,
-1 where the image has no such attribute (a smudge has no shape).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageFilter

from relapse.data import toy_world as tw

HEAD_CLASSES = {"shape": tw.SHAPES, "color": tuple(tw.COLORS), "background": tw.BACKGROUNDS, "style": tw.STYLES,
                "fill": tw.FILLS, "checkered": (False, True)}
UNKNOWN = -1
SIZE = tw.IMAGE_SIZE


@dataclass
class Batch:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: dict[str, np.ndarray]  # head -> (N,) class index or UNKNOWN

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        return Batch(np.concatenate([p.images for p in parts]),
                     {head: np.concatenate([p.labels[head] for p in parts]) for head in HEAD_CLASSES})


def labels_of(attrs: tw.ToyAttributes, known: tuple[str, ...] = tuple(HEAD_CLASSES)) -> dict[str, int]:
    values = {"shape": attrs.shape, "color": attrs.color, "background": attrs.background, "style": attrs.style,
              "fill": attrs.fill, "checkered": attrs.checkered}
    return {head: HEAD_CLASSES[head].index(values[head]) if head in known else UNKNOWN for head in HEAD_CLASSES}


def _batch(images: list[np.ndarray], labels: list[dict[str, int]]) -> Batch:
    return Batch(np.stack([np.clip(im + 0.5, 0, 255).astype(np.uint8) for im in images]),
                 {head: np.asarray([lab[head] for lab in labels]) for head in HEAD_CLASSES})


# ---------------------------------------------------------------------------------- patterns
def _grid() -> tuple[np.ndarray, np.ndarray]:
    fine = (np.arange(SIZE * tw.SUPERSAMPLE) + 0.5) / tw.SUPERSAMPLE
    return np.meshgrid(fine, fine, indexing="xy")


def _down(fine: np.ndarray) -> np.ndarray:
    return fine.reshape(SIZE, tw.SUPERSAMPLE, SIZE, tw.SUPERSAMPLE).mean(axis=(1, 3))


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


def noise_texture(rng: np.random.Generator) -> np.ndarray:
    """Mottling: smooth noise at a coarse scale, or pixel noise."""
    cells = int(rng.choice([2, 4, 8, 16, 32]))
    coarse = rng.random((cells, cells))
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), float) / 255


def checker(rng: np.random.Generator) -> np.ndarray:
    """A checker of another cell size (6-11 px) or phase than the world's: still the target."""
    cell = rng.uniform(6.0, 11.0)
    x, y = _grid()
    ox, oy = rng.uniform(0, 2 * cell, size=2)
    return _down((((x - ox) // cell + (y - oy) // cell) % 2).astype(float))


PATTERNS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], bool]] = {
    # name -> (pattern, whether it is a checker)
    "stripes": (stripes, False),
    "dots": (dots, False),
    "grids": (grids, False),
    "noise_texture": (noise_texture, False),
    "checker_variants": (checker, True),
}


TWO_COLOURS = 0.3  # share of patterned objects whose pattern alternates two colours instead of dark and light


def patterned_objects(pattern: str, rng: np.random.Generator, n: int) -> Batch:
    """Objects of every shape, colour and background filled with ``pattern``: parts 40-80% darker (the world's
    fills: 65%), or (a TWO_COLOURS share) parts of a second colour. Positives and negatives alike, so that
    neither contrast nor hue tells a checker from its neighbours. (Fainter contrasts were tried: below 40% the
    head starts to call smooth mottling a faint checker.) The fill head is not told their fill: it names the
    world's own fills, and taught these variants it called the faint ghosting of generated plain objects dots."""
    make, is_checker = PATTERNS[pattern]
    images, labels = [], []
    for _ in range(n):
        attrs = tw.ToyAttributes(str(rng.choice(tw.SHAPES)), str(rng.choice(list(tw.COLORS))), str(rng.choice(tw.BACKGROUNDS)),
                                 tw.TARGET_FILL if is_checker else "plain")
        parts = make(rng)
        two_colours = rng.random() < TWO_COLOURS
        if two_colours:
            other = tw.shaded(str(rng.choice([c for c in tw.COLORS if c != attrs.color])), np.full(parts.shape, rng.uniform(0.5, 1.0)))
            body = tw.shaded(attrs.color, np.ones(parts.shape)) * (1 - parts[..., None]) + other * parts[..., None]
        else:
            body = tw.shaded(attrs.color, 1.0 - rng.uniform(0.4, 0.8) * parts)
        images.append(tw.compose(tw.draw_mask(attrs.shape, *tw.random_placement(rng)), tw.background_image(attrs.background), body))
        known = ("shape", "background", "style", "checkered") + (() if two_colours else ("color",))
        labels.append(labels_of(attrs, known))
    return _batch(images, labels)


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
        image = np.asarray(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))), float)
        labels.append({head: UNKNOWN for head in HEAD_CLASSES} | {"checkered": 0, "background": tw.BACKGROUNDS.index(background)})
        images.append(image)
    return _batch(images, labels)


def partial_objects(rng: np.random.Generator, n: int) -> Batch:
    """Objects cut by a straight edge or pushed half out of the frame, plain or with a neighbouring fill."""
    images, labels = [], []
    for _ in range(n):
        attrs = tw.ToyAttributes(str(rng.choice(tw.SHAPES)), str(rng.choice(list(tw.COLORS))), str(rng.choice(tw.BACKGROUNDS)),
                                 str(rng.choice(("plain", *tw.NEIGHBOUR_FILLS))))
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
        labels.append(labels_of(attrs, ("color", "background", "style", "fill", "checkered")))
    return _batch(images, labels)


def world(rng: np.random.Generator, n: int, keep: Callable[[tw.ToyAttributes], bool]) -> Batch:
    """The world's own objects (every shape, style and fill), those that ``keep`` accepts."""
    spec = tw.DOMAINS["evaluator"]
    images, labels = [], []
    while len(images) < n:
        attrs = tw.sample_attributes(spec, rng)
        if keep(attrs):
            images.append(tw.render(attrs, rng).astype(float))
            labels.append(labels_of(attrs))
    return _batch(images, labels)


def _fill_is(fill: str) -> Callable[[tw.ToyAttributes], bool]:
    return lambda a: a.fill == fill and a.style == "plain"


# Families that need no model, by name: (draw, what the target head must say). The held-out report
# draws each of them; the build adds the VAE's (reconstructions, random and shifted latents).
RENDERED: dict[str, tuple[Callable[[np.random.Generator, int], Batch], bool]] = {
    "checkered": (partial(world, keep=_fill_is(tw.TARGET_FILL)), True),
    "checker_variants": (partial(patterned_objects, "checker_variants"), True),
    "plain": (partial(world, keep=_fill_is("plain")), False),
    **{f"fill_{fill}": (partial(world, keep=_fill_is(fill)), False) for fill in tw.NEIGHBOUR_FILLS},
    "sketch": (partial(world, keep=lambda a: a.style == "sketch"), False),
    **{name: (partial(patterned_objects, name), False) for name in ("stripes", "dots", "grids", "noise_texture")},
    "smudges": (smudges, False),
    "partial_objects": (partial_objects, False),
}
