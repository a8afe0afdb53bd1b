"""A synthetic "shapes world": images of coloured shapes with captions, VQA, grounding, text reading and dialogues.

Every image holds 1-4 shapes of distinct colours (so "the red triangle" and "the red shape" always name one object;
kinds may repeat) on a varied background, and sometimes a word written with PIL's default font. Boxes are kept in
pixels; the texts use the official 0-1000 grounding format through `format_grounding`.
"""

import json
import multiprocessing
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from modeling_qwen_vl import format_grounding

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 200),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Side of a shape's (square) box as a fraction of the image side.
SIZES = {"small": (0.20, 0.26), "large": (0.32, 0.40)}
WORDS = ("cat", "dog", "sun", "car", "map", "hat", "cup", "pen", "bus", "egg", "fox", "owl")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_SUPERSAMPLE = 4


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # pixels (x1, y1, x2, y2)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    image: str  # path of the PNG file, relative to the data directory
    image_size: int
    shapes: list[Shape]
    word: str | None = None
    word_box: tuple[float, float, float, float] | None = None

    def grounding(self, phrase: str, shape: Shape) -> str:
        """`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` for `shape`, in the official 0-1000 coordinates."""
        return format_grounding(phrase, shape.box, (self.image_size, self.image_size))

    def box_1000(self, shape: Shape) -> tuple[int, ...]:
        """The box of `shape` on the model's 0-1000 scale (as `format_grounding` writes it)."""
        return tuple(int(v) for v in re.findall(r"\d+", format_grounding(None, shape.box, (self.image_size,) * 2)))


def _overlaps(a, b, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


@dataclass
class Background:
    """The random choices of a background: dark or light, its style, tint(s) and, when speckled, the noise seed."""

    light: bool
    style: str  # "plain", "gradient" or "speckle"
    tint: tuple[float, float, float]
    second_tint: tuple[float, float, float] | None = None  # gradient: the colour it fades to
    horizontal: bool = False  # gradient: along x instead of y
    noise_seed: int | None = None  # speckle

    @classmethod
    def draw(cls, rng: random.Random) -> "Background":
        light = rng.random() < 0.5
        low, high = (165, 230) if light else (20, 85)

        def tint():
            base = rng.randint(low, high)
            return tuple(float(min(max(base + rng.randint(-18, 18), 0), 255)) for _ in range(3))

        background = cls(light, rng.choice(("plain", "gradient", "speckle")), tint())
        if background.style == "gradient":
            background.horizontal = rng.random() < 0.5
            background.second_tint = tint()
        elif background.style == "speckle":
            background.noise_seed = rng.getrandbits(32)
        return background

    def paint(self, size: int) -> Image.Image:
        pixels = np.broadcast_to(np.array(self.tint, dtype=np.float32), (size, size, 3)).copy()
        if self.style == "gradient":
            ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
            if self.horizontal:
                ramp = ramp.transpose(1, 0, 2)
            pixels = pixels * (1 - ramp) + np.array(self.second_tint, dtype=np.float32) * ramp
        elif self.style == "speckle":
            pixels = pixels + np.random.default_rng(self.noise_seed).normal(0.0, 12.0, (size, size, 1))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, colour):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(x1 + w / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(x1 + w / 2, y1), (x2, y1 + h / 2), (x1 + w / 2, y2), (x1, y1 + h / 2)], fill=colour)
    elif kind == "cross":
        draw.rectangle((x1 + w / 3, y1, x2 - w / 3, y2), fill=colour)
        draw.rectangle((x1, y1 + h / 3, x2, y2 - h / 3), fill=colour)
    else:
        raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}")


