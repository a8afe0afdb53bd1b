"""`qwen-vl train pretrain|multitask|sft`: the three training stages of Qwen-VL on transformers' `Trainer`.

    qwen-vl train sft --config sft --model Qwen/Qwen-VL-Chat --data train.json --output_dir out
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m qwen_vl.recipes.train sft --config ...

Options come from `ModelArguments` (TRL's `ModelConfig`: model, dtype, attention, LoRA and QLoRA), `RecipeArguments`
(data and stage settings) and transformers' `TrainingArguments`. The YAML file given by `--config` sets them and
command-line flags override it (TRL's `TrlParser`); `--config NAME` with NAME a shipped config (`sft`, `sft_lora`,
`tiny/sft`, ...; package data under `recipes/configs/`) uses that file. Each run ends with a Hub-ready directory in
`output_dir` (model, remote code, `qwen.tiktoken`, processor configs; an adapter with `--use_peft`) that the next stage
takes as `--model`.

Checkpoints are written atomically (`qwen_vl.recipes.trainer.RecipeTrainer`): a run killed at any point resumes with
`--resume_from_checkpoint true` from its last complete checkpoint. A NaN or infinite training loss stops the run with
`qwen_vl.recipes.trainer.NonFiniteLossError` before the optimizer applies it, so no checkpoint holds the bad weights.
"""

import logging
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from importlib.resources import as_file, files

import datasets
import torch
import transformers
from accelerate import PartialState
from peft import PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainingArguments, set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from modeling_qwen_vl import QwenVLForConditionalGeneration, QwenVLImageProcessor, QwenVLProcessor, QwenVLTokenizer

from .collator import QwenVLDataCollator, SkippedRecordsCallback
from .data import Example, load_records, render_caption_pair, render_dialogue, render_task, with_text_lengths
from .freezing import freeze_for_stage
from .trainer import RecipeTrainer

logger = logging.getLogger(__name__)

# LoRA targets: the language model's linear layers, by regex, so the ViT's `mlp.c_proj` is left alone. Adding
# `|transformer\.visual\.attn_pool\.kv_proj` puts LoRA on the adapter too; `--lora_modules_to_save attn_pool
# ln_post` trains the adapter fully instead.
LORA_LM_TARGETS = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)"


@dataclass(frozen=True)
class Stage:
    """What distinguishes a training stage (its trainable groups are `freezing.STAGE_TRAINABLE_GROUPS`)."""

    render: Callable[..., Example]
    image_size: int
    packing: bool


STAGES = {
    "pretrain": Stage(render=render_caption_pair, image_size=224, packing=False),
    "multitask": Stage(render=render_task, image_size=448, packing=True),
    "sft": Stage(render=render_dialogue, image_size=448, packing=False),
}
USAGE = (
    f"usage: qwen-vl train {{{','.join(STAGES)}}} [--config FILE.yaml|NAME] [--model PATH] [--data FILE ...] [flags]"
)
SHIPPED_CONFIGS = files(__package__) / "configs"


def shipped_config(name: str):
    """The shipped stage config `name` (`"sft"`, `"tiny/sft"`, ...) as an `importlib.resources` file, or None."""
    resource = SHIPPED_CONFIGS.joinpath(*f"{name.removesuffix('.yaml')}.yaml".split("/"))
    return resource if resource.is_file() else None


