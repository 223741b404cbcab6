"""Dense seed methods end to end: the mosaic segmentation data, the crop / MGD / label-assisted
teachers, the EMA update FarSLIP relies on, the shrinking top-k inside an objective, and one engine
step of every dense preset."""

from __future__ import annotations

import copy

import pytest
import torch

from still.methods.base import build_method
from still.methods.dense_tasks import CropTeacher, LabelInputUNet, PixelUNet, crop, pixel_miou
from still.registry import DATASETS
from still.teachers.base import LiveTeacher

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").exists(),
                                reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def semi():
    return DATASETS.build("fmnist_mosaic_seg", split="train", num_samples=32, labelled_fraction=0.25, cutmix=True)


def _batch(ds, n: int = 4) -> dict:
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def test_mosaic_seg_labels_and_cutmix(semi) -> None:
    assert int(semi.labelled.sum()) == 8
    for i in range(len(semi)):
        s = semi[i]
        if bool(s["labelled"]):
            assert torch.equal(s["y"], s["mask"]) and torch.equal(s["x"], s["x0"]) and s["cutmix"].sum() == 0
        else:
            assert (s["y"] == -100).all()
            m = s["cutmix"]
            assert 0 < float(m.mean()) < 1
            assert torch.allclose(s["x"], s["x0"] * (1 - m) + s["x1"] * m)
    test = DATASETS.build("fmnist_mosaic_seg", split="test", num_samples=8, labelled_fraction=0.25)
    assert all(bool(test[i]["labelled"]) for i in range(8))


