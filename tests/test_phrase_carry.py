"""The phrase-carry objective (`recipes.phrase_carry`): which positions carry which phrase, the loss, and the recipe
option that adds it to the training loss."""

import json

import pytest
import torch

from qwen_vl.recipes.phrase_carry import GroundingTags, phrase_carry_loss, phrase_spans

TAGS = GroundingTags(ref_start=90, ref_end=91, box_start=92, box_end=93)
R, r, B, b = 90, 91, 92, 93


@pytest.mark.parametrize(
    ("ids", "spans"),
    [
        ([1, R, 5, 6, r, B, 7, 8, b, 2], [(2, 4, 8)]),  # one box: positions 4 (`</ref>`) .. 8 (`</box>`)
        ([R, 5, r, B, 7, b, B, 8, b, 3], [(1, 2, 8)]),  # two boxes of one ref: through the second `</box>`
        ([R, 5, r, B, 7, b, 4, R, 6, 6, r, B, 8, b], [(1, 2, 5), (8, 10, 13)]),  # two refs
        ([R, 5, r, 4, B, 7, b], []),  # text between the ref and the box: the box is not the ref's
        ([B, 7, b, R, 5, r], []),  # a box without a ref, a ref without a box
        ([R, 5, r, B, 7, 8], []),  # an unclosed box
        ([R, 5, R, 6, r, B, 7, b], [(3, 4, 7)]),  # an unclosed ref: the inner one counts
        ([R, r, B, 7, b], []),  # an empty phrase
    ],
)
def test_phrase_spans(ids, spans):
    assert phrase_spans(ids, TAGS) == spans


def test_loss_is_zero_when_the_first_block_adds_the_phrase_and_positive_otherwise():
    torch.manual_seed(0)
    embeddings = torch.randn(100, 8)
    ids = torch.tensor([[1, R, 5, 6, r, B, 7, b, 2], [3, 3, 3, 3, 3, 3, 3, 3, 3]])
    inputs = torch.randn(2, 9, 8)
    added = torch.zeros(2, 9, 8)
    added[0, 4:8] = embeddings[5] + embeddings[6]
    exact = (inputs, inputs + added, torch.randn(2, 9, 8))
    assert phrase_carry_loss(exact, ids, embeddings, TAGS, layer=1).item() == pytest.approx(0.0, abs=1e-6)
    # only the carrying positions count: elsewhere the first block may add anything
    noisy_elsewhere = (inputs, inputs + added + torch.randn(2, 9, 8) * (torch.arange(9) < 4).view(1, 9, 1), None)
    assert phrase_carry_loss(noisy_elsewhere, ids, embeddings, TAGS, layer=1).item() == pytest.approx(0.0, abs=1e-6)
    # nothing added: the loss is the targets' mean square over itself
    assert phrase_carry_loss((inputs, inputs), ids, embeddings, TAGS, layer=1).item() == pytest.approx(1.0)
    # layer 2 is compared instead when asked
    assert phrase_carry_loss(exact, ids, embeddings, TAGS, layer=2).item() > 0.1


def test_loss_trains_the_hidden_states_not_the_embeddings():
    embeddings = torch.randn(100, 8, requires_grad=True)
    hidden = (torch.randn(1, 5, 8), torch.randn(1, 5, 8, requires_grad=True))
    phrase_carry_loss(hidden, torch.tensor([[R, 5, r, B, b]]), embeddings, TAGS).backward()
    assert embeddings.grad is None and hidden[1].grad[0, 2:].abs().sum() > 0 and hidden[1].grad[0, :2].eq(0).all()


def test_no_phrase_gives_none_and_a_wrong_layer_a_value_error():
    hidden = (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
    assert phrase_carry_loss(hidden, torch.tensor([[1, 2, 3]]), torch.zeros(10, 4), TAGS) is None
    with pytest.raises(ValueError, match="phrase_carry_layer must be between 1 and 1"):
        phrase_carry_loss(hidden, torch.tensor([[1, 2, 3]]), torch.zeros(10, 4), TAGS, layer=2)


def test_grounding_tags_come_from_the_tokenizer(tiny_processor):
    tags = GroundingTags.from_tokenizer(tiny_processor.tokenizer)
    ids = tiny_processor.tokenizer("<ref>hello</ref><box>(1,2),(3,4)</box>")["input_ids"]
    assert ids[0] == tags.ref_start and ids[-1] == tags.box_end and len(phrase_spans(ids, tags)) == 1


def test_phrase_carry_weight_adds_the_objective_to_the_training_loss(train_recipe, workspace):
    """`--phrase_carry_weight 0.5`: the objective is logged, and the training loss is the language-modelling loss
    plus half of it, computed from the same batch."""
    model, data, tmp_path = workspace
    trainer = train_recipe(
        "multitask", model, data["multitask"], tmp_path / "out", "--max_steps", "2", "--phrase_carry_weight", "0.5"
    )
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["phrase_carry_loss"] > 0 for entry in logged)

    records = [json.loads(line) for line in data["multitask"].read_text().splitlines()]
    batch = trainer.data_collator(records)
    assert any(phrase_spans(row.tolist(), trainer._grounding_tags) for row in batch["input_ids"])
    model = trainer.model.train()
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch))
        outputs = model(**batch, output_hidden_states=True)
        carry = phrase_carry_loss(
            outputs.hidden_states, batch["input_ids"], model.get_input_embeddings().weight, trainer._grounding_tags
        )
    assert total.item() == pytest.approx(outputs.loss.item() + 0.5 * carry.item(), rel=1e-5)


def test_phrase_carry_weight_must_not_be_negative(train_recipe, workspace):
    model, data, tmp_path = workspace
    with pytest.raises(ValueError, match="phrase_carry_weight must be >= 0"):
        train_recipe("multitask", model, data["multitask"], tmp_path / "out", "--phrase_carry_weight", "-1")
