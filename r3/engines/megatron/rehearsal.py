"""Rehearse one training rank of a large layout on this CPU: live bytes per phase of a real step.

    r = rehearse_step(paper_rank_config(layers=2), seq_len=9216)     # real engine code, real shapes
    print(r["phases"])   # {"build": ..., "forward": ..., "logprobs+loss": ..., "backward": ..., ...}

What runs: `MegatronTrainEngine` (bf16, megatron's DDP + distributed optimizer, full recompute,
micro-batch 1, REPLAY of a routing trace) on a Qwen3-MoE of the paper rank's per-rank shapes: full
width (hidden, heads, vocabulary), the rank's local experts (128 / EP) with top-k 8, and a reduced
number of decoder layers; one `train_step` of one sequence of `seq_len` tokens. Every tensor is a real
CPU tensor and every op of the engine, megatron and torch autograd runs, except that `LiveBytes` (a
TorchDispatchMode) does not compute:
  - matmul-class ops above `flops_below` (mm, bmm, baddbmm, SDPA and their backwards: hours of CPU at
    full width), and
  - any op whose result (or the tensor it writes in place) is above `bytes_below` (64 MiB);
it allocates their results (torch.empty_strided with the shapes and strides torch's meta kernels give)
without writing them. Large allocations come straight from mmap (glibc serves anything above 32 MiB
that way), so untouched results cost no physical memory: the process stays at a few GB while the
tensors it counts add up to tens. Values are zeros, which is all a memory rehearsal needs; routing is
replayed from a balanced trace (every local expert receives the same number of tokens, as under EP
with balanced routing), so no shape depends on values.
LiveBytes counts the bytes of every storage created under it until it is freed (weak references, as
torch.distributed._tools.mem_tracker does) and keeps the peak per phase. Phases are set by wrapping
the engine's gpt_logits, the loss function and the optimizer step.

Depth: a rank's activation peak with full recompute grows linearly with its layers (each layer keeps
its input; one layer is live in full during its recompute), so two depths n1 < n2 give the per-layer
slope and `scale_to_depth` extrapolates to the model's depth; the static state (weights, fp32 main
grads, optimizer shards) is taken from the memory plan (r3.engines.megatron.memory) on the full model,
whose per-parameter bytes the rehearsal checks against the bytes it measured after building.
What it does not see: the CUDA context, NCCL buffers and allocator fragmentation (the plan's reserve),
the alltoall dispatcher's receive buffers of other ranks' tokens under EP > 1 (added from shapes), and
the CUDA kernels' own workspaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import resource
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GB = 1e9
MiB = 2**20
_NO_FAKE = {torch.ops.aten._unsafe_view.default, torch.ops.aten.lift_fresh.default}
"""Ops that share their input's storage without being marked as views in their schema."""
_HEAVY = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


