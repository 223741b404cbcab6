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
