"""Procedural scenes with known answers: the training data of the scene model and the cases of ``bench scenes``.

A :class:`Scene` is a sky and ground background (gradients, a rolling horizon, mild low-frequency texture) and a
list of objects drawn back to front (sun, stars, clouds, trees, houses, boxes, balls), so objects occlude one
another. Everything is a function of the scene's parameters: rendering the same scene twice gives the same
pixels, and rendering it with some objects translated gives the ground truth of a drag.

A :class:`DragCase` is a scene, one handle -> target pair per moved object (on its centre or on one of its
parts), and the same scene with those objects moved: the answer a drag edit should reach. :func:`make_cases`
builds a reproducible set of cases from a seed: short and long drags, several pairs, and a look-alike distractor
(an object of the same kind, colour and size near the path).

Objects are drawn with 2x supersampling, so their edges are anti-aliased, and positions are in pixels of the
scene's ``size`` (x to the right, y down), the convention of :class:`~adaptivedrag_core.points.DragPoints`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import signal
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

#: Supersampling factor of object drawing (anti-aliased edges).
SUPERSAMPLE = 2
OBJECT_KINDS = ("ball", "box", "tree", "house", "star", "sun", "cloud")
#: Kinds a drag case may move: solid things with a clear outline.
MOVABLE_KINDS = ("ball", "box", "tree", "house", "star", "sun")
CASE_KINDS = ("short", "long", "several", "lookalike")

# Named colours (RGB 0-255), so a scene can be described in words (the training captions).
COLOURS = {
    "red": (205, 45, 40), "orange": (235, 130, 35), "yellow": (240, 205, 50), "green": (60, 160, 60),
    "blue": (45, 90, 200), "purple": (130, 60, 170), "pink": (235, 120, 170), "white": (240, 240, 235),
    "brown": (130, 85, 45), "grey": (128, 128, 132), "black": (35, 35, 40), "teal": (30, 150, 150),
}
_BODY_COLOURS = ("red", "orange", "yellow", "blue", "purple", "pink", "white", "teal", "grey", "black")
_ROOF_COLOURS = ("red", "brown", "grey", "blue", "black")
_STAR_COLOURS = ("yellow", "white", "orange", "pink")
_SUN_COLOURS = ("yellow", "orange")
_CANOPY_GREENS = ((40, 110, 45), (60, 150, 55), (90, 160, 60), (30, 90, 50))
_SKIES = (((95, 150, 225), (175, 210, 245)), ((70, 120, 200), (150, 195, 240)), ((120, 120, 190), (240, 170, 130)),
          ((150, 190, 230), (220, 235, 250)))
_GROUNDS = (((70, 150, 60), (40, 110, 40)), ((110, 165, 70), (70, 125, 50)), ((200, 180, 120), (165, 140, 90)),
            ((125, 150, 80), (85, 105, 55)))

Colour = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Args:
        kind: one of :data:`OBJECT_KINDS`.
        x, y: its centre (the middle of its bounding box) in scene pixels.
        size: half its height in pixels (a ball's radius).
        colour_name: its main colour's name (a key of :data:`COLOURS`; "green" for a tree).
        colour: its main colour (a jittered shade of the named colour).
        accent: its second colour (a ball's highlight, a house's roof, a tree's trunk, a box's lid).
        aspect: width / height of its bounding box.
    """

    kind: str
    x: float
    y: float
    size: float
    colour_name: str
    colour: Colour
    accent: Colour
    aspect: float = 1.0

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x, self.y)

    def moved(self, dx: float, dy: float) -> "SceneObject":
        return replace(self, x=self.x + dx, y=self.y + dy)

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in scene pixels."""
        half_w, half_h = self.size * self.aspect, self.size
        return (self.x - half_w, self.y - half_h, self.x + half_w, self.y + half_h)

    def parts(self) -> list[tuple[str, list, Colour]]:
        """The shapes that draw this object, back to front: (shape, coordinates, colour), shape in
        "ellipse" (box [x0, y0, x1, y1]), "rectangle" (same) or "polygon" (list of (x, y))."""
        return _PARTS[self.kind](self)

    def part_points(self) -> list[tuple[float, float]]:
        """Points on distinctive parts (a handle placed "on a part" uses one of them)."""
        x0, y0, x1, y1 = self.bounds()
        w, h = x1 - x0, y1 - y0
        points = {
            "ball": [(self.x - 0.35 * w / 2, self.y - 0.35 * h / 2)],
            "box": [(self.x, y0 + 0.12 * h), (x0 + 0.3 * w, self.y + 0.2 * h)],
            "tree": [(self.x, y0 + 0.3 * h), (self.x, y1 - 0.12 * h)],
            "house": [(self.x, y0 + 0.2 * h), (x0 + 0.3 * w, y1 - 0.15 * h)],
            "star": [(self.x, y0 + 0.2 * h)],
            "sun": [(self.x + 0.3 * w / 2, self.y)],
            "cloud": [(self.x, self.y)],
        }
        return points[self.kind]


def _ball(o: SceneObject):
    r = o.size
    highlight = (o.x - 0.35 * r, o.y - 0.35 * r)
    return [("ellipse", [o.x - r, o.y - r, o.x + r, o.y + r], o.colour),
            ("ellipse", [highlight[0] - 0.28 * r, highlight[1] - 0.28 * r, highlight[0] + 0.28 * r,
                         highlight[1] + 0.28 * r], o.accent)]


def _box(o: SceneObject):
    x0, y0, x1, y1 = o.bounds()
    lid = y0 + 0.25 * (y1 - y0)
    return [("rectangle", [x0, y0, x1, y1], o.colour), ("rectangle", [x0, y0, x1, lid], o.accent),
            ("rectangle", [x1 - 0.18 * (x1 - x0), lid, x1, y1], _shade(o.colour, 0.75))]


def _tree(o: SceneObject):
    x0, y0, x1, y1 = o.bounds()
    w, h = x1 - x0, y1 - y0
    trunk_w = 0.22 * w
    canopy_bottom = y0 + 0.7 * h
    return [("rectangle", [o.x - trunk_w / 2, y0 + 0.5 * h, o.x + trunk_w / 2, y1], o.accent),
            ("ellipse", [x0, y0, x1, canopy_bottom], o.colour)]


def _house(o: SceneObject):
    x0, y0, x1, y1 = o.bounds()
    w, h = x1 - x0, y1 - y0
    eave = y0 + 0.42 * h
    door_w = 0.22 * w
    window = 0.2 * w
    return [("rectangle", [x0 + 0.06 * w, eave, x1 - 0.06 * w, y1], o.colour),
            ("polygon", [(x0, eave + 0.02 * h), (o.x, y0), (x1, eave + 0.02 * h)], o.accent),
            ("rectangle", [o.x - 0.05 * w - door_w, y1 - 0.36 * h, o.x - 0.05 * w, y1], (70, 50, 40)),
            ("rectangle", [o.x + 0.1 * w, eave + 0.14 * h, o.x + 0.1 * w + window, eave + 0.14 * h + window],
             (170, 215, 240))]


def _star(o: SceneObject):
    outer, inner = o.size, 0.45 * o.size
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((o.x + radius * o.aspect * math.cos(angle), o.y + radius * math.sin(angle)))
    return [("polygon", points, o.colour)]


def _sun(o: SceneObject):
    r = o.size
    return [("ellipse", [o.x - r, o.y - r, o.x + r, o.y + r], o.colour),
            ("ellipse", [o.x - 0.7 * r, o.y - 0.7 * r, o.x + 0.7 * r, o.y + 0.7 * r], o.accent)]


def _cloud(o: SceneObject):
    x0, y0, x1, y1 = o.bounds()
    w, h = x1 - x0, y1 - y0
    return [("ellipse", [x0, y0 + 0.35 * h, x0 + 0.55 * w, y1], o.colour),
            ("ellipse", [x0 + 0.45 * w, y0 + 0.3 * h, x1, y1], o.colour),
            ("ellipse", [x0 + 0.2 * w, y0, x0 + 0.75 * w, y1 - 0.15 * h], o.colour)]


_PARTS = {"ball": _ball, "box": _box, "tree": _tree, "house": _house, "star": _star, "sun": _sun, "cloud": _cloud}


def _shade(colour: Colour, factor: float) -> Colour:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _tint(colour: Colour, amount: float) -> Colour:
    return tuple(int(np.clip(c + (255 - c) * amount, 0, 255)) for c in colour)


def _jitter(rng: np.random.Generator, colour: Colour, spread: float = 18) -> Colour:
    return tuple(int(np.clip(c + rng.uniform(-spread, spread), 0, 255)) for c in colour)


# -------------------------------------------------------------------------------------------- background
@dataclass(frozen=True)
class Background:
    """Sky and ground: vertical gradients, a horizon made of two sines, and low-frequency texture.

    Args:
        sky_top, sky_bottom, ground_top, ground_bottom: gradient colours.
        horizon: the horizon's mean height as a fraction of the scene height.
        waves: (amplitude, frequency, phase) of the horizon's two sines; amplitude as a fraction of the height.
        texture_seed: seeds the texture noise.
        texture_strength: the texture's amplitude (0-255 scale).
    """

    sky_top: Colour
    sky_bottom: Colour
    ground_top: Colour
    ground_bottom: Colour
    horizon: float
    waves: tuple[tuple[float, float, float], ...]
    texture_seed: int
    texture_strength: float = 6.0

    def horizon_y(self, x: np.ndarray, size: int) -> np.ndarray:
        """The horizon's height (pixels) at columns ``x`` (pixels)."""
        u = np.asarray(x, dtype=np.float64) / size
        y = self.horizon + sum(a * np.sin(2 * math.pi * f * u + p) for a, f, p in self.waves)
        return y * size

    def render(self, size: int) -> np.ndarray:
        """[size, size, 3] float32 in 0-255."""
        rows = (np.arange(size, dtype=np.float32) + 0.5)[:, None]
        columns = np.arange(size, dtype=np.float32) + 0.5
        horizon = self.horizon_y(columns, size)[None, :].astype(np.float32)
        sky_t = np.clip(rows / np.maximum(horizon, 1.0), 0, 1)[..., None]
        ground_t = np.clip((rows - horizon) / np.maximum(size - horizon, 1.0), 0, 1)[..., None]
        sky = np.asarray(self.sky_top, np.float32) * (1 - sky_t) + np.asarray(self.sky_bottom, np.float32) * sky_t
        ground = (np.asarray(self.ground_top, np.float32) * (1 - ground_t)
                  + np.asarray(self.ground_bottom, np.float32) * ground_t)
        # A soft horizon edge, one pixel wide, like the objects' anti-aliased edges.
        ground_alpha = np.clip(rows - horizon + 0.5, 0, 1)[..., None]
        texture = _smooth_noise(self.texture_seed, size)[..., None] * self.texture_strength
        return sky * (1 - ground_alpha) + (ground + texture) * ground_alpha + 0.3 * texture * (1 - ground_alpha)


