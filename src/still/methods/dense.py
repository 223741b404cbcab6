"""Dense seed methods on the Fashion-MNIST mosaics (issue 6A), as registered presets.

Views (student and teacher are U-Nets from `still.methods.dense_tasks`, pixel-row logits):
`logits` = "" (B, H, W, K), `seg` = `head` (B, K, H, W), `enc<i>` = `encoder.<i>` (B, C_i, H/2^i, W/2^i),
`pe<i>` = `encoder.<i>.0` (the stage's first conv: the patch-embedding analogue).

| method | terms |
|---|---|
| `seg_kd` | CE + kd_weight·T²·KL per pixel (plain KD, CIRKD's baseline) |
| `transkd_seg` | CE + CSF/HCL on the encoder stages (+ `ea_weight`·EA on the stage embeddings) |
| `chimera_sgd` | CE + λ·SGD with the shrinking top-k (0.5 → 0.1 of the 16×16 cells) |
| `oadp` | CE + 256·object L1 + 0.5·global MSE + 128·(block L1 + RKD), each warmed up |
| `farslip` | CE + 0.1·(1 − cos(RoI(student patches), EMA teacher on each crop)) |
| `mgd` | CE (labelled) + cross pseudo-labels from 2 teachers + 0.002·GAP L1 + 100·region similarity |
| `lad` | CE + KD from the label-assisted teacher (image ⊕ noised one-hot label), dual-path trained |
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from still.losses.dense import CHIMERA_PAPER, FARSLIP_PAPER, MGD_PAPER, OADP_PAPER, TRANSKD_PAPER
from still.methods.base import MethodSpec
from still.registry import register_method
from still.teachers.label_assisted import LAD_PAPER

STAGES = 3
SEG_VIEWS = {"logits": "", "seg": "head", **{f"enc{i}": f"encoder.{i}" for i in range(STAGES)},
             **{f"pe{i}": f"encoder.{i}.0" for i in range(STAGES)}}


def _ce() -> dict[str, Any]:
    return {"name": "ce", "loss": "seg_ce", "student": "seg", "target": "y"}


def _spec(terms: list[dict[str, Any]], **kw: Any) -> MethodSpec:
    used = {v for t in terms for k in ("student", "teacher") for v in ([t[k]] if isinstance(t.get(k), str) else t.get(k) or [])}
    return MethodSpec(terms=terms, student_views={k: v for k, v in SEG_VIEWS.items() if k in used or k == "logits"},
                      teacher_views={k: v for k, v in SEG_VIEWS.items() if k in used}, **kw)


def fit_segmenter(model: nn.Module, data: Any, epochs: int = 3, batch_size: int = 32, lr: float = 3e-3,
                  seed: int = 0, max_steps: int | None = None, lr_schedule: str = "constant",
                  warmup: float = 0.0) -> nn.Module:
    """Train a U-Net with pixel CE on `data`'s `y` (pixels of -100 ignored) by `still.engine.train`;
    `lr_schedule` and `warmup` (a fraction < 1 of the steps, or steps) as `TrainConfig`'s `warmup_steps`."""
    from still.engine import TrainConfig, train
    from still.objective import Objective, build_term

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                      eval_every_epochs=None, log_every=10_000, lr_schedule=lr_schedule, warmup_steps=warmup)
    train(model, Objective([build_term(_ce())]), data, cfg, student_views={"seg": "head"})
    return model.eval()


@register_method("scratch_seg", paper="")
def scratch_seg() -> MethodSpec:
    """No teacher: pixel cross-entropy on `y` (labelled pixels only): the dense from-scratch baseline."""
    return _spec([_ce()])


@register_method("seg_kd", paper="Hinton et al. 2015; per-pixel as in CIRKD (Yang et al., CVPR 2022)")
def seg_kd(kd_weight: float = 1.0, temperature: float = 1.0) -> MethodSpec:
    """Pixel CE + kd_weight·T²·KL(p_t ‖ p_s) averaged over pixels (the plain-KD baseline of the dense rows)."""
    return _spec([_ce(), {"name": "kd", "loss": "kd", "params": {"temperature": temperature}, "student": "logits",
                          "teacher": "logits", "weight": kd_weight}])


@register_method("transkd_seg", paper=TRANSKD_PAPER)
def transkd_seg(feat_weight: float = 1.0, ea_weight: float = 0.0, csf_mid: int = 64,
                embed_weights: Sequence[float] = (0.1, 0.5, 1.0), kd_weight: float = 0.0) -> MethodSpec:
    """CE + CSF/HCL on the 3 encoder stages; `ea_weight` > 0 adds PEA + the embedding assistant (EA):
    the stage embeddings `pe<i>`, each mixed with a teacher-width embedding of the previous student
    stage, matched to the teacher's by MSE (stage weights: the last three of TransKD's 0.1/0.1/0.5/1)."""
    enc = [f"enc{i}" for i in range(STAGES)]
    pe = [f"pe{i}" for i in range(STAGES)]
    terms = [_ce()]
    if feat_weight:
        terms.append({"name": "feat", "loss": "transkd_csf", "params": {"mid": csf_mid}, "student": enc,
                      "teacher": enc, "weight": feat_weight})
    if ea_weight:
        terms.append({"name": "ea", "loss": "transkd_ea", "params": {"weights": list(embed_weights)},
                      "student": pe + enc, "teacher": pe, "weight": ea_weight})
    if kd_weight:
        terms.append({"name": "kd", "loss": "kd", "student": "logits", "teacher": "logits", "weight": kd_weight})
    return _spec(terms, notes="student/teacher: U-Nets with taps encoder.<i> (seg_unet_px, seg_unet_small_px)")