def _with_shipped_config(argv: list[str], stack: ExitStack) -> list[str]:
    """`argv` with a `--config NAME` that is no file here but names a shipped config replaced by that file's path."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config" and not os.path.isfile(argv[i + 1]) and (resource := shipped_config(argv[i + 1])):
            argv[i + 1] = str(stack.enter_context(as_file(resource)))
    return argv


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` with `--model` as a short flag, sdpa attention and Qwen-VL's LoRA targets by default."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Starting checkpoint: a Hub id or directory (e.g. the previous stage's output), or a LoRA "
            "adapter directory, which is merged into its base model first.",
            "aliases": ["--model"],
        },
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention implementation: sdpa or eager (flash attention: no packing)."}
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: [LORA_LM_TARGETS],
        metadata={"help": "LoRA target modules: one regex, or several module-name suffixes (PEFT's rules)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "After LoRA training, also write the merged full model to <output_dir>/merged."},
    )


@dataclass
class RecipeArguments:
    """Data and stage settings."""

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "JSON/JSONL/Parquet files, WebDataset .tar shards (globs, directories) or a Hub dataset."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Where qwen.tiktoken comes from (default: --model), e.g. Qwen/Qwen-7B."}
    )
    data_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    data_split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (pre-training-scale corpora)."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Shuffle buffer size when streaming."})
    image_root: str | None = field(
        default=None, metadata={"help": "Directory of relative image paths; images outside it are skipped."}
    )
    allow_images_outside_root: bool = field(
        default=False, metadata={"help": "Also open images outside --image_root (trusted data only)."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Image side (default: 224 pretrain, else 448)."})
    max_length: int = field(default=2048, metadata={"help": "Longest example, and packed row, in tokens."})
    packing: bool | None = field(default=None, metadata={"help": "Pack same-task examples (default: multitask)."})
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Train task records on their completion only (TRL's name). False trains their prompt text too "
            "(a referring expression's phrase, a question), as the paper's packed multi-task pre-training does; "
            "image spans stay untrained, dialogues train the assistant replies only."
        },
    )
    phrase_carry_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the phrase-carry objective (recipes/phrase_carry.py; 0: off): at every position of a "
            "`<ref>phrase</ref><box>...</box>` from `</ref>` on, what the first --phrase_carry_layer blocks add is "
            "pulled towards the sum of the phrase's token embeddings. No weights are added."
        },
    )
    phrase_carry_layer: int = field(default=1, metadata={"help": "Blocks the phrase-carry objective looks after."})
    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the ViT (default: --learning_rate). A pretrained ViT trained at a language "
            "model's learning rate can lose its features, and the adapter's output then stops depending on the image."
        },
    )


def load_model(model_args: ModelArguments) -> QwenVLForConditionalGeneration:
    """Load the starting checkpoint (quantized for QLoRA); an adapter directory is merged into its base model."""
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        if not torch.cuda.is_available():
            raise ValueError(
                "QLoRA (--load_in_4bit / --load_in_8bit) quantizes with bitsandbytes and needs a CUDA GPU; none is "
                "available. Drop the flag to train LoRA in full precision, or run on a GPU."
            )
        if not model_args.use_peft:
            raise ValueError("A quantized model trains only through LoRA adapters: add --use_peft.")
        quantization_config.llm_int8_skip_modules = ["visual", "lm_head"]  # quantize the LM blocks only
    kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "quantization_config": quantization_config,
        "device_map": {"": PartialState().local_process_index} if quantization_config is not None else None,
    }
    path = model_args.model_name_or_path
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return QwenVLForConditionalGeneration.from_pretrained(path, **kwargs)
    if quantization_config is not None:
        raise ValueError(f"{path} is a LoRA adapter, merged into unquantized base weights: drop --load_in_4bit/8bit.")
    base = QwenVLForConditionalGeneration.from_pretrained(
        PeftConfig.from_pretrained(path).base_model_name_or_path, **kwargs
    )
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def load_processor(path: str, image_size: int, revision: str = "main") -> QwenVLProcessor:
    """The processor for `image_size` with the tokenizer (`qwen.tiktoken`) of `path`, or of its base model when
    `path` is an adapter directory without one. Qwen-VL's image preprocessing is fixed up to the size."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "qwen.tiktoken")
    ):
        path = PeftConfig.from_pretrained(path).base_model_name_or_path
    image_processor = QwenVLImageProcessor(size={"height": image_size, "width": image_size})
    return QwenVLProcessor(image_processor, QwenVLTokenizer.from_pretrained(path, revision=revision))


def save_merged(model_args: ModelArguments, adapter_dir: str, processor: QwenVLProcessor) -> str:
    """Merge the LoRA adapter of `adapter_dir` into its unquantized base model and save the result, with official
    parameter names, and the processor to `<adapter_dir>/merged`; returns that directory."""
    merged_dir = os.path.join(adapter_dir, "merged")
    merged = load_model(replace(model_args, model_name_or_path=adapter_dir, load_in_4bit=False, load_in_8bit=False))
    merged.config.visual["image_size"] = processor.image_processor.size["height"]
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    return merged_dir


