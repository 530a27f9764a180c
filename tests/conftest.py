"""Shared fixtures and helpers of every test folder: an offline, throw-away Hugging Face home, the demo tokenizer,
tiny models, command-line runs, and the behaviour log-prob caches several stages read.

The tests mirror the package: ``tests/<stage>/test_<module>.py`` tests ``pear_lightning/<stage>/<module>.py``,
``tests/strategies/`` the built-in strategies, ``tests/e2e/`` the demo and whole-command runs; the ground floor
(``sampling``, ``atomic``) and the layering are tested at this top level. Test files have unique names (the folders
are not packages). Tests write only under temporary folders, never into the repository."""

import os
import tempfile
from pathlib import Path

# One scratch folder for the session, removed at its end (pytest_unconfigure).
SCRATCH = Path(tempfile.mkdtemp(prefix="pear-test-"))
# Before anything imports huggingface_hub: never reach for the network, never touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(SCRATCH / "hf")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Hypothesis keeps a cache in ./.hypothesis unless told otherwise: not in the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(SCRATCH / "hypothesis"))

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DEMO = REPO / "pear_lightning" / "demo"
STUDENT = DEMO / "assets" / "student"
BEHAVIOR = DEMO / "assets" / "behavior"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_unconfigure(config):
    shutil.rmtree(SCRATCH, ignore_errors=True)


# Where a run writes when a test gives it no folder: Lightning's defaults and the demo config's runs/ are relative to
# the working directory, which is often the repository; pip builds a plugin in its source folder.
DEFAULT_OUTPUTS = ("checkpoints", "lightning_logs", "runs", "tests/plugin_example/build")


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository():
    """Fail the test that leaves a run's default outputs in the repository (give its run a temporary folder)."""
    before = {name for name in DEFAULT_OUTPUTS if (REPO / name).exists()}
    yield
    made = {name for name in DEFAULT_OUTPUTS if (REPO / name).exists()} - before
    assert not made, f"the test wrote {sorted(made)} into the repository {REPO}: give its run a temporary folder"


@pytest.fixture(scope="session")
def tokenizer():
    """The demo's byte-level BPE tokenizer with its ChatML template."""
    return AutoTokenizer.from_pretrained(STUDENT)


def save_tiny_llama(path: Path, tokenizer, model_class=LlamaForCausalLM, **overrides) -> Path:
    """Save a freshly initialised (seed 0) two-layer Llama with ``tokenizer`` in ``path``; ``overrides``
    change its config, ``model_class`` the architecture (one with Llama's config fields, e.g. Qwen2)."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, max_position_embeddings=256)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = model_class.config_class(**{**sizes, **ids, **overrides})
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_module(tiny_model_dir):
    """A PearModule over the tiny model, loaded (one per test module)."""
    from pear_lightning import PearModule

    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A folder with a freshly initialised two-layer Llama and the demo tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    """A one-turn chat."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def demo_rows(count: int | None = None, split: str = "train") -> list[dict]:
    """The first ``count`` examples of the demo's ``split``, with their behaviour ``token_ids`` and ``logprobs``."""
    with open(DEMO / "data" / f"{split}.jsonl") as lines:
        return [json.loads(line) for line in lines][:count]


def adamw(lr: float, **init_args) -> dict:
    """An ``optimizer`` setting of PearModule: AdamW with ``lr`` and ``init_args``."""
    return {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, **init_args}}


def fit_quietly(module, data, ckpt_path=None, **trainer_args) -> L.Trainer:
    """``Trainer.fit`` on the CPU with only what a test asks for: no logger, progress bar, model summary or
    validation unless ``trainer_args`` say otherwise; returns the trainer. Without a ``default_root_dir`` its
    checkpoints go to a fresh temporary folder (Lightning's default, the working directory, is the repository)."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    if "default_root_dir" not in trainer_args:
        defaults["default_root_dir"] = tempfile.mkdtemp(prefix="run-", dir=SCRATCH)
    trainer = L.Trainer(**{**defaults, **trainer_args})
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A temporary folder for a command's outputs, run from the repository root (the demo config's paths are
    relative to it), with pytest's own arguments out of the CLI's way and no debug mode."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    monkeypatch.delenv("PEAR_DEBUG", raising=False)
    return tmp_path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in this process; return its exit status, stdout and stderr."""
    from pear_lightning.cli.commands import main

    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def in_process(args: list[str]) -> None:
    """Run the command line in this process with pytest's own arguments out of its way (for module fixtures)."""
    from pear_lightning.cli.commands import main

    argv, sys.argv = sys.argv, ["pear_lightning"]
    try:
        main(args)
    finally:
        sys.argv = argv


