"""The store's encodings: bit packing, top-k with missing mass, int8 values, dense dtypes, size bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from still.teachers.store_format import (
    NO_MASS, StoreError, TopKLogits, ViewSpec, decode_view, encode_view, index_bits, pack_indices, unpack_indices,
)


def _np(fields: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: (v.view(torch.uint16) if v.dtype == torch.bfloat16 else v).numpy() for k, v in fields.items()}


@pytest.mark.parametrize("vocab", [2, 3, 10, 255, 256, 257, 32000, 65536, 65537, 151936, 2**31])
def test_pack_roundtrip(vocab: int) -> None:
    rng = np.random.default_rng(vocab % 1000)
    for k in (1, 7, 8, 33):
        idx = rng.integers(0, vocab, size=(5, 3, k))
        idx[0, 0, 0] = vocab - 1  # the largest id fits
        bits = index_bits(vocab)
        packed = pack_indices(idx, bits)
        assert packed.dtype == np.uint8 and packed.shape == (5, 3, math.ceil(k * bits / 8))
        np.testing.assert_array_equal(unpack_indices(packed, k, bits), idx)


def test_index_bits_and_overflow() -> None:
    assert [index_bits(v) for v in (2, 10, 256, 257, 32000, 32768, 32769, 151936)] == [1, 4, 8, 9, 15, 15, 16, 18]
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack_indices(np.array([[16]]), 4)


def test_bit_layout_is_little_endian() -> None:
    # index 0 = 0b101 (5), index 1 = 0b011 (3), 3 bits each: bits LSB-first 1,0,1, 1,1,0 -> byte 0b011101
    assert pack_indices(np.array([[5, 3]]), 3).tolist() == [[0b011101]]


@pytest.mark.parametrize("shape", [(37,), (3, 300)])
def test_topk_encode_decode_against_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, *shape) * 3
    k = 5
    spec = ViewSpec("logits", shape, dtype="float32", k=k)
    got = decode_view(spec, _np(encode_view(spec, x)))
    assert isinstance(got, TopKLogits) and got.shape == x.shape and got.k == k
    ref_logp = torch.log_softmax(x.double(), -1)
    ref_vals, ref_idx = ref_logp.sort(-1, descending=True)
    torch.testing.assert_close(got.indices, ref_idx[..., :k])
    torch.testing.assert_close(got.logprobs.double(), ref_vals[..., :k], atol=1e-5, rtol=0)
    ref_missing = 1 - ref_vals[..., :k].exp().sum(-1)
    torch.testing.assert_close(got.missing.double(), ref_missing, atol=1e-6, rtol=0)
    # dense reconstruction, naive: top-k log-probs in place, the missing mass spread evenly over V - k
    V = shape[-1]
    dense = torch.empty_like(ref_logp)
    dense[:] = torch.log(ref_missing / (V - k))[..., None]
    dense.scatter_(-1, ref_idx[..., :k], ref_vals[..., :k])
    torch.testing.assert_close(got.dense("uniform").double(), torch.log_softmax(dense, -1), atol=1e-4, rtol=0)
    assert torch.allclose(got.dense("uniform").exp().sum(-1), torch.ones(()), atol=1e-5)
    # renormalise: the other ids get no mass, the top-k probabilities are rescaled to sum to 1
    ren = got.dense("renormalize")
    p = ren.exp()
    topk_p = ref_vals[..., :k].exp()
    torch.testing.assert_close(p.gather(-1, ref_idx[..., :k]).double(), topk_p / topk_p.sum(-1, keepdim=True),
                               atol=1e-5, rtol=0)
    assert float(p.sum(-1).min()) > 1 - 1e-5 and ren.min() <= NO_MASS / 2
    with pytest.raises(ValueError, match="missing must be"):
        got.dense("drop")


def test_topk_equal_to_vocab_has_no_missing_mass() -> None:
    x = torch.randn(3, 6)
    spec = ViewSpec("l", (6,), dtype="float32", k=6)
    got = decode_view(spec, _np(encode_view(spec, x)))
    assert float(got.missing.abs().max()) < 1e-6
    torch.testing.assert_close(got.dense(), torch.log_softmax(x, -1), atol=1e-5, rtol=0)


def test_int8_values_error_is_within_half_a_step() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 2, 500) * 4
    spec = ViewSpec("l", (2, 500), k=16, quant="int8")
    enc = encode_view(spec, x)
    assert enc["l.values_q"].dtype == torch.uint8 and enc["l.qparams"].shape == (6, 2, 2)
    got = decode_view(spec, _np(enc))
    ref = torch.log_softmax(x, -1).topk(16, -1).values
    step = enc["l.qparams"][..., 1:]
    assert bool(((got.logprobs - ref).abs() <= step / 2 + 1e-5).all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dense_views_store_the_cast_exactly(dtype: str) -> None:
    x = torch.randn(5, 3, 4) * 100
    spec = ViewSpec("feat", (3, 4), dtype=dtype)
    got = decode_view(spec, _np(encode_view(spec, x)))
    want = x.to(getattr(torch, dtype))
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_shape_mismatch_and_bad_specs() -> None:
    spec = ViewSpec("l", (10,), k=3)
    with pytest.raises(StoreError, match=r"per-row shape \(11,\)"):
        encode_view(spec, torch.randn(2, 11))
    with pytest.raises(ValueError, match="k=11"):
        ViewSpec("l", (10,), k=11)
    with pytest.raises(ValueError, match="top-k views only"):
        ViewSpec("l", (10,), quant="int8")
    with pytest.raises(ValueError, match="dtype must be"):
        ViewSpec("l", (10,), dtype="int4")


@pytest.mark.parametrize("vocab,k", [(v, k) for v in (10, 32000, 50257, 151936) for k in (1, 8, 32, 128) if k <= v])
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_size_within_issue_bound(vocab: int, k: int, quant: str) -> None:
    spec = ViewSpec("logits", (16, vocab), k=k, quant=quant)
    bound = k * (math.ceil(math.log2(vocab)) + 16) / 8 + 16
    assert spec.bytes_per_position() <= bound
    assert spec.bytes_per_position() == spec.bytes_per_row() / 16
    # and the fields really have that many bytes
    enc = encode_view(spec, torch.randn(2, 16, vocab))
    assert sum(v.numel() * v.element_size() for v in enc.values()) == 2 * spec.bytes_per_row()


def test_topk_logits_feed_the_sparse_kl_loss() -> None:
    """The store's TopKLogits is the (indices, logprobs) pair `sparse_topk_kl` takes; with missing="uniform" its
    value and gradient equal the dense KL to `TopKLogits.dense("uniform")` (same maths, sparse and dense)."""
    from still.registry import LOSSES

    torch.manual_seed(2)
    x, s = torch.randn(3, 4, 50) * 2, torch.randn(3, 4, 50, requires_grad=True)
    spec = ViewSpec("l", (4, 50), dtype="float32", k=6)
    tk = decode_view(spec, _np(encode_view(spec, x)))
    idx, lp = tk
    assert idx is tk.indices and lp is tk.logprobs and len(tk) == 2
    sparse = LOSSES.build("sparse_topk_kl", missing="uniform")(s, tk)
    g_sparse, = torch.autograd.grad(sparse, s)
    pt = tk.dense("uniform")  # (3, 4, 50) log-probs
    dense = (pt.exp() * (pt - torch.log_softmax(s, -1))).sum(-1).mean()
    g_dense, = torch.autograd.grad(dense, s)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-6, rtol=1e-4)
