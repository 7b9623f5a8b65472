"""Zoo recipes: the study zoo's mixed SFT set (direct answers beside worked chains)."""

from __future__ import annotations

from experiments import task, zoo


def test_study_sft_stream_mixes_direct_answers_at_its_share_reproducibly():
    cfg = zoo.SIZES["study"]
    assert cfg.sft_direct_frac == 0.5 and cfg.difficulty == task.REWRITE_FROM
    probs = zoo._stream(cfg, 1).take(2000)
    direct = [p for p in probs if p.solution == task.direct_solution(p)]
    assert 0.45 < len(direct) / len(probs) < 0.55
    assert all(p.solution.count("=") >= 4 for p in probs if p not in direct)  # the others keep their chain
    again = zoo._stream(cfg, 1)
    again.position = 0
    assert again.take(2000) == probs  # a function of (seed, position): reproducible
    s = zoo._stream(cfg, 1)
    s.take(700)
    resumed = zoo._stream(cfg, 1)
    resumed.position = s.position
    assert resumed.take(50) == s.take(50)


def test_pretraining_and_the_tiny_recipe_stay_chain_only():
    for cfg in (zoo.SIZES["tiny"], zoo.SIZES["study"]):
        probs = zoo._stream(cfg, 0).take(300)
        assert all(p.solution != task.direct_solution(p) for p in probs)
    probs = zoo._stream(zoo.SIZES["tiny"], 1).take(300)
    assert all(p.solution != task.direct_solution(p) for p in probs)
