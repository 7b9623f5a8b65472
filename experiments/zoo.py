"""The embedded model zoo: tokenizer, tiny Qwen3-MoE Base and SFT models, a dense control.

    python -m experiments.zoo [--zoo-dir runs/zoo] [--size tiny|micro|study] [--rebuild]

Inputs: nothing but a seed (the synthetic task, experiments.task, generates all text).
Outputs, in `zoo_dir` (default runs/zoo):
    base/   Qwen3MoeForCausalLM pretrained on task text (whole documents, loss on every token)
    sft/    base fine-tuned on the prompt/response format (loss on response tokens only)
    dense/  Qwen3ForCausalLM with about the same active parameters, same Base + SFT recipe
    zoo.json  the manifest, written LAST: config, parameter counts, measured held-out accuracy
Each model directory holds transformers `save_pretrained` weights and the tokenizer. A zoo is
reused only when zoo.json exists and records the same ZooConfig; otherwise it is rebuilt.

Shipped zoo: experiments/shipped_zoo/tiny/ holds the `tiny` zoo this recipe built (16 MB; its
zoo.json records the recipe, the measured accuracies and the build time). `build_zoo` copies it
into `zoo_dir` when its recipe equals SIZES["tiny"], so `make demo` starts in seconds instead of
~15 minutes; `--rebuild` trains the recipe from scratch with the current code (measured Dec 6: not
bit-identical to the shipped weights, which an earlier version of the code built; docs/embedded.md).
Both models train on one torch thread (`_one_thread`), as float reductions depend on the thread
count; so trained, two builds with the same code were bit-identical (the micro zoo; the study zoo's
dense model).

Departures from the paper: the paper starts from Qwen3-30B-A3B-Base (48 layers, 128 experts,
top-8) and its SFT model; here a 4-layer, 16-expert, top-4 model (norm_topk_prob=True, as
Qwen3-30B-A3B) is pretrained for minutes on arithmetic. Pretraining uses the load-balancing
auxiliary loss (as MoE pretraining does); the saved configs turn it off for RL (the paper uses
no balancing loss during RL).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from experiments import task

ZooSize = Literal["micro", "tiny", "study"]
MODEL_KINDS = ("base", "sft", "dense")
MANIFEST = "zoo.json"
SHIPPED = Path(__file__).resolve().parent / "shipped_zoo"
"""Zoos shipped with the repository (`tiny`), reused by build_zoo when their recipe matches."""
PACK_LEN = 128
"""Pretraining row length (tokens); a row holds about four documents at difficulty 2."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZooConfig:
    """Architecture and training recipe of one zoo."""

    size: ZooSize
    """Name of this recipe."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    """Per-expert FFN width; the dense control's FFN is top_k x this (equal active size)."""
    difficulty: int = 2
    """Task difficulty (experiments.task.DIFFICULTY)."""
    seed: int = 0
    batch_size: int = 64
    pretrain_steps: int
    pretrain_lr: float = 3e-3
    sft_steps: int
    sft_lr: float = 1e-3
    dense_pretrain_steps: int
    dense_sft_steps: int
    router_aux_coef: float = 0.01
    """Load-balancing loss weight during pretraining/SFT only."""
    eval_problems: int = 256
    """Held-out problems used to report the zoo's accuracy."""
    eval_max_new_tokens: int = 64
    sft_direct_frac: float = 0.0
    """Share of SFT responses that are the boxed answer alone, with no worked chain
    (task.direct_solution). Above 0 the SFT model mixes two behaviours, and the one that works
    (the chain) is a choice RL can learn, as RL lengthens the reasoning of real SFT models."""
    pack_len: int = PACK_LEN
    """Pretraining row length (tokens)."""
    max_positions: int = 256
    """max_position_embeddings of the models (prompt + response)."""


SIZES: dict[str, ZooConfig] = {
    # ~1.8M params, 0.6M active (the calibration size); accuracy: docs/embedded.md.
    "tiny": ZooConfig(
        size="tiny",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=16,
        top_k=4,
        moe_intermediate=64,
        pretrain_steps=700,
        sft_steps=300,
        dense_pretrain_steps=700,
        dense_sft_steps=300,
    ),
    # For tests and Slurm tests: seconds to build, accuracy near zero.
    "micro": ZooConfig(
        size="micro",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        num_experts=8,
        top_k=2,
        moe_intermediate=32,
        pretrain_steps=30,
        sft_steps=10,
        dense_pretrain_steps=15,
        dense_sft_steps=5,
        batch_size=32,
        eval_problems=16,
        eval_max_new_tokens=48,
    ),
    # The collapse study's model (docs/study.md): twice the depth and twice the experts of `tiny`,
    # since the share of tokens whose routing differs in at least one layer grows with depth
    # (paper: 94% at 48 layers), on level-5 problems whose rewritten chains run 63-188 tokens, and
    # an SFT set half of whose responses skip the chain, so that RL has something to learn. The
    # dense control is built short: the study does not use it.
    "study": ZooConfig(
        size="study",
        hidden_size=128,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=32,
        top_k=4,
        moe_intermediate=64,
        difficulty=5,
        batch_size=32,
        pretrain_steps=1000,
        sft_steps=300,
        dense_pretrain_steps=50,
        dense_sft_steps=20,
        sft_direct_frac=0.5,
        pack_len=256,
        max_positions=512,
        eval_max_new_tokens=256,
    ),
}


