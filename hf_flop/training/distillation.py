"""Distillation from a dense teacher: logit KL and hidden-state (layer) MSE, as one object.

``PruningTrainer`` mixes the task loss with it when given a ``teacher_model``; a plain fine-tuning
baseline that must get the same distillation (the benchmarks' Torch-Pruning rows) uses the same
object, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Distillation:
    """``loss = (1 - alpha) task + alpha KL(T) + hidden_weight * hidden MSE``.

    ``teacher`` is a module returning logits (and hidden states when ``hidden_weight`` > 0), put in
    eval mode without gradients by ``prepare_teacher``. ``temperature`` softens both softmaxes; the
    KL is scaled by ``T^2`` so its gradients keep their size across temperatures.
    """

    teacher: nn.Module
    alpha: float
    temperature: float
    hidden_weight: float = 0.0

    @classmethod
    def from_args(cls, teacher: nn.Module, args) -> Distillation:
        """From ``PruningArguments``' ``distillation_alpha``, ``distillation_temperature``, ``hidden_distillation_weight``."""
        return cls(teacher, args.distillation_alpha, args.distillation_temperature, args.hidden_distillation_weight)

    @property
    def uses_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    def student_inputs(self, inputs: dict) -> dict:
        """The model's inputs, asking for hidden states when they are distilled."""
        return {**inputs, "output_hidden_states": True} if self.uses_hidden_states else inputs

    def teacher_outputs(self, inputs: dict):
        """The teacher's forward on a batch (labels left out by the caller), without gradients."""
        with torch.no_grad():
            return self.teacher(**self.student_inputs(inputs))

    def loss(self, task: torch.Tensor, outputs, teacher_outputs, mask: torch.Tensor | None, window: float = 1.0):
        """``(loss, hidden MSE or None)``; ``window`` scales the distillation terms (gradient accumulation)."""
        distill = self.logit_loss(logits_of(outputs), logits_of(teacher_outputs), mask)
        loss = (1.0 - self.alpha) * task + self.alpha * window * distill
        if not self.uses_hidden_states:
            return loss, None
        hidden = self.hidden_loss(outputs, teacher_outputs, mask)
        return loss + self.hidden_weight * window * hidden, hidden

    def logit_loss(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """KL(teacher || student) at temperature T, times T^2, averaged over the positions the mask keeps."""
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher_model logits have shape {tuple(teacher.shape)} but the model's have "
                f"{tuple(student.shape)}; the teacher must share the task head and vocabulary."
            )
        temp = self.temperature
        per_position = F.kl_div(
            F.log_softmax(student.float() / temp, dim=-1),
            F.log_softmax(teacher.float() / temp, dim=-1),
            log_target=True,
            reduction="none",
        ).sum(-1) * (temp * temp)
        return masked_mean(per_position, mask)

    def hidden_loss(self, outputs, teacher_outputs, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over transformer layers of the MSE between the model's and the teacher's hidden states.

        ``hidden_states[0]`` (the embedding output) is left out, as in CoFi's layer distillation: the
        layers' outputs are what pruning changes. Per position the squared error is averaged over the
        hidden size, then over the positions the attention mask keeps.
        """
        student = _hidden_states(outputs, "the model")
        teacher = _hidden_states(teacher_outputs, "teacher_model")
        if len(student) != len(teacher):
            raise ValueError(
                f"the model returns {len(student)} hidden states but teacher_model {len(teacher)}: hidden-state "
                "distillation matches layers one to one, so both need the same number of layers."
            )
        if len(student) < 2:
            raise ValueError("the model returns no transformer-layer hidden states to distil (only the embeddings).")
        terms = []
        for i, (s, t) in enumerate(zip(student[1:], teacher[1:]), start=1):
            if s.shape != t.shape:
                raise ValueError(
                    f"hidden state {i}: the model's has shape {tuple(s.shape)} but teacher_model's "
                    f"{tuple(t.shape)}; hidden-state distillation needs the same hidden size."
                )
            terms.append(masked_mean((s.float() - t.float()).pow(2).mean(-1), mask))
        return torch.stack(terms).mean()


def prepare_teacher(teacher: nn.Module | None, student: nn.Module, device) -> nn.Module | None:
    """The teacher on ``device``, in eval mode, without gradients; refused if it shares the student's parameters."""
    if teacher is None:
        return None
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be a torch nn.Module, got {type(teacher).__name__}.")
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "teacher_model shares parameters with the model being pruned (get_flop_model modifies a model in "
            "place); pass a copy made before injection, e.g. teacher = copy.deepcopy(model) first."
        )
    return teacher.to(device).eval().requires_grad_(False)


def logits_of(outputs) -> torch.Tensor:
    """The logits of a model output (ModelOutput, dict, tuple with or without a loss, or a tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"model outputs have no 'logits' (keys: {list(outputs)}); distillation needs logits.")
        return outputs["logits"]
    return outputs[1] if len(outputs) > 1 and outputs[0].dim() == 0 else outputs[0]


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions, leaving out padding when an attention mask of the same shape is given."""
    if mask is not None and mask.shape == per_position.shape:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0)
    return per_position.mean()


def _hidden_states(outputs, who: str) -> tuple[torch.Tensor, ...]:
    """The ``hidden_states`` of a model output called with ``output_hidden_states=True``, or a clear error."""
    states = outputs.get("hidden_states") if isinstance(outputs, dict) else getattr(outputs, "hidden_states", None)
    if not states:
        raise ValueError(
            f"{who} returned no hidden_states when called with output_hidden_states=True (got a "
            f"{type(outputs).__name__}); hidden_distillation_weight > 0 needs two models that return them, as "
            "transformers models do. Set hidden_distillation_weight=0 to distil the logits only."
        )
    return tuple(states)
