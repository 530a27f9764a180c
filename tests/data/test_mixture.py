"""data.mixture: sources parsed from YAML with their own settings; each epoch's draw (every source's share within
±2 points of its weight, a small source repeated and a large one subsampled, differently each epoch, from the seed and
the epoch alone; a run resumed mid-epoch sees the uninterrupted sequence); and every bad input refused in one line
naming the source, before anything is trained."""

import json
import shutil
from collections import Counter

import lightning as L
import pytest
import torch
import yaml
from conftest import (
    BEHAVIOR,
    REMAKE_CACHE,
    REPO,
    assert_refused,
    demo_rows,
    fit_args,
    fit_quietly,
    run_cli,
    write_jsonl,
)
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint

from pear_lightning import PearDataModule, PearModule
from pear_lightning.behavior.generate import generate
from pear_lightning.data.mixture import MixtureSampler, MixtureSource, epoch_counts
from pear_lightning.sampling import SamplingSettings


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """300 demo training rows and 100 held-out ones, both with their behaviour token_ids and logprobs."""
    root = tmp_path_factory.mktemp("mixture")
    return write_jsonl(root / "big.jsonl", demo_rows(300)), write_jsonl(root / "small.jsonl", demo_rows(100, "val"))


def test_a_mixture_is_parsed_from_yaml_each_source_with_its_own_settings_or_the_data_ones(sources, tiny_model_dir):
    big, small = sources
    parser = ArgumentParser()
    parser.add_class_arguments(PearDataModule, "data")
    config = {
        "data": {
            "mixture": [
                {"name": "big", "path": str(big), "weight": 3},
                {"name": "small", "path": str(small), "weight": 1, "sampling": {"temperature": 0.7, "top_p": 0.9}},
            ],
            "token_ids_column": "response_ids",
            "tokenizer_name_or_path": str(tiny_model_dir),
        }
    }
    config["data"]["mixture"][1]["token_ids_column"] = "token_ids"
    data = parser.instantiate_classes(parser.parse_string(yaml.safe_dump(config))).data
    first, second = data.mixture
    assert data.source_names == ["big", "small"] and (first.weight, second.weight) == (3.0, 1.0)
    assert first.sampling is None and second.sampling == SamplingSettings(temperature=0.7, top_p=0.9)
    assert (first.token_ids_column, second.token_ids_column) == ("response_ids", "token_ids")
    assert first.logprobs_column == second.logprobs_column == "logprobs"


def drawn_epoch(loader, epoch: int) -> list[tuple[int, str]]:
    """(source, id) of every example the loader yields in ``epoch``, in order."""
    loader.sampler.set_epoch(epoch)
    return [(s, i) for batch in loader for s, i in zip(batch["source"].tolist(), batch["ids"])]


def test_one_epoch_draws_each_source_at_its_share_repeating_the_small_and_subsampling_the_large(
    sources, tiny_model_dir
):
    big, small = sources
    L.seed_everything(0)
    mixture = [MixtureSource("big", str(big), 0.7), MixtureSource("small", str(small), 0.3)]
    data = PearDataModule(mixture=mixture, tokenizer_name_or_path=str(tiny_model_dir), batch_size=16, packing=True)
    data.setup("fit")
    loader = data.train_dataloader()
    first = drawn_epoch(loader, 0)
    assert len(first) == len(loader.sampler) == 400  # an epoch draws as many examples as the sources hold
    shares = Counter(s for s, _ in first)
    assert abs(shares[0] / 400 - 0.7) <= 0.02 and abs(shares[1] / 400 - 0.3) <= 0.02
    big_drawn = Counter(i for s, i in first if s == 0)
    small_drawn = Counter(i for s, i in first if s == 1)
    assert len(big_drawn) == 280 and set(big_drawn.values()) == {1}  # 280 of its 300, none twice
    assert len(small_drawn) == 100 and Counter(small_drawn.values()) == {1: 80, 2: 20}  # all 100, 20 of them twice
    assert first[:16] != sorted(first[:16])  # the sources are shuffled together
    second = drawn_epoch(loader, 1)
    assert Counter(s for s, _ in second) == shares
    assert {i for s, i in second if s == 0} != set(big_drawn)  # another subsample
    twice = {i for i, n in Counter(i for s, i in second if s == 1).items() if n == 2}
    assert len(twice) == 20 and twice != {i for i, n in small_drawn.items() if n == 2}  # other repeats
    assert drawn_epoch(loader, 0) == first  # the draw is the seed's and the epoch's alone


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_draw_of_uneven_sources_keeps_every_share_to_an_example(shuffle):
    sizes, weights = [1000, 37, 5], [1.0, 1.0, 2.0]
    counts = epoch_counts(sizes, weights)
    assert counts == [261, 260, 521] and sum(counts) == sum(sizes)
    sampler = MixtureSampler(sizes, weights, seed=7, shuffle=shuffle)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn = torch.tensor(list(sampler))
        source = torch.bucketize(drawn, torch.tensor([1000, 1037]), right=True)
        assert torch.bincount(source).tolist() == counts
        tiny = Counter((drawn[source == 2] - 1037).tolist())
        assert sorted(tiny) == [0, 1, 2, 3, 4] and set(tiny.values()) == {104, 105}  # 521 = 4 × 104 + 105
    if not shuffle:  # file order, cycled; the sources interleaved evenly
        assert drawn[:8].tolist() == [1037, 0, 1000, 1038, 1039, 1, 1001, 1040]


