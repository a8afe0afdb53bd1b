"""Qwen-VL for the Hugging Face ecosystem.

Importing the package registers the classes with transformers' Auto classes (`model_type: "qwen"`), so local
directories load without `trust_remote_code`; Hub repositories carry the same files as remote code.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_qwen_vl import QwenVLConfig
from .grounding_qwen_vl import box_to_text, draw_grounding, format_grounding, parse_grounding
from .image_processing_qwen_vl import QwenVLImageProcessor
from .modeling_qwen_vl import QwenVLForConditionalGeneration, QwenVLModel, QwenVLPreTrainedModel
from .processing_qwen_vl import QwenVLProcessor
from .tokenization_qwen_vl import QwenVLTokenizer

AutoConfig.register("qwen", QwenVLConfig)
AutoModel.register(QwenVLConfig, QwenVLModel)
AutoModelForCausalLM.register(QwenVLConfig, QwenVLForConditionalGeneration)
AutoModelForImageTextToText.register(QwenVLConfig, QwenVLForConditionalGeneration)
AutoImageProcessor.register(QwenVLConfig, slow_image_processor_class=QwenVLImageProcessor)
AutoTokenizer.register(QwenVLConfig, tokenizer_class=QwenVLTokenizer)
AutoProcessor.register(QwenVLConfig, QwenVLProcessor)

__all__ = [
    "QwenVLConfig",
    "QwenVLForConditionalGeneration",
    "QwenVLImageProcessor",
    "QwenVLModel",
    "QwenVLPreTrainedModel",
    "QwenVLProcessor",
    "QwenVLTokenizer",
    "box_to_text",
    "draw_grounding",
    "format_grounding",
    "parse_grounding",
]