def assert_refused(args: list[str], capsys, run_dir: Path, expected: str) -> None:
    """The command stops with exit status 2, ``error: <expected>`` as its one error line, no traceback, and
    nothing trained under ``run_dir``."""
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {expected}"]
    assert "Traceback" not in err
    assert not list(run_dir.glob("**/*.ckpt")) and not list(run_dir.glob("**/metrics.csv"))


GOOD = [{"id": f"g{i}", "prompt": f"Compute {i}+1.", "completion": f"#### {i + 1}"} for i in range(4)]  # valid rows


def fit_args(run_dir, model, train, *extra):
    """A one-step CPU run with a CSV logger under ``run_dir/runs`` (no demo config, no callbacks)."""
    return [
        "fit",
        "--model.model_name_or_path",
        str(model),
        "--data.train_path",
        str(train),
        "--data.batch_size",
        "2",
        "--data.max_length",
        "64",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(run_dir / "runs"),
        "--trainer.default_root_dir",
        str(run_dir / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


# Behaviour log-prob caches: made once per session by `cache_logprobs` from 120 + 30 demo rows, read by the tests of
# the cache's writing (behavior/), its join (data/) and the commands that need one (training/, cli/).

# What a join refusal advises (data/join.py).
RESCORE = (
    "Re-score the data with `python -m pear_lightning cache_logprobs` and this run's config (same tokenizer, "
    "chat template and max_length), or set data.drop_misaligned true to train without them"
)
# What a refusal of the cache itself advises (data/cache.py), for the cache ``{}``.
REMAKE_CACHE = "re-run `python -m pear_lightning cache_logprobs --config <this run's config> --output {}`"
TEACHER_K = 8  # the teacher cache's top-k


@pytest.fixture(scope="session")
def cache_workdir(tmp_path_factory):
    """Small train/val files from the demo data (with their shipped log-probs): 120 and 30 rows."""
    root = tmp_path_factory.mktemp("cache")
    rows = demo_rows(split="val")
    write_jsonl(root / "train.jsonl", rows[:120])
    write_jsonl(root / "val.jsonl", rows[120:150])
    return root


def cache_logprobs_args(workdir: Path, output: Path, *extra: str) -> list[str]:
    """`cache_logprobs` of ``workdir``'s train and val data with the demo's behaviour model, in shards of 50."""
    return [
        "cache_logprobs",
        *("--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", str(BEHAVIOR)),
        *("--data.train_path", str(workdir / "train.jsonl"), "--data.val_path", str(workdir / "val.jsonl")),
        *("--data.batch_size", "16", "--output", str(output), "--shard_size", "50", "--splits", "[train,val]"),
        *extra,
    ]


def teacher_cache_args(workdir: Path, output: Path, *extra: str) -> list[str]:
    """``cache_logprobs_args`` with the teacher's (by default the behaviour model's) top ``TEACHER_K`` too."""
    return cache_logprobs_args(workdir, output, "--teacher_top_k", str(TEACHER_K), *extra)


@pytest.fixture(scope="session")
def behaviour_cache(cache_workdir):
    """A cache of train (3 shards: 50, 50, 20 rows) and val (1 shard), made in this process."""
    in_process(cache_logprobs_args(cache_workdir, cache_workdir / "cache"))
    return cache_workdir / "cache"


@pytest.fixture(scope="session")
def teacher_cache(cache_workdir):
    """The same cache with the teacher's top-k (teacher = the behaviour model, fp32)."""
    in_process(teacher_cache_args(cache_workdir, cache_workdir / "teacher-cache"))
    return cache_workdir / "teacher-cache"


def fit_on_cache_args(workdir: Path, cache: Path, root: Path, *extra: str) -> list[str]:
    """`fit` of the demo config with TokenIS on ``workdir``'s data joined to ``cache``, writing under ``root``."""
    return [
        "fit",
        *("--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", str(STUDENT)),
        *("--data.train_path", str(workdir / "train.jsonl"), "--data.val_path", str(workdir / "val.jsonl")),
        *("--data.logprobs_path", str(cache), "--model.weighting", "TokenIS"),
        *("--trainer.logger.init_args.save_dir", str(root), "--trainer.default_root_dir", str(root)),
        *extra,
    ]


def read_cache(folder: Path) -> dict[str, list[dict]]:
    """Every Parquet shard of a cache (or a generate folder), by file name, as rows."""
    import pyarrow.parquet as pq

    return {f.name: pq.read_table(f).to_pylist() for f in sorted(folder.glob("*.parquet"))}


# Small batches for the loss and log-prob paths.

SMALL_CHATS = [
    {"messages": conversation("Compute 1+2.", "1+2=3. #### 3")},
    {"prompt": "Compute 9-8+7-6+5.", "completion": "First, 9-8=1. Then 1+7=8. Next, 8-6=2. 2+5=7. #### 7"},
    {
        "messages": conversation("Hi", "#### 0")
        + [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "ok"}]
    },
]  # three examples of different lengths (so a batch of them is padded), one of two assistant turns


def collate_examples(tokenizer, examples: list[dict], max_length: int = 256) -> dict:
    """Tokenise ``examples`` (ids "0", "1", …) and collate them into one padded batch."""
    from pear_lightning.data.collate import collate
    from pear_lightning.data.render import tokenize_example

    rows = [{**tokenize_example(e, tokenizer, max_length, str(i)), "id": str(i)} for i, e in enumerate(examples)]
    return collate(rows, tokenizer.pad_token_id)


def collate_with_behavior(tokenizer, examples: list[dict]) -> tuple[dict, list[dict]]:
    """Collate ``examples`` with made-up behaviour log-probs (as the join leaves them); return the batch and those
    log-probs (``{"id", "logprobs"}`` per example)."""
    from pear_lightning.data.collate import collate
    from pear_lightning.data.render import tokenize_example

    rows, behavior = [], []
    for i, example in enumerate(examples):
        tokens = tokenize_example(example, tokenizer, 256, str(i))
        n = sum(tokens["loss_mask"])
        behavior.append({"id": str(i), "logprobs": [-(i + 1) - k / 100 for k in range(n)]})
        rows.append({**tokens, "id": str(i), "behavior_logp": behavior[-1]["logprobs"]})
    return collate(rows, tokenizer.pad_token_id), behavior


def mixed_examples(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Chats of one to four demo turns (so their lengths differ up to fourfold), with the response ``token_ids`` the
    trainer will see and made-up behaviour ``logprobs`` for them."""
    from pear_lightning.data.render import tokenize_example

    demo = [row["messages"] for row in demo_rows(4 * count)]
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        turns = 1 + (i * 7) % 4
        messages = [m for conversation in demo[4 * i : 4 * i + turns] for m in conversation]
        tokens = tokenize_example({"messages": messages}, tokenizer, 1024, str(i))
        token_ids = [t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m]
        logprobs = (-8 + 6 * torch.rand(len(token_ids), generator=generator)).tolist()
        examples.append({"id": f"m{i}", "messages": messages, "token_ids": token_ids, "logprobs": logprobs})
    return examples


@pytest.fixture(scope="session")
def mixed_rows(tokenizer):
    """Twelve examples of mixed length, tokenised, with their behaviour log-probs as the join leaves them."""
    from pear_lightning.data.render import tokenize_example

    rows = []
    for example in mixed_examples(tokenizer, 12):
        tokens = tokenize_example(example, tokenizer, 1024, example["id"])
        rows.append({**tokens, "id": example["id"], "behavior_logp": example["logprobs"]})
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) > 3 * min(lengths)
    return rows


@pytest.fixture(scope="session")
def uneven_data(tmp_path_factory):
    """The four shortest then the four longest demo responses (with behaviour log-probs): micro-batches of
    two differ about threefold in token count."""
    rows = sorted(demo_rows(), key=lambda r: len(r["token_ids"]))
    chosen = rows[:4] + rows[-4:]
    assert len(chosen[-1]["token_ids"]) > 2 * len(chosen[0]["token_ids"])
    return write_jsonl(tmp_path_factory.mktemp("uneven") / "train.jsonl", chosen)


@pytest.fixture(scope="session")
def alternating_data(uneven_data):
    """The same examples alternating short and long: a distributed sampler gives rank 0 the short ones."""
    rows = [json.loads(line) for line in open(uneven_data)]
    return write_jsonl(
        uneven_data.with_name("alternating.jsonl"), [r for pair in zip(rows[:4], rows[4:]) for r in pair]
    )


MIXED_FORMS = [  # chat and prompt/completion rows in one file
    {"id": "a", "messages": conversation("Compute 1+2.", "1+2=3. #### 3")},
    {"id": "b", "prompt": "Compute 2+2.", "completion": "2+2=4. #### 4"},
    {"id": "c", "messages": conversation("Compute 5-1.", "5-1=4. #### 4")},
]


def tokenized_train(path, **kwargs):
    """``path`` as the training split of a data module with the demo tokenizer, tokenised."""
    from pear_lightning import PearDataModule

    return PearDataModule(train_path=str(path), tokenizer_name_or_path=str(STUDENT), **kwargs).tokenized("train")
