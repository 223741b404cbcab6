"""CRD: NCE value and gradient against a naive reference, the memory bank, lazy heads, state loading."""

from __future__ import annotations

import math

import pytest
import torch

from still.losses.contrastive import CRDLoss, nce_loss
from still.registry import LOSSES

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _setup(n: int = 11, b: int = 3, k: int = 4, ds: int = 5, dt: int = 6, feat: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    crd = CRDLoss(feat_dim=feat, num_negatives=k, nce_t=0.5, momentum=0.3, num_samples=n).double()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, 2, dt // 2, generator=g, dtype=torch.float64)
    idx = torch.tensor([4, 0, 10][:b])
    cidx = torch.randint(0, n, (b, k + 1), generator=g)
    cidx[:, 0] = idx
    return crd, s, t, idx, cidx


def naive_crd(s, t, ws, bs, wt, bt, mem_s, mem_t, cidx, temp, n):  # noqa: ANN001, ANN201
    """Tian et al. eq. (10)-(18) as in their code: h = exp(v·m/τ)/Z, NCE with Pn = 1/N, both directions."""
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    b, k1 = cidx.shape

    def emb(x, w, bias):  # noqa: ANN001, ANN202
        v = [sum(w[o, i] * x[i] for i in range(x.shape[0])) + bias[o] for o in range(w.shape[0])]
        norm = torch.sqrt(sum(u * u for u in v))
        return [u / norm for u in v]

    vs = [emb(s[i], ws, bs) for i in range(b)]
    vt = [emb(t[i], wt, bt) for i in range(b)]

    def scores(v, mem):  # noqa: ANN001, ANN202
        return [[torch.exp(sum(mem[int(cidx[i, j]), d] * v[i][d] for d in range(len(v[i]))) / temp)
                 for j in range(k1)] for i in range(b)]

    def nce(h):  # noqa: ANN001, ANN202
        z = sum(h[i][j] for i in range(b) for j in range(k1)) / (b * k1) * n
        m, pn, eps = k1 - 1, 1.0 / n, 1e-7
        tot = 0
        for i in range(b):
            p = [x / z.detach() for x in h[i]]
            tot = tot + torch.log(p[0] / (p[0] + m * pn + eps))
            tot = tot + sum(torch.log(m * pn / (p[j] + m * pn + eps)) for j in range(1, k1))
        return -tot / b

    return nce(scores(vs, mem_t)) + nce(scores(vt, mem_s))


def test_crd_matches_naive_value_and_gradients() -> None:
    crd, s, t, idx, cidx = _setup()
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    got = crd(s, t, idx, contrast_index=cidx)
    ws, bs, wt, bt = crd.embed_s.weight, crd.embed_s.bias, crd.embed_t.weight, crd.embed_t.bias
    assert ws.shape == (3, 5) and wt.shape == (3, 6)  # heads sized lazily from the inputs
    ref = naive_crd(s, t, ws, bs, wt, bt, mem_s, mem_t, cidx, 0.5, 11)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-9, atol=1e-12)
    for p in (s, ws, bs, wt):
        g_got, = torch.autograd.grad(got, p, retain_graph=True)
        g_ref, = torch.autograd.grad(ref, p, retain_graph=True)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-7, atol=1e-10)
        assert g_got.abs().sum() > 0


def test_crd_memory_momentum_update_and_eval_mode() -> None:
    crd, s, t, idx, cidx = _setup()
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()
    crd(s, t, idx, contrast_index=cidx)
    vs, vt = crd.embed(s.detach(), t)
    for old, new, v in ((old_s, crd.memory_s, vs), (old_t, crd.memory_t, vt)):
        rows = 0.3 * old[idx] + 0.7 * v.detach()
        torch.testing.assert_close(new[idx], rows / rows.norm(dim=1, keepdim=True))
        keep = torch.ones(11, dtype=torch.bool)
        keep[idx] = False
        torch.testing.assert_close(new[keep], old[keep])  # other rows untouched
    # Z was fixed by the first batch and stays
    z = crd.z.clone()
    crd.eval()
    before = crd.memory_s.clone()
    crd(s, t, idx, contrast_index=cidx)
    torch.testing.assert_close(crd.memory_s, before)  # evaluation never writes the bank
    torch.testing.assert_close(crd.z, z)


def test_crd_grows_bank_without_num_samples_and_samples_negatives() -> None:
    torch.manual_seed(0)
    crd = CRDLoss(feat_dim=4, num_negatives=7)
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 8)
    v = crd(s, t, torch.tensor([2, 9, 4]))
    assert crd.memory_s.shape == (10, 4) and crd.num_data == 10
    crd(s, t, torch.tensor([1, 0, 25]))
    assert crd.memory_s.shape[0] >= 26 and crd.num_data == 26
    v.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    fixed = CRDLoss(num_samples=5)
    with pytest.raises(IndexError, match="num_samples=5"):
        fixed(s, t, torch.tensor([0, 1, 5]))


