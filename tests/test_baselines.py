"""The baselines random_balanced, longest and rds: hand-computed picks, seeds, RDS+'s pooling and
round robin, its embedding cache, and their configs."""

import inspect
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from delift.errors import DeliftInputError
from delift.generation import weighted_mean_pooled_states
from delift.models import LoadedModel
from delift.records import make_record
from delift.selectors import SELECTORS, SelectionContext, rds
from delift.data.stages import proportional_quotas
from delift.selectors.baselines import LongestSelector, RandomBalancedSelector
from delift.selectors.rds import RDSSelector, round_robin_select
from delift.training import encode_example
from tests.helpers import compose_config, isolated_cache


def sourced_pool(sources: list[str]) -> list[dict]:
    return [make_record(f"r{i}", "Say something.", "", f"answer {i}", source=s) for i, s in enumerate(sources)]


def picked_sources(pool, indices) -> Counter:
    return Counter(pool[i]["source"] for i in indices)


# random_balanced

def test_random_balanced_keeps_each_sources_share_and_follows_the_seed():
    pool = sourced_pool(["a", "b", "a", "c"] * 5)  # 10 a, 5 b, 5 c, interleaved
    selector = RandomBalancedSelector(fraction=0.4)  # budget 8 -> 4 / 2 / 2
    first = selector.select(SelectionContext(stage="instruction", pool=pool, seed=3))
    assert picked_sources(pool, first.indices) == {"a": 4, "b": 2, "c": 2}
    assert len(set(first.indices)) == 8
    assert first.info["per_source"] == {"a": 4, "b": 2, "c": 2}
    again = selector.select(SelectionContext(stage="instruction", pool=pool, seed=3))
    other = selector.select(SelectionContext(stage="instruction", pool=pool, seed=4))
    assert again.indices == first.indices
    assert other.indices != first.indices
    assert picked_sources(pool, other.indices) == {"a": 4, "b": 2, "c": 2}


def test_largest_remainder_gets_the_units_left():
    # 7 / 2 / 1 of 10, budget 3: exact shares 2.1, 0.6, 0.3 -> floors 2, 0, 0, the unit left to b (0.6).
    assert proportional_quotas({"a": 7, "b": 2, "c": 1}, 3) == {"a": 2, "b": 1, "c": 0}
    pool = sourced_pool(["a"] * 7 + ["b"] * 2 + ["c"])
    selection = RandomBalancedSelector(fraction=0.3).select(SelectionContext(stage="instruction", pool=pool))
    assert picked_sources(pool, selection.indices) == {"a": 2, "b": 1}
    # 6 / 3 / 1, budget 5: shares 3, 1.5, 0.5 -> b and c tie at .5; the source seen first wins.
    assert proportional_quotas({"a": 6, "b": 3, "c": 1}, 5) == {"a": 3, "b": 2, "c": 0}
    assert proportional_quotas({"c": 1, "b": 3, "a": 6}, 5) == {"c": 1, "b": 1, "a": 3}


def test_adding_a_source_leaves_the_others_draws_alone():
    base = sourced_pool(["a"] * 10 + ["b"] * 10)
    grown = base + [make_record(f"c{i}", "Say something.", "", "c", source="c") for i in range(10)]
    before = RandomBalancedSelector(fraction=0.5).select(SelectionContext(stage="instruction", pool=base, seed=7))
    # budget 10 of 30: 10/3 each -> 3 / 3 / 3, the unit left to a (seen first) -> 4 / 3 / 3
    after = RandomBalancedSelector(fraction=1 / 3).select(SelectionContext(stage="instruction", pool=grown, seed=7))
    assert picked_sources(grown, after.indices) == {"a": 4, "b": 3, "c": 3}
    # Smaller quotas of the same sources are prefixes of the same per-source draws.
    assert {i for i in after.indices if i < 20} < set(before.indices)


# longest