def fit_mixture(model_dir, big, small, root, max_steps, ckpt_path=None):
    """Batches of 4 from 10 + 6 examples at equal weights (8 + 8 per epoch: 4 batches), a checkpoint every 3 steps."""
    L.seed_everything(0)
    mixture = [MixtureSource("big", str(big), 1), MixtureSource("small", str(small), 1)]
    data = PearDataModule(mixture=mixture, tokenizer_name_or_path=str(model_dir), batch_size=4)
    seen = []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, module, batch, i: seen.append(
        list(zip(batch["source"].tolist(), batch["ids"]))
    )
    every_3_steps = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, save_on_train_epoch_end=False)
    callbacks = [every_3_steps, record]
    fit_quietly(
        PearModule(str(model_dir)),
        data,
        ckpt_path,
        max_steps=max_steps,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    return seen


@pytest.mark.parametrize("checkpoint", ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"])
def test_a_run_resumed_mid_epoch_draws_the_uninterrupted_sequence(tmp_path, tiny_model_dir, checkpoint):
    big = write_jsonl(tmp_path / "big.jsonl", demo_rows(10))
    small = write_jsonl(tmp_path / "small.jsonl", demo_rows(6, "val"))
    straight = fit_mixture(tiny_model_dir, big, small, tmp_path / "straight", max_steps=9)
    stopped = int(checkpoint.split("step=")[1].split(".")[0])
    first = fit_mixture(tiny_model_dir, big, small, tmp_path / "stopped", max_steps=stopped)
    resumed = fit_mixture(tiny_model_dir, big, small, tmp_path / "stopped", 9, str(tmp_path / "stopped" / checkpoint))
    assert first + resumed == straight
    epochs = [sum(straight[4 * e : 4 * e + 4], []) for e in (0, 1)]
    assert all(Counter(s for s, _ in epoch) == {0: 8, 1: 8} for epoch in epochs)
    assert epochs[0] != epochs[1]


# Bad inputs: each one line naming the source, nothing trained.


def mixture_args(run_dir, model, mixture, *extra):
    """``fit_args`` with ``data.mixture`` (a YAML config) in place of ``data.train_path``."""
    config = run_dir / "mixture.yaml"
    config.write_text(yaml.safe_dump({"data": {"mixture": mixture}}))
    args = fit_args(run_dir, model, "unused")
    at = args.index("--data.train_path")
    return ["fit", "--config", str(config), *args[1:at], *args[at + 2 :], *extra]


@pytest.fixture
def two(run_dir):
    """Two small sources with their behaviour log-probs, as ``data.mixture`` entries."""
    big = write_jsonl(run_dir / "big.jsonl", demo_rows(6))
    small = write_jsonl(run_dir / "small.jsonl", demo_rows(4, "val"))
    return [{"name": "big", "path": str(big), "weight": 2}, {"name": "small", "path": str(small), "weight": 1}]


WEIGHT = 'data.mixture[1] (name "small"): weight must be a positive finite number, got '


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"weight": -1}, WEIGHT + "-1"),
        ({"weight": 0}, WEIGHT + "0"),
        ({"weight": float("nan")}, WEIGHT + "nan"),
        ({"weight": float("inf")}, WEIGHT + "inf"),
        (
            {"weight": None},
            'data.mixture[1] (name "small"): has no weight; give its share of each epoch (a positive number)',
        ),
        ({"name": None}, "data.mixture[1]: has no name; give every source a name (it names the source's metrics)"),
        (
            {"name": "big"},
            """data.mixture[1] (name "big"): the name is data.mixture[0]'s too; give each source its own""",
        ),
        (
            {"name": "small/2"},
            'data.mixture[1] (name "small/2"): the name may hold only letters, digits, _ and - (it names the source\'s '
            "metrics, train/small/2/ess)",
        ),
        ({"path": None}, 'data.mixture[1] (name "small"): has no path; give the file or folder of its examples'),
        ({"path": "/nowhere/small.jsonl"}, 'data.mixture[1] (name "small"): /nowhere/small.jsonl: file not found'),
        (
            {"sampling": {"temperature": 0}},
            'data.mixture[1] (name "small"): sampling: temperature must be > 0 (greedy data has no π_β to divide by), '
            "got 0.0",
        ),
    ],
    ids=[
        "weight-negative",
        "weight-zero",
        "weight-nan",
        "weight-inf",
        "weight-missing",
        "name-missing",
        "name-repeated",
        "name-unfit",
        "path-missing",
        "file-missing",
        "sampling-greedy",
    ],
)
def test_a_bad_source_is_one_line_naming_it(run_dir, tiny_model_dir, capsys, two, change, expected):
    two[1] = {k: v for k, v in {**two[1], **change}.items() if v is not None}
    assert_refused(mixture_args(run_dir, tiny_model_dir, two), capsys, run_dir, expected)


