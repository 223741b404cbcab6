"""LLM distillation methods: token-level KD, sequence-level KD, GKD on-policy, SCRG + span loss, DDK.

>>> cfg = LMDistillConfig(steps=200, divergence="jsd", beta=0.5, on_policy=0.5)   # GKD, λ = 0.5
>>> result = train_lm(student, train_blocks, cfg, teacher=CausalLMTeacher(gemma, rows=sub.ids), collate=...)

Each step draws a batch (uniformly, or by DDK's domain weights); then, by the method:

* token-level KD (`lm_kd`): `kd_weight · D(p_t ‖ p_s) + ce_weight · CE` on the data (live teacher or top-k store);
* GKD (Agarwal et al.): with probability `on_policy` (λ) the continuation after `prompt_len` tokens is
  sampled from the student and the loss is D on the generated tokens only (no CE: there is no ground truth);
* sequence-level KD (Kim & Rush): the continuation is the teacher's greedy generation, trained with CE (+ KD);
* SCRG (Liu et al.): the student generates; at the generated position where the student's token differs from
  the teacher's argmax and KL(p_t ‖ p_s) is largest, the teacher's token replaces it and the student
  re-generates the rest; the corrected sequence is distilled with D + `span_weight` · span loss;
* DDK (Liu et al. 2024): domain sampling weights from the student/teacher perplexity ratio, smoothed,
  re-estimated every `ddk_every` steps (`DDKSampler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from still.methods.base import MethodSpec
from still.registry import register_method


# ---------------------------------------------------------------------------------------------------
# Configuration and methods
# ---------------------------------------------------------------------------------------------------
@dataclass
class LMDistillConfig:
    """Every knob of `train_lm`. Defaults: off-policy forward-KL KD mixed with CE."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    clip_grad_norm: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    on_policy: float = 0.0          # GKD λ: fraction of steps on student generations
    seq_kd: bool = False            # train on teacher generations
    scrg: bool = False
    scrg_corrections: int = 1
    span_weight: float = 0.0
    prompt_len: int = 16
    gen_len: int = 32
    gen_temperature: float = 1.0
    ddk: bool = False
    ddk_every: int = 20
    ddk_alpha: float = 0.5
    ddk_eval_blocks: int = 8
    kd_rows: int | None = None
    allowed_gen_rows: int | None = None  # generate only from the first rows (e.g. a sub-vocab without UNK)
    chunk_size: int = 1024
    log_every: int = 10
    seed: int = 0


class LMMethodSpec(MethodSpec):
    """A MethodSpec whose `lm` field carries the LM loop's settings (generation, DDK, ...)."""

    def __init__(self, terms: list, lm: LMDistillConfig, notes: str = "") -> None:
        super().__init__(terms=terms, student_views={"lm": "<lm_head>"}, teacher_views={"lm": "lm"}, notes=notes)
        self.lm = lm


def _terms(cfg: LMDistillConfig) -> list[dict[str, Any]]:
    t = [{"name": "kd", "loss": "lm_kd", "student": "lm", "teacher": "lm", "inputs": {"labels": "labels"},
          "params": {"divergence": cfg.divergence, "beta": cfg.beta, "temperature": cfg.temperature,
                     "kd_weight": cfg.kd_weight, "ce_weight": cfg.ce_weight, "kd_rows": cfg.kd_rows,
                     "chunk_size": cfg.chunk_size}}]
    if cfg.span_weight:
        t.append({"name": "span", "loss": "span_kd", "student": "lm", "teacher": "lm",
                  "inputs": {"span_ids": "span_ids"}, "weight": cfg.span_weight,
                  "params": {"kd_rows": cfg.kd_rows, "chunk_size": cfg.chunk_size}})
    return t


def _spec(notes: str, **kw: Any) -> LMMethodSpec:
    cfg = LMDistillConfig(**kw)
    return LMMethodSpec(_terms(cfg), cfg, notes)


@register_method("lm_kd", paper="Hinton et al. 2015 (token-level KD for LMs)")
def lm_kd_method(divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 kd_weight: float = 1.0, ce_weight: float = 0.5, kd_rows: int | None = None) -> LMMethodSpec:
    """Off-policy token-level KD (any divergence) mixed with CE, from a live teacher or a top-k store."""
    return _spec("token-level KD", divergence=divergence, beta=beta, temperature=temperature,
                 kd_weight=kd_weight, ce_weight=ce_weight, kd_rows=kd_rows)


