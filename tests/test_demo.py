"""`qwen-vl demo --fast`: the whole pipeline at toy size, its artifacts, and a grounding answer from its checkpoint.

The run itself is the `demo_out` fixture (conftest.py): the installed wheel's `qwen-vl demo --fast`."""

import base64
import json

import torch

from qwen_vl.demo.run import STAGE0, STAGES
from qwen_vl.demo.world import load_scenes


def test_artifacts(demo_out):
    for name in ("metrics.json", "loss_curves.png", "grounding.png", "checkpoint/config.json",
                 "checkpoint/model.safetensors", "checkpoint/qwen.tiktoken", "checkpoint/processor_config.json",
                 "checkpoint/README.md", "configs/shapes-clip.json", "data/clip_train.csv",
                 "stages/stage0_vision/open_clip_model.safetensors", "stages/stage0_lm/model.safetensors",
                 *(f"eval/{task}_{kind}" for task in ("grounding", "counting", "caption")
                   for kind in ("metrics.json", "predictions.jsonl"))):
        assert (demo_out / name).is_file(), name
    for stage in STAGES:
        assert (demo_out / "configs" / f"{stage}.yaml").is_file()
    metrics = json.loads((demo_out / "metrics.json").read_text())
    for name in ("grounding_accuracy", "counting_accuracy", "caption_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
    assert set(metrics["timings_s"]) >= {"data", "tokenizer", *STAGE0, *STAGES, "evaluate", "total"}
    assert metrics["grounding_queries"] == sum(len(s.shapes) for s in load_scenes(demo_out / "data" / "heldout.json"))
    card = (demo_out / "checkpoint" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and f"| counting | {metrics['counting_accuracy']:.3f} |" in card


def test_loss_fell_in_every_stage(demo_out):
    for stage in (*STAGE0, *STAGES):
        history = json.loads((demo_out / "stages" / stage / "trainer_state.json").read_text())["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert len(losses) >= 3, stage
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"{stage}: {losses}"


def test_vocabulary_is_in_the_official_format(demo_out):
    lines = (demo_out / "checkpoint" / "qwen.tiktoken").read_bytes().splitlines()
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert all(len(token) > 1 for token in tokens[256:]) and len(set(tokens)) == len(tokens)


def test_checkpoint_loads_in_pipeline(demo_out):
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(demo_out / "checkpoint"))
    scene = load_scenes(demo_out / "data" / "heldout.json")[0]
    with Image.open(demo_out / "data" / scene.image) as image:
        messages = [{"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                                 {"type": "text", "text": "How many shapes are there?"}]}]
        output = pipe(text=messages, max_new_tokens=4)
    assert output[0]["generated_text"][-1]["role"] == "assistant"


def test_cli_lists_demo():
    from qwen_vl import cli

    assert cli.SUBCOMMANDS["demo"] == "qwen_vl.demo.run:main"
    assert cli.SUBCOMMANDS["eval"] == "qwen_vl.recipes.evaluate:main"


def test_stage0_checkpoints_are_what_users_convert(demo_out):
    """The LM checkpoint has no vision weights (Qwen-7B layout) and the stage-1 init carries the OpenCLIP tower."""
    import open_clip
    from safetensors.torch import load_file

    from qwen_vl.hub_upload.convert_openclip import vision_state_dict_from_open_clip

    lm = load_file(demo_out / "stages" / "stage0_lm" / "model.safetensors")
    assert "transformer.wte.weight" in lm and not any(k.startswith("transformer.visual.") for k in lm)
    clip = load_file(demo_out / "stages" / "stage0_vision" / "open_clip_model.safetensors")
    config = json.loads((demo_out / "configs" / "shapes-clip.json").read_text())
    visual = open_clip.model._build_vision_tower(config["embed_dim"], config["vision_cfg"])
    visual.load_state_dict({k.removeprefix("visual."): v for k, v in clip.items() if k.startswith("visual.")})
    width = config["vision_cfg"]["width"]
    expected = vision_state_dict_from_open_clip(visual, width, width // config["vision_cfg"]["head_width"])
    init = load_file(demo_out / "stages" / "init" / "model.safetensors")
    for name in ("transformer.visual.conv1.weight", "transformer.visual.transformer.resblocks.0.attn.in_proj.weight"):
        assert torch.equal(init[name], expected[name]), name


def test_checkpoint_answers_a_grounding_prompt_with_a_box(demo_out):
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    from modeling_qwen_vl import parse_grounding
    from qwen_vl.demo.world import grounding_prompt

    model = AutoModelForCausalLM.from_pretrained(demo_out / "checkpoint")
    processor = AutoProcessor.from_pretrained(demo_out / "checkpoint")
    scene = load_scenes(demo_out / "data" / "heldout.json")[0]
    phrase = f"the {scene.shapes[0].name}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": grounding_prompt(phrase)}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with Image.open(demo_out / "data" / scene.image) as image:
        inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    reply = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    boxes = parse_grounding(reply)
    assert boxes, reply
    assert len(boxes[0]["box"]) == 4 and all(0 <= v < 1000 for v in boxes[0]["box"]), boxes
