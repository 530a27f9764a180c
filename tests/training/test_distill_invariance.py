"""The bucket KL reads the teacher as a distribution, whatever its storage did to it: renormalised, it is invariant
to a constant shift of the teacher's top-k log-probs and tail (what rounding or a missing normaliser adds), and it is
zero, up to fp16 rounding, for a teacher that is the student's own distribution stored in fp16 as caches store it."""

import pytest
import torch

from pear_lightning.training.distill import TeacherTopK, bucket_kl


def distributions(seed: int, k: int = 8, vocab: int = 50, tokens: int = 16):
    """A student's log-probs at the teacher's top k ids and its tail, and the teacher's own top k and tail."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(torch.randn(tokens, vocab, generator=generator) * 2, dim=-1)
    teacher = torch.log_softmax(torch.randn(tokens, vocab, generator=generator) * 2, dim=-1)
    values, ids = teacher.topk(k, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
    at_ids = student.gather(1, ids)
    student_tail = torch.log1p(-at_ids.exp().sum(-1).clamp(max=1 - 1e-7))
    return student, ids, at_ids, student_tail, TeacherTopK(ids, values, tail)


@pytest.mark.parametrize("shift", [-3.0, -0.01, 0.5])
def test_a_constant_shift_of_the_teachers_log_probs_and_tail_leaves_the_kl_as_it_is(shift):
    _, _, at_ids, student_tail, teacher = distributions(0)
    shifted = TeacherTopK(teacher.ids, teacher.logprobs + shift, teacher.tail + shift)
    kl = bucket_kl(at_ids, student_tail, teacher)
    assert (kl > 1e-3).all()
    torch.testing.assert_close(bucket_kl(at_ids, student_tail, shifted), kl, rtol=1e-5, atol=1e-6)


def test_the_student_stored_in_fp16_as_its_own_teacher_gives_a_kl_of_zero():
    student, _, _, _, _ = distributions(1)
    values, ids = student.topk(8, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1))
    stored = TeacherTopK(ids, values.half(), tail.half())  # a cache's fp16 top-k, rounded: its mass is no longer 1
    assert (stored.logprobs.float().exp().sum(-1) + stored.tail.float().exp() - 1).abs().max() > 1e-5
    at_ids = student.gather(1, ids)
    kl = bucket_kl(at_ids, torch.log1p(-at_ids.exp().sum(-1)), stored)
    assert kl.abs().max() < 1e-5
