"""Synthetic counterparts of the paper's downstream tasks, on the same scenes.

Each task gets a small dataset in its own directory (``dataset.json`` plus
train/val shards in the task's sample format, see ``vlcluster.tasks``):

- ``vqa``: the scenes' questions, one sample per image, soft score 1.0;
- ``retrieval``: groups of near-duplicate scenes that differ in one object's
  colour, shape or position, three captions per image, each naming a random
  subset of the objects, so a caption can fit several images of its group
  and recall is not saturated;
- ``nlvr2``: a statement about a pair of scenes, true or false, each sentence
  true as often as false (the text alone is at chance);
- ``classification``: one object per image, class = colour x shape (20);
- ``segmentation``: a mask per image, labels background + the 5 colours
  (1..6; 0 = ignore is never used here).

Everything is a pure function of the seed. Each task's class names its
generator here (``Task.synthetic``); a new task may define its own in its module.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

import fsspec
from PIL import Image

from vlcluster.data.corpusindex import index_beside
from vlcluster.data.split_writer import SplitWriter
from vlcluster.data.synthetic import (
    COLORS, MAX_OBJECTS, POSITIONS, SEGMENT_CLASSES, SHAPES, Scene, SceneObject,
    _join_phrases, _png_bytes, questions, render, sample_scene,
)
from vlcluster.tasks.dataset import write_record
from vlcluster.tasks.registry import get_task

OBJECT_PHRASE = "a {color} {shape} at the {position}"
CAPTIONS_PER_IMAGE = 3
GROUP_SIZE = 4  # near-duplicate scenes per group (retrieval)
CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
Sample = dict[str, bytes | str]


def _encode_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ---- VQA ---------------------------------------------------------------------


def vqa_samples(rng: random.Random, image_size: int) -> Iterator[Sample]:
    while True:
        scene = sample_scene(rng)
        image = render(scene, image_size, rng)
        qa = [{"question": q, "answers": [[a, 1.0]]} for q, a in questions(scene, rng)]
        yield {"png": _png_bytes(image), "json": _encode_json({"questions": qa})}


# ---- retrieval ---------------------------------------------------------------


def near_duplicate(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with one object changed in colour, shape or position."""
    objects = list(scene.objects)
    index = rng.randrange(len(objects))
    obj = objects[index]
    free = [p for p in POSITIONS if scene.at(p) is None]
    change = rng.choice(["color", "shape", "position"] if free else ["color", "shape"])
    if change == "color":
        obj = SceneObject(obj.shape, rng.choice([c for c in COLORS if c != obj.color]), obj.position)
    elif change == "shape":
        obj = SceneObject(rng.choice([s for s in SHAPES if s != obj.shape]), obj.color, obj.position)
    else:
        obj = SceneObject(obj.shape, obj.color, rng.choice(free))
    objects[index] = obj
    return Scene(tuple(objects))


def partial_caption(scene: Scene, rng: random.Random) -> str:
    subset = rng.sample(scene.objects, rng.randint(1, len(scene.objects)))
    return _join_phrases([OBJECT_PHRASE.format(color=o.color, shape=o.shape, position=o.position) for o in subset])


def retrieval_samples(rng: random.Random, image_size: int) -> Iterator[Sample]:
    seen: set = set()
    while True:
        base = sample_scene(rng)
        while len(base.objects) < 2:  # one object leaves nothing for a caption to leave out
            base = sample_scene(rng)
        group = [base]
        while len(group) < GROUP_SIZE:
            group.append(near_duplicate(rng.choice(group), rng))
        for scene in group:
            if scene.canonical() in seen:
                continue
            seen.add(scene.canonical())
            captions = [partial_caption(scene, rng) for _ in range(CAPTIONS_PER_IMAGE)]
            yield {
                "png": _png_bytes(render(scene, image_size, rng)),
                "txt": "\n".join(captions).encode(),
                "json": _encode_json({"objects": [[o.shape, o.color, o.position] for o in scene.objects]}),
            }


# ---- NLVR2 -------------------------------------------------------------------


def _has(scene: Scene, color: str | None = None, shape: str | None = None) -> bool:
    return any((color is None or o.color == color) and (shape is None or o.shape == shape) for o in scene.objects)