@register_method("transkd_seg_ea", paper=TRANSKD_PAPER)
def transkd_seg_ea(feat_weight: float = 1.0, ea_weight: float = 1.0, csf_mid: int = 64) -> MethodSpec:
    """TransKD-EA: `transkd_seg` with the embedding assistant on (ea_weight = 1)."""
    return transkd_seg(feat_weight=feat_weight, ea_weight=ea_weight, csf_mid=csf_mid)


@register_method("chimera_sgd", paper=CHIMERA_PAPER)
def chimera_sgd(weight: float = 1.0, start: float = 0.5, end: float = 0.1, stage: int = 2) -> MethodSpec:
    """CE + weight·SGD: 1 − cos(mean of the top-k(t) student cells most similar to the teacher's global
    embedding (GAP of its deepest encoder map), that embedding); k(t) shrinks linearly start → end."""
    v = f"enc{stage}"
    return _spec([_ce(), {"name": "sgd", "loss": "selective_global", "params": {"start": start, "end": end},
                          "student": v, "teacher": v, "weight": weight}],
                 notes="the teacher's GAP embedding stands in for CLIP's CLS ([R] reconstruction)")


def _crop_wrap(tap: str, ema_decay: float | None = None, crop_size: int = 32, blocks: int = 2) -> Any:
    def wrap(teacher: Any, student: nn.Module) -> Any:
        from still.methods.dense_tasks import CropTeacher

        if ema_decay is not None:
            from still.teachers.ema import EMATeacher

            ema = EMATeacher(student, {k: v for k, v in SEG_VIEWS.items()}, decay=ema_decay)
            return CropTeacher(lambda: ema.model, tap, inner=ema, crop_size=crop_size, blocks=blocks)
        if teacher is None or not hasattr(teacher, "model"):
            raise ValueError("this method needs a live teacher model (teacher.model in the recipe)")
        return CropTeacher(lambda: teacher.model, tap, inner=teacher, crop_size=crop_size, blocks=blocks)
    return wrap


@register_method("oadp", paper=OADP_PAPER)
def oadp(object_gain: float = 256.0, global_gain: float = 0.5, block_gain: float = 128.0, rkd_gain: float = 8.0,
         warmup: float = 200, stage: int = 2, blocks: int = 2, spatial_scale: float = 0.25,
         crop_size: int = 32) -> MethodSpec:
    """CE + OADP's pyramid on the student's deepest encoder map vs the teacher's (frozen) embeddings of
    each mosaic box crop (object; boxes = the ground-truth items as proposals), of the whole canvas
    (global) and of its g×g blocks (block, with RKD among blocks). The gains are the paper's config;
    `warmup` is the linear warm-up (steps, or a fraction of the run if < 1; the paper: 200 iterations);
    `crop_size`: the side each crop is resized to before the teacher encodes it (about one item)."""
    v = f"enc{stage}"
    wu = {"name": "warmup", "steps": warmup}
    terms = [_ce(),
             {"name": "object", "loss": "oadp_object", "params": {"spatial_scale": spatial_scale}, "student": v,
              "teacher": "obj_emb", "inputs": {"boxes": "boxes"}, "weight": object_gain, "schedule": wu},
             {"name": "global", "loss": "oadp_global", "student": v, "teacher": "global_emb", "weight": global_gain,
              "schedule": wu},
             {"name": "block", "loss": "oadp_block", "params": {"rkd_weight": rkd_gain / block_gain}, "student": v,
              "teacher": "block_emb", "weight": block_gain, "schedule": wu}]
    spec = _spec(terms, wrap_teacher=_crop_wrap(f"encoder.{stage}", crop_size=crop_size, blocks=blocks),
                 notes="teacher views obj_emb / block_emb / global_emb come from CropTeacher (crops encoded alone)")
    # placeholders for the pipeline's live teacher (a valid tap); CropTeacher serves these names itself
    spec.teacher_views = {n: f"encoder.{stage}" for n in ("obj_emb", "block_emb", "global_emb")}
    return spec


