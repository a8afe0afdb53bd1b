"""Images reach the right rows through `generate`: beams, `num_return_sequences`, mixed image counts, cached turns."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen_vl.hub_upload.convert_official import convert_official

IMPLEMENTATIONS = ["eager", "sdpa"]
NO_STOP = dict(eos_token_id=None, pad_token_id=0)


def span(config) -> list[int]:
    """One `<img>` + n_queries slot ids + `</img>` span, as the processor writes it."""
    start = config.image_start_id
    return [start] + [start + 2] * config.visual["n_queries"] + [start + 1]


def images(config, count: int, seed: int) -> torch.Tensor:
    size = config.visual["image_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def first_step_logits(model, batch, **generate_kwargs) -> torch.Tensor:
    """The raw logits `generate` computes at its first step, one row per beam or copy."""
    out = model.generate(
        **batch, max_new_tokens=2, output_logits=True, return_dict_in_generate=True, **NO_STOP, **generate_kwargs
    )
    return out.logits[0]


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "expansion",
    [dict(num_beams=3, do_sample=False), dict(num_return_sequences=2, do_sample=True)],
    ids=["beams", "copies"],
)
def test_every_beam_and_copy_sees_its_own_images(tiny_model_factory, tiny_inputs, attn_implementation, expansion):
    model = tiny_model_factory(attn_implementation=attn_implementation).eval()
    batch = tiny_inputs(model.config, lengths=[12, 9, 7], images_per_row=[0, 1, 2])
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
    copies = max(expansion.get("num_beams", 1), expansion.get("num_return_sequences", 1))
    got = first_step_logits(model, batch, **expansion)
    assert got.shape[0] == 3 * copies
    torch.testing.assert_close(got, expected.repeat_interleave(copies, dim=0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_text_only_row_beside_two_image_row_equals_rows_alone(tiny_model_factory, tiny_inputs, attn_implementation):
    model = tiny_model_factory(attn_implementation=attn_implementation).eval()
    batch = tiny_inputs(model.config, lengths=[40, 6], images_per_row=[0, 2])
    greedy = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, **NO_STOP)
    batched = model.generate(**batch, **greedy)
    prompt_length = batch["input_ids"].shape[1]
    row_pixels = [None, batch["pixel_values"]]
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep][None]
        alone = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=row_pixels[row], **greedy
        )
        assert batched.sequences[row, prompt_length:].tolist() == alone.sequences[0, ids.shape[1] :].tolist()
        torch.testing.assert_close(batched.logits[0][row], alone.logits[0][0], rtol=1e-4, atol=1e-4)


def two_turns(config, seed: int = 0):
    """Turn 1 with one image, turn 2 with two new images: (turn1 ids, turn2 ids, turn1 pixels, turn2 pixels)."""
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(config.image_start_id + 3, config.vocab_size, (n,), generator=generator).tolist()

    turn1 = text(3) + span(config) + text(5)
    turn2 = text(4) + span(config) + text(2) + span(config) + text(3)
    return torch.tensor([turn1]), torch.tensor([turn2]), images(config, 1, seed + 1), images(config, 2, seed + 2)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_new_images_with_a_filled_cache_equal_the_uncached_conversation(tiny_model_factory, attn_implementation):
    model = tiny_model_factory(attn_implementation=attn_implementation).eval()
    turn1, turn2, pixels1, pixels2 = two_turns(model.config)
    with torch.no_grad():
        cache = model(input_ids=turn1, pixel_values=pixels1, use_cache=True).cache
        continued = model(input_ids=turn2, pixel_values=pixels2, cache=cache).logits[0]
        full = model(input_ids=torch.cat([turn1, turn2], 1), pixel_values=torch.cat([pixels1, pixels2])).logits[0]
    torch.testing.assert_close(continued, full[turn1.shape[1] :], rtol=1e-4, atol=1e-4)


def test_images_that_do_not_match_the_new_spans_raise(tiny_model_factory):
    model = tiny_model_factory().eval()
    turn1, turn2, pixels1, pixels2 = two_turns(model.config)
    with torch.no_grad():
        cache = model(input_ids=turn1, pixel_values=pixels1, use_cache=True).cache
        past = cache.get_seq_length()
        with pytest.raises(ValueError, match=r"0 <img>.*1 images were given in pixel_values.*uncached"):
            model(input_ids=turn2[:, :3], pixel_values=pixels1, cache=cache)  # no span among the new ids
        assert cache.get_seq_length() == past  # refused before anything was written to the cache
        with pytest.raises(ValueError, match=r"2 <img>.*3 images were given in pixel_values"):
            model(input_ids=turn2, pixel_values=torch.cat([pixels1, pixels2]), cache=cache)  # old images again


def test_generate_continues_a_cached_conversation_with_new_images(tiny_model_factory):
    model = tiny_model_factory().eval()
    turn1, turn2, pixels1, pixels2 = two_turns(model.config)
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, **NO_STOP)
    first = model.generate(input_ids=turn1, attention_mask=torch.ones_like(turn1), pixel_values=pixels1, **greedy)
    conversation = torch.cat([first.sequences, turn2], 1)
    mask = torch.ones_like(conversation)
    cached = model.generate(
        input_ids=conversation, attention_mask=mask, pixel_values=pixels2, cache=first.cache, **greedy
    )
    uncached = model.generate(
        input_ids=conversation, attention_mask=mask, pixel_values=torch.cat([pixels1, pixels2]), **greedy
    )
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-4)


def test_beams_continue_a_cached_conversation_with_new_images(tiny_model_factory):
    """With a cache given, rows are matched to images by the spans of the new tokens only."""
    model = tiny_model_factory().eval()
    turn1, turn2, pixels1, pixels2 = two_turns(model.config)
    conversation = torch.cat([turn1, turn2], 1)
    with torch.no_grad():
        expected = model(input_ids=conversation, pixel_values=torch.cat([pixels1, pixels2])).logits[:, -1]
        cache = model(input_ids=turn1, pixel_values=pixels1, use_cache=True).cache
    cache.batch_repeat_interleave(3)  # one cached prefix per beam
    got = first_step_logits(
        model,
        dict(input_ids=conversation, attention_mask=torch.ones_like(conversation), pixel_values=pixels2),
        num_beams=3,
        cache=cache,
    )
    torch.testing.assert_close(got, expected.expand(3, -1), rtol=1e-4, atol=1e-4)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_qwen_vl"] = None  # the package is not importable: only the repo's own files exist
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    repo = sys.argv[1]
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    red, green, blue = (Image.new("RGB", (40, 30), color) for color in ((200, 30, 30), (30, 200, 30), (30, 30, 200)))
    texts = ["hello world", "Picture 1: <img></img>\\nhello", "Picture 1: <img></img>\\nPicture 2: <img></img>\\nworld"]
    batch = processor(text=texts, images=[[], [red], [green, blue]], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
    stop = dict(eos_token_id=None, pad_token_id=0, max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    result = {}
    for name, options, copies in (("beams", dict(num_beams=3), 3),
                                  ("copies", dict(num_return_sequences=2, do_sample=True), 2)):
        got = model.generate(**batch, **options, **stop).logits[0]
        result[name] = (got - expected.repeat_interleave(copies, 0)).abs().max().item()

    turn1 = processor(text="Picture 1: <img></img>\\nhello", images=[red], return_tensors="pt")
    first = model.generate(**turn1, do_sample=False, **stop)
    turn2 = processor(text="Picture 2: <img></img>\\nworld", images=[blue], return_tensors="pt")
    conversation = torch.cat([first.sequences, turn2["input_ids"]], 1)
    cached = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                            pixel_values=turn2["pixel_values"], past_key_values=first.cache,
                            do_sample=False, **stop)
    uncached = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                              pixel_values=torch.cat([turn1["pixel_values"], turn2["pixel_values"]]),
                              do_sample=False, **stop)
    result["cached_turn"] = (cached.logits[0] - uncached.logits[0]).abs().max().item()
    result["same_tokens"] = cached.sequences.tolist() == uncached.sequences.tolist()
    print(json.dumps(result))
    """
)


def test_fresh_process_generate_hands_each_beam_and_turn_its_images(tmp_path, official_checkpoint):
    official = official_checkpoint(tmp_path / "official")
    repo = convert_official(official, tmp_path / "repo", repo_id="me/tiny-qwen-vl-chat")
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(repo)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["beams"] < 1e-4 and result["copies"] < 1e-4, result
    assert result["cached_turn"] < 1e-4 and result["same_tokens"], result