def default_zoo_dir(size: str = "tiny") -> Path:
    """Where a zoo of `size` is built and found by default: runs/zoo (the demo's tiny zoo), runs/zoo-<size>."""
    return Path("runs/zoo" if size == "tiny" else f"runs/zoo-{size}").resolve()


def model_configs(cfg: ZooConfig, tokenizer) -> tuple:
    """(Qwen3MoeConfig, Qwen3Config) for this zoo."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    moe = Qwen3MoeConfig(
        **common,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate,
        intermediate_size=cfg.top_k * cfg.moe_intermediate,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
        router_aux_loss_coef=cfg.router_aux_coef,
    )
    dense = Qwen3Config(**common, intermediate_size=cfg.top_k * cfg.moe_intermediate)
    return moe, dense


def active_params(model) -> int:
    """Parameters touched per token: all but the unselected experts' weights."""
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    if not hasattr(c, "num_experts"):
        return total
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return total - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert


def _batch(tokenizer, problems: list[task.Problem], *, sft: bool) -> dict[str, torch.Tensor]:
    """Right-padded documents `<bos> prompt response <eos>`; labels -100 on padding (and on
    the prompt when sft)."""
    seqs, n_prompt = [], []
    for p in problems:
        prompt = tokenizer(task.format_prompt(p.problem))["input_ids"]
        resp = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + resp)
        n_prompt.append(len(prompt))
    S = max(map(len, seqs))
    ids = torch.full((len(seqs), S), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), S), dtype=torch.long)
    labels = torch.full((len(seqs), S), -100, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        start = n if sft else 1  # the BOS is never a target
        labels[i, start : len(s)] = ids[i, start : len(s)]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


class _Packer:
    """Pretraining rows: documents `<bos> prompt response <eos>` concatenated and cut into rows of
    exactly `seq_len` tokens (standard LM packing: no padding; a document may span two rows)."""

    def __init__(self, tokenizer, stream: task.TrainStream, seq_len: int):
        self.tokenizer, self.stream, self.seq_len = tokenizer, stream, seq_len
        self.buf: list[int] = []

    def batch(self, rows: int) -> dict[str, torch.Tensor]:
        need = rows * self.seq_len
        while len(self.buf) < need:
            p = self.stream.next()
            self.buf += self.tokenizer(task.format_prompt(p.problem) + p.solution)["input_ids"]
            self.buf.append(self.tokenizer.eos_token_id)
        ids = torch.tensor(self.buf[:need], dtype=torch.long).view(rows, self.seq_len)
        self.buf = self.buf[need:]
        return {"input_ids": ids, "labels": ids.clone()}


def train_lm(
    model,
    tokenizer,
    stream: task.TrainStream,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    sft: bool,
    desc: str,
    seed: int,
    position: int = 0,
    pack_len: int = PACK_LEN,
) -> list[float]:
    """AdamW with linear warmup (5%) and cosine decay to 10%; returns the loss curve.

    sft: `batch_size` padded prompt/response documents, loss on the response; otherwise
    pretraining on batch_size/2 packed rows of `pack_len` tokens (loss on every token)."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    losses = []
    packer = _Packer(tokenizer, stream, pack_len)
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, position=position)
    for _ in bar:
        if sft:
            batch = _batch(tokenizer, stream.take(batch_size), sft=True)
        else:
            batch = packer.batch(batch_size // 2)
        out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {len(losses) + 1}; lower the lr ({lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _save(model, tokenizer, path: Path) -> None:
    model.config.output_router_logits = False  # no balancing loss during RL (PAPER.md, Setup)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def measure_accuracy(model_dir: Path, cfg: ZooConfig, *, temperature: float, seed: int = 0, pool=None) -> float:
    """Held-out accuracy with the rollout engine (fp32) and the project's grader."""
    from transformers import AutoTokenizer

    from eval.grader import grade_many
    from r3.engines import registry
    from r3.engines.base import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    probs = task.heldout_problems(cfg.eval_problems, difficulty=cfg.difficulty)
    engine = registry.build_rollout_engine(
        registry.rollout_config("hf", model_path=str(model_dir), precision="fp32", seed=seed)
    )
    prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in probs]
    params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=temperature, seed=seed)
    samples = engine.generate(prompts, params)
    responses = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    correct = grade_many(list(zip(responses, [p.answer for p in probs])), workers=2, pool=pool)
    return sum(map(bool, correct)) / len(probs)


