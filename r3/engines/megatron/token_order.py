"""Which rollout routing row each rank's router sees: token order under context parallelism (CP)
and packed (THD) sequences.

A rollout trace holds one row per fed token (expert_ids_BTLK [B, T = S - 1, L, K], DESIGN.md
invariant 1). The router of a megatron MoE layer sees the token rows of its rank's hidden states,
seq-major. Every layout below is an index `idx` into the FULL seq-major rows of the batch (row
s * B + b of r3.engines.megatron.replay.to_megatron_layout, or packed position q for THD): this
rank's router row j is full row idx[j]. `router_rows` applies it per layer and, under sequence
parallelism, keeps the TP rank's contiguous slice (as replay.MegatronRouterReplay does today);
`restore_full_order` puts recorded rows of every rank back in full order.

- Padded batches (BSHD) under CP: megatron's `get_batch_on_this_cp_rank`
  (megatron/core/utils.py:1994) cuts each sequence into 2 * CP equal chunks and gives CP rank r
  chunks r and 2 * CP - 1 - r (load balance under the causal mask); the embedding output of the
  rank's [B, S / CP] tokens is [S / CP, B, H]. `cp_positions`, `bshd_index`.
- Packed sequences (THD): the batch's sequences laid end to end in one row, each padded to a
  multiple of `PackedLayout.multiple` (its span in `cu_seqlens_padded`; megatron's PackedSeqParams
  carries the real `cu_seqlens` too), so the router sees the packed positions in order. Under CP,
  megatron's `get_thd_batch_on_this_cp_rank` (utils.py:2041) takes Transformer Engine's
  `thd_get_partitioned_indices`: each sequence's padded span split the same load-balanced way,
  sequence after sequence (TE fused_attn/thd_utils.cu, thd_partition_indices_kernel). `thd_index`.
  Rows of a sequence's last token (never fed in the rollout) and of its padding get the distinct
  dummy experts 0..K-1 (r3.trace.dummy_rows), as padding does in the padded layout.

Both need Transformer Engine's attention (megatron's local DotProductAttention asserts
context_parallel_size == 1 and packed_seq_params is None), so on this CPU-only machine they are
tested as mappings against megatron's own slicing functions, not in a forward:
`require_transformer_engine` is the engine's refusal.
"""

from __future__ import annotations

import dataclasses

import torch

from r3.trace import RoutingSpec, dummy_rows