class LiveBytes(TorchDispatchMode):
    """Live storage bytes created under this mode, their peak overall and per phase (module docstring).
    `phase` is set by the caller (`with lb.in_phase("forward"): ...`)."""

    def __init__(self, *, flops_below: float = 5e7, bytes_below: int = 64 * MiB):
        super().__init__()
        self.flops_below, self.bytes_below = flops_below, bytes_below
        self.live = 0
        self.peak = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self.skipped = 0
        self.large: list[tuple[str, str, int]] = []
        """(phase, op, bytes) of every allocation above bytes_below."""
        self.holders: dict[str, list[tuple[str, str, int]]] = {}
        """Per phase, the allocations above bytes_below live at its peak (phase made, op, bytes)."""
        self._refs: dict[int, weakref.ref] = {}
        self._large_live: dict[int, tuple[str, str, int]] = {}

    # --- accounting ---------------------------------------------------------------------------------
    def _track(self, t, op: str = "") -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        n, key = st.nbytes(), st.data_ptr()
        if n == 0 or key in self._refs:
            return
        if n > self.bytes_below:
            self.large.append((self.phase, op, n))
            self._large_live[key] = (self.phase, op, n)

        def freed(_ref, key=key, n=n):
            self._refs.pop(key, None)
            self._large_live.pop(key, None)
            self.live -= n

        self._refs[key] = weakref.ref(st, freed)
        self.live += n
        self.peak = max(self.peak, self.live)
        if self.live > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.live
            self.holders[self.phase] = sorted(self._large_live.values(), key=lambda x: -x[2])

    @contextlib.contextmanager
    def in_phase(self, name: str):
        before, self.phase = self.phase, name
        self.peaks[name] = max(self.peaks.get(name, 0), self.live)
        try:
            yield self
        finally:
            self.phase = before
            self.peaks[before] = max(self.peaks.get(before, 0), self.live)

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.live)

    # --- dispatch -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._fake(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            self._track(t, str(func))
        return out

    def _fake(self, func, args, kwargs):
        """Results of `func` allocated but not computed when it is heavy (module docstring); None: run it."""
        schema = func._schema
        aliasing = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if func.is_view or func in _NO_FAKE or aliasing:
            return None  # views: no allocation, must alias their input
        written = _written_args(schema, args, kwargs)
        if written and all(isinstance(w, torch.Tensor) for w in written):
            if max(w.untyped_storage().nbytes() for w in written) > self.bytes_below or func in _HEAVY:
                self.skipped += 1
                return written[0] if len(written) == 1 else tuple(written)
            if not _is_flop_heavy(func, args, kwargs, self.flops_below):
                return None
        meta_kwargs = {k: "meta" if k == "device" and v is not None else _to_meta(v) for k, v in kwargs.items()}
        try:
            meta_out = func(*tree_map(_to_meta, args), **tree_map(lambda x: x, meta_kwargs))
        except Exception:  # no meta kernel or a data-dependent shape: small ops, run them for real
            return None
        metas = [t for t in tree_flatten(meta_out)[0] if isinstance(t, torch.Tensor)]
        big = any(t.untyped_storage().nbytes() > self.bytes_below for t in metas)
        if not (big or func in _HEAVY or _is_flop_heavy(func, args, kwargs, self.flops_below)):
            return None
        if written:
            return None  # an in-place op on small tensors that is flop-heavy: rare, run it
        device = _device_of(args, kwargs)
        self.skipped += 1

        def real(t):
            if not isinstance(t, torch.Tensor):
                return t
            make = torch.empty_strided if t.untyped_storage().nbytes() > self.bytes_below else _zeros_strided
            return make(t.shape, t.stride(), dtype=t.dtype, device=device)

        return tree_map(real, meta_out)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps freed chunks below its mmap threshold in its
    arenas), so one rehearsal's garbage does not add to the next one's resident memory."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _zeros_strided(shape, stride, *, dtype, device):
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()


def _to_meta(x):
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def _device_of(args, kwargs) -> torch.device:
    if kwargs.get("device") is not None:  # a copy to another device (_to_copy) or a factory
        return torch.device(kwargs["device"])
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            return t.device
    return torch.device(kwargs.get("device") or "cpu")


def _written_args(schema, args, kwargs) -> list:
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(a.name))
    return out


def _is_flop_heavy(func, args, kwargs, limit: float) -> bool:
    from torch.utils.flop_counter import flop_registry

    f = flop_registry.get(func.overloadpacket)
    if f is None:
        return False
    try:
        meta = tree_map(_to_meta, (args, kwargs))
        out = func(*meta[0], **meta[1])
        return f(*meta[0], **meta[1], out_val=out) > limit
    except Exception:
        return False


# --- the paper rank ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RankShape:
    """Per-rank shapes of one training rank: the model (memory.ModelShape) and its layout."""

    layers: int
    local_experts: int
    top_k: int
    hidden: int
    moe_ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def paper_rank_shape(layers: int, *, ep: int = 8) -> RankShape:
    from r3.engines.megatron.memory import QWEN3_30B_A3B as m

    return RankShape(layers=layers, local_experts=m.experts // ep, top_k=m.top_k, hidden=m.hidden,
                     moe_ffn=m.moe_ffn, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
                     vocab=m.vocab)  # fmt: skip


