"""DiSCo as a method (catalog 1.4): the rewrite teacher and the multi-teacher objective."""

from __future__ import annotations

import pytest
import torch

from still.losses.multi_teacher_scores import disco_multi_kl
from still.methods.base import build_method
from still.registry import TEACHERS
from still.teachers.base import Teacher
from still.teachers.rewrite import RewriteTeacher


class _LenTeacher(Teacher):
    """Embeds a text as (len, number of spaces, 1): enough to see which text it was given."""

    def __init__(self, view: str = "embedding") -> None:
        self.view_specs = {view: view}
        self.seen: list[list[str]] = []

    def views(self, batch, names):
        self._check_names(names)
        self.seen.append(list(batch["text"]))
        return {n: torch.tensor([[len(t), t.count(" "), 1.0] for t in batch["text"]]) for n in names}

    def fingerprint(self) -> str:
        return "len"


def test_rewrite_teacher_reads_rewrites_and_passes_other_texts_through() -> None:
    inner = _LenTeacher()
    t = RewriteTeacher(inner, {"long conversation: and cat?": "cat"})
    out = t.views({"text": ["long conversation: and cat?", "a small feline"], "index": torch.arange(2)},
                  ["embedding"])
    assert inner.seen == [["cat", "a small feline"]]
    assert out["embedding"][0, 0] == 3 and out["embedding"][1, 0] == len("a small feline")
    fn = RewriteTeacher(_LenTeacher(), str.upper)
    assert fn.rewrite(["ab"]) == ["AB"]
    assert t.fingerprint() != RewriteTeacher(inner, {"x": "y"}).fingerprint()
    with pytest.raises(KeyError, match="batch\\['text'\\]"):
        t.views({"texts": ["a"]}, ["embedding"])
    with pytest.raises(KeyError, match="no view"):
        t.views({"text": ["a"]}, ["logits"])
    assert isinstance(TEACHERS.build("rewrite", inner=inner, rewrites={}), RewriteTeacher)


def test_disco_method_is_the_multi_teacher_loss_over_its_views() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 4, generator=g, requires_grad=True)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 3, generator=g)
    obj = build_method("disco", teachers=["a", "b"], temperature=0.1).objective()
    got = obj({"embedding": s}, {"a": a, "b": b}, {})["total"]
    ref = disco_multi_kl(s, [a, b], temperature=0.1)
    assert torch.allclose(got, ref)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(disco_multi_kl(s, [a, b], temperature=0.1), s)
    assert torch.allclose(g1, g2)
    # two copies of one teacher are that teacher alone (the mean of identical distributions)
    one = build_method("disco", teachers=["a"]).objective()({"embedding": s}, {"a": a}, {})["total"]
    two = build_method("disco", teachers=["a", "b"]).objective()({"embedding": s}, {"a": a, "b": a}, {})["total"]
    assert torch.allclose(one, two, atol=1e-6)
    spec = build_method("disco", teachers=["minilm", "mpnet"])
    assert spec.teacher_views == {"minilm": "", "mpnet": ""} and spec.student_views == {"embedding": ""}
    with pytest.raises(ValueError, match="at least one teacher"):
        build_method("disco", teachers=[])
