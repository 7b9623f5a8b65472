"""The embedded mode's synthetic verifiable task: integer arithmetic with a chain of thought.

A problem is an expression such as `76+6*2-1` (2-4 operands of 1-2 digits at the default
difficulty, operators + - *, products first, then left to right). Its solution is a chain of
thought of one step per operation, each `a op b = c` closed by a dot, and the final answer
boxed, the format graded by the project's grader (eval.grader: last `\\boxed{}` + math-verify):

    prompt    "76+6*2-1\\n"
    response  "6*2=12.76+12=88.88-1=87.\\boxed{87}" then EOS

Problems are a pure function of (seed, index, difficulty): the held-out split is indices
0..n-1 of ONE fixed held-out stream (independent of any run's seed, so every seed of a grid
cell is evaluated on the same problems); every training stream, whatever its seed, skips every
expression of that split, so training and evaluation never overlap by construction, and a
sampler's position is just an integer (exact resume).

The tokenizer is character level (the `tokenizers` library), with `\\boxed{` as one token;
`build_tokenizer()` returns a transformers tokenizer that is saved with every zoo model.

Departure from the paper: the paper trains on ~100k real math problems (Big-Math, ORZ);
this task stands in for them so that a 2M-parameter model can learn it in minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

from eval import benchmarks

DIFFICULTY: dict[int, tuple[int, int, int, str]] = {
    # level: (min operands, max operands, max digits, operators)
    1: (2, 3, 1, "+-"),
    2: (2, 4, 2, "+-*"),  # the calibrated default
    3: (3, 5, 2, "+-*"),
    4: (3, 6, 3, "+-*"),
    5: (6, 10, 1, "+-"),  # the study zoo's level: long rewritten chains (REWRITE_FROM) of easy steps
}
REWRITE_FROM = 5
"""From this level on, each step of a worked chain is followed by the whole remaining expression
(`12+34-5` -> `12+34=46.46-5\n46-5=41.`), so responses are long (mean 117 tokens at level 5)
and every step is conditioned on text the model wrote itself."""
BOXED = "\\boxed{"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ALPHABET = list("0123456789+-*=.\n}") + [BOXED]
HELDOUT_STREAM = 1_000_003
"""Stream seed of the held-out split (a constant far from any run seed; never derived from one)."""
HELDOUT_N = 512
"""Size of the held-out split: benchmark `synthetic`; every training stream skips all of it."""
BENCHMARK = "synthetic"
"""The held-out split's benchmark name (scores in eval.jsonl under it); registered by register_benchmark."""
benchmarks.declare_title(BENCHMARK, "synthetic (held-out)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One synthetic problem with its worked solution."""

    id: str
    problem: str
    """The expression, e.g. `76+6*2-1`."""
    answer: str
    """The integer value as text, e.g. `87`."""
    solution: str
    """Chain of thought ending in `\\boxed{answer}` (no EOS)."""

    def row(self) -> dict[str, str]:
        """The benchmark row shape (eval.benchmarks): id, problem, answer."""
        return {"id": self.id, "problem": self.problem, "answer": self.answer}


def _check_difficulty(difficulty: int) -> tuple[int, int, int, str]:
    if difficulty not in DIFFICULTY:
        raise ValueError(
            f"task difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r} "
            f"(RunConfig.task_difficulty / ZooConfig.difficulty)"
        )
    return DIFFICULTY[difficulty]


def solve(operands: list[int], ops: list[str], *, rewrite: bool = False) -> tuple[int, str]:
    """Evaluate with products first, then + and - left to right; return (value, chain of thought).

    rewrite: after each step write the remaining expression (REWRITE_FROM)."""
    if len(ops) != len(operands) - 1:
        raise ValueError(f"{len(operands)} operands need {len(operands) - 1} operators, got {len(ops)}")
    if rewrite:
        return _solve_rewriting(operands, ops)
    steps: list[str] = []
    terms: list[int] = [operands[0]]  # the additive terms after the products are folded
    signs: list[str] = ["+"]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            prod = terms[-1] * x
            steps.append(f"{terms[-1]}*{x}={prod}.")
            terms[-1] = prod
        else:
            terms.append(x)
            signs.append(op)
    acc = terms[0]
    for sign, t in zip(signs[1:], terms[1:]):
        new = acc + t if sign == "+" else acc - t
        steps.append(f"{acc}{sign}{t}={new}.")
        acc = new
    return acc, "".join(steps) + f"{BOXED}{acc}}}"


def _solve_rewriting(operands: list[int], ops: list[str]) -> tuple[int, str]:
    """solve() with the remaining expression rewritten after every step but the last."""
    xs, rest_ops, steps = list(operands), list(ops), []
    while rest_ops:
        i = rest_ops.index("*") if "*" in rest_ops else 0  # products first, then left to right
        a, b, op = xs[i], xs[i + 1], rest_ops.pop(i)
        c = a * b if op == "*" else a + b if op == "+" else a - b
        xs[i : i + 2] = [c]
        remaining = str(xs[0]) + "".join(f"{o}{x}" for o, x in zip(rest_ops, xs[1:]))
        steps.append(f"{a}{op}{b}={c}." + (f"{remaining}\n" if rest_ops else ""))
    return xs[0], "".join(steps) + f"{BOXED}{xs[0]}}}"


def direct_solution(problem: Problem) -> str:
    """The answer alone, boxed, with no worked chain (the other behaviour of a mixed SFT set,
    experiments.zoo.ZooConfig.sft_direct_frac)."""
    return f"{BOXED}{problem.answer}}}"


def make_problem(seed: int, index: int, difficulty: int, *, prefix: str = "train") -> Problem:
    """The problem at `index` of the stream `seed` (deterministic: no global RNG)."""
    lo, hi, digits, opset = _check_difficulty(difficulty)
    rng = random.Random(f"{seed}:{index}:{difficulty}")
    n = rng.randint(lo, hi)
    operands = [rng.randint(1 if digits == 1 else 0, 10 ** rng.randint(1, digits) - 1) for _ in range(n)]
    ops = [rng.choice(opset) for _ in range(n - 1)]
    expr = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
    value, solution = solve(operands, ops, rewrite=difficulty >= REWRITE_FROM)
    return Problem(id=f"{prefix}-{seed}-{difficulty}-{index}", problem=expr, answer=str(value), solution=solution)


def heldout_problems(n: int = HELDOUT_N, *, difficulty: int = 2) -> list[Problem]:
    """The held-out split: the first n problems of the one held-out stream (no run seed)."""
    if not 0 < n <= HELDOUT_N:
        raise ValueError(f"the held-out split has {HELDOUT_N} problems; asked for n={n}")
    return [make_problem(HELDOUT_STREAM, i, difficulty, prefix="heldout") for i in range(n)]


def heldout_rows(n: int = HELDOUT_N, *, difficulty: int = 2) -> list[dict[str, str]]:
    """Benchmark rows (id, problem, answer) of the held-out split, for eval.benchmarks."""
    return [p.row() for p in heldout_problems(n, difficulty=difficulty)]


class TrainStream:
    """Training problems of stream `seed` in a fixed order that skips every expression of the
    whole held-out split (all HELDOUT_N problems, whatever subset a run evaluates); `position`
    is the state."""

    def __init__(self, *, seed: int, difficulty: int, position: int = 0):
        self.seed, self.difficulty, self.position = seed, difficulty, position
        self._heldout = {p.problem for p in heldout_problems(HELDOUT_N, difficulty=difficulty)}

    def next(self) -> Problem:
        while True:
            p = make_problem(self.seed, self.position, self.difficulty)
            self.position += 1
            if p.problem not in self._heldout:
                return p

    def take(self, n: int) -> list[Problem]:
        return [self.next() for _ in range(n)]

    def __iter__(self) -> Iterator[Problem]:
        while True:
            yield self.next()


def solution_steps(solution: str) -> list[str]:
    """The worked steps of a solution, each `a op b = c.` (the boxed answer and, in a rewritten
    chain, the remaining expressions left out)."""
    return [step.split("\n")[-1] + "." for step in solution.split(BOXED)[0].split(".") if step]


def hint_text(problem: Problem, turn: int) -> str:
    """The environment's reply after a wrong answer in turn `turn` (1-based) of a multi-turn episode
    (experiments.multiturn): step `turn` of the worked solution, as a calculator tool would return
    it, between newlines; past the last step a bare newline (try again). The task's alphabet has no
    letters, so the verdict "wrong" is the reply itself."""
    steps = solution_steps(problem.solution)
    return f"\n{steps[turn - 1]}\n" if turn <= len(steps) else "\n"


def format_prompt(problem: str) -> str:
    """The prompt text of a problem (the `arith` template: the expression and a newline)."""
    return f"{problem}\n"


def build_tokenizer():
    """Character-level tokenizer over the task alphabet (`\\boxed{` one token), BOS prepended.

    Returns a transformers `PreTrainedTokenizerFast` (saved with each zoo model).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `\boxed{` first so it wins over the single backslash; every other character alone.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def register_benchmark(*, n: int = HELDOUT_N, difficulty: int = 2) -> None:
    """Register benchmark `synthetic` (held-out split) and template `arith` with the eval package."""
    from eval import templates

    benchmarks.register(BENCHMARK, lambda: heldout_rows(n, difficulty=difficulty))
    if hasattr(templates, "register"):
        templates.register("arith", format_prompt)
