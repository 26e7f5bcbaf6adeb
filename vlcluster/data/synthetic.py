"""Procedural shapes-in-quadrants scenes with captions and VQA pairs.

A stand-in for COCO/VQA small enough for a tiny vision-language transformer
to learn on CPU in minutes. Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from vlcluster.data.corpusindex import index_beside
from vlcluster.data.tokenizer import build_word_tokenizer
from vlcluster.storage.paths import run_path, writable, write_bytes

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three")
NOTHING = "nothing"
ANSWERS: tuple[str, ...] = COLORS + SHAPES + COUNT_WORDS + ("yes", "no", NOTHING)
# Segmentation labels 1..6, by colour (0 is left for "ignore", as in ADE20k). Colour, not
# shape: a 32px image is a 4x4 grid of patches, too coarse for shape outlines.
SEGMENT_CLASSES: tuple[str, ...] = ("background", *COLORS)

# Saturated and far apart in hue so they survive 32 px and the grey background.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
# (column, row) of each quadrant in the 2x2 grid.
_GRID: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (1, 0),
    "bottom left": (0, 1),
    "bottom right": (1, 1),
}
MAX_OBJECTS = len(COUNT_WORDS)
_BACKGROUND_RANGE = (105, 150)
_NOISE_AMPLITUDE = 6
_OBJECT_SCALE = (0.6, 0.8)  # object size as a fraction of the quadrant side
_MAX_UNIQUE_REJECTIONS = 10_000

OBJECT_PHRASE = "a {color} {shape} at the {position}"
# Caption = phrases joined as "p1, p2 and p3".
LIST_SEPARATOR, LAST_SEPARATOR = ", ", " and "
QUESTION_TEMPLATES: dict[str, str] = {
    "color_of_shape": "what color is the {shape}",
    "shape_at": "what shape is at the {position}",
    "count": "how many shapes are there",
    "exists": "is there a {color} {shape}",
    "color_at": "what color is the shape at the {position}",
}

# Words of the downstream tasks' texts (NLVR2 statements), in every tokenizer so
# pre-trained models can be fine-tuned on every synthetic task.
EXTRA_WORDS = ("left", "right", "image", "images", "contains", "contain", "both", "exactly", "one", "shape", "shapes", "has", "more", "than", "no")

QA = tuple[str, str]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def canonical(self) -> tuple[tuple[str, str, str], ...]:
        """Order-independent key, for deduplication."""
        return tuple(sorted((o.shape, o.color, o.position) for o in self.objects))

    def at(self, position: str) -> SceneObject | None:
        return next((o for o in self.objects if o.position == position), None)


def sample_scene(rng: random.Random) -> Scene:
    """1 to ``MAX_OBJECTS`` objects, each in its own quadrant."""
    positions = rng.sample(POSITIONS, rng.randint(1, MAX_OBJECTS))
    return Scene(
        tuple(SceneObject(rng.choice(SHAPES), rng.choice(COLORS), p) for p in positions)
    )


# ---------------------------------------------------------------- rendering

Box = tuple[float, float, float, float]


def _object_box(position: str, image_size: int, rng: random.Random) -> Box:
    quadrant = image_size / 2
    size = quadrant * rng.uniform(*_OBJECT_SCALE)
    # Jitter by at most half the free margin so objects never touch a neighbour.
    slack = (quadrant - size) / 4
    col, row = _GRID[position]
    cx = (col + 0.5) * quadrant + rng.uniform(-slack, slack)
    cy = (row + 0.5) * quadrant + rng.uniform(-slack, slack)
    half = size / 2
    return cx - half, cy - half, cx + half, cy + half


def _draw_circle(draw: ImageDraw.ImageDraw, box: Box, fill: tuple[int, int, int]) -> None:
    draw.ellipse(box, fill=fill)


def _draw_square(draw: ImageDraw.ImageDraw, box: Box, fill: tuple[int, int, int]) -> None:
    # Slightly smaller than the box so area is close to the circle's: corners, not
    # size, must tell the two apart.
    x0, y0, x1, y1 = box
    inset = (x1 - x0) * 0.07
    draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)


def _draw_triangle(draw: ImageDraw.ImageDraw, box: Box, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _draw_cross(draw: ImageDraw.ImageDraw, box: Box, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, half_bar = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 6
    draw.rectangle((x0, cy - half_bar, x1, cy + half_bar), fill=fill)
    draw.rectangle((cx - half_bar, y0, cx + half_bar, y1), fill=fill)


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, Box, tuple[int, int, int]], None]] = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "cross": _draw_cross,
}


def _add_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    # numpy is ~100x faster than per-pixel random.Random; seed it from rng to stay deterministic.
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + noise_rng.integers(
        -_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=pixels.shape, dtype=np.int16
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def render(scene: Scene, image_size: int, rng: random.Random, mask: Image.Image | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``image_size``; with ``mask`` (mode "L"),
    also draw each object's segmentation class (``SEGMENT_CLASSES``) there."""
    grey = rng.randint(*_BACKGROUND_RANGE)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    mask_draw = ImageDraw.Draw(mask) if mask is not None else None
    for obj in scene.objects:
        box = _object_box(obj.position, image_size, rng)
        _DRAW[obj.shape](draw, box, RGB[obj.color])
        if mask_draw is not None:
            _DRAW[obj.shape](mask_draw, box, SEGMENT_CLASSES.index(obj.color) + 1)
    return _add_noise(image, rng)


