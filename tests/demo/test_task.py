"""The demo's task: arithmetic problems whose reference solver is always right and varies its wording, and answers
graded exactly."""

import random

from pear_lightning.demo.task import Problem, extract_answer, reference_solution, sample_problem


def test_the_solver_is_always_right_and_varies_its_wording():
    rng = random.Random(1)
    solutions = set()
    for _ in range(2000):
        problem = sample_problem(rng)
        solution = reference_solution(problem, rng)
        assert extract_answer(solution) == str(problem.answer)
        solutions.add(solution)
    assert len({reference_solution(Problem((3, 4, 5), ("+", "+")), rng) for _ in range(100)}) > 5


def test_answers_are_graded_exactly():
    assert Problem((7, 5, 3), ("+", "-")).answer == 9
    assert extract_answer("7+5=12. 12-3=9. #### 9") == "9"
    assert extract_answer("#### -4") == "-4"
    assert extract_answer("7+5=12. 12-3=9.") is None
