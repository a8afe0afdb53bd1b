"""The model against the official implementation's real outputs (fixtures A and B), plus invariants on tiny configs."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

IMPLEMENTATIONS = ["eager", "sdpa"]
FIXTURES = ["fixture_a", "fixture_b", "fixture_e"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request, fixtures_dir):
    path = fixtures_dir / request.param
    return path, load_file(path / "golden.safetensors"), json.loads((path / "golden.json").read_text())


def load(path, attn_implementation):
    model, info = QwenVLForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, output_loading_info=True
    )
    return model, info


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_fixture_eval_outputs(fixture, attn_implementation):
    path, golden, _ = fixture
    model, info = load(path, attn_implementation)
    assert not any(info.values()), f"loading reported {info}"
    model.eval()
    with torch.no_grad():
        features = model.get_image_features(golden["pixel_values"])
        out = model(
            input_ids=golden["input_ids"], attention_mask=golden["attention_mask"], pixel_values=golden["pixel_values"]
        )
    assert features.shape == golden["image_features"].shape
    assert rel_err(features, golden["image_features"]) <= 1e-4
    # Every position, padding included: left-padded batches use the official mask arithmetic.
    assert rel_err(out.logits, golden["logits"]) <= 1e-4


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_fixture_loss_and_gradient_norm(fixture, attn_implementation):
    path, golden, meta = fixture
    model, _ = load(path, attn_implementation)
    model.train()
    out = model(
        input_ids=golden["input_ids"],
        attention_mask=golden["attention_mask"],
        pixel_values=golden["pixel_values"],
        labels=golden["labels"],
    )
    out.loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert abs(out.loss.item() - meta["loss"]) <= 1e-5
    assert abs(grad_norm.item() - meta["grad_norm"]) / meta["grad_norm"] <= 1e-4
    assert model.transformer.visual.attn_pool.pos_embed.grad is None  # fixed table, never trained


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_fixture_greedy_generation(fixture, attn_implementation):
    path, golden, meta = fixture
    model, _ = load(path, attn_implementation)
    model.eval()
    row = meta["generate"]["prompt_row"]
    keep = golden["attention_mask"][row].bool()
    input_ids = golden["input_ids"][row][keep][None]
    first_image = int((golden["input_ids"][:row] == model.config.image_start_id).sum())
    num_images = int((input_ids == model.config.image_start_id).sum())
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=golden["pixel_values"][first_image : first_image + num_images],
        max_new_tokens=len(meta["generate"]["new_tokens"]),
        do_sample=False,
        eos_token_id=None,
        pad_token_id=meta["pad_id"],
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences[0, input_ids.shape[1] :].tolist() == meta["generate"]["new_tokens"]
    assert rel_err(torch.stack(out.scores)[:, 0], golden["generate_scores"]) <= 1e-4


@pytest.mark.parametrize("name", FIXTURES)
def test_save_load_round_trip_is_bit_identical(fixtures_dir, tmp_path, name):
    """What we save has exactly the official key set (fixture E: no `kv_proj.weight`) and the same tensors."""
    source = fixtures_dir / name
    model, _ = load(source, "eager")
    model.save_pretrained(tmp_path)
    with (
        safe_open(source / "model.safetensors", "pt") as official,
        safe_open(tmp_path / "model.safetensors", "pt") as ours,
    ):
        assert set(official.keys()) == set(ours.keys())
        for name in official.keys():
            assert torch.equal(official.get_tensor(name), ours.get_tensor(name)), name
    reloaded, info = QwenVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    saved = json.loads((tmp_path / "config.json").read_text())
    official_config = json.loads((source / "config.json").read_text())
    assert (
        saved["model_type"] == "qwen"
        and saved["visual"]["image_start_id"] == official_config["visual"]["image_start_id"]
    )


def test_fresh_adapter_table_equals_official(fixtures_dir):
    """The sin-cos table a fresh model builds is the one stored in official checkpoints."""
    config = QwenVLConfig.from_pretrained(fixtures_dir / "fixture_a")
    official = load_file(fixtures_dir / "fixture_a" / "model.safetensors")["transformer.visual.attn_pool.pos_embed"]
    fresh = QwenVLForConditionalGeneration(config).transformer.visual.attn_pool.pos_embed
    torch.testing.assert_close(fresh, official, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_left_padded_batch_matches_rows_alone(tiny_model_factory, tiny_inputs, attn_implementation):
    model = tiny_model_factory(attn_implementation=attn_implementation).eval()
    batch = tiny_inputs(model.config, lengths=[30, 21], images_per_row=[1, 1])
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            keep = mask.bool()
            alone = model(input_ids=ids[keep][None], pixel_values=batch["pixel_values"][row : row + 1]).logits[0]
            torch.testing.assert_close(logits[row][keep], alone, rtol=1e-4, atol=1e-4)


def test_batched_generation_matches_single(tiny_model_factory, tiny_inputs):
    model = tiny_model_factory().eval()
    batch = tiny_inputs(model.config, lengths=[30, 21], images_per_row=[1, 1])
    common = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(**batch, **common)[:, batch["input_ids"].shape[1] :]
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep][None]
        single = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=batch["pixel_values"][row : row + 1],
            **common,
        )
        assert batched[row].tolist() == single[0, ids.shape[1] :].tolist()


def test_past_key_values_keyword_is_accepted(tiny_model_factory, tiny_inputs):
    model = tiny_model_factory().eval()
    batch = tiny_inputs(model.config, lengths=[20], images_per_row=[0])
    with torch.no_grad():
        first = model(input_ids=batch["input_ids"][:, :-1], use_cache=True)
        step = model(input_ids=batch["input_ids"][:, -1:], past_key_values=first.cache)
        full = model(input_ids=batch["input_ids"])
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_model_factory, tiny_inputs):
    batch = tiny_inputs(tiny_model_factory().config, lengths=[24, 24], images_per_row=[1, 0])
    batch["labels"] = batch["input_ids"].clone()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model_factory().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_image_count_mismatch_names_both_counts(tiny_model_factory, tiny_inputs):
    model = tiny_model_factory().eval()
    batch = tiny_inputs(model.config, lengths=[30], images_per_row=[1])
    two_images = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"1 <img>.*2 images"):
        model(input_ids=batch["input_ids"], pixel_values=two_images)
    with pytest.raises(ValueError, match=r"1 <img>.*0 images"):
        model(input_ids=batch["input_ids"])


def test_dynamic_ntk_alpha_is_kept_from_prefill(tiny_model_factory):
    """Decoding past a power-of-two boundary keeps the prefill's alpha instead of recomputing it, as the official model
    does (its rotary embedding reuses the alpha cached at the last prefill)."""
    model = tiny_model_factory(seq_length=8, use_logn_attn=False).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :8], use_cache=True)  # 8 positions -> alpha 1
        step = model(input_ids=ids[:, 8:], cache=prefill.cache)
        rescaled = model(input_ids=ids)  # 9 positions without a cache -> alpha 3
        unscaled = model.train()(input_ids=ids)  # training never rescales: alpha 1
    assert model.transformer.context_scaling.prefill_alpha(prefill.cache) == 1
    torch.testing.assert_close(step.logits[:, -1], unscaled.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(step.logits[:, -1], rescaled.logits[:, -1], atol=1e-3)


def test_hidden_states_and_attentions_are_recorded(tiny_model_factory, tiny_inputs):
    """transformers' output capturing: layers + 1 hidden states (the last one after the final norm) and, with eager
    attention, one [batch, heads, len, len] attention map per layer whose rows sum to 1; tuples on request."""
    model = tiny_model_factory(attn_implementation="eager").eval()
    batch = tiny_inputs(model.config, lengths=[6, 9], images_per_row=[1, 0])
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        plain = model(**batch)
        as_tuple = model(**batch, return_dict=False)
    layers, length = model.config.num_hidden_layers, batch["input_ids"].shape[1]
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    embeddings = model.transformer.wte(batch["input_ids"])
    image_slots = model.transformer.get_image_mask(batch["input_ids"])
    torch.testing.assert_close(out.hidden_states[0][~image_slots], embeddings[~image_slots])
    with torch.no_grad():
        torch.testing.assert_close(out.hidden_states[-1], model.transformer(**batch).last_hidden_state)
    assert out.attentions[0].shape == (2, model.config.num_attention_heads, length, length)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, model.config.num_attention_heads, length))
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(out.logits, plain.logits)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)


def test_logits_to_keep_slices_before_the_head(tiny_model_factory, tiny_inputs):
    model = tiny_model_factory().eval()
    batch = tiny_inputs(model.config, lengths=[7], images_per_row=[0])
    with torch.no_grad():
        full, last = model(**batch).logits, model(**batch, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_modeling_file_leaves_the_processing_stack_to_chat():
    """The model's module imports no processor or image processor at import time (`chat()` imports it lazily)."""
    import ast
    import inspect

    import modeling_qwen_vl.modeling_qwen_vl as modeling

    top_level = [node for node in ast.parse(inspect.getsource(modeling)).body if isinstance(node, ast.ImportFrom)]
    assert not [node.module for node in top_level if node.module and "processing" in node.module]


def test_a_copied_cache_keeps_decoding_with_the_prefill_alpha(tiny_model_factory):
    """`copy.deepcopy` of a prefilled cache (prompt reuse) decodes like the original: same alpha, same logits."""
    import copy

    model = tiny_model_factory(seq_length=8, use_logn_attn=False).eval()
    ids = torch.randint(0, 300, (1, 11))
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :10], use_cache=True)  # 10 positions -> alpha 3
        copied = copy.deepcopy(prefill.cache)
        step = model(input_ids=ids[:, 10:], cache=prefill.cache)
        step_on_copy = model(input_ids=ids[:, 10:], cache=copied)
    scaling = model.transformer.context_scaling
    assert scaling.prefill_alpha(prefill.cache) == scaling.prefill_alpha(copied) == 3
    torch.testing.assert_close(step_on_copy.logits, step.logits, rtol=0, atol=0)