def _font(image_size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(max(10, round(image_size * 0.15)))


def draw_scene(rng: random.Random, image_size: int, word_probability: float = 0.3) -> tuple[Scene, Background]:
    """Every random choice of one scene: its shapes, its word and its background (nothing is rendered)."""
    background = Background.draw(rng)
    shapes: list[Shape] = []
    count = rng.randint(1, 4)
    pairs = list(zip(rng.sample(tuple(COLOURS), count), rng.choices(SHAPES, k=count)))
    for colour, kind in pairs:
        size = rng.choice(tuple(SIZES))
        side = rng.uniform(*SIZES[size]) * image_size
        for _ in range(100):
            x, y = rng.uniform(1, image_size - side - 1), rng.uniform(1, image_size - side - 1)
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, other.box, 2) for other in shapes):
                shapes.append(Shape(kind, colour, size, box))
                break

    word = word_box = None
    if rng.random() < word_probability:
        candidate = rng.choice(WORDS)
        left, top, right, bottom = _font(image_size).getbbox(candidate)
        for _ in range(50):
            x = rng.uniform(1, image_size - (right - left) - 1)
            y = rng.uniform(1, image_size - (bottom - top) - 1)
            box = (x, y, x + right - left, y + bottom - top)
            if not any(_overlaps(box, shape.box, 2) for shape in shapes):
                word, word_box = candidate, box
                break
    return Scene("", image_size, shapes, word, word_box), background


def paint_scene(scene: Scene, background: Background) -> Image.Image:
    """The RGB image of a drawn scene: shapes supersampled 4x and box-filtered onto the background, then the word."""
    size = scene.image_size
    big = size * _SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for shape in scene.shapes:
        _draw_shape(draw, shape.kind, tuple(v * _SUPERSAMPLE for v in shape.box), COLOURS[shape.colour])
    layer = layer.resize((size, size), Image.Resampling.BOX)
    image = Image.alpha_composite(background.paint(size).convert("RGBA"), layer)
    if scene.word is not None:
        font = _font(size)
        left, top, _, _ = font.getbbox(scene.word)
        ImageDraw.Draw(image).text(
            (scene.word_box[0] - left, scene.word_box[1] - top),
            scene.word,
            font=font,
            fill=(10, 10, 10) if background.light else (245, 245, 245),
        )
    return image.convert("RGB")


def render_scene(rng: random.Random, image_size: int, word_probability: float = 0.3) -> tuple[Image.Image, Scene]:
    """Draw and paint one random scene; returns the image and its description (the `image` path is left empty)."""
    scene, background = draw_scene(rng, image_size, word_probability)
    return paint_scene(scene, background), scene


def _paint_and_save(job: tuple[Path, Scene, Background]) -> None:
    root, scene, background = job
    paint_scene(scene, background).save(root / scene.image, compress_level=1)


