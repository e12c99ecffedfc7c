"""Synthetic arithmetic for the demo model: 3-digit addition and subtraction, solved column by column.

A problem is typed as a person would (`357+48`, `512 - 89`). The thought restates it with both
operands zero-padded to 3 digits, then works one fixed-width step per column, units first, with
the carry (or borrow) written out: `7+8+0=15` is digit 7 plus digit 8 plus carry 0, giving carry 1
and digit 5; `4-9-0=15` is 4 minus 9 minus borrow 0, giving borrow 1 and digit 5. The answer is
the bare number.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

MAX_OPERAND = 999
SEED = 1234
HELD_OUT_SIZE = 1000


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+" or "-"
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


def random_problem(rng: random.Random) -> Problem:
    """a+b with 0 <= a, b <= 999, or a-b with 0 <= b <= a <= 999, each half the time."""
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return Problem(a, "+", b)
    return Problem(max(a, b), "-", min(a, b))


def training_problem(rng: random.Random) -> Problem:
    """Mostly uniform problems, with short operands and near-equal subtractions mixed in: their answers
    have leading zeros to skip, which uniform sampling rarely shows."""
    kind = rng.random()
    if kind < 0.7:
        return random_problem(rng)
    if kind < 0.85:
        a, b = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))
        return Problem(a, "+", b) if rng.random() < 0.5 else Problem(max(a, b), "-", min(a, b))
    a = rng.randint(0, MAX_OPERAND)
    return Problem(a, "-", max(0, a - rng.randint(0, 120)))


def user_message(problem: Problem, rng: random.Random) -> str:
    """The problem as typed: spaces around the operator are optional."""
    left, right = rng.choice([("", ""), ("", ""), (" ", " "), (" ", ""), ("", " ")])
    return f"{problem.a}{left}{problem.op}{right}{problem.b}"


def thought(problem: Problem) -> str:
    """`745-292\n5-2-0=03|4-9-0=15|7-2-1=04|`: the padded problem, then one step per column, units first."""
    a, b, op = f"{problem.a:03d}", f"{problem.b:03d}", problem.op
    steps, carry = [], 0
    for da, db in zip(map(int, reversed(a)), map(int, reversed(b))):
        value = da + db + carry if op == "+" else da - db - carry
        carry_out = value // 10 if op == "+" else int(value < 0)
        steps.append(f"{da}{op}{db}{op}{carry}={carry_out}{value % 10}|")
        carry = carry_out
    return f"{a}{op}{b}\n" + "".join(steps)


def completion(problem: Problem) -> str:
    """The assistant's text after the generation prompt `<think>\\n`: the thought, then the answer."""
    return f"{thought(problem)}\n</think>\n\n{problem.answer}"


def assistant_text(problem: Problem) -> str:
    """The whole assistant message, as R1 writes it."""
    return f"<think>\n{completion(problem)}"


def held_out(n: int = HELD_OUT_SIZE, seed: int = SEED) -> list[Problem]:
    """A fixed set of distinct problems that training never sees."""
    rng = random.Random(f"held-out-{seed}")
    chosen: dict[Problem, None] = {}
    while len(chosen) < n:
        chosen[random_problem(rng)] = None
    return list(chosen)


def training_stream(seed: int = SEED, exclude: set[Problem] | None = None) -> Iterator[tuple[Problem, str]]:
    """Endless (problem, user message) pairs, reproducible from `seed`, skipping the held-out problems."""
    exclude = set(held_out()) if exclude is None else exclude
    rng = random.Random(f"train-{seed}")
    while True:
        problem = training_problem(rng)
        if problem not in exclude:
            yield problem, user_message(problem, rng)