def test_pixel_miou_layouts_and_ignore() -> None:
    y = torch.tensor([[[0, 1], [1, -100]]])
    logits = torch.nn.functional.one_hot(y.clamp_min(0), 3).double()  # (B, H, W, K), perfect
    assert pixel_miou(logits, y) == pytest.approx(1.0)
    assert pixel_miou(logits.permute(0, 3, 1, 2), y) == pytest.approx(1.0)
    wrong = logits.clone()
    wrong[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # class 0 lost, class 1 gains a false positive
    assert pixel_miou(wrong, y) == pytest.approx((0 + 2 / 3) / 2)


def test_crop_teacher_encodes_each_box_alone(semi) -> None:
    torch.manual_seed(0)
    model = PixelUNet((4, 8, 8), 11).eval()
    b = _batch(semi)
    b["boxes"][0, 1] = -1.0  # an absent box
    ct = CropTeacher(lambda: model, "encoder.2", crop_size=16, blocks=2)
    v = ct.views(b, ["obj_emb", "block_emb", "global_emb"])
    assert v["obj_emb"].shape == (4, 4, 8) and v["block_emb"].shape == (4, 4, 8) and v["global_emb"].shape == (4, 8)
    assert v["obj_emb"][0, 1].abs().sum() == 0
    from still.taps import forward_with_views

    _, tv = forward_with_views(model, {"x": crop(b["x"][:1], b["boxes"][:1, :1], 16)}, {"e": "encoder.2"}, detach=True)
    assert torch.allclose(v["obj_emb"][0, 0], tv["e"].mean((2, 3))[0], atol=1e-5)
    # the crop really is the box region: a box of the whole canvas resized gives the whole image
    whole = torch.tensor([[[0.0, 0.0, 64.0, 64.0]]])
    c = crop(b["x"][:1], whole, 64)
    assert torch.allclose(c[0], b["x"][0], atol=1e-5)


def test_farslip_ema_teacher_update_and_step(semi) -> None:
    torch.manual_seed(0)
    student = PixelUNet((4, 8, 8), 11)
    spec = build_method("farslip")
    teacher = spec.wrap_teacher(None, student)
    before = copy.deepcopy(teacher.model_fn().state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.after_step(student)
    for name, p in teacher.model_fn().named_parameters():
        want = 0.99 * before[name] + 0.01 * dict(student.named_parameters())[name]
        assert torch.allclose(p, want, atol=1e-6), name
    # one engine step through the objective
    from still.engine import TrainConfig, train

    cfg = TrainConfig(max_steps=1, batch_size=8, progress=False, eval_every_epochs=None)
    obj = spec.objective()
    train(student, obj, semi, cfg, teacher=teacher, student_views={k: spec.student_views[k] for k in obj.student_views()})
    assert teacher.inner.num_updates == 2


def test_mgd_teacher_pseudo_labels_mix_the_pair(semi) -> None:
    from still.methods.mgd import MGDTeacher

    torch.manual_seed(0)
    t1, t2 = PixelUNet((4, 8, 8), 11), PixelUNet((4, 8, 8, 8), 11)
    mt = MGDTeacher([t1, t2])
    b = _batch(semi, 8)
    v = mt.views(b, ["t1_pl", "t2_seg", "t1_feat"])
    with torch.no_grad():
        z0, z1 = t1(b["x0"]).permute(0, 3, 1, 2), t1(b["x1"]).permute(0, 3, 1, 2)
    m = b["cutmix"]
    assert torch.allclose(v["t1_pl"], z0 * (1 - m) + z1 * m, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(v["t2_seg"], t2(b["x"]).permute(0, 3, 1, 2), atol=1e-5)
    assert v["t1_feat"].shape == (8, 8, 16, 16)


def test_label_assisted_teacher_input_and_fit(semi) -> None:
    from still.teachers.label_assisted import LabelAssistedTeacher, fit_label_assisted

    torch.manual_seed(0)
    model = LabelInputUNet((4, 8, 8), 11)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 64, 64, 11)  # label-free call: zero label channels
    lt = LabelAssistedTeacher(model, {"logits": ""}, noise=0.0)
    b = _batch(semi, 8)
    inp = lt.teacher_input(b)
    assert inp.shape == (8, 12, 64, 64)
    lab = b["y"] >= 0
    assert torch.equal(inp[:, 1:].argmax(1)[lab], b["y"][lab]) and inp[:, 1:].sum(1)[~lab].abs().sum() == 0
    losses = fit_label_assisted(model, semi, epochs=1, batch_size=8, max_steps=3)
    assert len(losses) == 3 and all(l == l for l in losses)
    # a warm-up of the whole run: the first step has lr 0, so the weights do not move on it
    before = [p.detach().clone() for p in model.parameters()]
    fit_label_assisted(model, semi, epochs=1, batch_size=8, max_steps=1, lr_schedule="cosine", warmup=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="lr_schedule"):
        fit_label_assisted(model, semi, epochs=1, batch_size=8, max_steps=1, lr_schedule="cosin")


def test_chimera_topk_shrinks_through_the_objective() -> None:
    obj = build_method("chimera_sgd", start=0.5, end=0.1).objective()
    sgd = obj.losses["sgd"]
    obj.set_progress(0, 100)
    assert sgd.fraction == pytest.approx(0.5)
    obj.set_progress(50, 100)
    assert sgd.fraction == pytest.approx(0.3)


@pytest.mark.parametrize("method", ["scratch_seg", "seg_kd", "transkd_seg", "transkd_seg_ea", "chimera_sgd", "oadp",
                                    "mgd", "lad"])
def test_every_dense_method_trains_one_step(method: str, semi) -> None:
    from still.engine import TrainConfig, train

    torch.manual_seed(0)
    student = PixelUNet((4, 8, 8), 11)
    tmodel = LabelInputUNet((8, 8, 16), 11) if method == "lad" else PixelUNet((8, 8, 16), 11)
    spec = build_method(method)
    obj = spec.objective()
    need = obj.teacher_views()
    teacher = LiveTeacher(tmodel, {k: spec.teacher_views[k] for k in need}) if need else None
    if spec.wrap_teacher is not None:
        teacher = spec.wrap_teacher(teacher, student)
    before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(max_steps=1, batch_size=8, progress=False, eval_every_epochs=None)
    train(student, obj, semi, cfg, teacher=teacher, student_views={k: spec.student_views[k] for k in obj.student_views()})
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


# ------------------------------------------------------------------------------ budget plumbing
def test_mosaic_item_shrinks_items_and_canvas() -> None:
    import numpy as np

    from still.data.mosaic import build_mosaics

    g = np.random.default_rng(0)
    images = (g.random((20, 28, 28)) * 255).astype(np.uint8)
    labels = g.integers(0, 10, 20)
    default = build_mosaics(images, labels, 6, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(default, build_mosaics(images, labels, 6, seed=3, item=28)))
    x, mask, boxes, blabels = build_mosaics(images, labels, 6, seed=3, cell=16, item=14)
    assert x.shape == (6, 1, 32, 32) and mask.shape == (6, 32, 32)
    ok = blabels > 0
    assert ok.any() and ((boxes[ok][:, 2:] - boxes[ok][:, :2]) <= 14).all() and (boxes[ok] <= 32).all()
    assert ((mask > 0) == (x[:, 0] > 0.1)).all()  # the mask is the shrunk item's own threshold
    with pytest.raises(ValueError, match="item"):
        build_mosaics(images, labels, 2, seed=0, cell=16, item=28)
    ds = DATASETS.build("fmnist_mosaic_seg", split="train", num_samples=4, cell=16, item=14)
    assert ds[0]["x"].shape == (1, 32, 32) and ds[0]["y"].shape == (32, 32)


def test_bg_bias_sets_the_head_prior_only() -> None:
    from still.registry import MODELS

    torch.manual_seed(0)
    plain = MODELS.build("seg_unet_small_px")
    torch.manual_seed(0)
    prior = MODELS.build("seg_unet_small_px", bg_bias=2.5)
    assert prior.head.bias.tolist() == [2.5] + [0.0] * 10
    for (n, a), b in zip(plain.named_parameters(), prior.parameters()):
        assert n == "head.bias" or torch.equal(a, b)
    assert MODELS.build("seg_unet_lad_px", bg_bias=1.0).head.bias[0] == 1.0


def test_seg_kd_term_reads_the_teacher_and_moves_the_student(semi) -> None:
    """Plain KD in the dense bench once matched scratch to 4 digits: the KD term must see the teacher's
    logits, have a gradient, and change the trained student (same seed, data order and init)."""
    from still.engine import TrainConfig, train
    from still.taps import forward_with_views

    torch.manual_seed(0)
    tmodel = PixelUNet((8, 8, 16), 11).eval()
    spec = build_method("seg_kd")
    obj = spec.objective()
    teacher = LiveTeacher(tmodel, {k: spec.teacher_views[k] for k in obj.teacher_views()})
    views = {k: spec.student_views[k] for k in obj.student_views()}
    b = _batch(semi, 8)
    torch.manual_seed(1)
    student = PixelUNet((4, 8, 8), 11)
    _, s_views = forward_with_views(student, b, views)
    t_views = teacher.views(b, obj.teacher_views())
    with torch.no_grad():
        assert torch.equal(t_views["logits"], tmodel(b["x"]))
    out = obj(s_views, t_views, b)
    assert float(out["kd"].detach()) > 0
    grads = torch.autograd.grad(out["kd"], list(student.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)

    def fit(method: str) -> list[torch.Tensor]:
        sp = build_method(method)
        ob = sp.objective()
        torch.manual_seed(1)
        st = PixelUNet((4, 8, 8), 11)
        need = ob.teacher_views()
        t = LiveTeacher(tmodel, {k: sp.teacher_views[k] for k in need}) if need else None
        train(st, ob, semi, TrainConfig(max_steps=3, batch_size=8, progress=False, eval_every_epochs=None), teacher=t,
              student_views={k: sp.student_views[k] for k in ob.student_views()})
        return [p.detach().clone() for p in st.parameters()]

    assert any(not torch.equal(a, c) for a, c in zip(fit("scratch_seg"), fit("seg_kd")))


def test_fit_segmenter_schedule() -> None:
    from still.methods.dense import fit_segmenter

    ds = DATASETS.build("fmnist_mosaic_seg", split="train", num_samples=16, cell=16, item=14)
    torch.manual_seed(0)
    m = PixelUNet((4, 8, 8), 11)
    before = [p.detach().clone() for p in m.parameters()]
    out = fit_segmenter(m, ds, epochs=2, batch_size=8, lr=1e-2, lr_schedule="cosine", warmup=0.5)
    assert out is m and not m.training
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