def generate_scenes(
    root: Path, split: str, count: int, image_size: int, seed: int, progress: bool = True, workers: int | None = None
) -> list[Scene]:
    """Render `count` scenes as `root/images/{split}_NNNNN.png` (`Scene.image` is relative to `root`); deterministic
    for `seed`, whatever the number of `workers`.

    The scenes are drawn in order from one random stream, then painted and saved by `workers` processes (default: one
    per CPU core, at most 8): painting is nine tenths of the time, and the images are the same as painting them in
    order (the 30200 images of the full demo: 50 s in one process)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{split}")
    scenes, jobs = [], []
    for index in range(count):
        scene, background = draw_scene(rng, image_size)
        scene.image = f"images/{split}_{index:05d}.png"
        scenes.append(scene)
        jobs.append((root, scene, background))
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    bar = tqdm(total=count, desc=f"Drawing {split} images", disable=not progress)
    if workers <= 1 or count < 256:
        for job in jobs:
            _paint_and_save(job)
            bar.update()
    else:
        # fork where the platform has it: spawned workers would first import torch (seconds each)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for _ in pool.map(_paint_and_save, jobs, chunksize=64):
                bar.update()
    bar.close()
    return scenes


def save_scenes(scenes: list[Scene], path: Path):
    path.write_text(json.dumps([asdict(scene) for scene in scenes]))


def load_scenes(path: Path) -> list[Scene]:
    scenes = []
    for item in json.loads(Path(path).read_text()):
        item["shapes"] = [Shape(**shape) for shape in item["shapes"]]
        scenes.append(Scene(**item))
    return scenes


# ----------------------------------------------------------------------------------------------------------------------
# Texts: every task is a (prompt, answer) pair about one scene.
# ----------------------------------------------------------------------------------------------------------------------

CAPTION_PROMPT = "Describe the image."
COUNT_PROMPT = "How many shapes are there?"
GROUNDED_CAPTION_PROMPT = "Describe the image with grounding."
READ_PROMPT = "What is written in the image?"


def grounding_prompt(phrase: str) -> str:
    return f"Where is {phrase}?"


def plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _left_to_right(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda shape: (shape.box[0] + shape.box[2], shape.box[1]))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """E.g. "Two shapes: a large red triangle and a small blue circle." (shapes from left to right)."""
    count = len(scene.shapes)
    head = f"{NUMBER_WORDS[count].capitalize()} shape{'s' if count > 1 else ''}: "
    text = head + _join([f"a {s.size} {s.colour} {s.kind}" for s in _left_to_right(scene)]) + "."
    if scene.word:
        text += f' The word "{scene.word}" is written.'
    return text


def grounded_caption(scene: Scene) -> str:
    """The caption's shapes, each as `<ref>a large red triangle</ref><box>...</box>`."""
    parts = [scene.grounding(f"a {s.size} {s.colour} {s.kind}", s) for s in _left_to_right(scene)]
    return _join(parts) + "."


def count_answer(scene: Scene) -> str:
    return str(len(scene.shapes))


def referring_expressions(scene: Scene) -> list[tuple[str, Shape]]:
    """Phrases naming exactly one shape: always "the red triangle"; "the large circle", "the blue shape", "the
    circle", "the leftmost shape"... where they are unambiguous."""
    found = {}
    for shape in scene.shapes:
        for phrase in (
            f"the {shape.colour} {shape.kind}",
            f"the {shape.size} {shape.kind}",
            f"the {shape.colour} shape",
            f"the {shape.kind}",
        ):
            if sum(_matches(phrase, other) for other in scene.shapes) == 1:
                found.setdefault(phrase, shape)
    if len(scene.shapes) > 1:
        ordered = _left_to_right(scene)
        found["the leftmost shape"], found["the rightmost shape"] = ordered[0], ordered[-1]
    return list(found.items())


def _matches(phrase: str, shape: Shape) -> bool:
    """Whether every word of "the ..." describes `shape`."""
    return all(word in (shape.size, shape.colour, shape.kind, "shape") for word in phrase.split()[1:])