@register_method("gkd", paper="Agarwal et al., On-Policy Distillation of Language Models (GKD, ICLR 2024)")
def gkd(lmbda: float = 0.5, beta: float = 0.5, temperature: float = 1.0, gen_len: int = 32,
        prompt_len: int = 16, ce_weight: float = 0.5, kd_rows: int | None = None) -> LMMethodSpec:
    """Generalized JSD(β); a fraction λ of steps on student generations scored by the teacher."""
    return _spec("GKD", divergence="jsd", beta=beta, temperature=temperature, on_policy=lmbda, gen_len=gen_len,
                 prompt_len=prompt_len, ce_weight=ce_weight, kd_rows=kd_rows)


@register_method("seq_kd", paper="Kim & Rush, Sequence-Level Knowledge Distillation (EMNLP 2016)")
def seq_kd(gen_len: int = 32, prompt_len: int = 16, kd_weight: float = 0.0, kd_rows: int | None = None) -> LMMethodSpec:
    """CE on the teacher's greedy continuations of the data's prompts (+ optional token KD on them)."""
    return _spec("sequence-level KD", seq_kd=True, ce_weight=1.0, kd_weight=kd_weight, gen_len=gen_len,
                 prompt_len=prompt_len, kd_rows=kd_rows)


@register_method("scrg", paper="Liu et al., Multi-Granularity Semantic Revision for LLM Distillation (2024)")
def scrg(lmbda: float = 0.5, corrections: int = 1, span_weight: float = 1.0, divergence: str = "forward_kl",
         gen_len: int = 32, prompt_len: int = 16, ce_weight: float = 0.5, kd_rows: int | None = None) -> LMMethodSpec:
    """Student generations corrected by the teacher at the most divergent token, then re-generated; + span loss."""
    return _spec("SCRG + span", scrg=True, on_policy=lmbda, scrg_corrections=corrections, span_weight=span_weight,
                 divergence=divergence, gen_len=gen_len, prompt_len=prompt_len, ce_weight=ce_weight, kd_rows=kd_rows)


@register_method("ddk", paper="Liu et al., DDK: Distilling Domain Knowledge for Efficient LLMs (NeurIPS 2024)")
def ddk(every: int = 20, alpha: float = 0.5, gamma: float = 0.2, temperature: float = 1.0,
        kd_rows: int | None = None) -> LMMethodSpec:
    """CE + γ·KL with DDK's domain sampler (perplexity-ratio weights, factor smoothing, every K steps)."""
    return _spec("DDK", ddk=True, ddk_every=every, ddk_alpha=alpha, kd_weight=gamma, ce_weight=1.0,
                 temperature=temperature, kd_rows=kd_rows)


# ---------------------------------------------------------------------------------------------------
# DDK
# ---------------------------------------------------------------------------------------------------
class DDKSampler:
    """DDK's domain weights. First estimate `r = softmax(ℓ_S / ℓ_T)`; each later one
    `ψ = r · exp(ℓ_S / ℓ_T)`, `r ← α · ψ / Σψ + (1 − α) / N` (factor smooth updating; α = 0.5)."""

    def __init__(self, n_domains: int, alpha: float = 0.5, seed: int = 0) -> None:
        self.n, self.alpha = int(n_domains), float(alpha)
        self.weights = torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        self.updates = 0
        self.history: list[list[float]] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, student_ppl: Sequence[float] | torch.Tensor, teacher_ppl: Sequence[float] | torch.Tensor) -> torch.Tensor:
        ratio = torch.as_tensor(student_ppl, dtype=torch.float64) / torch.as_tensor(teacher_ppl, dtype=torch.float64)
        if ratio.shape != (self.n,):
            raise ValueError(f"DDK: expected {self.n} domain perplexities, got shape {tuple(ratio.shape)}")
        if self.updates == 0:
            self.weights = torch.softmax(ratio, 0)
        else:
            psi = self.weights * torch.exp(ratio)
            self.weights = self.alpha * psi / psi.sum() + (1 - self.alpha) / self.n
        self.updates += 1
        self.history.append(self.weights.tolist())
        return self.weights

    def sample(self, n: int) -> torch.Tensor:
        """`n` domain ids drawn with the current weights."""
        return torch.multinomial(self.weights.float(), n, replacement=True, generator=self.gen)


