"""Weight soups and seed trials (issue 19): `sweeper best --soup` and `--seeds`.

One small real sweep (three tiny trials, every checkpoint kept) is run through the CLI once
for this file; the soups are made from its real checkpoints in the real artifact store, and
the seed trials run through real workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.study import StudyDirection
from optuna.trial import TrialState
from safetensors.torch import load_file

from sweeper import best, budget, checkpoints, cli, record, report, soup
from sweeper.finetune.loop import evaluate
from sweeper.finetune.model_specs import TinyTextClassifier
from sweeper.finetune.models import TextAdapter
from sweeper.objective import prepare_data
from sweeper.study import load as load_sweep
from tests.helpers import TINY_STUDY, run_cli, write_study

pytestmark = pytest.mark.xdist_group("soup")  # one xdist worker: the sweep below is run once
# The tests on the sweep below are marked slow, with 300 s: its launch and each CLI run import
# PyTorch in several processes on 2 shared cores.

TRIALS = 3


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished tiny sweep of three trials that keeps every checkpoint (this file's own: the
    soups and seed trials write on the study, which the shared `finished_sweep` forbids)."""
    folder = tmp_path_factory.mktemp("soup")
    body = TINY_STUDY.replace("n_trials=4,", f"n_trials={TRIALS}, keep={TRIALS}, pruner=\"none\",")  # all kept
    study_file = write_study(folder, body)
    done = run_cli("launch", str(study_file), "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"file": study_file, "folder": folder}


def _open(swept: dict[str, Any]) -> tuple[Any, optuna.Study]:
    sweep = load_sweep(swept["file"])
    url = f"sqlite:///{swept['folder'] / 'out' / 'study.db'}"
    return sweep, optuna.load_study(study_name=sweep.name, storage=url)


def _members(sweep: Any, study: optuna.Study, trials: list[int], folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The members' weights as their own checkpoint files hold them."""
    store = checkpoints.open_store(None, sweep.output_path, create=False)
    by_number = {t.number: t for t in study.get_trials()}
    return {n: load_file(str(checkpoints.download_model(store, by_number[n], folder / str(n)) / "model.safetensors"))
            for n in trials}


# --------------------------------------------------------------------------- the averaging itself


def test_the_soup_of_one_model_is_that_model() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        state = dict(torch.nn.Linear(7, 5).state_dict())
    state["half"] = torch.randn(4).to(torch.bfloat16)  # rounded once, to its own type
    state["counter"] = torch.tensor(4)  # an integer buffer, as BatchNorm's batch counter
    for method in soup.METHODS:
        made = soup.make(method, [soup.Ingredient(0, 0.5, state)], lambda s: {"accuracy": 0.5}, "accuracy",
                         StudyDirection.MAXIMIZE)
        assert made.members == [0] and made.weights == [1.0]
        for name, tensor in state.items():
            assert torch.equal(made.state[name], tensor) and made.state[name].dtype == tensor.dtype, name


def test_greedy_keeps_only_the_trials_that_do_not_lower_the_validation_figure() -> None:
    # A score that prefers weights near `target`: trial 2 pulls the soup away from it.
    target = torch.tensor([1.0, 1.0])
    weights = {0: [1.2, 0.8], 1: [0.8, 1.2], 2: [9.0, -9.0], 3: [1.0, 1.0]}
    values = {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6}  # validation values: the order greedy adds them in
    ingredients = [soup.Ingredient(n, values[n], {"w": torch.tensor(w)}) for n, w in weights.items()]

    def score(state: soup.State) -> dict[str, float]:
        return {"accuracy": 1.0 - float((state["w"] - target).norm())}

    made = soup.greedy(ingredients, score, "accuracy", StudyDirection.MAXIMIZE)
    assert [s.trial for s in made.steps] == [0, 1, 2, 3]
    assert [s.kept for s in made.steps] == [True, True, False, True]  # trial 3 ties: a tie stays in
    assert made.members == [0, 1, 3]
    kept = [s.value for s in made.steps if s.kept]
    assert kept == sorted(kept) and made.validation["accuracy"] == kept[-1] == 1.0
    assert made.steps[2].value < made.steps[1].value
    assert torch.equal(made.state["w"], torch.tensor([1.0, 1.0]))


# --------------------------------------------------------------------------- soups of a real sweep


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uniform_soup_is_the_members_mean_to_the_last_bit(swept: dict[str, Any], tmp_path: Path) -> None:
    sweep, study = _open(swept)
    line = best.export_soup(sweep, study, tmp_path / "uniform", "uniform")
    manifest = json.loads((tmp_path / "uniform" / "soup.json").read_text())
    assert [m["trial"] for m in manifest["members"]] == [t.number for t in best.kept_trials(study)]
    assert len(manifest["members"]) == TRIALS and manifest["weights"] == [1 / TRIALS] * TRIALS
    members = _members(sweep, study, [m["trial"] for m in manifest["members"]], tmp_path / "members")
    souped = load_file(str(tmp_path / "uniform" / "model.safetensors"))
    assert set(souped) == set(next(iter(members.values())))
    differs = 0
    for name, tensor in souped.items():
        stack = np.stack([m[name].numpy() for m in members.values()])
        if tensor.is_floating_point():
            expected = stack.astype(np.float64).mean(axis=0).astype(np.float32)
            assert np.array_equal(tensor.numpy(), expected), name
            differs += int(not np.array_equal(stack[0], stack[1]))
        else:
            assert np.array_equal(tensor.numpy(), stack[0]), name
    assert differs > 0  # the members were trained apart: the mean is not any one of them
    assert f"uniform soup of trials {manifest['members'][0]['trial']}" in line.replace("[", "")
    assert record.SOUP.get(study, "uniform")["members"] == [m["trial"] for m in manifest["members"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_greedy_soup_never_lowers_validation_and_its_folder_reproduces_it(swept: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    sweep, study = _open(swept)
    out = tmp_path / "greedy"
    best.export_soup(sweep, study, out, "greedy", evaluate=True)
    manifest = json.loads((out / "soup.json").read_text())
    ranked = best.kept_trials(study)
    steps = manifest["steps"]
    assert [s["trial"] for s in steps] == [t.number for t in ranked]  # in order of validation value
    assert steps[0]["kept"] and steps[0]["validation"] == pytest.approx(ranked[0].value)
    running = steps[0]["validation"]
    for step in steps[1:]:
        assert step["kept"] == (step["validation"] >= running), step
        running = max(running, step["validation"]) if step["kept"] else running
    assert manifest["validation"] == running >= ranked[0].value - 1e-12
    assert "test" in manifest and "best_test" in manifest  # --evaluate: both figures, side by side

    # The model's own loader opens the folder, and scores what soup.json recorded.
    model = AutoModelForSequenceClassification.from_pretrained(str(out), use_safetensors=True)
    data, _ = prepare_data(sweep)
    scores = evaluate(TextAdapter(model), data.validation, torch.device("cpu"), sweep.bf16, data.num_labels)
    assert scores == manifest["validation_metrics"]
    assert scores[sweep.metric] == manifest["validation"]


def test_a_soup_of_different_models_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two kept trials of two model sizes (the study file changed between launches) cannot be
    averaged: one line, exit 2, nothing written."""
    study_file = write_study(tmp_path, TINY_STUDY)
    sweep = load_sweep(study_file)
    storage = f"sqlite:///{sweep.output_path / 'study.db'}"
    sweep.output_path.mkdir(parents=True)
    study = optuna.create_study(study_name=sweep.name, storage=storage, direction="maximize")
    store = checkpoints.open_store(None, sweep.output_path)
    for value, hidden in ((0.9, 32), (0.8, 16)):
        spec = TinyTextClassifier(layers=2, hidden=hidden, heads=2)
        trial = study.ask()
        adapter = spec.build(2, sweep.cache_dir)
        info = checkpoints.save_model(store, trial, adapter, spec.tokenizer(sweep.cache_dir), {"trial": trial.number})
        record.CHECKPOINT.set(trial, info)
        study.tell(trial, value)
    code = cli.main(["best", str(study_file), "--soup", "--out", str(tmp_path / "soup")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot be averaged" in err[0] and "trial 1" in err[0] and "--trial N" in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "soup").exists()


# --------------------------------------------------------------------------- seed trials


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(300)
def test_seeds_run_as_marked_budgeted_trials_and_are_reported(swept: dict[str, Any], tmp_path: Path) -> None:
    sweep, study = _open(swept)
    original = best.choose(sweep, study)
    done = run_cli("best", str(swept["file"]), "--seeds", "2", "--workers", "2", "--out", str(tmp_path / "seeds"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trial {original.number} with 2 other seeds" in done.stdout

    _, study = _open(swept)
    trials = study.get_trials()
    repeats = [t for t in trials if record.REPEAT.get(t)]
    assert len(repeats) == 2 and all(t.state == TrialState.COMPLETE for t in repeats)
    assert all(t.params == original.params for t in repeats)
    marks = [record.REPEAT.get(t) for t in repeats]
    assert {m["trial"] for m in marks} == {original.number} and sorted(m["index"] for m in marks) == [0, 1]
    # The objective trained each with the seed its mark names: two seeds, neither the original's.
    used = [record.SEED.get(t) for t in repeats]
    assert used == [m["seed"] for m in marks] and len(set(used)) == 2
    assert record.SEED.get(original) not in used

    # The budget is exact: the study's trials plus the two, all finished, none beyond.
    tally = budget.tally(trials)
    assert record.N_TRIALS.get(study) == TRIALS + 2 == tally.finished == len(trials)
    assert tally.waiting == tally.running == 0
    # Seed trials measure noise: never the best, never a soup member, their checkpoints kept.
    assert best.choose(sweep, study).number == original.number
    assert not {t.number for t in repeats} & {t.number for t in best.kept_trials(study)}
    assert all(record.CHECKPOINT.get(t) and checkpoints.deleted_by(study, t.number) is None for t in repeats)

    figures = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert figures == record.SEEDS.get(study, original.number)
    assert figures["validation"]["n"] == figures["test"]["n"] == 2
    assert figures["validation"]["values"] == [t.value for t in repeats]
    assert figures["test"]["mean"] == pytest.approx(np.mean(figures["test"]["values"]))

    # Queued once: asking again for 2 adds nothing.
    assert best.queue_seeds(sweep, study, 2)[1] == TRIALS + 2

    # The report shows them beside the best trial (and a soup, once one is made).
    best.export_soup(sweep, study, tmp_path / "soup", "uniform")
    page, _ = report.build(study, sweep)
    table = page[page.index('<table id="soups">'):]
    table = table[:table.index("</table>")]
    assert f"trial {original.number} with 2 other seeds" in table and "uniform soup of trials" in table
    assert f"{figures['validation']['mean']:.4f} ± {figures['validation']['std']:.4f}" in table


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_seeds_below_two_are_refused_in_one_line(swept: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["best", str(swept["file"]), "--seeds", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["sweeper: error: `--seeds` is 1: a spread needs 2 or more seeds, e.g. --seeds 3"]


# --------------------------------------------------------------------------- ResNets: BatchNorm


def _resnet_members(touched: str) -> tuple[Any, soup.State, list[soup.State]]:
    """A ResNet-18 adapter, its weights, and two "trials" of it whose parameters and BatchNorm
    statistics moved apart under the names starting with ``touched`` (as training moves them)."""
    from sweeper.finetune.model_specs import ImageClassifier

    adapter = ImageClassifier(arch="resnet18", weights="none").build(3, Path("."))
    base = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    members = []
    with torch.random.fork_rng():
        for seed in (1, 2):
            torch.manual_seed(seed)
            state = dict(base)
            for name, value in base.items():
                if name.startswith(touched) and value.is_floating_point():
                    noise = 0.1 * torch.randn_like(value)
                    state[name] = value * noise.exp() if name.endswith("running_var") else value + noise
            members.append(state)
    return adapter, base, members


def _images(n: int = 96) -> Any:
    from sweeper.finetune.data import ImageSplit

    rng = np.random.default_rng(0)
    return ImageSplit(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, n))


def test_a_resnet_soup_recomputes_batchnorm_statistics_as_torch_update_bn_does() -> None:
    adapter, _, members = _resnet_members("")  # full depth: every layer trained
    split = _images()
    souped = soup.batchnorm_blend(adapter, soup.training_batches(split, torch.device("cpu"), seed=0))(members)
    averaged = soup.average(members)
    import torchvision

    reference = torchvision.models.resnet18(num_classes=3)
    reference.load_state_dict(averaged)
    batches = [b["pixel_values"] for b in soup.training_batches(split, torch.device("cpu"), seed=0)()]
    torch.optim.swa_utils.update_bn(batches, reference)  # PyTorch's own re-estimation, over the same batches
    expected = reference.state_dict()
    for name in souped:
        if name.endswith(("running_mean", "running_var")):
            assert torch.allclose(souped[name], expected[name], rtol=1e-5, atol=1e-6), name
            assert not torch.allclose(souped[name], averaged[name]), name  # not the members' average
        elif souped[name].is_floating_point():
            assert torch.equal(souped[name], averaged[name]), name  # weights: the plain mean


def test_a_resnet_soup_keeps_the_statistics_of_frozen_layers() -> None:
    adapter, base, members = _resnet_members("layer4.")  # unfreeze depth 2 of 8: only layer4 trained
    souped = soup.batchnorm_blend(adapter, soup.training_batches(_images(), torch.device("cpu"), seed=0))(members)
    for name in ("bn1.running_mean", "layer1.0.bn1.running_var", "layer3.1.bn2.running_mean"):
        assert torch.equal(souped[name], base[name]), name
    averaged = soup.average(members)
    assert not torch.allclose(souped["layer4.1.bn2.running_mean"], averaged["layer4.1.bn2.running_mean"])
