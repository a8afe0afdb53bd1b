"""The text formats of Qwen-VL's pre-training tasks (paper §3.2 and its data-format table), in one place.

Each task maps to `(prompt, completion)` templates filled with `str.format` from the record's fields. The prompt is
never trained; the completion, followed by `EOS`, is. `<img></img>` marks the record's image (the processor fills the
span with `<imgpad>`, which the model overwrites with image features). `{box}` is written from the record's
`box` ([x1, y1, x2, y2] on the 0-1000 grid) as `<box>(x1,y1),(x2,y2)</box>`.

Stage 1 (pre-training) uses the `caption` format; stage 2 (multi-task pre-training) uses all seven; stage 3 (SFT)
uses the ChatML template of the tokenizer instead.
"""

from modeling_qwen_vl.text_format import ENDOFTEXT

EOS = ENDOFTEXT  # ends every completion, as in the official pre-training data

TASK_FORMATS: dict[str, tuple[str, str]] = {
    # image captioning: {"image", "caption"}
    "caption": ("<img></img>Generate the caption in English:", " {caption}"),
    # visual question answering (OCR-VQA included): {"image", "question", "answer"}
    "vqa": ("<img></img>{question} Answer:", " {answer}"),
    # captioning with grounding: {"image", "caption"} with `<ref>phrase</ref><box>...</box>` markup in the caption
    "grounding": ("<img></img>Generate the caption in English with grounding:", " {caption}"),
    # referring expression comprehension: {"image", "phrase", "box"}
    "ref": ("<img></img><ref>{phrase}</ref>", "{box}"),
    # grounded captioning (describe a region): {"image", "box", "phrase"}
    "grounded_caption": ("<img></img><ref>This</ref>{box}", " is {phrase}"),
    # OCR / text reading: {"image", "text"}
    "ocr": ("<img></img>OCR:", " {text}"),
    # pure-text autoregression: {"text"}
    "text": ("", "{text}"),
}