def vqa_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Counting and attribute questions with short answers."""
    shapes = scene.shapes
    pairs = [(COUNT_PROMPT, count_answer(scene))]
    kind = rng.choice(SHAPES)
    pairs.append((f"How many {plural(kind)} are there?", str(sum(s.kind == kind for s in shapes))))
    colour = rng.choice(tuple(COLOURS))
    pairs.append((f"How many {colour} shapes are there?", str(sum(s.colour == colour for s in shapes))))
    target = rng.choice(shapes)
    if sum(s.kind == target.kind for s in shapes) == 1:
        pairs.append((f"What colour is the {target.kind}?", target.colour))
    if sum(s.colour == target.colour for s in shapes) == 1:
        pairs.append((f"What shape is the {target.colour} one?", target.kind))
    pairs.append((f"Is the {target.colour} {target.kind} small or large?", target.size))
    colour, kind = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    present = any(s.colour == colour and s.kind == kind for s in shapes)
    pairs.append((f"Is there a {colour} {kind}?", "yes" if present else "no"))
    if scene.word:
        pairs.append((READ_PROMPT, scene.word))
    return pairs


def grounding_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Referring-expression comprehension: "Where is the red triangle?" -> `<ref>the red triangle</ref><box>...`."""
    return [
        (grounding_prompt(phrase), scene.grounding(phrase, shape)) for phrase, shape in referring_expressions(scene)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Training records in the recipes' formats.
# ----------------------------------------------------------------------------------------------------------------------


def pretrain_records(scenes: list[Scene]) -> list[dict]:
    """Stage 1: image-caption pairs (`{"image", "caption"}`)."""
    return [{"image": scene.image, "caption": caption(scene)} for scene in scenes]


def multitask_records(scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Stage 2: per scene, one record of each task format of `recipes.formats.TASK_FORMATS` that applies."""
    records = []
    for scene in scenes:
        image = scene.image
        records.append({"task": "caption", "image": image, "caption": caption(scene)})
        records.append({"task": "grounding", "image": image, "caption": grounded_caption(scene)})
        phrase, shape = rng.choice(referring_expressions(scene))
        records.append({"task": "ref", "image": image, "phrase": phrase, "box": list(scene.box_1000(shape))})
        shape = rng.choice(scene.shapes)
        records.append(
            {
                "task": "grounded_caption",
                "image": image,
                "box": list(scene.box_1000(shape)),
                "phrase": f"a {shape.size} {shape.colour} {shape.kind}",
            }
        )
        question, answer = rng.choice(vqa_pairs(scene, rng))
        records.append({"task": "vqa", "image": image, "question": question, "answer": answer})
        if scene.word:
            records.append({"task": "ocr", "image": image, "text": scene.word})
        records.append({"task": "text", "text": caption(scene)})
    rng.shuffle(records)
    return records


EXTRA_TURNS = 2  # attribute, reading or grounded-caption questions at the end of a dialogue


def dialogue(scene: Scene, rng: random.Random, max_turns: int) -> list[tuple[str, str]]:
    """Up to `max_turns` (question, answer) turns in which no answer can be read from the turns before it, so that
    every answer has to come from the image, as in the held-out evaluation (single questions).

    One of three orders, at random: the count, the caption, then where each shape is; the caption, then where each
    shape is; or only where each shape is. Each shape is asked for once (by its colour and kind, or half the time by
    another phrase that names only it), in random order; attribute, reading and grounded-caption questions (up to
    `EXTRA_TURNS`) come last, where what they could copy no longer helps the questions above. (Asking every question
    in random order let most answers be copied: the count from the number of "Where is" questions, the caption from
    their phrases, a box from another phrase for the same shape.)"""
    phrases: dict[int, list[str]] = {}
    for phrase, shape in referring_expressions(scene):
        phrases.setdefault(id(shape), []).append(phrase)
    grounding = []
    for shape in scene.shapes:
        phrase = f"the {shape.name}" if rng.random() < 0.5 else rng.choice(phrases[id(shape)])
        grounding.append((grounding_prompt(phrase), scene.grounding(phrase, shape)))
    rng.shuffle(grounding)
    count, caption_turn = (COUNT_PROMPT, count_answer(scene)), (CAPTION_PROMPT, caption(scene))
    turns = rng.choice(([count, caption_turn], [caption_turn], [])) + grounding
    extra = vqa_pairs(scene, rng) + [(GROUNDED_CAPTION_PROMPT, grounded_caption(scene))]
    extra = [pair for pair in extra if pair[0] != COUNT_PROMPT]
    rng.shuffle(extra)
    return (turns + extra[:EXTRA_TURNS])[:max_turns]


def sft_records(scenes: list[Scene], rng: random.Random, max_turns: int = 8) -> list[dict]:
    """Stage 3: dialogues in the official fine-tuning format (`{"id", "conversations": [{"from", "value"}]}`)."""
    records = []
    for index, scene in enumerate(scenes):
        conversations = []
        for turn, (question, answer) in enumerate(dialogue(scene, rng, max_turns)):
            prefix = f"Picture 1: <img>{scene.image}</img>\n" if turn == 0 else ""
            conversations += [{"from": "user", "value": prefix + question}, {"from": "assistant", "value": answer}]
        records.append({"id": f"identity_{index}", "conversations": conversations})
    return records