def test_a_mixture_beside_train_path_or_logprobs_path_is_refused(run_dir, tiny_model_dir, capsys, two):
    args = mixture_args(run_dir, tiny_model_dir, two, "--data.train_path", two[0]["path"])
    expected = (
        f'data.mixture (sources "big", "small") and data.train_path={two[0]["path"]} are both set: give the training '
        "examples as one or the other (data.train_path is the one-source shorthand)"
    )
    assert_refused(args, capsys, run_dir, expected)
    args = mixture_args(run_dir, tiny_model_dir, two, "--data.logprobs_path", str(run_dir / "cache"))
    expected = (
        f'data.mixture (sources "big", "small") and data.logprobs_path={run_dir / "cache"} are both set: a cache holds '
        "the log-probs of one source's examples; give each source its own logprobs_path"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_a_source_whose_logprobs_do_not_line_up_or_are_missing_is_named(run_dir, tiny_model_dir, capsys, two):
    rows = demo_rows(4, "val")
    rows[2]["logprobs"] = rows[2]["logprobs"][:-1]
    write_jsonl(run_dir / "small.jsonl", rows)
    args = mixture_args(run_dir, tiny_model_dir, two)
    _, _, err = run_cli(args, capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f'error: data.mixture[1] (name "small"): {two[1]["path"]}: 1 of 4 examples cannot be joined')
    write_jsonl(run_dir / "small.jsonl", [{k: v for k, v in r.items() if k != "logprobs"} for r in rows])
    expected = (
        'data.mixture[1] (name "small"): its examples have no behaviour log-probs, but those of data.mixture[0] '
        '(name "big") have behaviour log-probs; every source of a mixture needs the same: behaviour log-probs (a '
        "logprobs_path, or token_ids and logprobs columns) for all of them, or for none"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_a_source_cache_of_other_sampling_or_another_tokenizer_is_named(
    run_dir, tiny_model_dir, capsys, two, cache_workdir, behaviour_cache
):
    scored = {"name": "small", "path": str(cache_workdir / "train.jsonl"), "weight": 1}
    scored |= {"logprobs_path": str(behaviour_cache), "sampling": {"temperature": 0.7}}
    args = mixture_args(run_dir, tiny_model_dir, [two[0], scored])
    expected = (
        f'data.mixture[1] (name "small"): logprobs_path={behaviour_cache}: scored the train data under temperature 1, '
        "no top-k/top-p/min-p (the raw distribution), but it was sampled with temperature 0.7; those log-probs are not "
        "π_β of this data. Set sampling to how the data was really sampled (a `generate` folder records it) and "
        + REMAKE_CACHE.format(behaviour_cache)
    )
    assert_refused(args, capsys, run_dir, expected)
    spoilt = run_dir / "spoilt"
    shutil.copytree(behaviour_cache, spoilt)
    manifest = json.loads((spoilt / "manifest.json").read_text())
    ours, manifest["tokenizer_fingerprint"] = manifest["tokenizer_fingerprint"], "0123456789abcdef"
    (spoilt / "manifest.json").write_text(json.dumps(manifest))
    scored = {**scored, "logprobs_path": str(spoilt)}
    del scored["sampling"]
    expected = (
        f'data.mixture[1] (name "small"): logprobs_path={spoilt}: made with another tokenizer or chat template '
        f"(fingerprint 0123456789abcdef, this run's is {ours}); its token ids would not line up: "
        + REMAKE_CACHE.format(spoilt)
    )
    assert_refused(mixture_args(run_dir, tiny_model_dir, [two[0], scored]), capsys, run_dir, expected)


def test_a_source_cache_scored_by_another_model_than_sampled_it_is_named(run_dir, tiny_model_dir, capsys, two):
    prompts = write_jsonl(run_dir / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Compute {i}+1."} for i in range(3)])
    gen, cache = run_dir / "gen", run_dir / "cache"
    sampled = generate(str(prompts), gen, str(tiny_model_dir), max_new_tokens=4, accelerator="cpu")
    run = ["--config", str(REPO / "configs" / "demo.yaml"), "--data.val_path", "null", "--data.train_path", str(gen)]
    code, _, err = run_cli(
        ["cache_logprobs", *run, "--model.model_name_or_path", str(BEHAVIOR), "--output", str(cache)], capsys
    )
    assert code == 0, err
    scorer = json.loads((cache / "manifest.json").read_text())["behavior_model_config_fingerprint"]
    source = {"name": "gen", "path": str(gen), "weight": 1, "logprobs_path": str(cache)}
    expected = (
        f'data.mixture[1] (name "gen"): logprobs_path={cache}: scored the train data with {BEHAVIOR} (config {scorer}), '
        f"but {gen} was sampled from {tiny_model_dir} (config {sampled['model_config_fingerprint']}); those log-probs "
        "are not π_β of this data: re-score it with the model that sampled it (`cache_logprobs "
        f"--model.model_name_or_path {tiny_model_dir}`)"
    )
    assert_refused(mixture_args(run_dir, tiny_model_dir, [two[0], source]), capsys, run_dir, expected)
