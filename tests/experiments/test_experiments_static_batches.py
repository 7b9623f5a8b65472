"""The static measurement in bounded batches (experiments.static_mismatch.measure, batch_prompts): every
train-engine call holds at most batch_prompts x group_size rows, metrics over several batches equal the
metrics of one batch holding the same rows, and the MoE model's engines are released before the dense
model's engines are built."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from experiments import static_mismatch, zoo


def test_batches_are_bounded_and_the_moe_engines_are_gone_before_the_dense_ones(micro_zoo):
    rows, alive_at_dense, phases = [], [], []
    refs: list[weakref.ref] = []
    moe_dir, dense_dir = zoo.model_dir("sft", micro_zoo), zoo.model_dir("dense", micro_zoo)

    class Counting:  # the zoo's train engine, counting the rows of each call
        def __init__(self, engine):
            self.engine, self.is_moe = engine, engine.is_moe

        def compute_logprobs(self, batch, **kw):
            rows.append(batch.input_ids_BS.shape[0])
            return self.engine.compute_logprobs(batch, **kw)

    def engines(model_dir):
        if model_dir == dense_dir:
            gc.collect()
            alive_at_dense.extend(r() is not None for r in refs)
        ro, tr = static_mismatch._engine_pair(model_dir, "bf16", 0, "hf", progress=False)
        refs.extend([weakref.ref(tr)])
        return ro, Counting(tr)

    rec = static_mismatch.measure(
        moe_dir, dense_dir, "bf16", n_prompts=5, group_size=2, max_new_tokens=6, engines=engines,
        batch_prompts=2, on_phase=phases.append,
    )  # fmt: skip
    assert rows == [4, 4, 4, 4, 2, 2, 4, 4, 2]  # 3 batches x (native, R3) for the MoE, then 3 dense
    assert alive_at_dense == [False]  # the MoE train engine was freed before the dense one was built
    assert phases == sorted(phases) and phases[-1] == pytest.approx(1.0)
    assert rec["moe"]["fed_tokens"] > rec["moe"]["tokens"] > 0 and len(rec["moe"]["per_layer_disagreement"]) == 2
    assert sum(rec["moe"]["log_ratio_hist"]["counts"]) == rec["moe"]["tokens"]


def test_metrics_over_batches_equal_metrics_of_one_batch():
    g = torch.Generator().manual_seed(0)
    B, T, L, K = 6, 9, 2, 2
    train, infer = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    fed = torch.ones(B, T, dtype=torch.bool)
    fed[0, 6:] = False
    a = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(B * T * L)]).view(B, T, L, K)
    b = a.clone()
    b[1, :4, 0] = torch.tensor([7, 6])  # some routing differs
    one = static_mismatch._Accumulator()
    one.add(train, infer, mask, a, b, fed)
    two = static_mismatch._Accumulator()
    for rows in (slice(0, 2), slice(2, 6)):
        two.add(train[rows], infer[rows], mask[rows], a[rows], b[rows], fed[rows])
    ref, got = one.metrics(), two.metrics()
    assert got["tokens"] == ref["tokens"] and got["fed_tokens"] == ref["fed_tokens"]
    assert got["log_ratio_hist"] == ref["log_ratio_hist"]
    for key in ("k3_kl", "extreme_frac@2", "abs_log_ratio_mean", "abs_log_ratio_max",
                "routing_pair_disagreement", "routing_token_disagreement"):  # fmt: skip
        assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert got["per_layer_disagreement"] == pytest.approx(ref["per_layer_disagreement"], rel=1e-6)
    assert got["F_curve"]["F"] == pytest.approx(ref["F_curve"]["F"], abs=1e-9)
