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


def test_zoo_trains_on_one_thread_whatever_the_caller_set(tmp_path, monkeypatch):
    """A zoo's weights depend on the intra-op thread count (float reductions), so both models train
    on one thread whether the caller is the study command (1 thread) or the zoo CLI (every core), and
    the caller's count is restored afterwards."""
    import torch

    seen = []

    def fake_train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return [0.0]

    monkeypatch.setattr(zoo, "train_lm", fake_train)
    monkeypatch.setattr(zoo, "_save", lambda *a, **k: None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        zoo._train_moe(zoo.SIZES["micro"], tmp_path)
        zoo._train_dense(zoo.SIZES["micro"], tmp_path)
        assert seen == [1, 1, 1, 1]  # Base, SFT; dense Base, dense SFT
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
