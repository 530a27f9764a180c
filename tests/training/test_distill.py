"""Distillation's per-token KL: the dense KL when k is the vocabulary, zero for the student as teacher, every
strategy's weights multiplying it unchanged, and `fit --model.loss kl` on a teacher cache logging its diagnostics."""

import pytest
import torch
from conftest import BEHAVIOR, demo_rows, fit_on_cache_args, run_cli

from pear_lightning import PearModule
from pear_lightning.data.cache import TEACHER_COLUMNS
from pear_lightning.data.collate import collate as collate_rows
from pear_lightning.data.render import tokenize_example
from pear_lightning.errors import PearError
from pear_lightning.model.topk import teacher_topk, topk_logprobs
from pear_lightning.strategies import DFT, BlockIS, SequenceIS, TokenIS, TruncatedIS, UniformSFT
from pear_lightning.strategies.base import TokenBatch, WeightingStrategy
from pear_lightning.training.distill import TeacherTopK, bucket_kl, score
from pear_lightning.training.loss import loss_terms


def tokenized(tokenizer, rows):
    return [{**tokenize_example(row, tokenizer, 128, str(i)), "id": row["id"]} for i, row in enumerate(rows)]


def collate(tokenizer, rows):
    return collate_rows(tokenized(tokenizer, rows), tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    module = PearModule(str(tiny_model_dir), loss="kl")
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def teacher_model():
    """The demo's behaviour policy: another model with the student's tokenizer."""
    module = PearModule(str(BEHAVIOR))
    module.configure_model()
    return module.model


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Four demo examples of different lengths (so rows are padded)."""
    return collate(tokenizer, [{k: v for k, v in r.items() if k != "logprobs"} for r in demo_rows(4)])


def with_teacher(batch, model, k):
    """``batch`` with ``model``'s top-k as the teacher columns (as a cache would give them)."""
    with torch.no_grad():
        _, ids, values, tail = teacher_topk(model, batch, k)
    return {**batch, **dict(zip(TEACHER_COLUMNS, (ids, values, tail)))}


def dense(model, batch):
    """log π of every vocabulary token at the loss positions, [N, V], from the model's own full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, :-1][batch["loss_mask"][:, 1:]].float(), dim=-1)


@pytest.mark.parametrize("chunk_size", [0, 1, 7, 256])
def test_with_k_equal_to_the_vocabulary_kl_and_gradient_equal_the_dense_kl(student, teacher_model, batch, chunk_size):
    model, vocab = student.model, student.model.config.vocab_size
    taught = with_teacher(batch, teacher_model, vocab)
    teacher = TeacherTopK(*(taught[c] for c in TEACHER_COLUMNS))
    assert teacher.ids.shape[1] == vocab and torch.isneginf(teacher.tail).all()
    args = (batch, teacher.ids)
    weights = torch.rand(len(teacher.ids))  # any per-token weights: the gradient of Σ w·KL must match too

    _, at_ids, tail = topk_logprobs(model, *args, chunk_size=chunk_size)
    ours = bucket_kl(at_ids, tail, teacher)
    ours_grads = torch.autograd.grad((weights * ours).sum(), list(model.parameters()))

    log_q = dense(teacher_model, batch).detach()
    reference = (log_q.exp() * (log_q - dense(model, batch))).sum(dim=-1)
    reference_grads = torch.autograd.grad((weights * reference).sum(), list(model.parameters()))

    assert reference.min() > 0.1  # two different models: a KL far from 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_with_fewer_tokens_it_is_the_kl_of_the_bucketed_distributions_and_at_most_the_full_kl(
    student, teacher_model, batch
):
    k = 5
    teacher = TeacherTopK(*(with_teacher(batch, teacher_model, k)[c] for c in TEACHER_COLUMNS))
    args = (batch, teacher.ids)
    with torch.no_grad():
        ours = bucket_kl(*topk_logprobs(student.model, *args)[1:], teacher)
        log_q, log_p = dense(teacher_model, batch).double(), dense(student.model, batch).double()
    q, p = log_q.exp(), log_p.exp()
    q_k, p_k = q.gather(-1, teacher.ids), p.gather(-1, teacher.ids)
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, teacher.ids, False)
    q_tail, p_tail = (q * outside).sum(-1), (p * outside).sum(-1)  # summed directly: 1 − Σ top-k would cancel
    assert (q_tail < 1e-3).any()  # a peaked teacher, where the tail is small
    torch.testing.assert_close(teacher.tail.double(), q_tail.log(), rtol=1e-5, atol=1e-5)
    bucketed = (q_k * (q_k.log() - p_k.log())).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    torch.testing.assert_close(ours.double(), bucketed, rtol=1e-5, atol=1e-5)
    full = (q * (log_q - log_p)).sum(-1)
    assert (ours.double() <= full + 1e-6).all() and (ours >= -1e-6).all()


@pytest.mark.parametrize("strategy", [UniformSFT(), TokenIS(gamma=0.9)], ids=["UniformSFT", "TokenIS"])
def test_the_student_as_its_own_teacher_gives_loss_and_gradient_zero(student, batch, strategy):
    taught = with_teacher(batch, student.model, 20)
    taught["behavior_logp"] = torch.full(batch["input_ids"].shape, -1.0)
    student.weighting = strategy
    terms = student.loss_terms(taught)
    grads = torch.autograd.grad(terms.total, [p for p in student.model.parameters() if p.requires_grad])
    assert abs(terms.total.item()) < 1e-5
    assert terms.metrics["kl"].abs() < 1e-6 and terms.metrics["top1_agreement"] == 1
    assert max(g.abs().max().item() for g in grads) < 1e-5
    assert terms.nll > 0  # the data tokens are still scored (train/nll, the IS ratios)


class RowMeanSFT(WeightingStrategy):
    """A third-party strategy, as a plugin would define it: weight 1 / (loss tokens of its row)."""

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        mask = batch.mask.float()
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


STRATEGIES = [
    UniformSFT(),
    SequenceIS(),
    TokenIS(gamma=0.9),
    BlockIS(block_size=3, gamma=0.9),
    DFT(),
    TruncatedIS(cap=1.5),
    RowMeanSFT(),
]


@pytest.mark.parametrize("kind", ["kl", "nll+kl"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_strategy_weights_the_token_kl_unchanged(student, teacher_model, batch, strategy, kind):
    taught = with_teacher(batch, teacher_model, 8)
    torch.manual_seed(0)
    taught["behavior_logp"] = torch.where(batch["loss_mask"], -3 * torch.rand(batch["input_ids"].shape), 0.0)
    tokens, per_token, metrics = score(student.model, taught, kind, 256)
    terms = loss_terms(strategy, tokens, "tokens", per_token, metrics)
    weights = strategy.weights(tokens)  # from the data token's log-probs and the behaviour log-probs, as for NLL
    assert not weights.requires_grad
    teacher = TeacherTopK(*(taught[c] for c in TEACHER_COLUMNS))
    _, at_ids, tail = topk_logprobs(student.model, batch, teacher.ids)
    kl = torch.zeros_like(tokens.logp).masked_scatter(tokens.mask, bucket_kl(at_ids, tail, teacher))
    expected = kl if kind == "kl" else kl - tokens.logp
    reference = (weights * expected)[tokens.mask].sum()
    params = [p for p in student.model.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(terms.total, params, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(terms.total, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # two graphs: fp32 summation order
    assert set(metrics) <= set(terms.metrics) and {"kl", "kl_max", "teacher_tail_mass"} <= set(metrics)


def test_a_strategy_with_its_own_token_losses_is_refused_under_kl(student, teacher_model, batch):
    class Entropic(UniformSFT):
        def token_losses(self, batch: TokenBatch) -> torch.Tensor:
            return super().token_losses(batch) + batch.logp.exp()

    tokens, per_token, metrics = score(student.model, with_teacher(batch, teacher_model, 4), "kl", 256)
    with pytest.raises(PearError, match="weighting Entropic defines its own token_losses"):
        loss_terms(Entropic(), tokens, "tokens", per_token, metrics)


def test_a_batch_without_teacher_or_with_ids_beyond_the_student_vocabulary_is_refused(student, teacher_model, batch):
    with pytest.raises(PearError, match="model.loss kl: the training data has no teacher top-k log-probs"):
        score(student.model, batch, "kl", 256)
    taught = with_teacher(batch, teacher_model, 4)
    taught[TEACHER_COLUMNS[0]] = taught[TEACHER_COLUMNS[0]].clone()
    taught[TEACHER_COLUMNS[0]][3, 1] = 301
    with pytest.raises(PearError, match="holds token id 301, outside the student's vocabulary of 301"):
        score(student.model, taught, "kl", 256)


@pytest.mark.parametrize("kind", ["kl", "nll+kl"])
def test_a_packed_batch_gives_each_example_the_padded_batchs_token_losses(student, teacher_model, tokenizer, kind):
    rows = tokenized(tokenizer, [{k: v for k, v in r.items() if k != "logprobs"} for r in demo_rows(6)])
    padded = collate_rows(rows, tokenizer.pad_token_id)
    taught = with_teacher(padded, teacher_model, 8)
    counts = padded["loss_mask"].sum(dim=1).tolist()  # one example per padded row, its teacher rows in order
    columns = [taught[c].split(counts) for c in TEACHER_COLUMNS]
    torch.manual_seed(0)
    for i, row in enumerate(rows):
        row |= {c: columns[j][i].flatten().tolist() for j, c in enumerate(TEACHER_COLUMNS)}
        row["behavior_logp"] = (-3 * torch.rand(counts[i])).tolist()
    padded, packed = collate_rows(rows, tokenizer.pad_token_id), collate_rows(rows, tokenizer.pad_token_id, 512)
    assert len(packed["input_ids"]) < len(rows)
    strategy = TokenIS(gamma=0.9)  # suffix sums within each packed sequence (segment_ids)
    terms = []
    for b in (padded, packed):
        tokens, per_token, metrics = score(student.model, b, kind, "auto")
        terms.append(loss_terms(strategy, tokens, "tokens", per_token, metrics))
    ours = [score(student.model, b, kind, 7)[1] for b in (padded, packed)]  # fixed chunks, recomputed: the same
    for i in range(len(rows)):
        in_packed = (packed["segment_ids"] == i) & packed["loss_mask"]
        for a, b in ((ours[1], ours[0]), (terms[1].weights, terms[0].weights)):
            torch.testing.assert_close(a[in_packed], b[i][padded["loss_mask"][i]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms[1].total, terms[0].total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms[1].metrics["kl"], terms[0].metrics["kl"], rtol=1e-4, atol=1e-6)


def test_the_kl_diagnostics_wait_for_logging_steps(student, teacher_model, batch):
    taught = with_teacher(batch, teacher_model, 4)
    student.weighting = UniformSFT()
    assert score(student.model, taught, "kl", "auto", metrics=False)[2] == {}
    assert student.loss_terms(taught, metrics=False).metrics == {}
    assert {"kl", "top1_agreement"} <= set(student.loss_terms(taught).metrics)


def test_kl_with_token_is_trains_and_logs_the_kl_diagnostics(cache_workdir, teacher_cache, tmp_path, capsys, run_dir):
    args = fit_on_cache_args(cache_workdir, teacher_cache, tmp_path, "--model.loss", "kl", "--trainer.max_steps", "2")
    args += ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2", "--data.batch_size", "16"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    header = next(tmp_path.glob("demo/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    for name in ("kl", "kl_max", "teacher_tail_mass", "student_tail_mass", "top1_agreement", "ess"):
        assert f"train/{name}_step" in header