Statement = tuple[str, Callable[[Scene, Scene], bool]]  # the sentence, and its truth for (left, right)


def _side_has_color(rng: random.Random) -> Statement:
    side, color = rng.choice(("left", "right")), rng.choice(COLORS)
    return f"the {side} image contains a {color} shape", lambda left, right: _has(left if side == "left" else right, color)


def _side_has_shape(rng: random.Random) -> Statement:
    side, shape = rng.choice(("left", "right")), rng.choice(SHAPES)
    return f"the {side} image contains a {shape}", lambda left, right: _has(left if side == "left" else right, shape=shape)


def _both_have_color(rng: random.Random) -> Statement:
    color = rng.choice(COLORS)
    return f"both images contain a {color} shape", lambda left, right: _has(left, color) and _has(right, color)


STATEMENTS: tuple[Callable[[random.Random], Statement], ...] = (_side_has_color, _side_has_shape, _both_have_color)


def nlvr2_samples(rng: random.Random, image_size: int) -> Iterator[Sample]:
    """The sentence is drawn first and made true and false in turn, the pair of scenes
    last (by rejection) to fit: every sentence is true as often as false (to one), so
    the sentence alone predicts nothing and only looking at the images beats 50%."""
    next_label: dict[str, bool] = {}
    while True:
        sentence, truth = rng.choice(STATEMENTS)(rng)
        label = next_label.get(sentence, rng.random() < 0.5)  # a fixed first label would tilt the set
        next_label[sentence] = not label
        left, right = sample_scene(rng), sample_scene(rng)
        while truth(left, right) != label:
            left, right = sample_scene(rng), sample_scene(rng)
        yield {
            "img0.png": _png_bytes(render(left, image_size, rng)),
            "img1.png": _png_bytes(render(right, image_size, rng)),
            "json": _encode_json({"sentence": sentence, "label": label}),
        }


# ---- classification and segmentation -------------------------------------------


def classification_samples(rng: random.Random, image_size: int) -> Iterator[Sample]:
    while True:
        obj = SceneObject(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(POSITIONS))
        label = CLASSES.index(f"{obj.color} {obj.shape}")
        yield {"png": _png_bytes(render(Scene((obj,)), image_size, rng)), "cls": str(label).encode()}


def segmentation_samples(rng: random.Random, image_size: int) -> Iterator[Sample]:
    while True:
        scene = sample_scene(rng)
        mask = Image.new("L", (image_size, image_size), SEGMENT_CLASSES.index("background") + 1)
        image = render(scene, image_size, rng, mask=mask)
        yield {"png": _png_bytes(image), "seg.png": _png_bytes(mask)}


assert MAX_OBJECTS <= len(POSITIONS)


def write_task_dataset(out_dir: str, task: str, n_train: int, n_val: int, shard_size: int, image_size: int,
                       seed: int, tokenizer: str | None = None) -> dict:
    """Write ``task``'s synthetic train/val shards and ``dataset.json`` into ``out_dir``;
    ``tokenizer``: a tokenizer.json copied beside them (the pre-training data's)."""
    synthetic = get_task(task).synthetic()
    if synthetic is None:
        raise ValueError(f"task {task!r} has no synthetic dataset (its class defines no synthetic()): "
                         "leave it out of the data stage's tasks and import its data (an import stage)")
    splits = {}
    for split, count in (("train", n_train), ("val", n_val)):
        rng = random.Random(f"vlcluster-synthetic-task:{seed}:{task}:{split}")
        writer = SplitWriter(out_dir, split, shard_size)
        for index, sample in zip(range(count), synthetic.samples(rng, image_size)):
            writer.write({"__key__": f"{split}-{index:08d}", **sample})
        splits[split] = writer.close()
    index_beside([f"{out_dir.rstrip('/')}/{name}" for entry in splits.values() for name in entry["shards"]])
    if tokenizer is not None:
        with fsspec.open(tokenizer, "rb") as src, fsspec.open(f"{out_dir.rstrip('/')}/tokenizer.json", "wb") as dst:
            dst.write(src.read())
    return write_record(out_dir, task, "synthetic", list(synthetic.labels), splits, "tokenizer.json" if tokenizer else None)
