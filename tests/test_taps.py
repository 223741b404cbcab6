"""Taps: every tap form, hook clean-up (also on exceptions), names under DDP and torch.compile, errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from still.taps import (TapError, Taps, TapSpec, call_model, forward_with_views, module_names, resolve_module,
                        unwrap_model)


class Block(nn.Module):
    """Returns a tuple (main, aux)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.lin(x))
        return h, h * 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([Block(4), Block(4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h, _ = b(h)
        return self.head(h)


class Pair(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class HFLike(nn.Module):
    """A model whose submodule and root return an HF ModelOutput."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.pair = Pair()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):  # noqa: ANN201
        from transformers.modeling_outputs import BaseModelOutput

        enc = self.encoder(input_ids.float())
        h = self.pair(enc.last_hidden_state, enc.hidden_states[0])
        return BaseModelOutput(last_hidden_state=h, hidden_states=(enc.last_hidden_state, h))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        from transformers.modeling_outputs import BaseModelOutput

        h = self.proj(x)
        return BaseModelOutput(last_hidden_state=torch.tanh(h), hidden_states=(h,))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))


def _expected(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h0 = net.stem(x)
    b0, aux0 = net.blocks[0](h0)
    b1, _ = net.blocks[1](b0)
    return {"stem": h0, "b0": b0, "aux0": aux0, "b1": b1, "out": net.head(b1)}


def test_parse_forms_and_roundtrip() -> None:
    assert TapSpec.parse("") == TapSpec("", (), False)
    assert TapSpec.parse("layer3.1.conv2") == TapSpec("layer3.1.conv2")
    assert TapSpec.parse("encoder.layer.5[0]") == TapSpec("encoder.layer.5", (0,))
    assert TapSpec.parse("[last_hidden_state]") == TapSpec("", ("last_hidden_state",))
    assert TapSpec.parse("fc@input[1]") == TapSpec("fc", (1,), True)
    assert TapSpec.parse("a[hidden_states][-1]").keys == ("hidden_states", -1)
    for text in ("layer3.1[0]", "fc@input[1]", "[x][2]", "m@input"):
        assert str(TapSpec.parse(text)) == text
    with pytest.raises(TapError, match="cannot parse"):
        TapSpec.parse("a@in[0")


def test_root_submodule_tuple_index_and_input(net: Net) -> None:
    exp = _expected(net, X)
    out, views = forward_with_views(net, X, {
        "out": "", "stem": "stem", "b0": "blocks.0[0]", "aux0": "blocks.0[1]", "block_tuple": "blocks.1",
        "head_in": "head@input", "head_in0": "head@input[0]", "lin_in": "blocks.1.lin@input",
    })
    torch.testing.assert_close(out, exp["out"])
    torch.testing.assert_close(views["out"], exp["out"])
    torch.testing.assert_close(views["stem"], exp["stem"])
    torch.testing.assert_close(views["b0"], exp["b0"])
    torch.testing.assert_close(views["aux0"], exp["aux0"])
    assert isinstance(views["block_tuple"], tuple) and len(views["block_tuple"]) == 2
    torch.testing.assert_close(views["head_in"], exp["b1"])  # "@input" is the first positional input
    torch.testing.assert_close(views["head_in0"], exp["b1"])
    torch.testing.assert_close(views["lin_in"], exp["b0"])
    assert views["stem"].requires_grad  # student views keep the graph
    _, det = forward_with_views(net, X, {"stem": "stem", "out": ""}, detach=True)
    assert not det["stem"].requires_grad and not det["out"].requires_grad
    assert _hooks(net) == 0


def test_second_positional_input() -> None:
    m = HFLike()
    ids = torch.randn(2, 3, 5)
    _, v = forward_with_views(m, {"input_ids": ids}, {"a": "pair@input", "b": "pair@input[1]"})
    enc = m.encoder(ids)
    torch.testing.assert_close(v["a"], enc.last_hidden_state)
    torch.testing.assert_close(v["b"], enc.hidden_states[0])


def test_dict_and_model_output_keys() -> None:
    torch.manual_seed(0)
    m = HFLike()
    ids = torch.randn(2, 3, 5)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 3), "labels": torch.zeros(2)}
    out, v = forward_with_views(m, batch, {
        "root": "[last_hidden_state]", "root_hs": "[hidden_states][1]", "enc": "encoder[last_hidden_state]",
        "enc_hs0": "encoder[hidden_states][0]", "whole": "encoder",
    })
    enc = m.encoder(ids)
    torch.testing.assert_close(v["root"], out.last_hidden_state)
    torch.testing.assert_close(v["root_hs"], out.hidden_states[1])
    torch.testing.assert_close(v["enc"], enc.last_hidden_state)
    torch.testing.assert_close(v["enc_hs0"], enc.hidden_states[0])
    assert type(v["whole"]).__name__ == "BaseModelOutput"
    with pytest.raises(TapError, match="no key 'logits'.*last_hidden_state"):
        forward_with_views(m, batch, {"x": "encoder[logits]"})
    with pytest.raises(TapError, match="no key 5"):
        forward_with_views(m, batch, {"x": "[hidden_states][5]"})
    # plain dicts too
    d = nn.ModuleDict({"lin": nn.Linear(5, 2)})

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = d

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.inner["lin"](x), "extra": x}

    out, v = forward_with_views(DictOut(), {"x": ids}, {"logits": "[logits]", "lin": "inner.lin"})
    torch.testing.assert_close(v["logits"], out["logits"])
    torch.testing.assert_close(v["lin"], out["logits"])


def test_hooks_removed_on_exit_and_on_exception(net: Net) -> None:
    with Taps(net, {"stem": "stem", "in": "head@input"}) as taps:
        assert _hooks(net) == 2
        net(X)
        assert set(taps.views) == {"stem", "in"} and taps.missing() == []
    assert _hooks(net) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with Taps(net, {"stem": "stem", "b": "blocks.0"}):
            assert _hooks(net) == 2
            raise RuntimeError("boom")
    assert _hooks(net) == 0

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("bad forward")

    net.head = Broken()
    with pytest.raises(ValueError, match="bad forward"):
        forward_with_views(net, X, {"stem": "stem", "out": ""})
    assert _hooks(net) == 0


def test_unknown_path_lists_closest_names(net: Net) -> None:
    with pytest.raises(TapError) as err:
        Taps(net, {"x": "blocks.0.lni"})
    msg = str(err.value)
    assert "blocks.0.lni" in msg and "blocks.0.lin" in msg and "Closest" in msg
    with pytest.raises(TapError, match="Closest: stem"):
        forward_with_views(net, X, {"x": "stemm"})
    assert _hooks(net) == 0


def test_module_that_did_not_run_is_an_error() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(TapError, match="did not run"):
        forward_with_views(Skip(), X, {"u": "unused"})


def test_call_model_input_forms(net: Net) -> None:
    batch = {"x": X, "alt": X * 2}
    torch.testing.assert_close(call_model(net, batch), net(X))
    torch.testing.assert_close(call_model(net, batch, "alt"), net(X * 2))
    torch.testing.assert_close(call_model(net, batch, ["alt"]), net(X * 2))
    torch.testing.assert_close(call_model(net, batch, {"x": "alt"}), net(X * 2))
    torch.testing.assert_close(call_model(net, X), net(X))


def test_ddp_wrapped_model_keeps_names(net: Net, tmp_path) -> None:  # noqa: ANN001
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(net)
        assert unwrap_model(ddp) is net
        assert module_names(ddp) == module_names(net)
        assert resolve_module(ddp, "blocks.0.lin") is net.blocks[0].lin
        assert resolve_module(ddp, "module.blocks.0.lin") is net.blocks[0].lin  # a prefixed name also works
        exp = _expected(net, X)
        out, v = forward_with_views(ddp, X, {"b0": "blocks.0[0]", "in": "head@input", "out": ""})
        torch.testing.assert_close(v["b0"], exp["b0"])
        torch.testing.assert_close(v["in"], exp["b1"])
        torch.testing.assert_close(v["out"], out)
        v["b0"].sum().backward()  # gradients flow through DDP to the tapped view's producers
        assert net.stem.weight.grad is not None
        assert _hooks(net) == 0
    finally:
        dist.destroy_process_group()


def _compiled_check(net: Net, backend: str) -> None:
    compiled = torch.compile(net, backend=backend)
    assert unwrap_model(compiled) is net
    assert module_names(compiled) == module_names(net)
    assert resolve_module(compiled, "_orig_mod.stem") is net.stem
    exp = _expected(net, X)
    out, v = forward_with_views(compiled, X, {"stem": "stem", "b0": "blocks.0[0]", "in": "head@input", "out": ""})
    torch.testing.assert_close(v["stem"], exp["stem"])
    torch.testing.assert_close(v["b0"], exp["b0"])
    torch.testing.assert_close(v["in"], exp["b1"])
    torch.testing.assert_close(out, exp["out"])
    assert _hooks(net) == 0
    # a second call with other taps still captures (hooks are re-registered, not baked in)
    _, v2 = forward_with_views(compiled, X, {"aux": "blocks.0[1]"})
    torch.testing.assert_close(v2["aux"], exp["aux0"])


def test_torch_compile_keeps_names(net: Net) -> None:
    """torch.compile wraps the model in an OptimizedModule (`_orig_mod`); dynamo traces the forward.

    The eager backend keeps this fast on CPU; the inductor variant is the slow test below.
    """
    _compiled_check(net, "eager")


@pytest.mark.slow
def test_torch_compile_inductor_keeps_names(net: Net) -> None:
    _compiled_check(net, "inductor")


def test_unwrap_nested_wrappers(net: Net) -> None:
    class FakeCompiled(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self._orig_mod = m

    class DistributedDataParallel(nn.Module):  # same class name as torch's, as unwrap_model checks
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    wrapped = FakeCompiled(DistributedDataParallel(net))
    assert unwrap_model(wrapped) is net
    _, v = forward_with_views(wrapped._orig_mod.module, X, {"s": "stem"})
    with Taps(wrapped, {"s": "stem"}) as taps:
        net(X)
    torch.testing.assert_close(taps.views["s"], v["s"])


def test_single_root_view_fast_path_and_cached_parse(net: Net) -> None:
    """One root view skips hooks and keys but keeps detach semantics; parsed taps are cached yet equal, and a
    bad tap raises every time."""
    out, v = forward_with_views(net, X, {"out": ""})
    assert v["out"] is out and out.requires_grad
    _, d = forward_with_views(net, X, {"out": ""}, detach=True)
    assert not d["out"].requires_grad
    torch.testing.assert_close(d["out"], out.detach())
    assert TapSpec.parse("blocks.0[1]") is TapSpec.parse("blocks.0[1]") == TapSpec("blocks.0", (1,))
    for _ in range(2):
        with pytest.raises(TapError, match="cannot parse"):
            TapSpec.parse("a@in[0")
    assert _hooks(net) == 0