def _setup_logging(training_args: TrainingArguments):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    level = training_args.get_process_log_level()
    logging.getLogger(__package__).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def run(argv: list[str]) -> RecipeTrainer:
    """Parse `argv` (`[stage, flags...]`), train the stage and save the result; returns the trainer."""
    if not argv or argv[0] not in STAGES:
        raise ValueError(f"The first argument must be a stage among {', '.join(STAGES)}, got {argv[:1]}.")
    stage_name, stage = argv[0], STAGES[argv[0]]
    parser = TrlParser((ModelArguments, RecipeArguments, TrainingArguments))
    with ExitStack() as stack:
        model_args, recipe, training_args = parser.parse_args_and_config(_with_shipped_config(argv[1:], stack))
    if not model_args.model_name_or_path:
        raise ValueError("No starting checkpoint: pass --model (a Hub id or a directory) or set it in the config.")
    image_size = recipe.image_size or stage.image_size
    packing = stage.packing if recipe.packing is None else recipe.packing
    if packing and model_args.attn_implementation not in ("sdpa", "eager"):
        raise ValueError("Packing separates examples through the causal mask: use attn_implementation sdpa or eager.")
    training_args.remove_unused_columns = False  # the collator needs the raw records
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        # Frozen embeddings give inputs without gradients, which reentrant checkpointing would not backpropagate.
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    if recipe.streaming:
        training_args.accelerator_config.dispatch_batches = False  # each process reads its own shards
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    _setup_logging(training_args)
    set_seed(training_args.seed)

    processor = load_processor(recipe.tokenizer or model_args.model_name_or_path, image_size, model_args.model_revision)
    model = load_model(model_args)
    model.config.visual["image_size"] = image_size  # the vision positional table is resized at run time
    if model_args.use_peft:  # PEFT freezes everything but the adapters (and `modules_to_save`)
        if getattr(model, "is_quantized", False):
            model = prepare_model_for_kbit_training(
                model, training_args.activation_checkpointing, training_args.activation_checkpointing_kwargs
            )
        model = get_peft_model(model, get_peft_config(model_args))
        trainable = {"lora": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    else:
        trainable = freeze_for_stage(model, stage_name)
    logger.info("Stage %s at %dpx, trainable parameters: %s", stage_name, image_size, trainable)

    dataset = load_records(recipe.data, recipe.data_split, recipe.data_config, recipe.streaming)
    collator = QwenVLDataCollator(
        processor,
        stage.render,
        recipe.max_length,
        packing,
        recipe.image_root,
        recipe.allow_images_outside_root,
        recipe.completion_only_loss,
    )
    collator.prime(dataset)  # fails early on unusable data; gives all-bad batches a stand-in
    if recipe.streaming:
        dataset = dataset.shuffle(seed=training_args.seed, buffer_size=recipe.shuffle_buffer)
    elif training_args.train_sampling_strategy == "group_by_length":
        # Trainer's LengthGroupedSampler reads the lengths from this column (or `input_ids`, which raw records lack).
        dataset = with_text_lengths(dataset, training_args.length_column_name)
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[SkippedRecordsCallback(collator)],
        vision_learning_rate=recipe.vision_learning_rate,
        phrase_carry_weight=recipe.phrase_carry_weight,
        phrase_carry_layer=recipe.phrase_carry_layer,
    )
    result = trainer.train(resume_from_checkpoint=resume)

    skipped = int(trainer.accelerator.reduce(torch.tensor(collator.num_skipped, device=training_args.device), "sum"))
    trainer.model.config.use_cache = True  # Trainer switched the cache off for training; generation wants it back
    trainer.save_model(training_args.output_dir)  # model (or adapter) + processor, gathered across processes
    if model_args.use_peft and model_args.merge_lora and trainer.is_world_process_zero():
        save_merged(model_args, training_args.output_dir, processor)
    trainer.log({"skipped_records": skipped})
    metrics = {**result.metrics, "skipped_records": skipped}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return trainer


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`qwen-vl train ...`, `python -m recipes.train ...`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"{USAGE}\n\nStages: pretrain (stage 1), multitask (stage 2), sft (stage 3). "
            "`qwen-vl train <stage> --help` lists every flag."
        )
        return 0
    if not argv or argv[0] not in STAGES:
        sys.stderr.write(f"{USAGE}\nerror: the first argument must be a stage: {', '.join(STAGES)}\n")
        return 2
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
