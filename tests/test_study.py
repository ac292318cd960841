from __future__ import annotations

from pathlib import Path

import pytest

from sweeper import study as study_mod
from sweeper.errors import ConfigError, SweepError
from sweeper.finetune.data import TextData
from sweeper.finetune.model_specs import TextClassifier
from sweeper.space import LogFloat
from tests.helpers import MINILM, ROOT, SST2, TINY_STUDY, write_study


def test_loads_a_study_by_path_and_applies_overrides(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    sweep = study_mod.load(path, ["epochs=2", "data.n_train=300", "space.learning_rate=1e-3..1e-2",
                                  "space.unfreeze_depth=1", "timeout=None"])
    assert sweep.epochs == 2.0 and isinstance(sweep.epochs, float)
    assert sweep.data.n_train == 300
    assert sweep.space["learning_rate"] == LogFloat(1e-3, 1e-2)
    assert sweep.space["unfreeze_depth"] == 1


def test_every_bad_override_is_reported_in_one_error(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    with pytest.raises(ConfigError) as caught:
        study_mod.load(path, ["epoch=2", "n_trials=many", "data.nope=1", "broken"])
    problems = caught.value.problems
    assert len(problems) == 4
    assert "did you mean `epochs`" in problems[0]
    assert "n_trials=many" in problems[1]
    assert "`data.nope`" in problems[2]
    assert "key=value" in problems[3]
    assert "\n" not in str(caught.value)


def test_invalid_values_are_all_listed(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    with pytest.raises(ConfigError) as caught:
        study_mod.load(path, ["pruner=fast", "metric=loss", "keep=0", "space.dropuot=0.1"])
    text = str(caught.value)
    assert "pruner" in text and "direction=minimize" in text and "keep" in text
    assert "did you mean `dropout`" in text


def test_switches_take_true_or_false_and_nothing_else(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    assert study_mod.load(path, ["compile=true", "bf16=false"]).compile is True
    with pytest.raises(ConfigError) as caught:
        study_mod.load(path, ["compile=fast"])
    assert "`compile=fast`: expected bool, write compile=true or compile=false" in str(caught.value)
    study = write_study(tmp_path, TINY_STUDY.replace("n_trials=", 'compile="yes", n_trials=', 1))
    with pytest.raises(ConfigError, match="`compile` is 'yes': use True or False"):
        study_mod.load(study)


def test_model_and_data_shorthands(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    sweep = study_mod.load(path, [f"model={MINILM}", f"data={SST2}"])
    assert sweep.model == TextClassifier(str(MINILM))
    assert sweep.data.path == str(SST2)


def test_missing_broken_and_empty_study_files(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="does not exist"):
        study_mod.load(tmp_path / "nope.py")
    broken = tmp_path / "broken.py"
    broken.write_text("from sweeper import Sweep\nsweep = Sweep(\n")
    with pytest.raises(SweepError, match=r"broken.py:\d+: syntax error"):
        study_mod.load(broken)
    raises = tmp_path / "raises.py"
    raises.write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(SweepError, match=r"raises.py:2: the study file raised RuntimeError: no GPU here"):
        study_mod.load(raises)
    empty = tmp_path / "empty.py"
    empty.write_text("sweep = 3\n")
    with pytest.raises(SweepError, match="must set `sweep = Sweep"):
        study_mod.load(empty)


def test_unfreeze_depth_beyond_the_model_is_refused_before_training(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    sweep = study_mod.load(path, ["space.unfreeze_depth=0..5"])
    with pytest.raises(ConfigError, match=r"Int\(0, 5\), but the model has 2 blocks: use 0..2"):
        study_mod.check_model_fit(sweep, str(path))


def test_mlm_needs_a_checkpoint_with_an_lm_head() -> None:
    sweep = study_mod.load(ROOT / "studies" / "bert_sst2.py",
                           [f"model={MINILM}", f"data={SST2}", "pretrain_loss=mlm"])
    with pytest.raises(ConfigError, match="no masked-LM head"):
        study_mod.check_model_fit(sweep, "bert_sst2.py")


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.py")), ids=lambda p: p.name)
def test_every_study_file_loads_and_validates(path: Path) -> None:
    """A study cannot rot: each loads, validates, and (with offline stand-ins for what it
    would download) fits its model."""
    offline = {"bert_sst2.py": [f"model={MINILM}", f"data={SST2}", "space.unfreeze_depth=0..6"],
               "resnet_cifar10.py": ["model.weights=none"]}
    sweep = study_mod.load(path, offline.get(path.name, []))
    assert sweep.name and sweep.space
    assert path.read_text().lstrip().startswith('"""'), "a study opens with its docstring"
    assert "sweeper launch studies/" in path.read_text().split('"""')[1], "... giving its command"
    if sweep.train is None:  # a study with its own train function has no model of sweeper's to fit
        assert study_mod.check_model_fit(sweep, str(path)) >= 1


def test_first_trials_from_the_command_line_are_checked_against_the_space(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    assert study_mod.load(path, ["first_trials=center"]).first_trials == ("center",)
    sweep = study_mod.load(path, ['first_trials=[{"learning_rate": 1e-3, "unfreeze_depth": 2}]'])
    assert sweep.first_trials == ({"learning_rate": 1e-3, "unfreeze_depth": 2},)
    with pytest.raises(ConfigError) as caught:
        study_mod.load(path, ['first_trials=[{"learning_rate": 1e-3, "unfreeze_depth": 9}, "center"]',
                              "n_trials=1"])
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert "`first_trials[0]` sets `unfreeze_depth` to 9, outside `space.unfreeze_depth` = Int(0, 2)" in problems[0]
    assert "`first_trials` has 2 entries but `n_trials` is 1" in problems[1]


def test_every_setting_is_checked_against_its_declared_rule(tmp_path: Path) -> None:
    path = write_study(tmp_path, TINY_STUDY)
    with pytest.raises(ConfigError) as caught:
        study_mod.load(path, ["epochs=0", "evals_per_epoch=1000", "space.max_grad_norm=-1", "space.adam_beta2=1.0",
                              "space.warmup_ratio=0.9", "data.max_length=4", "model.layers=13"])
    assert caught.value.problems == [
        "`epochs` is 0.0: use a number of passes above 0 and at most 1000",
        "`model.layers` is 13: use 1..12",
        "`data.max_length` is 4: use 8..4096 tokens",
        "`space.max_grad_norm` is -1: use a number at least 0",
        "`space.adam_beta2` is 1.0: use a number at least 0 and below 1",
    ]  # evals_per_epoch=1000 and warmup_ratio=0.9 are allowed: the rules are what the checks enforce


def test_docs_settings_md_is_what_the_declared_rules_generate() -> None:
    generated = study_mod.settings_markdown()
    assert (ROOT / "docs" / "settings.md").read_text() == generated, (
        "docs/settings.md disagrees with the settings' declarations: rebuild it with the command at its top")
    for line in ("| `epochs` | `3` | a number of passes above 0 and at most 1000 |",
                 "| `adam_beta2` | `0.999` | a number at least 0 and below 1 |",
                 "| `max_length` | `128` | 8..4096 tokens |"):
        assert line in generated


def test_each_kind_of_model_and_data_takes_the_shorthands_its_own_way(tmp_path: Path) -> None:
    resnet = ROOT / "studies" / "resnet_cifar10.py"
    sweep = study_mod.load(resnet, ["model=resnet50", f"data={tmp_path}"])
    assert (sweep.model.arch, sweep.model.weights, sweep.data.path) == ("resnet50", "DEFAULT", str(tmp_path))
    assert study_mod.load(resnet, ["model=/weights/r18.safetensors"]).model.weights == "/weights/r18.safetensors"
    tiny = study_mod.load(write_study(tmp_path, TINY_STUDY), [f"data={SST2}"])
    assert tiny.data == TextData(path=str(SST2))  # generated data gives way to a real data set
    with pytest.raises(ConfigError, match="`model` is 'bert': use TextClassifier, TinyTextClassifier or ImageClassifier"):
        study_mod.load(write_study(tmp_path, TINY_STUDY.replace("TinyTextClassifier(layers=2, hidden=32, heads=2)",
                                                                "'bert'"), name="bad.py"))