class WordTokenizer:
    """One token per whitespace-separated word, so lengths can be counted by eye."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[0] * len(text.split()) for text in texts]}


def stub_context(pool: list[dict]) -> SelectionContext:
    stub = LoadedModel(model=torch.nn.Linear(1, 1), tokenizer=WordTokenizer(), name="stub", identity={})
    return SelectionContext(stage="instruction", pool=pool, loader=lambda: stub, device="cpu")


def test_longest_picks_the_longest_responses_ties_by_index():
    outputs = ["one", "one two three", "a b", "x y z", "p q r s", "k"]  # 1, 3, 2, 3, 4, 1 tokens
    pool = [make_record(i, "Say something.", "", out) for i, out in enumerate(outputs)]
    selection = LongestSelector(fraction=0.5).select(stub_context(pool))  # budget 3
    assert selection.indices == [4, 1, 3]  # 1 and 3 tie at 3 tokens: index 1 first
    assert selection.scores == [4.0, 3.0, 3.0]
    assert LongestSelector(fraction=0.65).select(stub_context(pool)).indices == [4, 1, 3, 2]  # budget round(3.9)


def test_longest_counts_the_models_tokens(tiny_qwen2):
    outputs = ["Yes", "The answer, worked out step by step, is forty-two.", "No", "It is blue"]
    pool = [make_record(i, "Answer.", "", out) for i, out in enumerate(outputs)]
    ctx = SelectionContext(stage="instruction", pool=pool, loader=lambda: tiny_qwen2, device="cpu")
    selection = LongestSelector(fraction=0.5).select(ctx)
    assert selection.indices == [1, 3]
    assert selection.scores == [float(len(tiny_qwen2.tokenizer(outputs[i], add_special_tokens=False)["input_ids"]))
                                for i in (1, 3)]


# rds: pooling and round robin

def test_weighted_mean_pooling_masks_padding():
    hidden = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]],        # no padding: weights 1/6, 2/6, 3/6
        [[3.0, 0.0], [0.0, 3.0], [100.0, 100.0]],    # right-padded: weights 1/3, 2/3, 0
        [[100.0, 100.0], [3.0, 0.0], [0.0, 3.0]],    # left-padded: weights 0, 1/3, 2/3
    ])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]])
    pooled = weighted_mean_pooled_states(hidden, mask)
    expected = torch.tensor([[7 / 6, 8 / 6], [1.0, 2.0], [1.0, 2.0]])
    assert torch.allclose(pooled, expected)
    assert pooled.dtype == torch.float32


def test_round_robin_spends_a_turn_on_an_example_already_taken():
    similarity = np.array([
        [0.90, 0.80, 0.10, 0.00],  # query 0: 0, 1, 2, 3
        [0.95, 0.20, 0.70, 0.30],  # query 1: 0, 2, 3, 1
    ])
    # Round 1: query 0 takes 0; query 1's best is 0, taken: its turn is spent. Round 2: 1, then 2.
    assert round_robin_select(similarity, 2) == ([0, 1], [0.90, 0.80], [0, 0])
    assert round_robin_select(similarity, 3) == ([0, 1, 2], [0.90, 0.80, 0.70], [0, 0, 1])
    # Round 3: query 0's next is 2, taken: spent; query 1 takes 3.
    assert round_robin_select(similarity, 4) == ([0, 1, 2, 3], [0.90, 0.80, 0.70, 0.30], [0, 0, 1, 1])


def test_round_robin_breaks_ties_by_lower_index():
    similarity = np.array([[0.5, 0.5, 0.9, 0.5]])
    assert round_robin_select(similarity, 3)[0] == [2, 0, 1]


# rds: end to end on the tiny model

QUERIES = ["How many legs does an insect have?", "Name a famous playwright."]


def query_records() -> list[dict]:
    return [make_record(f"q{i}", "Answer the question.", q, "A short answer.", source="dev")
            for i, q in enumerate(QUERIES)]


def authors_embedding(model, input_ids: list[int]) -> np.ndarray:
    """One unpadded sequence, as the authors embed it: weights (t + 1) / sum over all positions."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([input_ids]), output_hidden_states=True).hidden_states[-1][0]
    weights = torch.arange(1, hidden.shape[0] + 1, dtype=torch.float32)
    pooled = (hidden.float() * (weights / weights.sum())[:, None]).sum(dim=0)
    return (pooled / pooled.norm()).numpy()


def test_rds_end_to_end_and_reads_its_cache(tiny_qwen2, toy_records, tmp_path, monkeypatch):
    cache = isolated_cache(tmp_path)
    selector = RDSSelector(fraction=0.5, batch_size=4, max_length=64)  # batches of 4: padding is exercised
    make_ctx = lambda: SelectionContext(stage="instruction", pool=toy_records, target=query_records(),  # noqa: E731
                                        cache_dir=str(cache), loader=lambda: tiny_qwen2, device="cpu",
                                        progress=False)
    first = selector.select(make_ctx())
    assert len(first.indices) == len(set(first.indices)) == 3

    # The same selection from per-example, unpadded embeddings computed the authors' way.
    def vectors(records):
        return np.stack([authors_embedding(tiny_qwen2.model, encode_example(tiny_qwen2.tokenizer, r, 64)["input_ids"])
                         for r in records]).astype(np.float64)
    similarity = vectors(query_records()) @ vectors(toy_records).T
    expected, expected_scores, _ = round_robin_select(similarity, 3)
    assert first.indices == expected
    assert np.allclose(first.scores, expected_scores, atol=1e-5)
    assert len(list((cache / "rds_embeddings").rglob("*.npy"))) == 2  # pool and target

    def no_recompute(*args, **kwargs):
        raise AssertionError("the embeddings should come from the cache")

    monkeypatch.setattr(rds, "sequence_embeddings", no_recompute)
    second = selector.select(make_ctx())
    assert second.indices == first.indices and second.scores == first.scores


def test_rds_without_target_names_the_role_before_loading_a_model(toy_records):
    def no_model():
        raise AssertionError("the model should not load")

    ctx = SelectionContext(stage="instruction", pool=toy_records, loader=no_model)
    with pytest.raises(DeliftInputError, match=r"stage\.roles\.target") as error:
        RDSSelector().select(ctx)
    assert error.value.field == "stage.roles.target"


def test_rds_rejects_a_bad_batch_size():
    with pytest.raises(DeliftInputError, match=r"selector\.batch_size"):
        RDSSelector(batch_size=0)


# configs

@pytest.mark.parametrize("name, cls", [("random_balanced", RandomBalancedSelector), ("longest", LongestSelector),
                                       ("rds", RDSSelector)])
def test_yaml_builds_the_registered_class_with_its_defaults(name, cls, tmp_path):
    built = instantiate(compose_config([f"selector={name}"], output_dir=tmp_path).selector)
    assert type(built) is cls and SELECTORS[name] is cls and built.name == name
    defaults = {key: p.default for key, p in inspect.signature(cls).parameters.items()}
    assert {key: value for key, value in built.config().items() if key != "name"} == defaults


def test_rds_yaml_takes_overrides(tmp_path):
    cfg = compose_config(["selector=rds", "selector.max_length=128", "selector.batch_size=2"], output_dir=tmp_path)
    built = instantiate(cfg.selector)
    assert (built.max_length, built.batch_size) == (128, 2)
