"""Dynamic sampling bookkeeping, batch alignment, mini-batch splitting and the data_prep table
stream (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from experiments import rollout, task
from r3.engines.base import RolloutSample, SamplingParams


class FakeEngine:
    """Returns response '<answer>' or a wrong one following a per-call script; routing rows [T, 2, 2]."""

    def __init__(self, script):
        self.script = list(script)  # per call: list of booleans (right?) per sample
        self.seeds = []

    def generate(self, prompts, params, *, capture_routing=False):
        self.seeds.append(params.seed)
        right = self.script.pop(0)
        out = []
        for p, ok in zip(prompts, right):
            resp = [1, 2] if ok else [3]
            T = len(p) + len(resp) - 1
            ids = torch.arange(T * 4).view(T, 2, 2) % 8 if capture_routing else None
            out.append(
                RolloutSample(
                    prompt_ids=list(p),
                    response_ids=resp,
                    logprobs_R=torch.full((len(resp),), -0.5),
                    expert_ids_TLK=ids,
                    finish_reason="stop",
                )
            )
        return out


def _collect(engine, *, prompts=2, G=2, rounds=4, dynamic=True, gen_prompts=0, stream=None):
    stream = stream or task.TrainStream(seed=0, difficulty=2)
    return rollout.collect(
        engine,
        lambda text: [5] * (len(text) % 3 + 1),
        lambda ids: ["ok" if i == [1, 2] else "no" for i in ids],
        stream,
        reward_fn=lambda texts, golds: [1.0 if t == "ok" else 0.0 for t in texts],
        prompts_per_step=prompts,
        group_size=G,
        params=SamplingParams(max_new_tokens=4),
        dynamic=dynamic,
        max_rounds=rounds,
        capture_routing=True,
        run_seed=7,
        step=3,
        gen_prompts=gen_prompts,
    )


def test_dynamic_sampling_drops_uniform_groups_until_full():
    # round 0: group A all right (dropped), group B mixed (kept); round 1: all wrong, mixed -> full
    eng = FakeEngine([[1, 1, 1, 0], [0, 0, 0, 1]])
    ro = _collect(eng)
    assert len(ro.kept) == 2 and ro.rounds == 2 and ro.sampled_groups == 4
    assert all(g.informative for g in ro.kept)
    assert ro.reward_mean == pytest.approx(4 / 8)
    assert eng.seeds == [rollout.sampling_seed(7, 3, 0), rollout.sampling_seed(7, 3, 1)]


def test_dynamic_sampling_cap_stops_short():
    eng = FakeEngine([[1, 1, 0, 0]] * 3)  # every group uniform: nothing kept
    ro = _collect(eng, rounds=3)
    assert ro.kept == [] and ro.rounds == 3 and ro.sampled_groups == 6


def test_an_oversampled_round_keeps_the_first_informative_groups_in_stream_order():
    # one round of 4 prompts for a batch of 2: A uniform (dropped), B and C kept, D mixed but not needed
    eng = FakeEngine([[1, 1, 1, 0, 0, 1, 1, 0]])
    stream = task.TrainStream(seed=0, difficulty=2)
    want = task.TrainStream(seed=0, difficulty=2).take(4)
    ro = _collect(eng, gen_prompts=4, stream=stream)
    assert ro.rounds == 1 and ro.sampled_groups == 4 and len(eng.seeds) == 1
    assert [g.problem for g in ro.kept] == want[1:3]
    assert stream.position >= 4  # every sampled prompt is consumed, the unused D included
    with pytest.raises(ValueError, match=r"gen_prompts \(1\) must be >= prompts_per_step \(2\)"):
        _collect(FakeEngine([[1, 0]]), gen_prompts=1)


def test_without_dynamic_sampling_everything_is_kept_in_one_round():
    ro = _collect(FakeEngine([[1, 1, 0, 0]]), dynamic=False)
    assert len(ro.kept) == 2 and ro.rounds == 1


def test_build_batch_aligns_response_positions_and_traces():
    g = rollout.Group(
        problem=task.make_problem(0, 0, 2),
        rewards=[1.0, 0.0],
        samples=[
            RolloutSample(
                prompt_ids=[9, 9, 9],
                response_ids=[1, 2],
                logprobs_R=torch.tensor([-0.1, -0.2]),
                expert_ids_TLK=torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]),
            ),
            RolloutSample(
                prompt_ids=[9],
                response_ids=[4],
                logprobs_R=torch.tensor([-0.3]),
                expert_ids_TLK=torch.tensor([[[5, 6]]]),
            ),
        ],
    )
    b = rollout.build_batch([g], pad_id=0, with_routing=True)
    tb = b.train
    assert tb.input_ids_BS.tolist() == [[9, 9, 9, 1, 2], [9, 4, 0, 0, 0]]
    assert tb.loss_mask_BT.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert b.infer_logp_BT[0, 2:].tolist() == pytest.approx([-0.1, -0.2])
    assert b.infer_logp_BT[1, 0].item() == pytest.approx(-0.3)
    assert tb.expert_ids_BTLK.shape == (2, 4, 1, 2)
    assert tb.expert_ids_BTLK[1, 0].tolist() == [[5, 6]]
    assert tb.expert_ids_BTLK[1, 1].tolist() == [[0, 1]]  # dummy distinct experts on padding
    assert b.rewards_B.tolist() == [1.0, 0.0]


def test_build_batch_rejects_misaligned_or_missing_traces():
    s = RolloutSample(
        prompt_ids=[9, 9],
        response_ids=[1],
        logprobs_R=torch.tensor([-0.1]),
        expert_ids_TLK=torch.zeros(3, 1, 2, dtype=torch.long),
    )  # 3 rows for 3 tokens: one too many
    g = rollout.Group(problem=task.make_problem(0, 0, 2), rewards=[1.0], samples=[s])
    with pytest.raises(ValueError, match="has 3 rows, expected 2"):
        rollout.build_batch([g], pad_id=0, with_routing=True)
    s.expert_ids_TLK = None
    with pytest.raises(ValueError, match="capture_routing=True"):
        rollout.build_batch([g], pad_id=0, with_routing=True)


@pytest.mark.parametrize("n_groups, mini, sizes", [(16, 1, [16]), (16, 8, [2] * 8), (5, 8, [1] * 5), (7, 2, [4, 3])])
def test_mini_batches_hold_whole_groups(n_groups, mini, sizes):
    from r3.algorithm import mini_batch_slices

    sl = mini_batch_slices(n_groups, 4, mini)
    assert [(s.stop - s.start) // 4 for s in sl] == sizes
    assert sl[0].start == 0 and sl[-1].stop == n_groups * 4
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:]))


# --- TableStream reads the data stage's output through data_prep.load_train ----------------------
FIXTURES = Path(__file__).resolve().parents[2] / "data_prep" / "fixtures"


@pytest.fixture(scope="module")
def built_table(tmp_path_factory):
    """A finished data_prep build of the small fixtures (math-verify off: no worker processes)."""
    from data_prep.build import build
    from data_prep.config import BuildConfig

    out = tmp_path_factory.mktemp("table") / "build"
    cfg = BuildConfig(
        sources=(f"bigmath={FIXTURES / 'bigmath_sample.parquet'}", f"orz={FIXTURES / 'orz_sample.json'}"),
        verify_answers=False,
    )
    m = build(cfg, out, progress=False, log=lambda s: None)
    return out, m


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_table_stream_reads_a_finished_build(built_table):
    out, m = built_table
    s = rollout.TableStream(str(out), seed=3)
    probs = s.take(m["final_count"] + 2)  # cycles past the end
    assert len({p.id for p in probs}) == m["final_count"] and s.position == m["final_count"] + 2
    assert [p.id for p in rollout.TableStream(str(out), seed=3).take(4)] == [p.id for p in probs[:4]]


def _interrupted(d: Path) -> None:
    (d / "manifest.json").unlink()  # the build deletes it first and writes it last


def _torn(d: Path) -> None:
    (d / "manifest.json").write_text('{"status": "compl')


def _incomplete(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "status": "running"}))


def _table_replaced(d: Path) -> None:  # a second build into the same directory, stopped after its parquet
    import pyarrow.parquet as pq

    t = pq.read_table(d / "train.parquet")
    pq.write_table(t.slice(0, 2), d / "train.parquet")


@pytest.mark.parametrize(
    "damage, kind, found",
    [
        (_interrupted, FileNotFoundError, "found train.parquet without it"),
        (_torn, ValueError, "found unreadable text"),
        (_incomplete, ValueError, "found 'running'"),
        (_table_replaced, ValueError, "expected sha256"),
    ],
)
def test_table_stream_refuses_a_build_without_a_complete_manifest(built_table, tmp_path, damage, kind, found):
    d = _copy(built_table[0], tmp_path / "build")
    damage(d)
    for path in (d, d / "train.parquet"):  # the directory, or its table file directly
        with pytest.raises(kind) as e:
            rollout.TableStream(str(path), seed=0)
        msg = str(e.value)
        assert found in msg  # what arrived
        assert "expected" in msg  # what was expected
        assert f"python -m data_prep.build --out {d}" in msg  # how to fix it