# ---------------------------------------------------------------------------------------------------
# Generation and SCRG
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
             allowed_rows: int | None = None, greedy: bool = False, generator: torch.Generator | None = None,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, P + new_tokens)` sampled (or greedy) continuations, in the model's own ids. Logits are restricted
    to the head `rows` (e.g. a teacher's sub-vocabulary) and to the first `allowed_rows` of those.
    Fixed length: EOS does not stop it. No KV cache (students are small; prompts short)."""
    from still.integrations.causal_lm import lm_head_outputs

    was = model.training
    model.eval()
    seq = prompts
    for _ in range(new_tokens):
        out = lm_head_outputs(model, {"input_ids": seq}, rows)
        z = (out.hidden[:, -1] @ out.weight.t()).float()
        if out.bias is not None:
            z = z + out.bias
        if allowed_rows is not None:
            z[:, allowed_rows:] = float("-inf")
        if greedy or temperature <= 0:
            nxt = z.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=generator).squeeze(-1)
        if rows is not None:  # row positions → the model's own ids
            nxt = rows.to(nxt.device)[nxt]
        seq = torch.cat([seq, nxt[:, None]], 1)
    model.train(was)
    return seq


def scrg_correction(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                    start: int) -> tuple[int, int] | None:
    """SCRG's correction point of one sequence: `(position j, teacher token)` or None if all agree.

    student_logits, teacher_logits (T, V): position t predicts token t + 1; tokens (T,); generated tokens
    are `tokens[start:]`. Among generated positions j where `tokens[j] != argmax teacher_logits[j - 1]`,
    j maximises KL(p_t ‖ p_s) of the prediction of token j.
    """
    from still.losses.llm_span import divergence_rows

    pred_t = teacher_logits[start - 1 : -1].argmax(-1)           # teacher's choice for tokens[start:]
    actual = tokens[start:]
    differ = pred_t != actual
    if not differ.any():
        return None
    kl = divergence_rows("forward_kl", student_logits[start - 1 : -1], teacher_logits[start - 1 : -1])
    kl = torch.where(differ, kl, torch.full_like(kl, float("-inf")))
    j = int(kl.argmax())
    return start + j, int(pred_t[j])


@torch.no_grad()
def scrg_sequences(student: nn.Module, teacher: Any, prompts: torch.Tensor, new_tokens: int, corrections: int = 1,
                   temperature: float = 1.0, allowed_rows: int | None = None, kd_rows: int | None = None,
                   to_teacher_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
    """Student generations after `corrections` SCRG rounds; returns `(sequences (B, P+G), corrected positions)`."""
    from still.integrations.causal_lm import lm_head_outputs

    P = prompts.shape[1]
    seq = generate(student, prompts, new_tokens, temperature, allowed_rows, generator=generator)
    fixed: list[int] = []
    for _ in range(corrections):
        batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if to_teacher_ids is not None:
            batch["teacher_input_ids"] = to_teacher_ids(seq)
        t_out = teacher.views(batch, ["lm"])["lm"]
        s_out = lm_head_outputs(student, batch)
        rows = kd_rows or min(t_out.weight.shape[0], s_out.weight.shape[0])
        new = []
        for b in range(len(seq)):
            zs = (s_out.hidden[b] @ s_out.weight[:rows].t()).float()
            zt = (t_out.hidden[b] @ t_out.weight[:rows].t()).float()
            c = scrg_correction(zs, zt, seq[b], P)
            if c is None:
                new.append(seq[b])
                fixed.append(-1)
                continue
            j, tok = c
            prefix = torch.cat([seq[b, :j], torch.tensor([tok], device=seq.device)])[None]
            rest = seq.shape[1] - j - 1
            new.append(generate(student, prefix, rest, temperature, allowed_rows, generator=generator)[0]
                       if rest > 0 else prefix[0])
            fixed.append(j)
        seq = torch.stack(new)
    return seq, fixed
