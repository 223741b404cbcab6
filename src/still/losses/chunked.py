"""Chunked fused-linear distillation: the LLM token-level KD loss without any `(N, V)` tensor.

    chunked_distill_loss(
        student_hidden,            # (N, Hs) or (..., Hs): the student's final hidden states (before the lm-head)
        student_head,              # (V, Hs) lm-head weight (Tensor, or an nn.Linear / module with .weight/.bias)
        teacher_hidden=None,       # (N, Ht) teacher hidden states ...
        teacher_head=None,         # (V, Ht) ... and lm-head weight (Tensor or module); the teacher gets no gradient
        *,
        student_bias=None, teacher_bias=None,   # (V,) optional
        teacher_logits=None,       # or cached teacher logits (N, V)
        teacher_topk=None,         # or a top-k teacher: (ids (N, k) int64, log-probs (N, k)) (+ .vocab_size); sparse_topk_kl
                                   #   uses the log-probs as given; a dense divergence densifies them (topk_missing)
                                   #   and treats them as teacher logits (1/T applies). No teacher: CE-only (kd_weight=0)
        labels=None,               # (N,) int64, ignore_index marks tokens that do not count; also the CE target
        mask=None,                 # (N,) bool, True = token counts (combined with labels)
        ignore_index=-100,
        divergence="forward_kl",   # a name in still.losses.divergences.DIVERGENCES, or a DACKL module
        divergence_params=None,    # e.g. {"beta": 0.5} for jsd; {"group_size": 256} for sinkhorn
        temperature=1.0, scale_t2=False,
        kd_weight=1.0, ce_weight=0.0,   # loss = kd_weight·KD + ce_weight·CE(student logits at T=1, labels)
        num_valid=None,            # the normaliser: global count of valid tokens (default: the local count)
        kd_mask=None, num_kd_valid=None,  # KD only where kd_mask (N,) (CE keeps every valid token), own normaliser
        topk_missing="uniform",    # a dense divergence from teacher_topk: each chunk densified ("uniform"|"renormalise")
        chunk_size=None,           # tokens per chunk (default: about 32 MiB of fp32 logits, at least 128 tokens)
        use_fused=True,            # closed-form chunk gradients where the divergence has them (KL, RKL, JSD);
                                   #   False: autograd of the row function (the reference; same value)
        student_softcap=None, teacher_softcap=None,  # Gemma-style final logit soft-capping: cap·tanh(z/cap)
        kd_vocab=None,             # KD over the first kd_vocab logits only (teacher: kd_vocab rows); CE over all V
        return_parts=False,        # also return {"kd": ..., "ce": ...} (detached, each already normalised)
    ) -> Tensor (fp32 scalar)

How it works. Valid tokens are gathered first (masked tokens cost nothing). For each chunk of tokens the
student logits are computed into a reused buffer, the teacher logits under no_grad into another, and
the *same row function* the dense divergences use (`still.losses.divergences`) is differentiated with
`torch.autograd.grad` on that chunk only; forward KL, reverse KL and JSD use their closed-form gradient
(`Divergence.fused`, tested equal to autograd of the row function), which needs 4 chunk buffers instead
of ~15. The chunk's gradient is pushed through the head at once (grad_h = g·W, grad_W += gᵀ·h), so the
chunk's logits die before the next chunk. The whole thing is an `autograd.Function`: the gradients are
computed in the forward and only rescaled in the backward, so it sits inside any normal
`loss.backward()`; under `torch.no_grad()` no gradient work is done. bf16 inputs: GEMMs in bf16, the
loss in fp32, grad_W accumulated in fp32; heads in another dtype than the hidden states (fp32 weights
under autocast) are cast for the GEMMs and get their gradient in their own dtype. Chunking never changes
the value (normalisation by the global count), except for the batch-wise `sinkhorn`, whose OT batch is
the group of `group_size` valid tokens (dense: the same `group_size` gives the same value).

`divergence` may also be a `Divergence` with `overlap=1` (a pairwise row function, e.g. `span_kd`): each chunk
then also computes the next chunk's first row, as context with weight 0. `still.losses.llm_span.lm_kd` and
`span_kd` are thin wrappers of this function: it is still's one chunked loop.

`chunked_kd` (registered loss, `LMDistillLoss`) wraps this for an Objective: the student view is either an
object with `.hidden (B, T, Hs)` and `.weight (V, Hs)` (+ `.bias`, `.softcap`; e.g.
`still.integrations.causal_lm.LMHeadOutputs`) or plain hidden states with the heads bound once by `.bind(...)`;
the teacher view is the same, or cached logits, or a top-k pair (`.indices`/`.logprobs`, a dict or a tuple).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from still.losses.divergences import NEG_FLOOR, Divergence, get_divergence, valid_mask

CHUNK_BYTES = 32 * 2**20


MIN_CHUNK = 128  # smaller chunks make the lm-head GEMMs slow: at V=131072, N=1024 (CPU, 2 threads), 64-token
# chunks took 30.7 s vs 22.0 s for 128 (median of 3 interleaved runs) for 5% less peak memory (1,292 vs 1,357 MB)


def default_chunk_size(vocab: int, n_tokens: int) -> int:
    """Tokens per chunk: about `CHUNK_BYTES` of fp32 logits, a power of two in [MIN_CHUNK, 1024], ≤ n_tokens."""
    c = MIN_CHUNK
    while c * 2 <= 1024 and (c * 2) * vocab * 4 <= CHUNK_BYTES:
        c *= 2
    return max(1, min(c, n_tokens))


def _weight_bias(head: Any, bias: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if head is None:
        return None, bias  # type: ignore[return-value]
    if isinstance(head, torch.Tensor):
        return head, bias
    w = getattr(head, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a (V, H) tensor or a module with .weight, got {type(head).__name__}")
    return w, bias if bias is not None else getattr(head, "bias", None)


@dataclass
class _Plan:
    rows: Callable[..., torch.Tensor]
    teacher_kind: str  # "hidden" | "logits" | "topk"
    temperature: float
    kd_scale: float
    ce_scale: float
    chunk: int
    n_params: int
    grad_enabled: bool = True
    topk_missing: str = "uniform"
    fused: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    s_cap: float | None = None
    t_cap: float | None = None
    kd_vocab: int = 0  # KD over the first kd_vocab logits (CE over all V)
    topk_vocab: int = 0  # a dense divergence from top-k: densified over this many ids, then cut to kd_vocab
    overlap: int = 0  # rows of the next chunk a pairwise row function also sees (weight 0 in this chunk)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _prep_(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-place `prepare_logits` for a no-grad teacher buffer (fp32 copy first if needed)."""
    x = x if x.dtype == torch.float32 else x.float()
    if temperature != 1.0:
        x.div_(temperature)
    return x.clamp_min_(NEG_FLOOR)


