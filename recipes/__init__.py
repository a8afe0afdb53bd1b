"""Training recipes for Qwen-VL's three stages (pre-training, multi-task pre-training, SFT) on transformers' Trainer.

`qwen-vl train pretrain|multitask|sft --config recipes/configs/<stage>.yaml`; see recipes/README.md.
"""