def test_crd_state_dict_loads_into_fresh_module() -> None:
    crd, s, t, idx, cidx = _setup()
    crd(s, t, idx, contrast_index=cidx)
    fresh = CRDLoss(feat_dim=3, num_negatives=4, nce_t=0.5, momentum=0.3).double()  # no bank, no heads
    fresh.load_state_dict(crd.state_dict())
    crd.eval(), fresh.eval()
    torch.testing.assert_close(fresh(s, t, idx, contrast_index=cidx), crd(s, t, idx, contrast_index=cidx))


def test_crd_learns_to_align_embeddings() -> None:
    """A few steps of training: the NCE loss falls when student features can match the teacher's."""
    torch.manual_seed(0)
    n, d = 48, 6
    teacher_feats = torch.randn(n, d)
    student_feats = torch.nn.Parameter(torch.randn(n, d))
    crd = CRDLoss(feat_dim=8, num_negatives=16, nce_t=0.1, num_samples=n)
    crd(student_feats[:4], teacher_feats[:4], torch.arange(4))  # builds the heads
    opt = torch.optim.Adam([student_feats, *crd.parameters()], lr=0.05)
    losses = []
    for epoch in range(12):
        tot = 0.0
        for idx in torch.randperm(n).split(16):
            loss = crd(student_feats[idx], teacher_feats[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss)
        losses.append(tot)
    assert losses[-1] < 0.8 * losses[0]


def test_nce_loss_formula_and_registry() -> None:
    p = torch.tensor([[0.5, 0.1, 0.2]], dtype=torch.float64)
    mpn = 2 / 10
    ref = -(math.log(0.5 / (0.5 + mpn + 1e-7)) + math.log(mpn / (0.1 + mpn + 1e-7)) + math.log(mpn / (0.2 + mpn + 1e-7)))
    assert float(nce_loss(p, 10)) == pytest.approx(ref, rel=1e-12)
    e = LOSSES.entry("crd")
    assert e.is_class and e.meta["shape_check"] == "batch" and e.paper


def test_crd_under_bf16_autocast_scores_in_float32() -> None:
    torch.manual_seed(0)
    crd = CRDLoss(feat_dim=8, num_negatives=16)
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = crd(s, t, torch.arange(4))
    assert v.dtype == torch.float32 and math.isfinite(float(v))
    v.backward()
    assert torch.isfinite(s.grad).all()


def test_crd_gather_and_full_bank_paths_agree() -> None:
    crd, s, t, idx, cidx = _setup()
    crd.eval()
    full = crd(s, t, idx, contrast_index=cidx)
    g_full, = torch.autograd.grad(full, s)
    crd.full_bank_factor = 0  # force gathering the sampled rows
    gathered = crd(s, t, idx, contrast_index=cidx)
    g_gath, = torch.autograd.grad(gathered, s)
    torch.testing.assert_close(full, gathered, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_full, g_gath, rtol=1e-10, atol=1e-12)


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial bank and heads on both processes
        crd = CRDLoss(feat_dim=4, num_negatives=8)
        g = torch.Generator().manual_seed(100 + rank)
        s, t = torch.randn(3 - rank, 5, generator=g), torch.randn(3 - rank, 6, generator=g)
        index = torch.tensor([0, 4, 7])[: 3 - rank] + rank * 10  # rank 1 sees ids 10, 14; the bank grows to 15
        crd(s, t, index)
        vs, vt = crd.embed(s, t)
        torch.save({"memory_s": crd.memory_s, "memory_t": crd.memory_t, "z": crd.z, "index": index,
                    "vs": vs.detach(), "n": crd.num_data}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_crd_banks_stay_identical_across_two_processes(tmp_path) -> None:  # noqa: ANN001
    """Two gloo processes with different samples: each applies both processes' rows to its bank."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["n"] == r1["n"] == 15
    for key in ("memory_s", "memory_t", "z"):
        torch.testing.assert_close(r0[key], r1[key])
    # each process's rows hold its own embeddings' update (norm 1) on both processes
    for r in (r0, r1):
        rows = r0["memory_s"][r["index"]]
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(r["index"])))
    torch.manual_seed(0)
    init = CRDLoss(feat_dim=4, num_negatives=8)
    init._grow(torch.tensor([14]))
    untouched = [i for i in range(15) if i not in (0, 4, 7, 10, 14)]
    torch.testing.assert_close(r0["memory_s"][untouched], init.memory_s[untouched])
