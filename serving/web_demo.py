"""
`qwen-vl web MODEL`: a Gradio chat app like the official Qwen-VL web demo.

Upload one or more images, ask about them over several turns; answers stream in token by token
(transformers' `TextIteratorStreamer`), and a grounding answer (`<ref>...</ref><box>...</box>`) is followed by the
most recent image with its boxes drawn (`draw_grounding`). "Regenerate" answers the last question again, "Clear
history" starts over. The model sees the conversation through the processor's ChatML chat template.
"""

import argparse
import html
import tempfile
import threading
from pathlib import Path

import torch
from transformers import TextIteratorStreamer

from modeling_qwen_vl import draw_grounding, parse_grounding
from modeling_qwen_vl.image_processing_qwen_vl import load_image
from modeling_qwen_vl.text_format import CHAT_STOP_TOKENS

from .loading import load_model, model_parser, reply_end_ids


def _visible(text: str) -> str:
    """Generated text without ChatML control tokens; grounding tags stay (escaped, so Markdown shows them)."""
    for token in CHAT_STOP_TOKENS:
        text = text.split(token)[0]
    return text.strip()


class ChatSession:
    """
    The model side of the demo: turns `[{"images": [path, ...], "query": str, "response": str, "drawn": path}]` to
    ChatML, streamed answers, and the drawn grounding image of an answer. One generation at a time (a lock).
    """

    def __init__(self, model, processor, max_new_tokens: int = 512):
        self.model, self.processor = model, processor
        self.end_ids = reply_end_ids(model, processor.tokenizer)
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.drawn_dir = Path(tempfile.mkdtemp(prefix="qwen-vl-web-"))

    def _inputs(self, turns: list[dict]):
        messages = []
        for turn in turns:
            content = [{"type": "image", "image": load_image(path)} for path in turn["images"]]
            content.append({"type": "text", "text": turn["query"]})
            messages.append({"role": "user", "content": content})
            if turn.get("response") is not None:
                messages.append({"role": "assistant", "content": turn["response"]})
        # Tokenized by the template: control tokens typed in a question stay text, and an `<img>path</img>` typed in
        # one is refused, never opened (images come only from the image items).
        return self.processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)

    def stream(self, turns: list[dict]):
        """Yield the growing answer to the last turn's query (whose `response` is None)."""
        inputs = self._inputs(turns)
        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, timeout=300, skip_special_tokens=False
        )
        kwargs = dict(
            **inputs, streamer=streamer, max_new_tokens=self.max_new_tokens, eos_token_id=self.end_ids,
            pad_token_id=self.processor.tokenizer.eod_id,
        )
        failure = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except Exception as error:  # surfaced after the stream ends
                failure.append(error)
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            text = ""
            for piece in streamer:
                text += piece
                yield _visible(text)
            worker.join()
        if failure:
            raise failure[0]

    def draw(self, turns: list[dict], answer: str) -> str | None:
        """Path of the most recent image with the boxes of `answer` drawn, or None when there is no box or image."""
        paths = [path for turn in turns for path in turn["images"]]
        if not paths or not parse_grounding(answer):
            return None
        drawn = draw_grounding(load_image(paths[-1]), answer)
        path = Path(tempfile.mkstemp(suffix=".png", dir=self.drawn_dir)[1])
        drawn.save(path)
        return str(path)


def render(turns: list[dict], pending: list[str]) -> list[dict]:
    """The chat as Gradio messages: images, question, answer (tags shown as written), drawn grounding image."""
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": {"path": path}} for path in turn["images"]]
        messages.append({"role": "user", "content": html.escape(turn["query"])})
        if turn.get("response"):
            messages.append({"role": "assistant", "content": html.escape(turn["response"])})
        if turn.get("drawn"):
            messages.append({"role": "assistant", "content": {"path": turn["drawn"], "alt_text": "grounding"}})
    messages += [{"role": "user", "content": {"path": path}} for path in pending]
    return messages


def build_demo(model, processor, max_new_tokens: int = 512):
    """The Gradio Blocks app for `model`; `.launch()` it."""
    import gradio as gr

    session = ChatSession(model, processor, max_new_tokens)

    def upload(files, turns, pending):
        pending = pending + [getattr(file, "name", file) for file in files or []]
        return render(turns, pending), pending

    def answer(turns):
        turn = turns[-1]
        for text in session.stream(turns):
            turn["response"] = text
            yield render(turns, []), turns
        turn["drawn"] = session.draw(turns, turn["response"] or "")
        yield render(turns, []), turns

    def submit(query, turns, pending):
        if not query.strip():
            raise gr.Error("Type a question first.")
        turns = turns + [{"images": pending, "query": query, "response": None, "drawn": None}]
        yield render(turns, []), turns, [], ""
        for chat, turns in answer(turns):
            yield chat, turns, [], ""

    def regenerate(turns, pending):
        if not turns:
            raise gr.Error("Nothing to regenerate yet.")
        turns = turns[:-1] + [{**turns[-1], "response": None, "drawn": None}]
        for chat, turns in answer(turns):
            yield chat + render([], pending), turns

    with gr.Blocks(title="Qwen-VL") as demo:
        gr.Markdown("## Qwen-VL\nUpload images, ask about them; grounding answers are drawn on the latest image.")
        chatbot = gr.Chatbot(label="Qwen-VL", elem_id="chatbot", height=520)
        turns, pending = gr.State([]), gr.State([])
        query = gr.Textbox(lines=2, label="Input", placeholder="Ask about the images...", elem_id="query")
        with gr.Row():
            upload_button = gr.UploadButton(
                "Upload images", file_count="multiple", file_types=["image"], elem_id="upload"
            )
            submit_button = gr.Button("Submit", variant="primary", elem_id="submit")
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear history", elem_id="clear")
        # Events that change the conversation run one at a time, in order; clearing also stops a running answer.
        serial = {"concurrency_id": "conversation", "concurrency_limit": 1}
        upload_button.upload(upload, [upload_button, turns, pending], [chatbot, pending], **serial)
        asked = [
            submit_button.click(submit, [query, turns, pending], [chatbot, turns, pending, query], **serial),
            query.submit(submit, [query, turns, pending], [chatbot, turns, pending, query], **serial),
            regenerate_button.click(regenerate, [turns, pending], [chatbot, turns], **serial),
        ]
        clear_button.click(lambda: ([], [], []), None, [chatbot, turns, pending], cancels=asked, **serial)
    demo.drawn_dir = session.drawn_dir
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = model_parser("qwen-vl web", __doc__.split("\n\n")[0].strip(), port=7860)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, processor = load_model(args.model, args.dtype, args.device)
    demo = build_demo(model, processor, args.max_new_tokens)
    demo.queue().launch(
        server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(demo.drawn_dir)]
    )
    return 0
