"""TransKD patch-embedding alignment (PEA) + feature-map distillation as a method (`transkd_pea`).

Terms (TransKD's `L = CE + w_feat·HCL(F_s', F_t) + Σ_i w_i·MSE(E_s'^i, E_t^i)`):

- `ce`: cross-entropy on labels;
- `feat` (weight `feat_weight`, the code's `review_kd_loss_weight = 1`): TransKD's CSF (cross selective
  fusion of the student stage maps `stages.<i>`, deep to shallow, to the teacher's widths) + HCL
  (`transkd_csf` in `still.losses.dense`); `feature_adapter="conv1x1"` swaps CSF for per-stage
  1x1-conv adapters + `hcl`;
- `pea` (weight `pea_weight`): Σ_i w_i·MSE over patch embeddings `stages.<i>.patch_embed`, through
  the `patch_embed` adapter (Linear on channels, token resampling when N differs), w_i =
  `embed_weights` (the paper's (0.1, 0.1, 0.5, 1.0); the last n for n stages);
- optional `kd` (weight `kd_weight`, default 0: TransKD has no logit term).
"""

from __future__ import annotations

from typing import Any, Sequence

from still.losses.transkd import TRANSKD_PAPER, stage_weights
from still.methods.base import MethodSpec
from still.registry import register_method


@register_method("transkd_pea", paper=TRANSKD_PAPER)
def transkd_pea(stages: int = 2, feat_weight: float = 1.0, pea_weight: float = 1.0,
                embed_weights: Sequence[float] | None = None, kd_weight: float = 0.0, temperature: float = 4.0,
                labels: str = "y", feature_adapter: str | None = None, csf_mid: int = 64,
                cls_token: bool = False) -> MethodSpec:
    """TransKD: CE + CSF/HCL on stage maps + PEA on patch embeddings (patch_embed adapter)."""
    n = int(stages)
    maps = [f"stage{i}" for i in range(n)]
    embeds = [f"pe{i}" for i in range(n)]
    w = stage_weights(n, embed_weights)
    terms: list[dict[str, Any]] = [{"name": "ce", "loss": "ce", "student": "logits", "target": labels}]
    if feat_weight and feature_adapter is None:
        terms.append({"name": "feat", "loss": "transkd_csf", "params": {"mid": csf_mid}, "student": maps,
                      "teacher": maps, "weight": feat_weight})
    elif feat_weight:
        terms.append({"name": "feat", "loss": "hcl", "student": maps, "teacher": maps, "adapter": feature_adapter,
                      "weight": feat_weight})
    if pea_weight:
        terms.append({"name": "pea", "loss": "pea", "params": {"weights": w}, "student": embeds, "teacher": embeds,
                      "adapter": {"name": "patch_embed", "cls_token": cls_token}, "weight": pea_weight})
    if kd_weight:
        terms.append({"name": "kd", "loss": "kd", "params": {"temperature": temperature}, "student": "logits",
                      "teacher": "logits", "weight": kd_weight})
    taps = {**{m: f"stages.{i}" for i, m in enumerate(maps)},
            **{e: f"stages.{i}.patch_embed" for i, e in enumerate(embeds)}, "logits": ""}
    return MethodSpec(terms=terms, student_views=dict(taps), teacher_views=dict(taps),
                      notes="student and teacher: hierarchical patch transformers (vit_nano / vit_tiny) with "
                            f"{n} stages (taps stages.<i> and stages.<i>.patch_embed)")
