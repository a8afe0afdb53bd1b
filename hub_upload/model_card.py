"""Render `MODEL_CARD.md` into a Hub repo's `README.md`, with the Hub metadata block in front.

The template is package data of `qwen_vl.hub_upload` (in the repository, `hub_upload/MODEL_CARD.md` links to the
top-level `MODEL_CARD.md`), read through `importlib.resources` so that an installed wheel finds it.
"""

from importlib.resources import files
from string import Template

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = files(__package__) / "MODEL_CARD.md"

DEFAULT_SUMMARY = (
    "A Qwen-VL vision-language model: images and text in, text with grounded boxes out, in the official Qwen-VL "
    "checkpoint format."
)
DEFAULT_EVALUATION = (
    "This implementation reproduces the official Qwen-VL implementation's outputs, measured by this project on "
    "official-format reference checkpoints in float32: image features and logits within 1e-4 relative error, training "
    "loss within 1e-5, gradient norm within 1e-4 relative, identical greedy decoding (eager and sdpa attention). "
    "Task scores of the released Qwen-VL models are in the paper; this project has not re-measured them."
)


def render_model_card(
    repo_id: str,
    *,
    model_name: str | None = None,
    summary: str = DEFAULT_SUMMARY,
    evaluation: str = DEFAULT_EVALUATION,
    base_model: str | None = None,
    license: str = "other",
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card for `repo_id`: metadata (license, `pipeline_tag: image-text-to-text`, `library_name`, base
    model, tags) plus the body of `MODEL_CARD.md` with its `${...}` fields filled in."""
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        tags=["qwen-vl", "vision-language", "grounding", "custom_code", *(tags or [])],
    )
    body = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        model_name=model_name or repo_id.split("/")[-1], summary=summary, evaluation=evaluation, repo_id=repo_id
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
