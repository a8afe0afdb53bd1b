"""Stage 0 of the demo, the paper's pretrained parts in miniature: a small OpenCLIP ViT trained on the shapes world.

Qwen-VL starts from OpenCLIP ViT-bigG and Qwen-7B (paper §2.1). Here the vision tower is an OpenCLIP
`VisionTransformer` built from a model config registered with `open_clip.add_model_config`, trained with OpenCLIP's
contrastive `ClipLoss` on image-caption pairs plus a dense shapes objective (`ShapesHead`): contrastive training alone
teaches a from-scratch ViT the colours in minutes but not the shape kinds or where they are, which the captions and
boxes of stages 1-3 need (measured with `benchmarks/demo_vision_probe.py`, see the README). The trained CLIP model is
then converted by `qwen-vl convert openclip`, exactly as ViT-bigG is.
"""

import csv
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset as Dataset_
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration
from modeling_qwen_vl.modeling_qwen_vl import fast_linear

from . import world

CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
KINDS = world.SHAPES
COLOURS = tuple(world.COLOURS)
MAX_SHAPES = 4


def to_pixels(image) -> torch.Tensor:
    """A PIL image (or its uint8 [S, S, 3] array) at the model's size -> [3, S, S], normalised with the CLIP mean and
    std (as `QwenVLImageProcessor` does)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - CLIP_MEAN) / CLIP_STD


def shape_targets(scene: world.Scene) -> torch.Tensor:
    """[MAX_SHAPES, 6]: (kind index, colour index, x1, y1, x2, y2 as fractions of the side) per shape; kind -1 marks
    no shape."""
    targets = torch.full((MAX_SHAPES, 6), -1.0)
    for row, shape in zip(targets, scene.shapes):
        row[0], row[1] = KINDS.index(shape.kind), COLOURS.index(shape.colour)
        row[2:] = torch.tensor(shape.box) / scene.image_size
    return targets


def draw_batch(rng: random.Random, count: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` freshly drawn scenes: pixel values [count, 3, S, S] and `shape_targets` [count, MAX_SHAPES, 6]."""
    pixels, targets = [], []
    for _ in range(count):
        image, scene = world.render_scene(rng, image_size)
        pixels.append(to_pixels(image))
        targets.append(shape_targets(scene))
    return torch.stack(pixels), torch.stack(targets)


