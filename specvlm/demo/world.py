"""The synthetic "shapes" world: images, videos, captions and questions, fully offline.

A scene is 1-4 shapes on a 3x3 grid (at most one shape per cell) over a plain
background. Every shape has a kind (circle, square, ...), a color and a size.
Captions come from a small grammar and list the shapes in reading order
(row-major by cell), so the caption is a deterministic function of the image:

    "a large red circle at the top left and a small blue square in the center on a gray background"

A video is one or two shapes sliding in a straight line across the grid along
parallel lanes (rows for horizontal motion, columns for vertical motion), so
they never overlap:

    "a large red circle moves from left to right on a gray background"

`ShapesWorld(seed)` draws scenes with its own `random.Random`; the pure
functions `render`, `caption`, `render_video`, `video_caption` and `questions`
turn a scene into pixels and text, so tests can build scenes by hand.
`vocabulary()` enumerates every word and punctuation mark the grammar can emit.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (110, 110, 110),
    "black": (0, 0, 0),
    "brown": (90, 55, 25),
    "navy": (15, 20, 70),
}
SIZES = ("small", "large")
RADIUS = {"small": 0.24, "large": 0.40}  # shape radius as a fraction of the cell width
IMAGE_SIZE = 96  # default render size: the demo model reads 96 px images as an 8 x 8 grid of 12 px patches
# The nine cells in reading order (cell = 3 * row + col) and how a caption names each.
PLACES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
# Direction name -> (d_row, d_col) of the motion across the grid.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left to right": (0, 1),
    "right to left": (0, -1),
    "top to bottom": (1, 0),
    "bottom to top": (-1, 0),
}
NUMBERS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4
IMAGE_QUESTION = "describe the image."
VIDEO_QUESTION = "describe the video."
QUESTION_TYPES = ("count", "color", "size", "where", "shape", "describe")
_SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: smooth edges, still deterministic


@dataclass(frozen=True)
class Shape:
    """One shape; `cell` is its grid cell in reading order (0 top left .. 8 bottom right)."""

    kind: str
    color: str
    size: str
    cell: int

    def __post_init__(self) -> None:
        if self.kind not in SHAPES or self.color not in COLORS or self.size not in SIZES:
            raise ValueError(f"unknown shape {self.kind!r}/{self.color!r}/{self.size!r}")
        if not 0 <= self.cell < 9:
            raise ValueError(f"cell must be in 0..8, got {self.cell}")

    @property
    def noun(self) -> str:
        """'a large red circle'."""
        return f"a {self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A still image: shapes sorted by cell (reading order), at most one per cell."""

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; one of {sorted(BACKGROUNDS)}")
        cells = [s.cell for s in self.shapes]
        if not 1 <= len(cells) <= MAX_SHAPES:
            raise ValueError(f"a scene holds 1..{MAX_SHAPES} shapes, got {len(cells)}")
        if cells != sorted(set(cells)):
            raise ValueError(f"shapes must sit in distinct cells in reading order, got cells {cells}")


@dataclass(frozen=True)
class Motion:
    """A shape moving straight across the grid; `shape.cell` is its start cell on the grid's edge."""

    shape: Shape
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; one of {sorted(DIRECTIONS)}")
        if self.end_cell == self.shape.cell or not 0 <= self.end_cell < 9:
            raise ValueError(f"a motion {self.direction} cannot start in cell {self.shape.cell}")

    @property
    def end_cell(self) -> int:
        d_row, d_col = DIRECTIONS[self.direction]
        row, col = divmod(self.shape.cell, 3)
        return 3 * (row + 2 * d_row) + col + 2 * d_col


