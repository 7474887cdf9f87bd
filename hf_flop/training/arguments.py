"""`PruningArguments`: `TrainingArguments` plus the pruning schedule, distillation and calibration settings.

The target sparsity itself lives in the model's ``FlopConfig.target_sparsity``; how the fields turn
into steps and targets is ``hf_flop.training.schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..scores import SCORES


@dataclass
class PruningArguments(TrainingArguments):
    """`TrainingArguments` plus the pruning schedule.

    The target sparsity itself lives in the model's ``FlopConfig.target_sparsity``.
    """

    target_warmup_steps: float = field(
        default=0.5,
        metadata={
            "help": "Steps over which the target sparsity rises linearly from 0 to its final value; a value "
            "below 1 is a fraction of the run (as for warmup_steps). Training after the warm-up settles the "
            "gates at the target."
        },
    )
    gate_learning_rate: float = field(
        default=0.2,
        metadata={
            "help": "Learning rate of the gate parameters (hard-concrete log_alpha, top-k scores/threshold), "
            "constant, no weight decay, no momentum. Hard-concrete gates start fully open (log_alpha near 7) and "
            "travel several units to close, so this is far larger than a fine-tuning learning rate."
        },
    )
    lagrangian_learning_rate: float = field(
        default=0.1,
        metadata={
            "help": "Learning rate of lambda_1, the linear multiplier (gradient ascent, constant, no weight decay)."
        },
    )
    quadratic_learning_rate: float = field(
        default=2.0,
        metadata={
            "help": "Learning rate of lambda_2, the quadratic multiplier (gradient ascent, constant). Its gradient "
            "(s - t)^2 vanishes near the target, and the quadratic term is what damps lambda_1's overshoot, so it "
            "learns faster than lambda_1."
        },
    )
    distillation_alpha: float = field(
        default=0.5,
        metadata={"help": "With a teacher_model: loss = (1 - alpha) * task + alpha * distillation."},
    )
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of the logit distillation (KL, scaled by T^2)."}
    )
    hidden_distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "With a teacher_model: add this weight times the mean over transformer layers of the MSE between "
            "the model's and the teacher's hidden states (padding left out with the attention mask). 0 = off. "
            "Both models must return hidden_states and have the same number of layers and hidden size."
        },
    )
    pruning_phase: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the run's steps that prune, in [0, 1]. Default 0: the measured best at a fine-tuning "
            "budget (benchmarks/README.md, 'Equal budget'). 1.0: the whole run prunes (FLOP's single phase). "
            "Below 1: after ceil(pruning_phase * max_steps) steps the eval masks are fixed at exactly the target, "
            "the gates frozen and the constraint dropped; the remaining steps fine-tune the pruned model. "
            "target_warmup_steps (as a fraction) is then a fraction of the pruning phase. 0: no pruning steps; "
            "before the first step the masks are set one-shot by oneshot_score on the reconstruction_data "
            "(hf_flop.prune_oneshot, with the refit; calibration data from train_dataset unless given), and every "
            "step recovers."
        },
    )
    calibration_batches: int = field(
        default=32,
        metadata={
            "help": "With pruning_phase < 1 and no reconstruction_data given to PruningTrainer: this many batches "
            "of per_device_train_batch_size rows, a seeded sample of train_dataset, are the calibration data of "
            "the one-shot scores and the refit. 0: none (pruning_phase=0 then needs reconstruction_data)."
        },
    )
    oneshot_score: str | None = field(
        default="auto",
        metadata={
            "help": "Score of every gated unit on PruningTrainer's calibration data (see hf_flop.scores: "
            f"{', '.join(SCORES)}), or 'auto' (the default): hf_flop.scores.recommended_oneshot_score(FlopConfig), "
            "the score the command line uses too: 'obs', which measured best on MiniLM and tied 'activation' on "
            "SmolLM2, and 'activation' with FlopConfig(uniform_shapes=True), which measured better there "
            "(benchmarks/README.md). With pruning_phase=0 it chooses the masks; with 0 < pruning_phase < 1 it "
            "warm-starts the gates (hf_flop.warm_start_gates: important units start more open). None: gates start "
            "fully open. Unused without calibration data or with pruning_phase=1."
        },
    )
    compact_recovery: bool = field(
        default=True,
        metadata={
            "help": "With pruning_phase=0 (fresh or resumed): the recovery steps train hf_flop.compact(model), the "
            "smaller dense model, instead of the full-size gated model with its masks held; after train() its "
            "weights are written back into the gated model (kept rows and columns; the pruned ones set to 0), so "
            "the model, trainer.model and hf_flop.compact(model) hold the result. Checkpoints then hold the "
            "compacted model and the gates (flop_gates.pt). Only for levels head and row (rank, block and "
            "embedding compact to other module types) and without an optimizer passed to PruningTrainer; "
            "otherwise, and with 0 < pruning_phase < 1 (the optimizer already holds the gated model's "
            "parameters at the boundary), recovery trains the gated model, logged at info level. Ignored with "
            "pruning_phase=1."
        },
    )

    recovery_lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "With pruning_phase=0 and compact_recovery: the recovery steps train PEFT LoRA adapters of this "
            "rank on the compacted model's linears instead of every weight (fewer trainable parameters, less "
            "optimizer memory); after train() the adapters are merged into the weights (merge_and_unload) and "
            "written back, so save_compacted writes a plain dense model that loads without peft. Distillation "
            "from teacher_model works as in full recovery. Only for levels head, query_head and row. None: full "
            "fine-tuning."
        },
    )
    recovery_lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA's alpha (the adapters' output is scaled by alpha / rank). None: 2 x the rank."},
    )
    recovery_lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (suffixes, as peft.LoraConfig.target_modules) of the compacted model's linears that "
            "get adapters. None: every linear but the output layer (PEFT's 'all-linear')."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_warmup_steps < 0:
            raise ValueError(f"PruningArguments.target_warmup_steps={self.target_warmup_steps} must be >= 0.")
        for name in (
            "gate_learning_rate",
            "lagrangian_learning_rate",
            "quadratic_learning_rate",
            "distillation_temperature",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"PruningArguments.{name}={getattr(self, name)} must be > 0.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"PruningArguments.distillation_alpha={self.distillation_alpha} must be in [0, 1].")
        if not self.hidden_distillation_weight >= 0.0:
            raise ValueError(
                f"PruningArguments.hidden_distillation_weight={self.hidden_distillation_weight} must be >= 0 (0 = off)."
            )
        if not 0.0 <= self.pruning_phase <= 1.0:
            raise ValueError(
                f"PruningArguments.pruning_phase={self.pruning_phase} must be in [0, 1]: the fraction of the run's "
                "steps that prune (1.0 = the whole run, no recovery phase; 0 = one-shot masks, then only recovery)."
            )
        if not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 0):
            raise ValueError(
                f"PruningArguments.calibration_batches={self.calibration_batches!r} must be an integer >= 0 (0 = none)."
            )
        if self.oneshot_score not in (None, "auto", *SCORES):
            raise ValueError(
                f"PruningArguments.oneshot_score={self.oneshot_score!r} is not a score; use one of {list(SCORES)}, "
                "'auto' (the recommended one for the model's FlopConfig) or None."
            )
        if not isinstance(self.compact_recovery, bool):
            raise ValueError(f"PruningArguments.compact_recovery={self.compact_recovery!r} must be True or False.")
        if self.pruning_phase == 0.0 and self.oneshot_score is None:
            raise ValueError(
                "PruningArguments(pruning_phase=0) sets the masks one-shot before the first step and needs "
                "oneshot_score (e.g. 'activation'); or set pruning_phase above 0 to learn them."
            )
        self._check_lora()

    def _check_lora(self) -> None:
        rank, name = self.recovery_lora_rank, "PruningArguments.recovery_lora_rank"
        if rank is None:
            for field_name in ("recovery_lora_alpha", "recovery_lora_target_modules"):
                if getattr(self, field_name) is not None:
                    raise ValueError(
                        f"PruningArguments.{field_name}={getattr(self, field_name)!r} sets up LoRA recovery, which "
                        "is off: also set recovery_lora_rank (e.g. 16), or drop it."
                    )
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}={rank!r} must be a positive integer (the LoRA rank, e.g. 16) or None (off).")
        if self.pruning_phase != 0.0 or not self.compact_recovery:
            raise ValueError(
                f"{name}={rank} trains LoRA adapters on the compacted model, which only one-shot runs recover on "
                f"(pruning_phase=0 and compact_recovery=True; now pruning_phase={self.pruning_phase}, "
                f"compact_recovery={self.compact_recovery}): set those, or recovery_lora_rank=None."
            )
        alpha = self.recovery_lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise ValueError(f"PruningArguments.recovery_lora_alpha={alpha!r} must be a number > 0, or None (2 x rank).")
        targets = self.recovery_lora_target_modules
        if targets is not None and (
            isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"PruningArguments.recovery_lora_target_modules={targets!r} must be a non-empty list of module "
                "names (e.g. ['q_proj', 'v_proj']), or None (every linear but the output layer)."
            )

    @property
    def two_phase(self) -> bool:
        """Whether the run has a recovery phase (``pruning_phase`` < 1), one-shot runs (0) included.

        Kept for compatibility; ``hf_flop.training.PruningSchedule.kind`` names the three schedules.
        """
        return self.pruning_phase < 1.0