def load_manifest(zoo_dir: Path) -> dict | None:
    path = Path(zoo_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(zoo_dir: Path, cfg: ZooConfig) -> bool:
    m = load_manifest(zoo_dir)
    return (
        m is not None
        and m.get("config") == dataclasses.asdict(cfg)
        and all((Path(zoo_dir) / k / "config.json").exists() for k in MODEL_KINDS)
    )


@contextlib.contextmanager
def _one_thread():
    """Train on one torch thread whatever the caller set, and restore its count afterwards. Float
    reductions depend on the intra-op thread count, so a zoo is a function of its seed only at a
    fixed count: `python -m experiments.zoo` (every core) and the study command (one thread) must
    build the same weights."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@_one_thread()
def _train_moe(cfg: ZooConfig, zoo_dir: Path) -> dict[str, list[float]]:
    """Base (pretraining) then SFT of the MoE model; saves base/ and sft/."""
    from transformers import Qwen3MoeForCausalLM

    tok = task.build_tokenizer()
    moe_cfg, _ = model_configs(cfg, tok)
    torch.manual_seed(cfg.seed)
    moe_cfg.output_router_logits = True  # load-balancing loss while pretraining
    moe = Qwen3MoeForCausalLM(moe_cfg)
    curves = {
        "base": train_lm(
            moe,
            tok,
            _stream(cfg, 0),
            steps=cfg.pretrain_steps,
            lr=cfg.pretrain_lr,
            batch_size=cfg.batch_size,
            sft=False,
            pack_len=cfg.pack_len,
            desc="zoo: pretrain Base (MoE)",
            seed=cfg.seed,
        )
    }
    _save(moe, tok, zoo_dir / "base")
    moe.config.output_router_logits = True
    curves["sft"] = train_lm(
        moe,
        tok,
        _stream(cfg, 1),
        steps=cfg.sft_steps,
        lr=cfg.sft_lr,
        batch_size=cfg.batch_size,
        sft=True,
        desc="zoo: SFT (MoE)",
        seed=cfg.seed + 1,
    )
    _save(moe, tok, zoo_dir / "sft")
    return curves


@_one_thread()
def _train_dense(cfg: ZooConfig, zoo_dir: Path) -> dict[str, list[float]]:
    """The dense control: the same Base + SFT recipe (its own step counts); saves dense/."""
    from transformers import Qwen3ForCausalLM

    tok = task.build_tokenizer()
    _, dense_cfg = model_configs(cfg, tok)
    torch.manual_seed(cfg.seed)
    dense = Qwen3ForCausalLM(dense_cfg)
    bs = cfg.batch_size
    curves = {
        "dense_base": train_lm(
            dense,
            tok,
            _stream(cfg, 0),
            steps=cfg.dense_pretrain_steps,
            lr=cfg.pretrain_lr,
            batch_size=bs,
            sft=False,
            pack_len=cfg.pack_len,
            desc="zoo: pretrain dense",
            seed=cfg.seed,
            position=1,
        )
    }
    curves["dense"] = train_lm(
        dense,
        tok,
        _stream(cfg, 1),
        steps=cfg.dense_sft_steps,
        lr=cfg.sft_lr,
        batch_size=bs,
        sft=True,
        desc="zoo: SFT dense",
        seed=cfg.seed + 1,
        position=1,
    )
    _save(dense, tok, zoo_dir / "dense")
    return curves


def _stream(cfg: ZooConfig, stage: int) -> task.TrainStream:
    """Separate prompt streams per stage (0 pretraining, 1 SFT) so each stage is reproducible;
    the SFT stream mixes in direct answers at cfg.sft_direct_frac."""
    if stage == 1 and cfg.sft_direct_frac > 0:
        return _MixedStream(seed=cfg.seed + 101, difficulty=cfg.difficulty, direct_frac=cfg.sft_direct_frac)
    return task.TrainStream(seed=cfg.seed + 100 + stage, difficulty=cfg.difficulty)


class _MixedStream(task.TrainStream):
    """A training stream whose problems carry the direct answer instead of the worked chain with
    probability `direct_frac`, drawn from (stream seed, position): reproducible and resumable."""

    def __init__(self, *, direct_frac: float, **kw):
        super().__init__(**kw)
        self.direct_frac = direct_frac

    def next(self) -> task.Problem:
        p = super().next()
        if random.Random(f"direct:{self.seed}:{self.position}").random() < self.direct_frac:
            p = dataclasses.replace(p, solution=task.direct_solution(p))
        return p


def build_zoo(
    zoo_dir: Path | None = None,
    *,
    size: ZooSize = "tiny",
    force: bool = False,
    measure: bool = True,
    parallel: bool = True,
) -> dict:
    """Build (or reuse) the zoo in `zoo_dir`; returns its manifest.

    parallel: train the dense control in a second process (1 torch thread) beside the MoE.
    """
    from transformers import AutoModelForCausalLM

    if size not in SIZES:
        raise ValueError(f"zoo size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    zoo_dir = Path(zoo_dir or default_zoo_dir()).resolve()
    if not force and is_complete(zoo_dir, cfg):
        return load_manifest(zoo_dir)
    if not force and is_complete(SHIPPED / size, cfg) and zoo_dir != (SHIPPED / size).resolve():
        return _copy_shipped(size, zoo_dir)
    (zoo_dir / MANIFEST).unlink(missing_ok=True)
    for k in MODEL_KINDS:
        shutil.rmtree(zoo_dir / k, ignore_errors=True)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if parallel:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            dense_future = ex.submit(_train_dense, cfg, zoo_dir)
            curves = _train_moe(cfg, zoo_dir)
            curves.update(dense_future.result())
    else:
        curves = _train_moe(cfg, zoo_dir)
        curves.update(_train_dense(cfg, zoo_dir))
    train_s = time.time() - t0

    models = {}
    for kind in MODEL_KINDS:
        m = AutoModelForCausalLM.from_pretrained(zoo_dir / kind)
        models[kind] = {
            "params": sum(p.numel() for p in m.parameters()),
            "active_params": active_params(m),
            "final_loss": sum(curves[kind][-10:]) / len(curves[kind][-10:]),
        }
    if measure:
        from eval.grader import make_pool

        with make_pool(workers=2) as pool:
            for kind in tqdm(MODEL_KINDS, desc="zoo: held-out accuracy", leave=False):
                for key, temp in (("heldout_acc_t1", 1.0), ("heldout_acc_greedy", 0.0)):
                    models[kind][key] = measure_accuracy(
                        zoo_dir / kind, cfg, temperature=temp, seed=cfg.seed, pool=pool
                    )
    manifest = {
        "config": dataclasses.asdict(cfg),
        "models": models,
        "train_seconds": round(train_s, 1),
        "eval_problems": cfg.eval_problems,
        "finished": time.time(),
    }
    (zoo_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last
    return manifest


def _copy_shipped(size: str, zoo_dir: Path) -> dict:
    """Copy the shipped zoo of `size` into zoo_dir (models first, manifest last)."""
    zoo_dir.mkdir(parents=True, exist_ok=True)
    (zoo_dir / MANIFEST).unlink(missing_ok=True)
    for k in MODEL_KINDS:
        shutil.rmtree(zoo_dir / k, ignore_errors=True)
        shutil.copytree(SHIPPED / size / k, zoo_dir / k)
    shutil.copy2(SHIPPED / size / MANIFEST, zoo_dir / MANIFEST)  # written last
    return load_manifest(zoo_dir)


def check_size(zoo_dir: Path, size: str | None) -> None:
    """Refuse a zoo of another recipe than `size` (None: any); RunConfig.zoo_size."""
    m = load_manifest(zoo_dir)
    have = (m or {}).get("config", {}).get("size")
    if size is not None and m is not None and have != size:
        raise ValueError(
            f"zoo {zoo_dir} holds the {have!r} recipe, but the run asks for zoo_size={size!r}; "
            f"point zoo_dir at a {size!r} zoo (python -m experiments.zoo --size {size} --zoo-dir DIR)"
        )


def model_dir(kind: str, zoo_dir: Path | None = None) -> Path:
    """Directory of zoo model `kind` (base / sft / dense); the zoo must be complete."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"zoo model kind must be one of {MODEL_KINDS}, got {kind!r}")
    zoo_dir = Path(zoo_dir or default_zoo_dir()).resolve()
    if load_manifest(zoo_dir) is None:
        raise FileNotFoundError(
            f"no complete zoo in {zoo_dir} ({MANIFEST} missing); build it with `python -m experiments.zoo "
            f"--zoo-dir {zoo_dir}` or set RunConfig.model_path"
        )
    return zoo_dir / kind


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument(
        "--rebuild",
        "--force",
        dest="force",
        action="store_true",
        help="train from scratch (ignore a complete zoo in --zoo-dir and the shipped copy)",
    )
    args = ap.parse_args(argv)
    m = build_zoo(args.zoo_dir, size=args.size, force=args.force)
    print(json.dumps(m["models"], indent=2))


if __name__ == "__main__":
    main()