def hf_config(r: RankShape):
    """A transformers Qwen3MoeConfig of the rank's shapes (its local experts as the model's experts)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=r.vocab, hidden_size=r.hidden, intermediate_size=6144, moe_intermediate_size=r.moe_ffn,
        num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
        head_dim=r.head_dim, num_experts=r.local_experts, num_experts_per_tok=r.top_k,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6,
    )  # fmt: skip


class _LazyZeros(dict):
    """A transformers state dict whose tensors are created (zeros, fp32 as LazyHFStateDict reads them)
    when the converter reads them: the shapes of a meta-device model, no checkpoint on disk."""

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        self.shapes = shapes

    def __getitem__(self, key):
        return torch.zeros(self.shapes[key], dtype=torch.float32)

    def __contains__(self, key):
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()


class _ShapeOnlyModel:
    def __init__(self, config):
        from transformers import Qwen3MoeForCausalLM

        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(config)
        self.config = config
        self._shapes = {k: v.shape for k, v in model.state_dict().items()}

    def state_dict(self):
        return _LazyZeros(self._shapes)


def balanced_trace(seq_len: int, r: RankShape) -> torch.Tensor:
    """expert_ids [1, seq_len - 1, L, K]: token t uses local experts (t * K + j) mod E, j < K: distinct
    per token, and every expert gets the same number of tokens (seq_len * K / E)."""
    t = torch.arange(seq_len - 1).view(-1, 1, 1)
    j = torch.arange(r.top_k).view(1, 1, -1)
    ids = (t * r.top_k + j) % r.local_experts
    return ids.expand(seq_len - 1, r.layers, r.top_k).unsqueeze(0).contiguous()


@contextlib.contextmanager
def legacy_paths():
    """The engine as it was before the attention/entropy fixes, for comparison: logprobs and entropy
    over the whole vocabulary at once (chunk_tokens=0); pass attention="local" to rehearse_step too."""
    from r3.engines.megatron import train as mtrain

    orig = mtrain.token_logprobs
    mtrain.token_logprobs = functools.partial(orig, chunk_tokens=0)
    try:
        yield
    finally:
        mtrain.token_logprobs = orig


def rehearse_step(r: RankShape, *, seq_len: int, attention: str = "sdpa", legacy: bool = False) -> dict:
    """Peak live bytes per phase of one bf16 train_step (module docstring) of one sequence of seq_len
    tokens on a rank of shapes `r`. Returns {"phases": {phase: peak bytes}, "built": bytes live after
    the engine is built, "params": parameters of the model, "skipped_ops", "max_rss_bytes"}."""
    from r3.engines.base import TrainBatch
    from r3.engines.megatron import train as mtrain
    from r3.replay import ReplayMode

    lb = LiveBytes()
    fake_hf = _ShapeOnlyModel(hf_config(r))
    ids = torch.randint(3, 1000, (1, seq_len), generator=torch.Generator().manual_seed(0))
    batch = TrainBatch(
        input_ids_BS=ids,
        attention_mask_BS=torch.ones(1, seq_len, dtype=torch.long),
        loss_mask_BT=torch.ones(1, seq_len - 1),
        expert_ids_BTLK=balanced_trace(seq_len, r),
    )

    def loss_fn(logp_BT, entropy_BT, rows):  # a token-mean policy-gradient-shaped loss
        lb.set_phase("backward")
        return -(logp_BT * batch.loss_mask_BT[rows].to(logp_BT.device)).sum() / seq_len, {}

    real_logits = mtrain.gpt_logits

    def gpt_logits(model, ids_BS):
        lb.set_phase("forward")
        out = real_logits(model, ids_BS)
        lb.set_phase("logprobs")
        return out

    with contextlib.ExitStack() as stack:
        if legacy:
            stack.enter_context(legacy_paths())
        stack.enter_context(lb)
        with lb.in_phase("build"):
            engine = mtrain.MegatronTrainEngine(
                fake_hf, lr=1e-6, precision="bf16", recompute=True, micro_batch=1, attention=attention
            )
        built = lb.live
        params = sum(p.numel() for p in engine.model.parameters())
        real_step = engine.optim.step

        def step():
            lb.set_phase("optimizer step")
            return real_step()

        engine.optim.step = step
        mtrain.gpt_logits = gpt_logits
        try:
            engine.train_step(batch, loss_fn, routing=ReplayMode.REPLAY)
        finally:
            mtrain.gpt_logits = real_logits
        lb.set_phase("done")
    del engine
    import gc

    gc.collect()  # megatron's modules hold reference cycles: free this engine before the next is built
    _trim_heap()
    return {
        "phases": {k: v for k, v in lb.peaks.items() if k not in ("setup", "done")},
        "built": built,
        "params": params,
        "skipped_ops": lb.skipped,
        "large": lb.large,
        "holders": lb.holders,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


STEP_PHASES = ("forward", "logprobs", "backward")
"""Phases of a step whose peak is activations on top of the built state (the optimizer step's is
state, planned from the full model's shards)."""


def scale_to_depth(a: dict, b: dict, layers: int) -> dict[str, float]:
    """Activation peak per phase (peak - bytes live after building) extrapolated linearly in the number
    of layers from two rehearsals `a` (n1 layers) and `b` (n2 > n1): act(L) = act(n1) + (L - n1) *
    (act(n2) - act(n1)) / (n2 - n1). Returns {phase: bytes, "per_layer:<phase>": slope}."""
    n1, n2 = a["layers"], b["layers"]
    out: dict[str, float] = {}
    for ph in STEP_PHASES:
        x1, x2 = a["phases"][ph] - a["built"], b["phases"][ph] - b["built"]
        slope = (x2 - x1) / (n2 - n1)
        out[ph] = x1 + (layers - n1) * slope
        out[f"per_layer:{ph}"] = slope
    return out


def alltoall_receive_bytes(seq_len: int, r: RankShape, micro_batch: int = 1, bytes_per: int = 2) -> int:
    """The alltoall dispatcher's buffers of tokens received from the other EP ranks, which a one-rank
    rehearsal (EP = 1) does not allocate: with balanced routing a rank receives as many token copies as
    it sends (micro_batch * seq_len * top_k rows of `hidden`), for the expert input and for the output
    sent back: 2 buffers (computed from shapes)."""
    return 2 * micro_batch * seq_len * r.top_k * r.hidden * bytes_per


def call_message_bytes(rows: int, seq_len: int, moe_layers: int, top_k: int, *, trace_bytes: int | None = None) -> dict:
    """Bytes of one driver-to-follower call (experiments.distributed: every tensor of the TrainBatch is
    broadcast whole to every rank, allocated on the wire device, the GPU under NCCL) for a batch of
    `rows` sequences of seq_len tokens, from shapes on the meta device: input ids (int64), attention
    mask (int64), loss mask (fp32), expert ids [rows, seq_len - 1, L, K] (`trace_bytes` per id; None:
    the dtype r3.trace.pad_traces builds for the model's experts, uint8 up to 256). On a follower each
    host tensor passes through a wire buffer of its own size, one at a time (experiments.distributed._recv),
    so the GPU holds at most the largest part (`wire_peak`)."""
    from r3.engines.megatron.memory import QWEN3_30B_A3B
    from r3.trace import trace_dtype

    if trace_bytes is None:
        trace_bytes = torch.empty((), dtype=trace_dtype(QWEN3_30B_A3B.experts)).element_size()
    m = torch.device("meta")
    ids = torch.empty(rows, seq_len, dtype=torch.int64, device=m)
    mask = torch.empty(rows, seq_len - 1, dtype=torch.float32, device=m)
    dtype = {8: torch.int64, 2: torch.int16, 1: torch.uint8}[trace_bytes]
    trace = torch.empty(rows, seq_len - 1, moe_layers, top_k, dtype=dtype, device=m)
    parts = {"input_ids": ids, "attention_mask": ids, "loss_mask": mask, "expert_ids": trace}
    out = {k: v.numel() * v.element_size() for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["wire_peak"] = max(out[k] for k in parts)
    return out


def fmt_gb(x: float) -> str:
    return f"{x / GB:8.1f} GB" if math.isfinite(x) else "     n/a"


# --- the paper layout, rehearsed ------------------------------------------------------------------
CACHE = __import__("pathlib").Path(__file__).with_name("rehearsal_paper.json")
"""The paper layout's rehearsal as benchmarks/rehearse_paper.py last wrote it (slurm.submit --dry-run
reads it instead of rehearsing at submit time, which takes ~1-2 minutes of CPU)."""


def rehearse_layout(
    *,
    world: int = 16,
    ep: int = 8,
    seq_len: int = 9216,
    depths: tuple[int, int] = (1, 2),
    attention: str = "sdpa",
    legacy: bool = False,
    call_rows: int = 1024,
    trace_bytes: int | None = None,
) -> dict:
    """Rehearsed per-GPU peak of one training rank of Qwen3-30B-A3B (QWEN3_30B_A3B) at EP `ep` on
    `world` ranks (TP = PP = 1, bf16, full recompute, micro-batch 1 of seq_len tokens), by phase:
      forward / logprobs / backward: the plan's static state (weights, fp32 main grads, optimizer
        shards of the full model) + the rehearsed activation peak at depth `depths`, scaled to 48
        layers (scale_to_depth) + the alltoall receive buffers (EP > 1, from shapes) + the reserve;
      optimizer step: static + the optimizer's transient measured at the deeper rehearsal beyond its
        built state and Adam state, scaled by the rank's optimizer shard / the rehearsed model's
        parameters (the rehearsal runs DP = 1, the rank DP 16 / expert-DP 2) + the reserve;
      call: static + the largest part of one driver-to-follower message of `call_rows` rows
        (call_message_bytes `wire_peak`: parts pass through the
        wire device) + the reserve.
    `calibration`: the bytes live after the rehearsed engine was built over the plan's 10 B per
    parameter at DP = 1 (2 weights + 4 main grads + 4 master copy). legacy: the pre-fix logprob and
    entropy (legacy_paths); pass attention="local" for the pre-fix attention."""
    from r3.engines.megatron.memory import QWEN3_30B_A3B as M
    from r3.engines.megatron.memory import plan_memory

    runs = []
    for n in depths:  # each in a fresh process: one engine's touched pages do not add to the next's RSS
        r = _isolated(rehearse_step, paper_rank_shape(n, ep=ep), seq_len=seq_len, attention=attention, legacy=legacy)
        runs.append({**r, "layers": n})
    act = scale_to_depth(runs[0], runs[1], M.layers)
    plan = plan_memory(M, world=world, ep=ep, micro_batch=1, seq_len=seq_len, recompute=True,
                       attention=attention, logits_chunk=0 if legacy else _chunk())  # fmt: skip
    rank = paper_rank_shape(M.layers, ep=ep)
    a2a = alltoall_receive_bytes(seq_len, rank) if ep > 1 else 0
    phases = {ph: plan.static + act[ph] + a2a + plan.reserve for ph in STEP_PHASES}
    deep = runs[1]
    transient = max(0.0, deep["phases"]["optimizer step"] - deep["built"] - 8 * deep["params"])
    dp, edp = world, world // ep
    shard = plan.dense_local / dp + plan.expert_local / edp
    phases["optimizer step"] = plan.static + transient * shard / deep["params"] + plan.reserve
    call = call_message_bytes(call_rows, seq_len, M.moe_layers, M.top_k, trace_bytes=trace_bytes)
    step_peak = max(phases.values())
    return {
        "layout": {
            "model": "Qwen3-30B-A3B",
            "world": world,
            "ep": ep,
            "tp": 1,
            "pp": 1,
            "micro_batch": 1,
            "seq_len": seq_len,
            "recompute": True,
            "precision": "bf16",
            "attention": attention,
            "legacy": legacy,
        },  # fmt: skip
        "phases": phases,
        "step_peak": step_peak,
        "call": {**call, "rows": call_rows, "peak": plan.static + call["wire_peak"] + plan.reserve},
        "plan_total": plan.total,
        "plan_static": plan.static,
        "reserve": plan.reserve,
        "alltoall_receive": a2a,
        "activations_48_layers": {ph: act[ph] for ph in STEP_PHASES},
        "activation_per_layer": {ph: act[f"per_layer:{ph}"] for ph in STEP_PHASES},
        "rehearsed": [
            {k: r[k] for k in ("layers", "phases", "built", "params", "skipped_ops", "max_rss_bytes")} for r in runs
        ],
        "calibration": deep["built"] / (10 * deep["params"]),
        "largest_at_peak": {
            ph: [(made, op, n) for made, op, n in deep["holders"].get(ph, []) if made != "build"][:8]
            for ph in STEP_PHASES
        },
    }


def _isolated(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new (spawned) process, its result returned: megatron keeps global state
    (parallel groups, buffers) that pins an engine's memory for the life of a process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _chunk() -> int:
    from r3.metrics import LOGITS_CHUNK_TOKENS

    return LOGITS_CHUNK_TOKENS


def matches_cache(cached: dict, *, world: int, ep: int, tp: int, pp: int, micro_batch: int, seq_len: int,
                  recompute: bool, precision: str, shape) -> bool:  # fmt: skip
    """Whether a cached rehearsal (rehearse_layout) is of this layout and of Qwen3-30B-A3B's shape."""
    from r3.engines.megatron.memory import QWEN3_30B_A3B

    lay = cached.get("layout", {})
    want = {"world": world, "ep": ep, "tp": tp, "pp": pp, "micro_batch": micro_batch, "seq_len": seq_len,
            "recompute": recompute, "precision": precision, "attention": "sdpa", "legacy": False}  # fmt: skip
    return shape == QWEN3_30B_A3B and all(lay.get(k) == v for k, v in want.items())


def load_cache(path=None) -> dict | None:
    import json
    from pathlib import Path

    p = Path(path or CACHE)
    return json.loads(p.read_text()) if p.is_file() else None