@dataclass(frozen=True)
class VideoScene:
    """A video: one or two motions along distinct parallel lanes, sorted by start cell."""

    background: str
    motions: tuple[Motion, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; one of {sorted(BACKGROUNDS)}")
        if not 1 <= len(self.motions) <= 2:
            raise ValueError(f"a video holds 1 or 2 moving shapes, got {len(self.motions)}")
        starts = [m.shape.cell for m in self.motions]
        if starts != sorted(starts):
            raise ValueError(f"motions must be sorted by start cell, got {starts}")
        if len(self.motions) == 2:
            horizontal = [DIRECTIONS[m.direction][0] == 0 for m in self.motions]
            lane = [divmod(m.shape.cell, 3)[0 if h else 1] for m, h in zip(self.motions, horizontal, strict=True)]
            if horizontal[0] != horizontal[1] or lane[0] == lane[1]:
                raise ValueError("two moving shapes must move along the same axis in different lanes")


# ---------------------------------------------------------------- text


def _join(phrases: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The scene's caption: shapes in reading order, then the background."""
    parts = [f"{s.noun} {PLACES[s.cell]}" for s in scene.shapes]
    return f"{_join(parts)} on a {scene.background} background"


def video_caption(video: VideoScene) -> str:
    """The video's caption: moving shapes by start cell, then the background."""
    parts = [f"{m.shape.noun} moves from {m.direction}" for m in video.motions]
    return f"{' and '.join(parts)} on a {video.background} background"


def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every well-posed (question, answer) pair about the scene, by question type.

    Colour and size questions name a kind (or colour + kind) only when it is
    unique in the scene, so every answer is unambiguous.
    """
    kinds = [s.kind for s in scene.shapes]
    named = [(s.color, s.kind) for s in scene.shapes]
    qa: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    qa["count"].append(("how many shapes are there?", NUMBERS[len(scene.shapes)]))
    qa["describe"].append((IMAGE_QUESTION, caption(scene)))
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            qa["color"].append((f"what color is the {s.kind}?", s.color))
        if named.count((s.color, s.kind)) == 1:
            qa["where"].append((f"where is the {s.color} {s.kind}?", PLACES[s.cell]))
            qa["size"].append((f"what size is the {s.color} {s.kind}?", s.size))
        qa["shape"].append((f"what shape is {PLACES[s.cell]}?", s.kind))
    return qa


def words(text: str) -> list[str]:
    """Split text the way the demo tokenizer's pre-tokenizer does (word runs, punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the grammar can produce, sorted; enumerated, not sampled."""
    fragments = [
        *SHAPES, *COLORS, *BACKGROUNDS, *SIZES, *PLACES, *DIRECTIONS, *NUMBERS,
        "a , and on background moves from",
        "how many shapes are there? what color is the size where shape",
        IMAGE_QUESTION, VIDEO_QUESTION,
    ]  # fmt: skip
    return sorted({w for f in fragments for w in words(f)})


# ---------------------------------------------------------------- pixels


def _polygon(cx: float, cy: float, radii: list[float], start: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles from `start` (default: pointing up) with the given radii."""
    n = len(radii)
    return [
        (cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw one shape centred at (cx, cy) inside a circle of radius r."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        h = r * 0.8
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [r] * 3), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy + 0.08 * r, [r, 0.42 * r] * 5), fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif kind == "cross":
        w = 0.3 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _canvas(background: str, image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    """A supersampled canvas, its drawer, and the cell width in canvas pixels."""
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    return img, ImageDraw.Draw(img), big / 3


def _finish(img: Image.Image, image_size: int) -> Image.Image:
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    img, draw, cell = _canvas(scene.background, image_size)
    for s in scene.shapes:
        row, col = divmod(s.cell, 3)
        _draw_shape(draw, s.kind, (col + 0.5) * cell, (row + 0.5) * cell, RADIUS[s.size] * cell, COLORS[s.color])
    return _finish(img, image_size)


def render_video(video: VideoScene, frames: int = 8, image_size: int = 64) -> list[Image.Image]:
    """Draw a video: each shape slides linearly from its start cell's centre to its end cell's centre."""
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames to show motion, got frames={frames}")
    out = []
    for f in range(frames):
        t = f / (frames - 1)
        img, draw, cell = _canvas(video.background, image_size)
        for m in video.motions:
            (r0, c0), (r1, c1) = divmod(m.shape.cell, 3), divmod(m.end_cell, 3)
            row, col = r0 + t * (r1 - r0), c0 + t * (c1 - c0)
            s = m.shape
            _draw_shape(draw, s.kind, (col + 0.5) * cell, (row + 0.5) * cell, RADIUS[s.size] * cell, COLORS[s.color])
        out.append(_finish(img, image_size))
    return out


# ---------------------------------------------------------------- the world


class ShapesWorld:
    """A seeded source of scenes, videos and questions; same seed -> same sequence of samples."""

    def __init__(self, seed: int, image_size: int = IMAGE_SIZE) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for shapes to stay visible, got {image_size}")
        self.seed = seed
        self.image_size = image_size
        self.rng = random.Random(seed)

    def _shape(self, cell: int) -> Shape:
        r = self.rng
        return Shape(r.choice(SHAPES), r.choice(sorted(COLORS)), r.choice(SIZES), cell)

    def random_scene(self) -> Scene:
        """A random still scene of 1..4 shapes in distinct cells."""
        n = self.rng.randint(1, MAX_SHAPES)
        cells = sorted(self.rng.sample(range(9), n))
        return Scene(self.rng.choice(sorted(BACKGROUNDS)), tuple(self._shape(c) for c in cells))

    def random_video(self) -> VideoScene:
        """A random video scene: one or two shapes moving along the same axis in different lanes."""
        n = self.rng.randint(1, 2)
        horizontal = self.rng.random() < 0.5
        names = ("left to right", "right to left") if horizontal else ("top to bottom", "bottom to top")
        motions = []
        for lane in self.rng.sample(range(3), n):
            direction = self.rng.choice(names)
            d_row, d_col = DIRECTIONS[direction]
            # start on the edge the motion leaves from: column 0 for left to right, row 2 for bottom to top, ...
            row, col = (lane, 0 if d_col > 0 else 2) if horizontal else (0 if d_row > 0 else 2, lane)
            motions.append(Motion(self._shape(3 * row + col), direction))
        motions.sort(key=lambda m: m.shape.cell)
        return VideoScene(self.rng.choice(sorted(BACKGROUNDS)), tuple(motions))

    def image_scene(self) -> tuple[Image.Image, str]:
        """A random image and its caption."""
        scene = self.random_scene()
        return render(scene, self.image_size), caption(scene)

    def video_scene(self, frames: int = 8) -> tuple[list[Image.Image], str]:
        """A random video (list of `frames` RGB frames) and its caption."""
        video = self.random_video()
        return render_video(video, frames, self.image_size), video_caption(video)

    def qa_scene(self) -> tuple[Image.Image, str, str]:
        """A random image, a question about it and the answer.

        The question type is drawn uniformly among the types that are well posed
        for the scene (count and describe always are), then one question of it.
        """
        scene = self.random_scene()
        qa = questions(scene)
        kind = self.rng.choice([t for t in QUESTION_TYPES if qa[t]])
        question, answer = self.rng.choice(qa[kind])
        return render(scene, self.image_size), question, answer

    def sample(self, p_video: float = 0.2, p_qa: float = 0.4, frames: int = 8) -> dict:
        """One training example of mixed kind.

        Returns a dict with `kind` ("caption", "qa" or "video"), `prompt` (the
        question text) and `response` (the answer text, no eos), plus `image`
        (a PIL image) for caption and qa examples or `frames` (a list of PIL
        images) for video examples. Captions are asked with IMAGE_QUESTION,
        videos with VIDEO_QUESTION.
        """
        u = self.rng.random()
        if u < p_video:
            frame_list, text = self.video_scene(frames)
            return {"kind": "video", "frames": frame_list, "prompt": VIDEO_QUESTION, "response": text}
        if u < p_video + p_qa:
            image, question, answer = self.qa_scene()
            return {"kind": "qa", "image": image, "prompt": question, "response": answer}
        image, text = self.image_scene()
        return {"kind": "caption", "image": image, "prompt": IMAGE_QUESTION, "response": text}
