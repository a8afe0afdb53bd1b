"""Serving Qwen-VL on one machine: an OpenAI-compatible HTTP server (`qwen-vl serve`) and a Gradio web demo
(`qwen-vl web`). Both load a saved repo through the package's public API (`from modeling_qwen_vl import ...`)."""

from .loading import load_model

__all__ = ["load_model"]