def _count(x: int | float | torch.Tensor) -> float:
    return max(float(x.item() if isinstance(x, torch.Tensor) else x), 1.0)


def _topk_pair(teacher_topk: Any) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(ids, log-probs, vocab_size or None) of a dict / `TopKLogits`-like object / pair."""
    if isinstance(teacher_topk, dict):
        return teacher_topk["indices"], teacher_topk["values"], teacher_topk.get("vocab_size")
    if hasattr(teacher_topk, "indices") and hasattr(teacher_topk, "logprobs"):
        return teacher_topk.indices, teacher_topk.logprobs, getattr(teacher_topk, "vocab_size", None)
    ids, vals = teacher_topk
    return ids, vals, None


def densify_topk(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int, missing: str = "uniform") -> torch.Tensor:
    """Prepared teacher log-probs `(m, V)` from top-k `(m, k)`: the missing mass spread evenly over the other
    ids ("uniform") or the top-k renormalised ("renormalise"; other ids at the -inf floor)."""
    missing = "renormalise" if missing == "renormalize" else missing
    lp = logprobs.float().clamp_min(NEG_FLOOR)
    m, k = ids.shape
    if missing not in ("uniform", "renormalise"):
        raise ValueError(f"densify_topk: missing must be 'uniform' or 'renormalise', got {missing!r}")
    if missing == "renormalise" or k >= vocab:
        out = torch.full((m, vocab), NEG_FLOOR, dtype=torch.float32, device=lp.device)
        return out.scatter_(1, ids.long(), lp - torch.logsumexp(lp, -1, keepdim=True))
    rest = ((1.0 - lp.exp().sum(-1)).clamp_min(1e-30) / (vocab - k)).log()
    return rest[:, None].expand(m, vocab).clone().scatter_(1, ids.long(), lp)


def _fused_chunk(plan: _Plan, s: torch.Tensor, t: torch.Tensor, lab: torch.Tensor | None,
                 w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d loss / d s for one chunk of prepared logits `s (m, V)` from the divergence's closed form (+ CE)."""
    kv = plan.kd_vocab
    rows, g = plan.fused(s if kv == s.shape[1] else s[:, :kv], t)
    if kv != s.shape[1]:  # KD on a prefix of the vocabulary: the other logits get only the CE gradient
        g = torch.cat([g, g.new_zeros(g.shape[0], s.shape[1] - kv)], 1)
    if w is not None:
        rows = rows * w
        g.mul_(w[:, None])
    g.mul_(plan.kd_scale)
    ce = s.new_zeros(())
    if plan.ce_scale:  # CE(T·s): d/ds = T·(softmax(T·s) − onehot)
        T = plan.temperature
        zc = s * T if T != 1.0 else s
        lse = torch.logsumexp(zc, -1)
        ce = (lse - zc.gather(1, lab[:, None]).squeeze(1)).sum()
        sm = torch.sub(zc, lse[:, None]).exp_()
        sm[torch.arange(sm.shape[0], device=sm.device), lab] -= 1.0
        g.add_(sm, alpha=plan.ce_scale * T)
    return g, rows.sum(), ce


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, idx: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None,
                ht: torch.Tensor | None, wt: torch.Tensor | None, bt: torch.Tensor | None,
                t_logits: torch.Tensor | None, t_ids: torch.Tensor | None, t_vals: torch.Tensor | None,
                labels: torch.Tensor | None, kd_w: torch.Tensor | None, *params: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad
        need_h, need_w, need_b = need[2], need[3], bs is not None and need[4]
        need_p = [bool(x) for x in need[13:]]
        grads_on = plan.grad_enabled and any([need_h, need_w, need_b, *need_p])
        need_h, need_w, need_b = need_h and grads_on, need_w and grads_on, need_b and grads_on
        need_p = [k and grads_on for k in need_p]
        N, n = hs.shape[0], idx.numel()
        dense = n == N

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or dense else x.index_select(0, idx)

        hs_v, ht_v, tl_v, ids_v, vals_v, lab_v, kdw_v = map(take, (hs, ht, t_logits, t_ids, t_vals, labels, kd_w))
        V, dtype, c, ov, kv = ws.shape[0], hs.dtype, plan.chunk, plan.overlap, plan.kd_vocab
        # mixed precision (e.g. bf16 hidden states under autocast, fp32 heads): GEMMs in the hidden states' dtype
        ws_c = ws if ws.dtype == dtype else ws.to(dtype)
        bs_c = bs if bs is None or bs.dtype == dtype else bs.to(dtype)
        if ht is not None:
            wt = wt if wt.dtype == ht.dtype else wt.to(ht.dtype)
            bt = bt if bt is None or bt.dtype == ht.dtype else bt.to(ht.dtype)
        g_hs = (torch.zeros_like(hs_v) if ov else torch.empty_like(hs_v)) if need_h else None
        g_w = torch.zeros(V, ws.shape[1], dtype=torch.float32, device=ws.device) if need_w else None
        g_tmp = torch.empty(V, ws.shape[1], dtype=dtype, device=ws.device) if need_w and dtype != torch.float32 else None
        g_b = torch.zeros(V, dtype=torch.float32, device=ws.device) if need_b else None
        g_p = [torch.zeros_like(p) for p in params]
        zs_buf = torch.empty(min(c + ov, n), V, dtype=dtype, device=hs.device)
        zt_buf = (torch.empty(min(c + ov, n), kv, dtype=ht.dtype, device=ht.device)
                  if plan.teacher_kind == "hidden" else None)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hs.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hs.device)
        wrt_params = [p for p, k in zip(params, need_p) if k]
        for a in range(0, n, c):
            m = min(c, n - a)
            e = min(n, a + m + ov)  # rows a..e-1 go through the head; a+m..e-1 only as the next rows' context
            h = hs_v[a:e]
            zs = torch.mm(h, ws_c.t(), out=zs_buf[:e - a])
            if bs_c is not None:
                zs.add_(bs_c)
            if plan.teacher_kind == "hidden":
                zt = torch.mm(ht_v[a:e], wt.t(), out=zt_buf[:e - a])
                if bt is not None:
                    zt.add_(bt)
                if plan.t_cap:
                    zt.div_(plan.t_cap).tanh_().mul_(plan.t_cap)
                t: Any = _prep_(zt, plan.temperature)
            elif plan.teacher_kind == "logits":
                tl = tl_v[a:e, :kv].detach()
                t = _prep_(tl.clone() if tl.dtype == torch.float32 else tl, plan.temperature)
            elif plan.teacher_kind == "topk":
                t = (ids_v[a:e], vals_v[a:e].detach())
            elif plan.teacher_kind == "topk_dense":  # densified log-probs are the teacher's logits (1/T applies)
                dt = densify_topk(ids_v[a:e], vals_v[a:e].detach(), plan.topk_vocab, plan.topk_missing)
                t = _prep_(dt if plan.topk_vocab == kv else dt[:, :kv], plan.temperature)
            else:
                t = None
            lab = None if lab_v is None else lab_v[a:e]
            # Prepare the student chunk in place (softcap, -inf floor, 1/T), then differentiate the row
            # function w.r.t. the prepared logits s; the chain back to the raw logits is applied to g below.
            zf = zs.float() if dtype != torch.float32 else zs
            if plan.s_cap:
                zf.div_(plan.s_cap).tanh_().mul_(plan.s_cap)
            zf.clamp_min_(NEG_FLOOR)
            T = plan.temperature
            if T != 1.0:
                zf.div_(T)
            w = None if kdw_v is None else kdw_v[a:e]
            if ov:  # the context rows count in the next chunk, not in this one
                w = torch.cat([torch.ones(m, device=zf.device) if w is None else w[:m], zf.new_zeros(e - a - m)])
            if grads_on and plan.fused is not None and t is not None:
                g, kd, ce = _fused_chunk(plan, zf, t, lab, w)  # closed form, no autograd graph
                got: tuple = (g,)
                s = zf
            else:
                s = zf.detach().requires_grad_(grads_on)
                with torch.enable_grad() if grads_on else torch.no_grad():
                    sk = s if kv == V else s[:, :kv]
                    kd = s.new_zeros(()) if t is None else (
                        plan.rows(sk, t, lab).sum() if w is None else (plan.rows(sk, t, lab) * w).sum())
                    loss = kd * plan.kd_scale
                    ce = s.new_zeros(())
                    if plan.ce_scale:
                        ce = F.cross_entropy(s * T if T != 1.0 else s, lab, reduction="sum")
                        loss = loss + ce * plan.ce_scale
                    if grads_on:
                        got = torch.autograd.grad(loss, [s, *wrt_params], allow_unused=True)
            kd_sum += kd.detach()
            ce_sum += ce.detach()
            if not grads_on:
                continue
            g = got[0]
            if T != 1.0:
                g.mul_(1.0 / T)
            if plan.s_cap:  # d(cap·tanh(z/cap))/dz = 1 − (c/cap)², c = s·T
                g.mul_(1.0 - (s.detach() * (T / plan.s_cap)).square_())
            if need_h:
                if ov:
                    g_hs[a:e].addmm_(g.to(dtype), ws_c)
                else:
                    torch.mm(g.to(dtype), ws_c, out=g_hs[a:e])
            if need_w:
                if g_tmp is None:
                    g_w.addmm_(g.t(), h)
                else:
                    g_w.add_(torch.mm(g.t().to(dtype), h, out=g_tmp))
            if need_b:
                g_b.add_(g.sum(0))
            j = 1
            for i, k in enumerate(need_p):
                if k:
                    if got[j] is not None:
                        g_p[i].add_(got[j])
                    j += 1
            del got, g, zf, s
        plan.parts = {"kd": kd_sum * plan.kd_scale, "ce": ce_sum * plan.ce_scale}
        ctx.plan_n, ctx.dense = N, dense
        saved = [idx] + [x if x is not None else torch.empty(0) for x in (g_hs, g_w, g_b)] + g_p
        ctx.save_for_backward(*saved)
        ctx.flags = (need_h, need_w, need_b, need_p)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        return kd_sum * plan.kd_scale + ce_sum * plan.ce_scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        idx, g_hs, g_w, g_b, *g_p = ctx.saved_tensors
        need_h, need_w, need_b, need_p = ctx.flags
        dh, dw, db = ctx.dtypes
        go = grad_out.float()
        out_h = out_w = out_b = None
        if need_h:
            gh = (g_hs.float() * go).to(dh)
            if ctx.dense:
                out_h = gh
            else:
                out_h = gh.new_zeros(ctx.plan_n, gh.shape[1]).index_copy_(0, idx, gh)
        if need_w:
            out_w = (g_w * go).to(dw)
        if need_b:
            out_b = (g_b * go).to(db)
        out_p = [(gp * go.to(gp.dtype)) if k else None for gp, k in zip(g_p, need_p)]
        return (None, None, out_h, out_w, out_b, None, None, None, None, None, None, None, None, *out_p)


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head: Any,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Any = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: Any = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: str | nn.Module | Divergence = "forward_kl",
    divergence_params: dict[str, Any] | None = None,
    temperature: float = 1.0,
    scale_t2: bool = False,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    num_valid: int | torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    num_kd_valid: int | torch.Tensor | None = None,
    topk_missing: str = "uniform",
    chunk_size: int | None = None,
    use_fused: bool = True,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kd_vocab: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss from hidden states and lm-heads, chunked over tokens (see the module docstring)."""
    ws, bs = _weight_bias(student_head, student_bias, "student_head")
    wt, bt = _weight_bias(teacher_head, teacher_bias, "teacher_head")
    if temperature <= 0:
        raise ValueError(f"chunked_distill_loss: temperature must be > 0, got {temperature}")
    Hs = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, Hs)
    N = hs.shape[0]
    if ws.dim() != 2 or ws.shape[1] != Hs:
        raise ValueError(f"student_head {tuple(ws.shape)} does not match student_hidden {tuple(student_hidden.shape)}: "
                         f"want (V, {Hs})")
    V = ws.shape[0]
    kv = V if kd_vocab is None else int(kd_vocab)
    if not 0 < kv <= V:
        raise ValueError(f"kd_vocab={kd_vocab} must be in [1, {V}] (the student head's rows)")
    params = dict(divergence_params or {})
    kinds = [k for k, v in (("hidden", teacher_hidden), ("logits", teacher_logits), ("topk", teacher_topk)) if v is not None]
    if len(kinds) > 1 or (not kinds and kd_weight):
        raise ValueError(f"give exactly one teacher: teacher_hidden+teacher_head, teacher_logits or teacher_topk (got "
                         f"{kinds}); only a CE-only call (kd_weight=0) may give none")
    kind = kinds[0] if kinds else "none"
    ht = t_logits = t_ids = t_vals = topk_vocab = None
    if kind == "hidden":
        if wt is None:
            raise ValueError("teacher_hidden needs teacher_head (V, Ht)")
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if ht.shape[0] != N or wt.shape != (kv, ht.shape[1]):
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_head {tuple(wt.shape)} do not match "
                             f"{N} student tokens and vocabulary {kv} (align padded vocabularies with still.losses.vocab)")
        ht, wt = ht.detach(), wt.detach()
        bt = None if bt is None else bt.detach()
    elif kind == "logits":
        t_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        if t_logits.shape[0] != N or t_logits.shape[1] < kv:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} do not match ({N}, {kv})")
    elif kind == "topk":
        t_ids, t_vals, topk_vocab = _topk_pair(teacher_topk)
        t_ids, t_vals = t_ids.reshape(N, -1), t_vals.reshape(N, -1)
        if topk_vocab is not None and topk_vocab < kv:
            raise ValueError(f"the top-k teacher's vocabulary ({topk_vocab}) is smaller than kd_vocab={kv}")
    mod_params: list[torch.Tensor] = []
    group = params.pop("group_size", None)
    if isinstance(divergence, nn.Module):
        if not hasattr(divergence, "rows"):
            raise TypeError(f"divergence module {type(divergence).__name__} has no rows(s, t, labels) method")
        if params:
            raise TypeError(f"divergence_params {sorted(params)} cannot be given with a divergence module")
        rows: Callable[..., torch.Tensor] = divergence.rows
        fused = None
        mod_params = [p for p in divergence.parameters()]
        batchwise, sparse, overlap = False, False, 0
    else:
        div = divergence if isinstance(divergence, Divergence) else get_divergence(divergence)
        unknown = set(params) - set(div.params)
        if unknown:
            raise TypeError(f"divergence {div.name!r}: unknown parameter(s) {sorted(unknown)}; it takes {list(div.params)}")
        rows = functools.partial(div.rows, **params) if params else div.rows
        fused = None if div.fused is None else (functools.partial(div.fused, **params) if params else div.fused)
        batchwise, sparse, overlap = div.batchwise, div.sparse_teacher, div.overlap
    if sparse and kind != "topk" and kind != "none":
        raise ValueError(f"divergence {divergence!r} needs teacher_topk (ids, log-probs)")
    topk_missing = "renormalise" if topk_missing == "renormalize" else topk_missing
    if kind == "topk" and not sparse:  # a dense divergence from a top-k teacher: densify each chunk
        if topk_missing not in ("uniform", "renormalise"):
            raise ValueError(f"topk_missing must be 'uniform' or 'renormalise' for divergence {divergence!r} "
                             f"(got {topk_missing!r}; 'drop' exists only for 'sparse_topk_kl')")
        kind = "topk_dense"
    if batchwise and kd_mask is not None:
        raise ValueError("kd_mask cannot be used with the batch-wise sinkhorn divergence (mask with `mask`)")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if overlap and (ce_weight or batchwise or mask is not None or labels is not None):
        raise ValueError("a pairwise divergence (overlap > 0) takes neither CE, labels nor mask (weight pairs by kd_mask)")
    lab = None if labels is None else labels.reshape(-1).to(hs.device).long()
    valid = valid_mask((N,), hs.device, None if mask is None else mask.reshape(-1), lab, ignore_index)
    idx = valid.nonzero().squeeze(1)
    n = idx.numel()
    count = _count(n if num_valid is None else num_valid)
    kd_count, kd_w = count, None
    if kd_mask is not None:
        kd_w = (kd_mask.reshape(-1).to(hs.device).bool() & valid).float()
        kd_count = _count(kd_w.sum() if num_kd_valid is None else num_kd_valid)
    if batchwise:
        chunk = int(group) if group else max(n, 1)
    else:
        chunk = int(chunk_size) if chunk_size else default_chunk_size(V, max(n, 1))
    tscale = float(temperature) ** 2 if scale_t2 else 1.0
    plan = _Plan(rows, kind, float(temperature), kd_weight * tscale / kd_count, ce_weight / count, max(chunk, 1),
                 len(mod_params), torch.is_grad_enabled(), topk_missing, fused if use_fused else None,
                 student_softcap, teacher_softcap, kv, kv if kind != "topk_dense" else int(topk_vocab or kv), overlap)
    if n == 0 or (kind == "none" and not ce_weight):  # nothing counts: an exact 0 with zero gradients
        zero = sum((x.reshape(-1)[:0].float().sum() for x in (hs, ws, bs, *mod_params) if x is not None),
                   hs.new_zeros((), dtype=torch.float32))  # empty slices: exactly 0, even with -inf biases
        return (zero, {"kd": zero.detach(), "ce": zero.detach()}) if return_parts else zero
    out = _ChunkedDistill.apply(plan, idx, hs, ws, bs, ht, wt, bt, t_logits, t_ids, t_vals, lab, kd_w, *mod_params)
    return (out, plan.parts) if return_parts else out


def __getattr__(name: str) -> Any:  # `LMDistillLoss` (chunked_kd) lives with the other LM terms now
    if name == "LMDistillLoss":
        from still.losses.llm_span import LMDistillLoss

        return LMDistillLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