def _check_split(length: int, cp_size: int, cp_rank: int, what: str) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} of size {cp_size}: need size >= 1 and 0 <= rank < size")
    if cp_size > 1 and length % (2 * cp_size):
        raise ValueError(
            f"{what} of {length} tokens cannot be split over CP = {cp_size}: got {length}, expected a multiple "
            f"of 2 * CP = {2 * cp_size} (megatron cuts it into 2 * CP equal chunks); likely cause: the batch "
            f"was not padded for context parallelism (pad sequences to a multiple of 2 * CP * TP)"
        )


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (int64 [seq_len / cp_size]) of a sequence of seq_len tokens that CP rank cp_rank holds,
    in its local order: chunks cp_rank and 2 * cp_size - 1 - cp_rank of 2 * cp_size equal chunks."""
    _check_split(seq_len, cp_size, cp_rank, "a sequence")
    if cp_size == 1:
        return torch.arange(seq_len)
    c = seq_len // (2 * cp_size)
    first, second = cp_rank * c, (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def bshd_index(batch_size: int, seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Full seq-major rows (s * B + b) in the order CP rank cp_rank's router sees them: its local
    position j, sequence b is row j * B + b. int64 [seq_len / cp_size * batch_size]."""
    pos = cp_positions(seq_len, cp_size, cp_rank)
    return (pos[:, None] * batch_size + torch.arange(batch_size)[None, :]).reshape(-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedLayout:
    """Sequences packed end to end (THD): `lengths[i]` real tokens of sequence i, its span padded to
    `padded[i]` (a multiple of `multiple`); sequence i starts at packed position sum(padded[:i])."""

    lengths: tuple[int, ...]
    """Real tokens per sequence (attention_mask row sums)."""
    multiple: int
    """Each span padded to a multiple of this: 2 * CP * TP under CP (every CP rank takes two equal
    chunks per sequence, each rank's part splits over TP under SP), TP without CP."""

    def __post_init__(self) -> None:
        if self.multiple < 1 or not self.lengths or min(self.lengths) < 2:
            raise ValueError(
                f"PackedLayout needs multiple >= 1 and sequences of >= 2 tokens (one with a target), got "
                f"multiple={self.multiple}, lengths={list(self.lengths)}"
            )

    @classmethod
    def from_attention_mask(cls, attention_mask_BS: torch.Tensor, *, cp_size: int = 1, tp_size: int = 1):
        """The packed layout of a right-padded batch for this CP x TP layout."""
        multiple = 2 * cp_size * tp_size if cp_size > 1 else tp_size
        return cls(lengths=tuple(int(n) for n in attention_mask_BS.sum(1).tolist()), multiple=multiple)

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(-(-n // self.multiple) * self.multiple for n in self.lengths)

    @property
    def total(self) -> int:
        return sum(self.padded)

    def cu_seqlens(self, padded: bool = False) -> torch.Tensor:
        """int32 [N + 1] cumulative lengths (real, or padded spans), what PackedSeqParams holds."""
        lens = torch.tensor(self.padded if padded else self.lengths, dtype=torch.int32)
        return torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0, dtype=torch.int32)])

    def packed_seq_params(self):
        """megatron's PackedSeqParams for this layout (as get_thd_batch_on_this_cp_rank builds it)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, cu_pad = self.cu_seqlens(), self.cu_seqlens(padded=True)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad,
            max_seqlen_q=max(self.padded),
            max_seqlen_kv=max(self.padded),
        )

    def pack(self, x_BS: torch.Tensor, fill) -> torch.Tensor:
        """A per-token tensor [B, S, ...] of the right-padded batch -> [1, total, ...] packed (the
        megatron THD batch), positions beyond each sequence's real tokens set to `fill`."""
        if x_BS.shape[0] != len(self.lengths) or x_BS.shape[1] < max(self.lengths):
            raise ValueError(
                f"packing {tuple(x_BS.shape)} with {len(self.lengths)} sequences of up to {max(self.lengths)} "
                f"tokens: got B = {x_BS.shape[0]}, S = {x_BS.shape[1]}; likely cause: a layout of another batch"
            )
        out = x_BS.new_full((self.total, *x_BS.shape[2:]), fill)
        start = 0
        for b, (n, span) in enumerate(zip(self.lengths, self.padded)):
            out[start : start + n] = x_BS[b, :n]
            start += span
        return out[None]

    def pack_routing(self, expert_ids_BTLK: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
        """The batch trace [B, T >= max(lengths) - 1, L, K] -> per-layer packed rows: L tensors int64
        [total, K], row q = the trace row of the token at packed position q; the last token of each
        sequence (never fed in the rollout: no row) and padding get dummy experts 0..K-1."""
        B, T, L, K = expert_ids_BTLK.shape
        if (L, K) != (spec.num_layers, spec.top_k) or T < max(self.lengths) - 1:
            raise ValueError(
                f"routing trace {tuple(expert_ids_BTLK.shape)} for sequences of up to {max(self.lengths)} tokens: "
                f"expected [{len(self.lengths)}, >= {max(self.lengths) - 1}, {spec.num_layers}, {spec.top_k}] "
                f"(one row per fed token); likely cause: a trace of another batch or model"
            )
        full = dummy_rows(self.total, L, K)
        start = 0
        for b, (n, span) in enumerate(zip(self.lengths, self.padded)):
            full[start : start + n - 1] = expert_ids_BTLK[b, : n - 1]
            start += span
        return [full[:, layer].contiguous() for layer in range(L)]


def thd_index(layout: PackedLayout, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Packed positions in the order CP rank cp_rank's router sees them: each sequence's padded span
    split into 2 * CP chunks, chunks cp_rank and 2 * CP - 1 - cp_rank, sequence after sequence (TE's
    thd_get_partitioned_indices). int64 [total / cp_size]."""
    parts, start = [], 0
    for span in layout.padded:
        _check_split(span, cp_size, cp_rank, "a packed sequence span")
        parts.append(start + cp_positions(span, cp_size, cp_rank))
        start += span
    return torch.cat(parts)


def router_rows(full_NK: torch.Tensor, index: torch.Tensor, *, tp_size: int = 1, tp_rank: int = 0) -> torch.Tensor:
    """One layer's full rows [N, K] -> the rows this rank's router sees: full_NK[index], and under
    sequence parallelism the TP rank's contiguous slice of them."""
    if index.numel() % tp_size:
        raise ValueError(
            f"{index.numel()} token rows on this context-parallel rank cannot be split over TP = {tp_size} "
            f"(sequence parallelism); pad the batch to a multiple of TP (x 2 * CP)"
        )
    n = index.numel() // tp_size
    return full_NK[index[tp_rank * n : (tp_rank + 1) * n]]


def restore_full_order(parts_NK: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    """Rows recorded on every rank (parts_NK[r] in rank r's router order, `indices[r]` its index) ->
    the full rows [N, K] in seq-major (BSHD) or packed (THD) order; the indices must cover 0..N-1
    once (a CP group's ranks do)."""
    index = torch.cat(indices)
    n = index.numel()
    if sorted(index.tolist()) != list(range(n)):
        raise ValueError(f"the ranks' token indices do not cover 0..{n - 1} once; likely cause: ranks of other layouts")
    rows = torch.cat(parts_NK)
    out = torch.empty_like(rows)
    out[index] = rows
    return out


def require_transformer_engine(*, context_parallel: int, packed_sequences: bool) -> None:
    """Refuse CP > 1 or packed sequences with what was asked, why it cannot run, and how to fix it.

    Both need megatron's TEDotProductAttention: the local DotProductAttention, the attention of the
    layer spec this engine builds, asserts `context_parallel_size == 1` and `packed_seq_params is None`
    (megatron/core/transformer/dot_product_attention.py:57 and :153 in megatron-core 0.16.1)."""
    if context_parallel == 1 and not packed_sequences:
        return
    asked = [f"context_parallel={context_parallel}"] if context_parallel != 1 else []
    asked += ["packed_sequences=True"] if packed_sequences else []
    try:
        import transformer_engine  # noqa: F401

        why = (
            "Transformer Engine is importable, but this engine builds megatron's local layer spec (its HF <-> "
            "megatron converter, r3.engines.megatron.model, maps local-spec parameter names only), whose "
            "attention cannot run it"
        )
    except ImportError as e:
        why = f"Transformer Engine is not installed here ({type(e).__name__}: {e}), and it needs a GPU"
    raise NotImplementedError(
        f"{' and '.join(asked)} was asked, but cannot run: megatron-core's local DotProductAttention asserts "
        f"context_parallel_size == 1 and packed_seq_params is None (dot_product_attention.py:57, :153); both "
        f"need TEDotProductAttention; {why}. To fix: on GPU nodes install transformer-engine[pytorch] and build "
        f"the TE layer spec with converter names for it (not done yet); the routing-row mapping both need is "
        f"built and tested (r3.engines.megatron.token_order). Until then use context_parallel=1 and padded batches."
    )
