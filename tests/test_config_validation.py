"""Bad config values stop a run in seconds, before anything loads: one `delift: error:` line, exit 2."""

import dataclasses

import pytest

from delift.config import KernelConfig, reference_markdown, validate
from delift.errors import DeliftInputError
from delift.utility.formatting import UtilityTemplate
from tests.helpers import ROOT, compose_config, run_cli

BAD_VALUES = [
    ("task=slect", "field 'task': 'slect' is not allowed; expected one of run, select, kernel"),
    ("eval.mode=bogus", "field 'eval.mode': 'bogus' is not allowed; expected one of finetune, icl, both"),
    ("kernel.engine=foo", "field 'kernel.engine': 'foo' is not allowed; expected one of naive, fast, knn, proxy"),
    ("selector.fraction=1.5", "field 'selector.fraction': 1.5 is not allowed; expected a number in (0, 1]"),
    ("kernel.batch_size=many", "field 'kernel.batch_size': 'many' is not allowed; expected an integer"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_fails_fast_with_one_line(override, message, tmp_path, monkeypatch):
    """The command (run.py's delift.cli.main, in-process: the process contract is test_bad_input's run.py
    case) stops at validation: the pipeline, which loads data and models, is never entered."""
    import delift.pipeline

    def loads(*args, **kwargs):
        raise AssertionError("the pipeline ran: validation should have stopped the run before anything loads")

    monkeypatch.setattr(delift.pipeline, "run", loads)
    proc = run_cli([override], tmp_path, monkeypatch)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"delift: error: {message}"]
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("selection.json"))


@pytest.mark.parametrize("overrides,field,words", [
    (["seed=-1"], "seed", "expected an integer >= 0"),
    (["device=gpu"], "device", "expected auto, cpu, cuda or cuda:N"),
    (["train.optim.schedule=cosine"], "train.optim.schedule", "expected one of constant, linear"),
    (["train.lora.dropout=1"], "train.lora.dropout", "expected a number in [0, 1)"),
    (["stage.sizes.pool.trivia=-3"], "stage.sizes.pool.trivia", "expected an integer >= 0 or null"),
    (["stage.holdout.eval.from=train"], "stage.holdout.eval.from", "expected one of pool, target, existing, eval"),
    (["selector.objective=flx"], "selector.objective", "expected one of fl, flmi, fl2mi, flcg or null"),
    (["selector=deft_ucs", "selector.per_cluster=even"], "selector.per_cluster", "one of paper, proportional"),
    (["+selector.fractoin=0.2"], "selector.fractoin", "unknown key for delift.selectors.delift.DeliftSelector"),
    (["+kernel.enigne=knn"], "kernel.enigne", "unknown key; the keys here are"),
    (["model=tiny_qwen2", "+model.tokenizer_source.gguf=x"], "model.tokenizer_source.gguf", "unknown key"),
    (["export.formats=[hf,parquet]"], "export.formats[1]", "expected one of hf, chat"),
    (["judge=prometheus", "judge.batch_size=eight"], "judge.batch_size", "expected an integer"),
])
def test_schema_names_key_value_and_what_is_allowed(overrides, field, words, tmp_path):
    with pytest.raises(DeliftInputError) as err:
        validate(compose_config(overrides, output_dir=tmp_path))
    assert err.value.field == field
    assert words in str(err.value)


def test_valid_values_pass(tmp_path):
    validate(compose_config(["selector=less", "kernel.engine=knn", "selector.fraction=1", "device=cuda:1",
                             "export.push_to_hub=me/subset", "judge=smollm2_standin", "~logger",
                             "+kernel.template.response=' {output}'", "trainer.devices=2"], output_dir=tmp_path))


def test_kernel_template_keys_are_utility_template_fields():
    hints = KernelConfig.__annotations__["template"]
    assert all(f.name in hints for f in dataclasses.fields(UtilityTemplate))


def test_configuration_reference_is_current():
    # Regenerate with: python -m delift.config > docs/configuration.md
    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()