# ---------------------------------------------------------------- text


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return LIST_SEPARATOR.join(phrases[:-1]) + LAST_SEPARATOR + phrases[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """E.g. "a red circle at the top left and a blue square at the bottom right"."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    return _join_phrases(
        [OBJECT_PHRASE.format(color=o.color, shape=o.shape, position=o.position) for o in objects]
    )


def _pick_position(scene: Scene, rng: random.Random, n_real_answers: int) -> str:
    # Ask about an empty quadrant with the probability of any one real answer,
    # so "nothing" is not a free win for a blind model.
    occupied = [o.position for o in scene.objects]
    if rng.random() < 1 / (n_real_answers + 1):
        return rng.choice([p for p in POSITIONS if p not in occupied])
    return rng.choice(occupied)


def _ask_color_of_shape(scene: Scene, rng: random.Random) -> QA | None:
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return QUESTION_TEMPLATES["color_of_shape"].format(shape=obj.shape), obj.color


def _ask_shape_at(scene: Scene, rng: random.Random) -> QA:
    position = _pick_position(scene, rng, len(SHAPES))
    obj = scene.at(position)
    return QUESTION_TEMPLATES["shape_at"].format(position=position), obj.shape if obj else NOTHING


def _ask_color_at(scene: Scene, rng: random.Random) -> QA:
    position = _pick_position(scene, rng, len(COLORS))
    obj = scene.at(position)
    return QUESTION_TEMPLATES["color_at"].format(position=position), obj.color if obj else NOTHING


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    return QUESTION_TEMPLATES["count"], COUNT_WORDS[len(scene.objects) - 1]


def _ask_exists(scene: Scene, rng: random.Random) -> QA:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        color, shape, answer = obj.color, obj.shape, "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        (color, shape), answer = rng.choice(absent), "no"
    return QUESTION_TEMPLATES["exists"].format(color=color, shape=shape), answer


_ASKERS: tuple[Callable[[Scene, random.Random], QA | None], ...] = (
    _ask_color_of_shape,
    _ask_shape_at,
    _ask_count,
    _ask_exists,
    _ask_color_at,
)
_MAX_ASK_ATTEMPTS = 50


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """3 to 5 distinct (question, answer) pairs; every answer is in ``ANSWERS``."""
    wanted = rng.randint(3, 5)
    # Every template once (in random order) before any repeats, for variety.
    order = list(_ASKERS)
    rng.shuffle(order)
    asked: dict[str, str] = {}
    for attempt in range(_MAX_ASK_ATTEMPTS):
        if len(asked) == wanted:
            break
        ask = order[attempt] if attempt < len(order) else rng.choice(_ASKERS)
        qa = ask(scene, rng)
        if qa is not None and qa[0] not in asked:
            asked[qa[0]] = qa[1]
    return list(asked.items())


def vocabulary() -> list[str]:
    """Every word the generator can emit (captions, questions, answers)."""
    texts = [OBJECT_PHRASE, LIST_SEPARATOR, LAST_SEPARATOR, *QUESTION_TEMPLATES.values()]
    texts += [*SHAPES, *COLORS, *POSITIONS, *ANSWERS, *EXTRA_WORDS]
    # The tokenizer splits "," off words, so whitespace pieces are enough here.
    return sorted({w for text in texts for w in text.split() if not w.startswith("{")})


# ---------------------------------------------------------------- shards


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _next_scene(rng: random.Random, seen: set | None) -> Scene:
    if seen is None:
        return sample_scene(rng)
    for _ in range(_MAX_UNIQUE_REJECTIONS):
        scene = sample_scene(rng)
        if scene.canonical() not in seen:
            seen.add(scene.canonical())
            return scene
    raise ValueError(
        f"no new unique scene after {_MAX_UNIQUE_REJECTIONS} draws ({len(seen)} found); "
        "ask for fewer unique samples"
    )


def _samples(split: str, n: int, image_size: int, seed: int, unique: bool) -> Iterator[dict]:
    # Seeding with the split name gives train and val independent streams.
    rng = random.Random(f"vlcluster-synthetic:{seed}:{split}")
    seen: set | None = set() if unique else None
    for i in range(n):
        scene = _next_scene(rng, seen)
        image = render(scene, image_size, rng)
        meta = {
            "objects": [[o.shape, o.color, o.position] for o in scene.objects],
            "qa": [list(qa) for qa in questions(scene, rng)],
        }
        yield {
            "__key__": f"{split}-{i:08d}",
            "png": _png_bytes(image),
            "txt": caption(scene, rng).encode("utf-8"),
            "json": json.dumps(meta, separators=(",", ":")).encode("utf-8"),
        }


def _write_shard(path: str, samples: Iterator[dict]) -> None:
    # Written to a temporary name and renamed (or uploaded) when complete: a
    # shard cut short by a full disk or a kill must never sit under its final
    # name, where a plain tar reader would take it for a complete shard.
    with writable(run_path(path)) as tmp, open(tmp, "wb") as f:
        # Fixed mtime (and TarWriter's fixed user/group/mode) make shards byte-identical per seed.
        with wds.TarWriter(f, encoder=False, mtime=0, compress=False) as tar:
            for sample in samples:
                tar.write(sample)
        f.flush()
        os.fsync(f.fileno())


def _join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


def write_split(
    out_dir: str,
    split: str,
    n: int,
    shard_size: int,
    image_size: int,
    seed: int,
    unique: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """Write ``n`` samples as ``{out_dir}/{split}-{index:06d}.tar``; return the shard paths."""
    if n < 0 or shard_size < 1 or image_size < 2:
        raise ValueError(f"need n >= 0, shard_size >= 1, image_size >= 2; got {n}, {shard_size}, {image_size}")
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    samples = _samples(split, n, image_size, seed, unique)
    paths = []
    for index in range(math.ceil(n / shard_size)):
        path = _join_url(out_dir, f"{split}-{index:06d}.tar")
        count = min(shard_size, n - index * shard_size)
        _write_shard(path, itertools.islice(samples, count))
        paths.append(path)
        if progress is not None:
            progress(split, index * shard_size + count, n)
    return paths


def _write_text(url: str, text: str) -> None:
    write_bytes(run_path(url), text.encode("utf-8"))


def build_dataset(
    out_dir: str,
    n_train: int,
    n_val: int,
    shard_size: int,
    image_size: int,
    seed: int,
    progress: Progress | None = None,
) -> dict:
    """Write train/val shards, ``tokenizer.json`` and ``answers.json``; return a summary."""
    train = write_split(out_dir, "train", n_train, shard_size, image_size, seed, progress=progress)
    # Unique val scenes make image<->text retrieval well-posed (one true match).
    val = write_split(out_dir, "val", n_val, shard_size, image_size, seed, unique=True, progress=progress)
    index_beside(train + val)  # readers then learn item counts and offsets from one small object
    tokenizer = build_word_tokenizer(vocabulary())
    tokenizer_path = _join_url(out_dir, "tokenizer.json")
    answers_path = _join_url(out_dir, "answers.json")
    _write_text(tokenizer_path, tokenizer.to_str(pretty=True))
    _write_text(answers_path, json.dumps(list(ANSWERS), indent=1))
    return {
        "train_shards": train,
        "val_shards": val,
        "n_train": n_train,
        "n_val": n_val,
        "tokenizer": tokenizer_path,
        "answers": answers_path,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
    }