def patch_labels(targets: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch of a `grid x grid` image: the kind and colour (index + 1, 0 = background) and box [.., 4] of the
    shape whose box holds the patch centre (boxes never overlap in the world)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.flatten()[None, None], cy.flatten()[None, None]  # [1, 1, P]
    box = targets[..., 2:, None]  # [B, M, 4, 1]
    inside = (
        (targets[..., 0:1] >= 0)
        & (cx >= box[:, :, 0])
        & (cx < box[:, :, 2])
        & (cy >= box[:, :, 1])
        & (cy < box[:, :, 3])
    )
    owner = inside.float().argmax(1)  # [B, P]: index of the shape holding the patch centre
    found = inside.any(1)
    picked = torch.gather(targets, 1, owner[..., None].expand(-1, -1, 6))  # [B, P, 6]
    kind = torch.where(found, picked[..., 0].long() + 1, 0)
    colour = torch.where(found, picked[..., 1].long() + 1, 0)
    return kind, colour, picked[..., 2:]


class ShapesHead(nn.Module):
    """Dense shapes objective on the ViT's patch tokens [B, P, width]: each patch predicts the kind and colour of the
    shape it lies in (or background), that shape's box, and the box's digits as the LM writes them.

    `digits` [B, P, 4 coordinates, 2 places, 11]: the hundreds and tens digit of x1, y1, x2, y2 on the 0-1000 scale of
    `<box>(x1,y1),(x2,y2)</box>`, class 10 = background. Features that hold the digits as classes let the language
    model read a box off the image tokens with a linear map instead of learning to discretise a coordinate."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.kind = nn.Linear(width, len(KINDS) + 1)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.box = nn.Linear(width, 4)
        self.digits = nn.Linear(width, 4 * 2 * 11)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.norm(tokens)
        digits = self.digits(tokens).unflatten(-1, (4, 2, 11))
        return self.kind(tokens), self.colour(tokens), self.box(tokens).sigmoid(), digits


def box_digits(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes [..., 4] as fractions of the side -> [..., 4, 2] hundreds and tens digits on the 0-1000 grid. The value
    is truncated, where the texts' `box_to_text` rounds: the two differ by at most one grid unit, so a tens digit
    differs only when rounding carries into it (what the demo's measured runs trained with)."""
    values = (boxes * 1000).long().clamp(0, 999)
    return torch.stack([values // 100, values // 10 % 10], dim=-1)


def shapes_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on each patch's kind, colour and box digits (background: class 10) plus L1 (x5) on the boxes of
    the patches inside a shape."""
    kind_logits, colour_logits, boxes, digit_logits = outputs
    kind, colour, true_boxes = patch_labels(targets, round(kind_logits.shape[1] ** 0.5))
    foreground = kind > 0
    digits = torch.where(foreground[..., None, None], box_digits(true_boxes), 10)
    loss = (
        F.cross_entropy(kind_logits.flatten(0, 1), kind.flatten())
        + F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten())
        + F.cross_entropy(digit_logits.flatten(0, -2), digits.flatten())
    )
    if foreground.any():
        loss = loss + 5 * F.l1_loss(boxes[foreground], true_boxes[foreground])
    return loss


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda z: (z[..., 2:] - z[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


@torch.no_grad()
def shapes_metrics(outputs, targets: torch.Tensor) -> dict[str, float]:
    """Per shape: kind accuracy (patch logits averaged over its patches) and IoU >= 0.5 share (patch boxes averaged)."""
    kind_logits, colour_logits, boxes, digit_logits = outputs
    kind, colour, _ = patch_labels(targets, round(kind_logits.shape[1] ** 0.5))
    hits, ious, colours, digits = [], [], [], []
    for b in range(targets.shape[0]):
        for shape in targets[b]:
            if shape[0] < 0:
                continue
            mask = (kind[b] == shape[0] + 1) & (colour[b] == shape[1] + 1)
            if not mask.any():
                continue
            hits.append(float(kind_logits[b][mask].mean(0)[1:].argmax() == shape[0]))
            colours.append(float(colour_logits[b][mask].mean(0)[1:].argmax() == shape[1]))
            ious.append(float(box_iou(boxes[b][mask].mean(0), shape[2:])))
            digits.append(
                float((digit_logits[b][mask].mean(0).argmax(-1) == box_digits(shape[2:]))[:, 0].float().mean())
            )
    return {
        "kind": float(np.mean(hits)),
        "colour": float(np.mean(colours)),
        "iou50": float(np.mean(np.array(ious) >= 0.5)),
        "hundreds_digit": float(np.mean(digits)),
    }


class VisionTower(nn.Module):
    """An OpenCLIP ViT with `ShapesHead` on its patch tokens (the probe's model; stage 0 adds the text tower)."""

    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int = 4, mlp_ratio: float = 2.0
    ):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=mlp_ratio,
            output_dim=width,
        )
        self.head = ShapesHead(width)

    def forward(self, pixel_values):
        tokens = self.visual.forward_intermediates(pixel_values, indices=1, output_fmt="NLC", intermediates_only=True)
        return self.head(tokens["image_intermediates"][-1])


# ----------------------------------------------------------------------------------------------------------------------
# The OpenCLIP model: a registered config, trained with ClipLoss + the shapes objective on Trainer.
# ----------------------------------------------------------------------------------------------------------------------


def register_clip_config(directory: Path, name: str, image_size: int, visual: dict, context_length: int) -> Path:
    """Write an OpenCLIP model config (`open_clip/model_configs` layout) and register it with
    `open_clip.add_model_config`; returns the JSON file (what `qwen-vl convert openclip --open-clip-model` takes)."""
    import open_clip

    config = {
        "embed_dim": visual["width"],
        "vision_cfg": {
            "image_size": image_size,
            "layers": visual["layers"],
            "width": visual["width"],
            "head_width": visual["width"] // visual["heads"],
            "mlp_ratio": visual["mlp_ratio"],
            "patch_size": visual["patch_size"],
        },
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    }
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    open_clip.add_model_config(path)
    return path


class FastLinearMode(TorchFunctionMode):
    """Sends OpenCLIP's `F.linear` calls (its MLPs and `nn.MultiheadAttention` projections) to `fast_linear`, the
    kernel the Qwen-VL modules call, while the stage-0 ViT trains (a FULL step, batch 64, 1 thread: 0.26 -> 0.23 s).
    OpenCLIP's modules call `F.linear` directly, so a function mode is the one way in without editing them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            return fast_linear(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class ShapesCLIP(nn.Module):
    """An OpenCLIP CLIP model trained with `open_clip.loss.ClipLoss` on image-caption pairs plus `shapes_weight` x
    `shapes_loss` of a `ShapesHead` on the vision tower's patch tokens. `forward` returns `{"loss"}` for `Trainer`."""

    def __init__(self, clip, shapes_weight: float = 1.0):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip = clip
        self.head = ShapesHead(clip.visual.conv1.out_channels)
        self.clip_loss = ClipLoss()
        self.shapes_weight = shapes_weight

    def forward(self, pixel_values, text, shape_targets):
        visual = self.clip.visual.forward_intermediates(pixel_values, indices=1, output_fmt="NLC")
        image_features = F.normalize(visual["image_features"], dim=-1)
        text_features = self.clip.encode_text(text, normalize=True)
        contrastive = self.clip_loss(image_features, text_features, self.clip.logit_scale.exp())
        shapes = shapes_loss(self.head(visual["image_intermediates"][-1]), shape_targets)
        return {
            "loss": contrastive + self.shapes_weight * shapes,
            "contrastive": contrastive.detach(),
            "shapes": shapes.detach(),
        }


class CaptionedScenes(Dataset):
    """The rows of an OpenCLIP CSV (`filepath`, `title`) with each scene's `shape_targets`; with `tokenizer` (an
    OpenCLIP tokenizer), also the caption's token ids `text` [context_length].

    Each image is decoded (kept as uint8 RGB, 3 bytes a pixel) and each caption tokenized on its first use only:
    stage 0 goes through the images several times (1500 steps x 64 of 30000), and PNG decoding and tokenizing were
    a tenth of its step time. The items are the same as decoding anew each time. The cache lives in the process that
    reads the items: with DataLoader workers, keep them persistent (`dataloader_persistent_workers`) so that it lasts
    from one epoch to the next."""

    def __init__(self, csv_path: Path, scenes: list[world.Scene], tokenizer=None):
        with open(csv_path, newline="") as file:
            self.rows = list(csv.DictReader(file))
        self.root = Path(csv_path).parent
        self.targets = {scene.image: shape_targets(scene) for scene in scenes}
        self.tokenizer = tokenizer
        self._images: dict[int, np.ndarray] = {}
        self._texts: dict[int, torch.Tensor] = {}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        if index not in self._images:
            with Image.open(self.root / row["filepath"]) as image:
                self._images[index] = np.asarray(image.convert("RGB"))
        item = {
            "pixel_values": to_pixels(self._images[index]),
            "caption": row["title"],
            "shape_targets": self.targets[row["filepath"]],
        }
        if self.tokenizer is not None:
            if index not in self._texts:
                self._texts[index] = self.tokenizer([row["title"]])[0]
            item["text"] = self._texts[index]
        return item


def write_clip_csv(path: Path, scenes: list[world.Scene]) -> Path:
    """The image-caption CSV of OpenCLIP's training script (`--csv-img-key filepath --csv-caption-key title`)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        writer.writerows([scene.image, world.caption(scene)] for scene in scenes)
    return path


def train_clip(
    model_name: str,
    csv_path: Path,
    scenes,
    output_dir: Path,
    settings: dict,
    shapes_weight: float,
    seed: int,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Path, dict]:
    """Train the registered OpenCLIP model `model_name` on the CSV with `Trainer` (`settings` are its
    TrainingArguments); saves `open_clip_model.safetensors` (OpenCLIP names) and `trainer_state.json`. Returns the
    weights file and the `shapes_metrics` of the trained head on `heldout` (`draw_batch` output; {} if None)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    clip = open_clip.create_model(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model = ShapesCLIP(clip, shapes_weight)

    args = TrainingArguments(output_dir=str(output_dir), seed=seed, remove_unused_columns=False, **settings)
    dataset = CaptionedScenes(csv_path, scenes, tokenizer)
    # `default_data_collator` stacks the tensors (pixel_values, text, shape_targets) and leaves out the caption string
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    with FastLinearMode():
        trainer.train()
    trainer.save_state()
    weights = Path(output_dir) / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)
    metrics = {}
    if heldout is not None:
        model.eval()
        with torch.no_grad():
            tokens = clip.visual.forward_intermediates(heldout[0], indices=1, output_fmt="NLC", intermediates_only=True)
            metrics = shapes_metrics(model.head(tokens["image_intermediates"][-1]), heldout[1])
    return weights, metrics


# ----------------------------------------------------------------------------------------------------------------------
# The language model: causal-LM pretraining on the world's text with a plain Trainer.
# ----------------------------------------------------------------------------------------------------------------------


def world_texts(scenes: list[world.Scene], seed: int, questions: int = 6) -> list[str]:
    """The text of the world, without images: one document per scene, its grounded caption followed by `questions`
    questions with their answers (counts, attributes, referring expressions with their boxes, the caption), so the
    answers can be read from the context above them, as they will later be read from the image.

    Measured (stage 3 alone, 400 steps, 64 held-out images): caption exact-set 0.094 from an LM pretrained on these
    documents against 0.000 from one pretrained on the same texts each on its own (both with 16 queries), and 0.203
    against 0.047 with 64 grid-initialised queries."""
    rng = random.Random(f"{seed}-text")
    texts = []
    for scene in scenes:
        pairs = world.vqa_pairs(scene, rng) + world.grounding_pairs(scene)
        pairs.append((world.CAPTION_PROMPT, world.caption(scene)))
        rng.shuffle(pairs)
        lines = [f"{question}\n{answer}" for question, answer in pairs[:questions]]
        texts.append("\n".join([world.grounded_caption(scene), *lines]))
    rng.shuffle(texts)
    return texts


def pretrain_lm(
    texts: list[str], tokenizer, config: QwenVLConfig, output_dir: Path, settings: dict, block_size: int, seed: int
) -> Path:
    """Pretrain the language model of `config` on `texts` (each ended by `<|endoftext|>`, concatenated and cut into
    `block_size` blocks, as transformers' `run_clm` does) with `Trainer`, and save it as a Qwen-7B-layout LM
    checkpoint (`transformer.wte/h/ln_f`, `lm_head`; no vision weights) for `qwen-vl convert openclip --qwen-lm`."""
    torch.manual_seed(seed)
    model = QwenVLForConditionalGeneration(config)
    ids = [token for text in texts for token in tokenizer(text)["input_ids"] + [tokenizer.eod_id]]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    dataset = Dataset_.from_dict({"input_ids": blocks, "labels": blocks})
    args = TrainingArguments(output_dir=str(output_dir), seed=seed, **settings)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    trainer.save_state()
    lm_state = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.visual.")}
    model.save_pretrained(output_dir, state_dict=lm_state)
    return Path(output_dir)
