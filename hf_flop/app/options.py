"""``JobOptions``: what the ``hf-flop prune`` job runs with, complete and checked.

The command line (``hf_flop_cli``) fills the task's defaults, checks the values and builds one field by
field: each field is named after its option (``--max-steps`` is ``max_steps``), and ``hf-flop prune
--help`` says what each does. The job records them, as they ran, in ``summary.json``'s ``settings``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """The prune job's options, in the order ``hf-flop prune --help`` lists them.

    ``None`` means "not given" where a field allows it: the job (or the library) picks. The one such
    choice the job makes itself is ``oneshot_score``: ``None`` runs the library's recommendation for the
    pruning configuration (``hf_flop.scores.recommended_oneshot_score``).
    """

    # the model and what to prune (FlopConfig is built from these by the CLI, which names its errors' options)
    task: str  # "seq-cls" or "causal-lm" (hf_flop.metrics.TASKS)
    model: str  # a Hub id, a local folder or an embedded default (hf_flop.app.data.MODELS)
    target: float
    levels: list[str]
    gate: str
    round_to: int
    uniform_shapes: bool
    target_modules: list[str] | None
    # data
    dataset: str  # a Hub id, a local folder or file, or an embedded default (hf_flop.app.data.DATASETS)
    dataset_config: str | None
    data_dir: str | None
    text_column: str | None
    label_column: str | None
    eval_split: str | None
    max_length: int
    train_samples: int  # 0 = all
    eval_samples: int  # 0 = all
    # training
    dense_epochs: float
    epochs: float
    max_steps: int | None  # overrides epochs
    target_warmup: float  # steps, or a fraction of the pruning steps if < 1
    batch_size: int
    learning_rate: float
    gate_learning_rate: float | None  # None: PruningArguments' default
    lagrangian_learning_rate: float | None  # None: PruningArguments' default
    distill: bool
    pruning_phase: float
    oneshot_score: str | None
    calibration_batches: int
    search: bool  # hf_flop.search_shape before pruning: the mix of levels with the lowest held-out loss
    search_hidden: list[float] | None  # None: ShapeSearchConfig's default fractions
    search_layers: list[float] | None
    hidden_distillation: float
    recovery_lora_rank: int | None  # None: full fine-tuning in the recovery steps
    seed: int
    threads: int
    # output
    output_dir: str  # as given; the job writes where run() is told (the checked, expanded path)
    overwrite: bool
    latency_threads: int
    no_plots: bool
    export_onnx: bool
    export_gguf: bool
    gguf_dtype: str
    gguf_quantization: str | None
    onnx_quantization: str | None
    gguf_tokenizer: str | None
    push_to_hub: bool
    repo_id: str | None
    private: bool
    license: str | None
