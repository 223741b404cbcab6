"""DistillTrainer: a transformers.Trainer running a still objective; resume gives the same weights."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from still.data.lm_text import LMBlocks  # noqa: E402
from still.integrations.causal_lm import student_from_config  # noqa: E402
from still.integrations.transformers_trainer import LM_HEAD, OBJECTIVE_FILE, DistillTrainer  # noqa: E402
from still.objective import Objective, Term  # noqa: E402
from still.registry import LOSSES  # noqa: E402

CFG = dict(model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _data() -> LMBlocks:
    g = torch.Generator().manual_seed(0)
    return LMBlocks(torch.randint(0, 256, (24, 12), generator=g), torch.zeros(24, dtype=torch.long), ["d"])


def _objective() -> Objective:
    """lm_kd (fused) + an MSE hint through a trainable linear adapter (objective parameters)."""
    return Objective([
        Term("kd", LOSSES.build("lm_kd", ce_weight=0.5), student="lm", teacher="lm", inputs={"labels": "labels"}),
        Term("hint", LOSSES.build("mse") if "mse" in LOSSES else torch.nn.functional.mse_loss,
             student="h", teacher="h", adapter="linear", weight=0.1),
    ])


class _HiddenTeacher:
    pass


def _run(out, teacher, steps, resume=None, objective=True):
    student = student_from_config(CFG, seed=0)
    args = TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    kw = {}
    if objective:
        from still.integrations.causal_lm import CausalLMTeacher
        from still.teachers.base import Teacher

        class Both(Teacher):
            """Fused-head view + the final-norm hidden states of the same frozen model."""

            def __init__(self, m):
                self.lm, self.view_specs = CausalLMTeacher(m), {"lm": "", "h": "model.norm"}

            def views(self, batch, names):
                out = self.lm.views(batch, ["lm"])
                return {"lm": out["lm"], "h": out["lm"].hidden[..., :8].contiguous()}

            def fingerprint(self):
                return self.lm.fingerprint()

        teacher = Both(teacher)
        kw = dict(objective=_objective(), student_views={"lm": LM_HEAD, "h": "model.norm"})
    tr = DistillTrainer(model=student, args=args, train_dataset=_data(), teacher=teacher, **kw)
    tr.train(resume_from_checkpoint=resume)
    return student, tr


def test_trainer_trains_logs_terms_and_resumes_exactly(tmp_path):
    teacher = student_from_config(CFG, seed=1)
    a, ta = _run(tmp_path / "a", teacher, 4)
    logs = [h for h in ta.state.log_history if "loss" in h]
    assert len(logs) == 4 and all("still/kd" in h and "still/hint" in h for h in logs)
    assert os.path.exists(tmp_path / "a" / "checkpoint-2" / OBJECTIVE_FILE)
    groups = ta.optimizer.param_groups
    adapter_params = {id(p) for p in ta.objective.parameters()}
    assert any(id(p) in adapter_params for g in groups for p in g["params"])  # the adapter trains
    _run(tmp_path / "b", teacher, 4)
    c, tc = _run(tmp_path / "b", teacher, 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    for (k, v), (_, w) in zip(a.state_dict().items(), c.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    for (k, v), (_, w) in zip(ta.objective.state_dict().items(), tc.objective.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=f"objective {k} differs after resume")


def test_trainer_default_method_with_plain_hf_teacher(tmp_path):
    teacher = student_from_config(CFG, seed=1)
    student, tr = _run(tmp_path / "c", teacher, 2, objective=False)
    assert [t.name for t in tr.objective.terms] == ["kd"] and tr.state.global_step == 2