def _smooth_noise(seed: int, size: int, cells: int = 6) -> np.ndarray:
    """Value noise: a coarse random grid (plus half its amplitude at twice the frequency) upsampled bilinearly."""
    rng = np.random.default_rng(seed)
    total = np.zeros((size, size), np.float32)
    for octave, amplitude in ((cells, 1.0), (2 * cells, 0.5)):
        grid = rng.standard_normal((octave + 1, octave + 1)).astype(np.float32)
        image = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
        total += amplitude * np.asarray(image)
    return total / 1.1


# ------------------------------------------------------------------------------------------------- scene
@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene.

    Args:
        image: [H, W, 3] uint8.
        alphas: per object, its own coverage [H, W] float32 in 0-1 (before occlusion by objects in front).
        visible: per object, where it is seen [H, W] bool (its coverage > 0.5 and not covered by objects in front).
    """

    image: np.ndarray
    alphas: list
    visible: list

    def footprint(self, index: int) -> np.ndarray:
        """Object ``index``'s whole footprint, occluded parts included, [H, W] bool."""
        return self.alphas[index] > 0.5


@dataclass(frozen=True)
class Scene:
    """A procedural scene: a background and objects, back to front.

    Args:
        size: side of the square image in pixels.
        background: sky and ground.
        objects: drawn in this order, so later objects occlude earlier ones.
    """

    size: int
    background: Background
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def render(self) -> RenderedScene:
        canvas = self.background.render(self.size)
        alphas = []
        for obj in self.objects:
            colour, alpha = _draw_object(obj, self.size)
            canvas = canvas * (1 - alpha[..., None]) + colour
            alphas.append(alpha)
        visible = []
        covered = np.zeros((self.size, self.size), bool)
        for alpha in reversed(alphas):
            own = alpha > 0.5
            visible.append(own & ~covered)
            covered |= own
        visible.reverse()
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return RenderedScene(image, alphas, visible)

    def image(self) -> Image.Image:
        return Image.fromarray(self.render().image)

    def with_moves(self, moves: dict) -> "Scene":
        """The same scene with objects translated: ``moves`` maps object index -> (dx, dy) in pixels."""
        objects = tuple(obj.moved(*moves[i]) if i in moves else obj for i, obj in enumerate(self.objects))
        return replace(self, objects=objects)

    def without(self, index: int) -> "Scene":
        """The same scene without object ``index`` (what is behind it)."""
        return replace(self, objects=self.objects[:index] + self.objects[index + 1:])

    def caption(self) -> str:
        """A short description, e.g. "a red ball, a green tree and a house" (the scene model's training text)."""
        words = []
        for obj in reversed(self.objects):  # front-most first: the most visible things
            if obj.kind in ("cloud",):
                continue
            name = obj.kind if obj.kind in ("sun", "house") else f"{obj.colour_name} {obj.kind}"
            words.append(f"a {name}")
        words = words[:4]
        if not words:
            return "a landscape"
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _draw_object(obj: SceneObject, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(premultiplied colour [H, W, 3] float32, coverage [H, W] float32) of one object, anti-aliased."""
    colour = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    x0, y0, x1, y1 = obj.bounds()
    left, top = max(0, int(math.floor(x0)) - 1), max(0, int(math.floor(y0)) - 1)
    right, bottom = min(size, int(math.ceil(x1)) + 2), min(size, int(math.ceil(y1)) + 2)
    if right <= left or bottom <= top:
        return colour, alpha
    s = SUPERSAMPLE
    box_w, box_h = (right - left) * s, (bottom - top) * s
    part_colour = np.zeros((box_h, box_w, 3), np.float32)
    part_alpha = np.zeros((box_h, box_w), np.float32)
    for shape, coords, fill in obj.parts():
        mask = Image.new("L", (box_w, box_h), 0)
        draw = ImageDraw.Draw(mask)
        if shape == "polygon":
            draw.polygon([((x - left) * s, (y - top) * s) for x, y in coords], fill=255)
        else:
            a, b, c, d = coords
            box = [(a - left) * s, (b - top) * s, (c - left) * s - 1, (d - top) * s - 1]
            (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=255)
        inside = np.asarray(mask, np.float32) / 255.0
        part_colour = part_colour * (1 - inside[..., None]) + inside[..., None] * np.asarray(fill, np.float32)
        part_alpha = part_alpha * (1 - inside) + inside
    premultiplied = part_colour.reshape(box_h // s, s, box_w // s, s, 3).mean(axis=(1, 3))
    coverage = part_alpha.reshape(box_h // s, s, box_w // s, s).mean(axis=(1, 3))
    colour[top:bottom, left:right] = premultiplied
    alpha[top:bottom, left:right] = coverage
    return colour, alpha


# -------------------------------------------------------------------------------------------- generation
def random_background(rng: np.random.Generator) -> Background:
    sky = _SKIES[rng.integers(len(_SKIES))]
    ground = _GROUNDS[rng.integers(len(_GROUNDS))]
    waves = tuple((float(rng.uniform(0.01, 0.06)), float(rng.uniform(0.3, 1.6)), float(rng.uniform(0, 2 * math.pi)))
                  for _ in range(2))
    return Background(_jitter(rng, sky[0], 12), _jitter(rng, sky[1], 12), _jitter(rng, ground[0], 14),
                      _jitter(rng, ground[1], 14), horizon=float(rng.uniform(0.42, 0.62)), waves=waves,
                      texture_seed=int(rng.integers(2**31)), texture_strength=float(rng.uniform(3, 8)))


def random_object(rng: np.random.Generator, kind: str, background: Background, size: int,
                  scale: Optional[float] = None) -> SceneObject:
    """An object of ``kind`` at a plausible place: things on the ground stand on it, the sun and stars fly."""
    unit = size / 128.0
    if kind in ("sun", "star", "cloud"):
        radius = scale if scale is not None else {"sun": rng.uniform(8, 14), "star": rng.uniform(6, 11),
                                                  "cloud": rng.uniform(6, 10)}[kind] * unit
        aspect = {"sun": 1.0, "star": 1.0, "cloud": float(rng.uniform(1.6, 2.4))}[kind]
        x = float(rng.uniform(radius * aspect + 2, size - radius * aspect - 2))
        horizon = float(background.horizon_y(np.array([x]), size)[0])
        y = float(rng.uniform(radius + 2, max(radius + 3, horizon - radius - 2)))
    else:
        # Every kind's size is drawn (and the others thrown away): the random stream, hence every scene of the
        # training set and of the benchmark, depends on it.
        sizes = {"ball": rng.uniform(7, 15), "box": rng.uniform(7, 14), "tree": rng.uniform(12, 22),
                 "house": rng.uniform(11, 18)}
        radius = scale if scale is not None else sizes[kind] * unit
        aspect = {"ball": 1.0, "box": float(rng.uniform(0.8, 1.4)), "tree": float(rng.uniform(0.55, 0.75)),
                  "house": float(rng.uniform(0.8, 1.1))}[kind]
        x = float(rng.uniform(radius * aspect + 2, size - radius * aspect - 2))
        horizon = float(background.horizon_y(np.array([x]), size)[0])
        # Stand somewhere between just below the horizon and the bottom edge.
        bottom = float(rng.uniform(min(horizon + 4 * unit, size - 3), size - 3))
        y = min(bottom - radius, size - radius - 2)
    name, colour, accent = _object_colours(rng, kind)
    return SceneObject(kind, x, y, float(radius), name, colour, accent, aspect)


def _object_colours(rng: np.random.Generator, kind: str) -> tuple[str, Colour, Colour]:
    if kind == "tree":
        return "green", _jitter(rng, _CANOPY_GREENS[rng.integers(len(_CANOPY_GREENS))], 10), \
            _jitter(rng, COLOURS["brown"], 12)
    if kind == "cloud":
        return "white", _jitter(rng, (245, 245, 248), 6), (245, 245, 248)
    palette = {"house": _BODY_COLOURS, "star": _STAR_COLOURS, "sun": _SUN_COLOURS}.get(kind, _BODY_COLOURS)
    name = palette[rng.integers(len(palette))]
    colour = _jitter(rng, COLOURS[name])
    if kind == "house":
        accent = _jitter(rng, COLOURS[_ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))]])
    elif kind == "ball":
        accent = _tint(colour, 0.55)
    elif kind == "sun":
        accent = _tint(colour, 0.35)
    else:
        accent = _tint(colour, 0.3) if kind == "box" else colour
    return name, colour, accent


def random_scene(rng: np.random.Generator, size: int = 128, min_objects: int = 3, max_objects: int = 7) -> Scene:
    """A random scene: background plus ``min_objects``..``max_objects`` objects, drawn far to near."""
    background = random_background(rng)
    objects = []
    if rng.random() < 0.6:
        objects.append(random_object(rng, "sun", background, size))
    for _ in range(int(rng.integers(0, 3))):
        objects.append(random_object(rng, "cloud", background, size))
    ground_kinds = ("ball", "box", "tree", "house", "star")
    count = int(rng.integers(min_objects, max_objects + 1))
    for kind in rng.choice(ground_kinds, size=count, p=(0.3, 0.2, 0.2, 0.15, 0.15)):
        objects.append(random_object(rng, str(kind), background, size))
    return Scene(size, background, tuple(_far_to_near(objects)))


def _far_to_near(objects: list) -> list:
    # Sky things first, then ground things by the height of their base: lower on screen is nearer.
    def depth(obj: SceneObject):
        flying = obj.kind in ("sun", "star", "cloud")
        return (0 if obj.kind == "sun" else 1 if obj.kind == "cloud" else 2 if flying else 3, obj.bounds()[3])

    return sorted(objects, key=depth)


#: Scenes a rendering process is given at a time: small enough for a steady progress bar.
_RENDER_CHUNK = 200


def scene_set(seed: int, count: int, size: int = 128, workers: int = 1,
              progress: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, list[str]]:
    """``count`` random scenes from ``seed``: their pictures [N, size, size, 3] uint8 and their captions.

    The scenes are drawn from one random stream, in order, then rendered ``workers`` processes at a time. Rendering
    makes no random draws, so the pictures are the same whatever the number of workers.

    Args:
        seed: seeds the stream (the scene model trains on seed 0's scenes; held-out sets use other seeds).
        count: number of scenes.
        size: side of each picture in pixels.
        workers: rendering processes; 1 renders here.
        progress: called with (scenes rendered, count) after each chunk.
    """
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, size) for _ in range(count)]
    images = np.empty((count, size, size, 3), np.uint8)
    starts = range(0, count, _RENDER_CHUNK)
    chunks = [scenes[start:start + _RENDER_CHUNK] for start in starts]
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1 and len(chunks) > 1:
            # spawn, not fork: the caller may hold torch's thread pools, which a forked child must not inherit.
            # Leaving the block terminates the workers, so an interrupt stops at once instead of rendering the rest.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(min(workers, len(chunks)), initializer=_leave_interrupts_to_caller))
            mapper = pool.imap
        for start, rendered in zip(starts, mapper(_render_pictures, chunks)):
            images[start:start + len(rendered)] = rendered
            if progress is not None:
                progress(start + len(rendered), count)
    return images, [scene.caption() for scene in scenes]


def _leave_interrupts_to_caller() -> None:
    # Ctrl-C reaches every process of the terminal's group; the caller stops its workers, which need not report it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_pictures(scenes: list[Scene]) -> np.ndarray:
    return np.stack([scene.render().image for scene in scenes])


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class DragCase:
    """A scene, handle -> target pairs on some of its objects, and the answer.

    Args:
        kind: "short", "long", "several" or "lookalike".
        scene: the input scene; moved objects are drawn last (in front).
        moved: the index of the object each pair moves.
        handles, targets: (x, y) scene pixels, one per pair.
        distractor: the index of the look-alike object, or None.
    """

    kind: str
    scene: Scene
    moved: tuple[int, ...]
    handles: tuple[tuple[float, float], ...]
    targets: tuple[tuple[float, float], ...]
    distractor: Optional[int] = None

    @property
    def moves(self) -> dict:
        return {i: (t[0] - h[0], t[1] - h[1]) for i, h, t in zip(self.moved, self.handles, self.targets)}

    def ground_truth(self) -> Scene:
        """The scene with each moved object translated by its handle -> target vector, nothing else changed."""
        return self.scene.with_moves(self.moves)

    def points(self):
        from .points import DragPoints

        return DragPoints(self.handles, self.targets, self.scene.size, self.scene.size)

    def drag_lengths(self) -> list[float]:
        return [math.dist(h, t) for h, t in zip(self.handles, self.targets)]


_DRAG_LENGTHS = {"short": (0.08, 0.14), "long": (0.22, 0.34), "several": (0.1, 0.2), "lookalike": (0.14, 0.24)}


def make_cases(count: int, seed: int, size: int = 128) -> list[DragCase]:
    """``count`` reproducible drag cases, cycling through :data:`CASE_KINDS`."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kind = CASE_KINDS[len(cases) % len(CASE_KINDS)]
        case = _try_case(rng, kind, size)
        if case is not None:
            cases.append(case)
    return cases


def _try_case(rng: np.random.Generator, kind: str, size: int) -> Optional[DragCase]:
    scene = random_scene(rng, size, min_objects=2, max_objects=5)
    pairs = int(rng.integers(2, 4)) if kind == "several" else 1
    objects = list(scene.objects)
    chosen = []
    for _ in range(pairs):
        candidates = [i for i, obj in enumerate(objects) if obj.kind in MOVABLE_KINDS and i not in chosen]
        if not candidates:
            return None
        chosen.append(int(rng.choice(candidates)))
    # Moved objects go in front, so their whole footprint is visible before and after the move.
    order = [i for i in range(len(objects)) if i not in chosen] + chosen
    objects = [objects[i] for i in order]
    moved = tuple(range(len(objects) - pairs, len(objects)))
    low, high = _DRAG_LENGTHS[kind]
    handles, targets = [], []
    for index in moved:
        obj = objects[index]
        vector = _drag_vector(rng, obj, size, low * size, high * size, [objects[i] for i in moved if i != index])
        if vector is None:
            return None
        handle = obj.centre if rng.random() < 0.6 else obj.part_points()[rng.integers(len(obj.part_points()))]
        handles.append((round(handle[0], 2), round(handle[1], 2)))
        targets.append((round(handle[0] + vector[0], 2), round(handle[1] + vector[1], 2)))
    distractor = None
    if kind == "lookalike":
        look_alike = _look_alike(rng, objects[moved[0]], handles[0], targets[0], size, objects)
        if look_alike is None:
            return None
        objects.insert(0, look_alike)  # behind everything else, so the moved object passes in front of it
        moved = tuple(i + 1 for i in moved)
        distractor = 0
    case = DragCase(kind, replace(scene, objects=tuple(objects)), moved, tuple(handles), tuple(targets), distractor)
    return case if _well_posed(case) else None


def _drag_vector(rng, obj: SceneObject, size: int, low: float, high: float, others: list):
    """A translation of ``obj`` by low..high pixels that keeps it inside the image (with a margin)."""
    x0, y0, x1, y1 = obj.bounds()
    for _ in range(40):
        length = rng.uniform(low, high)
        angle = rng.uniform(0, 2 * math.pi)
        dx, dy = length * math.cos(angle), length * math.sin(angle)
        if obj.kind not in ("sun", "star"):
            dy *= 0.6  # things on the ground move mostly sideways
        if x0 + dx < 2 or x1 + dx > size - 2 or y0 + dy < 2 or y1 + dy > size - 2:
            continue
        if math.hypot(dx, dy) < low * 0.8:
            continue
        return dx, dy
    return None


def _look_alike(rng, obj: SceneObject, handle, target, size: int, objects: list) -> Optional[SceneObject]:
    """A copy of ``obj`` near the drag's path, off to one side of it, overlapping neither end position."""
    dx, dy = target[0] - handle[0], target[1] - handle[1]
    length = math.hypot(dx, dy)
    normal = (-dy / length, dx / length)
    half_w, half_h = obj.size * obj.aspect, obj.size
    for _ in range(30):
        along = rng.uniform(0.3, 1.1)
        side = rng.choice((-1.0, 1.0)) * rng.uniform(2.3, 3.0) * max(half_w, half_h)
        x = obj.x + along * dx + side * normal[0]
        y = obj.y + along * dy + side * normal[1]
        copy = replace(obj, x=float(x), y=float(y))
        cx0, cy0, cx1, cy1 = copy.bounds()
        if cx0 < 2 or cy0 < 2 or cx1 > size - 2 or cy1 > size - 2:
            continue
        return copy
    return None


def _well_posed(case: DragCase) -> bool:
    """Moved objects must not overlap each other before or after, and a look-alike must stay clear of both ends."""
    before = case.scene.render()
    after = case.ground_truth().render()
    footprints = [before.footprint(i) for i in case.moved] + [after.footprint(i) for i in case.moved]
    if any(fp.sum() < 12 for fp in footprints):
        return False
    pairs = len(case.moved)
    for a in range(pairs):
        for b in range(a + 1, pairs):
            if (footprints[a] & footprints[b]).any() or (footprints[pairs + a] & footprints[pairs + b]).any():
                return False
    if case.distractor is not None:
        distractor = _dilate(before.footprint(case.distractor), 2)
        if any((distractor & fp).any() for fp in footprints):
            return False
    return True


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=radius) if radius > 0 else mask