@register_method("farslip", paper=FARSLIP_PAPER)
def farslip(weight: float = 0.1, decay: float = 0.99, stage: int = 2, spatial_scale: float = 0.25,
            crop_size: int = 32) -> MethodSpec:
    """CE + w_d·patch-to-patch: RoI-pooled student patches of the whole canvas vs an EMA copy of the
    student encoding each box crop on its own (mean-pooled, cosine); θ_ema ← 0.99·θ_ema + 0.01·θ.
    `crop_size`: the side each crop is resized to (about one item)."""
    v = f"enc{stage}"
    spec = _spec([_ce(), {"name": "p2p", "loss": "patch_to_patch", "params": {"spatial_scale": spatial_scale},
                          "student": v, "teacher": "obj_emb", "inputs": {"boxes": "boxes"}, "weight": weight}],
                 wrap_teacher=_crop_wrap(f"encoder.{stage}", ema_decay=decay, crop_size=crop_size),
                 notes="no external teacher: the EMA of the student (FarSLIP's --distill-type ema)")
    spec.teacher_views = {"obj_emb": f"encoder.{stage}"}
    return spec


@register_method("mgd", paper=MGD_PAPER)
def mgd(cps_weight: float = 1.0, gap_weight: float = 0.002, region_weight: float = 100.0, grid: int = 7,
        stage: int = 2, teacher2_epochs: int = 3) -> MethodSpec:
    """Semi-supervised: CE on labelled pixels + cross pseudo-supervision from both teachers' mixed
    logits on u_mix + λ1·GAP L1 to teacher 2 + λ2·region self-similarity MSE to teacher 1.
    Data: `fmnist_mosaic_seg` with `labelled_fraction` < 1 and `cutmix: true`. The recipe's teacher is
    b2; `prepare` trains the complementary b3 (a 4-stage U-Net) on the labelled samples."""
    v = f"enc{stage}"
    terms = [_ce(),
             {"name": "cps1", "loss": "pseudo_label_ce", "student": "seg", "teacher": "t1_pl", "weight": cps_weight},
             {"name": "cps2", "loss": "pseudo_label_ce", "student": "seg", "teacher": "t2_pl", "weight": cps_weight},
             {"name": "image", "loss": "gap_l1", "student": "seg", "teacher": "t2_seg", "weight": gap_weight},
             {"name": "region", "loss": "region_similarity", "params": {"grid": grid}, "student": v,
              "teacher": "t1_feat", "weight": region_weight}]
    state: dict[str, Any] = {}

    def wrap(teacher: Any, student: nn.Module) -> Any:
        from still.methods.mgd import MGDTeacher, complementary_teacher

        if teacher is None or not hasattr(teacher, "model"):
            raise ValueError("mgd needs a live teacher model (teacher b2) in the recipe")
        if "t2" not in state:
            torch.manual_seed(1)
            state["t2"] = complementary_teacher()
        return MGDTeacher([teacher.model, state["t2"]], feat_tap=f"encoder.{stage}")

    def prepare(teacher: Any, student: nn.Module, train_data: Any) -> None:
        models = getattr(teacher, "models", None)
        t2 = models[1] if models else state.setdefault("t2", None)
        if t2 is None:
            from still.methods.mgd import complementary_teacher

            torch.manual_seed(1)
            t2 = state["t2"] = complementary_teacher()
        for p in t2.parameters():
            p.requires_grad_(True)
        fit_segmenter(t2, train_data, epochs=teacher2_epochs, seed=1)
        for p in t2.parameters():
            p.requires_grad_(False)

    spec = _spec(terms, wrap_teacher=wrap, prepare=prepare,
                 notes="teachers frozen here (the paper also steps b2); needs cutmix data for the x0/x1 pairs")
    # placeholders on teacher b2 for the pipeline's live teacher; MGDTeacher serves these names itself
    spec.teacher_views = {f"t{j}_{v}": (f"encoder.{stage}" if v == "feat" else "head")
                          for j in (1, 2) for v in ("seg", "feat", "pl")}
    return spec


@register_method("lad", paper=LAD_PAPER)
def lad(kd_weight: float = 1.0, temperature: float = 1.0, noise: float = 0.1, noise_b: float = 0.5,
        consistency: float = 1.0, teacher_epochs: int = 3) -> MethodSpec:
    """CE + pixel KD from the label-assisted teacher: a U-Net over image ⊕ noised one-hot label
    (`seg_unet_lad_px`: 1 + K input channels), trained by `prepare`
    with dual-path consistency (CE on two noise draws + MSE of their softmaxes)."""
    spec = seg_kd(kd_weight=kd_weight, temperature=temperature)

    def wrap(teacher: Any, student: nn.Module) -> Any:
        from still.teachers.label_assisted import LabelAssistedTeacher

        if isinstance(teacher, LabelAssistedTeacher):
            return teacher
        if teacher is None or not hasattr(teacher, "model"):
            raise ValueError("lad needs a live teacher model with 1 + K input channels")
        return LabelAssistedTeacher(teacher.model, dict(teacher.view_specs), noise=noise)

    def prepare(teacher: Any, student: nn.Module, train_data: Any) -> None:
        from still.teachers.label_assisted import fit_label_assisted

        fit_label_assisted(teacher.model, train_data, epochs=teacher_epochs, noise=noise, noise_b=noise_b,
                           consistency=consistency)

    spec.wrap_teacher, spec.prepare = wrap, prepare
    spec.notes = "the teacher sees the label at distillation time too (privileged information)"
    return spec
