"""hf_flop: structured pruning of transformers models with FLOP (factorized low-rank pruning).

``import hf_flop`` registers the ``FLOP`` PEFT method, so ``peft.get_peft_model(model,
FlopConfig(...))`` and ``PeftModel.from_pretrained`` work, and the compacted models' classes, so
``AutoModel*.from_pretrained`` loads them without ``trust_remote_code``.

Where each idea lives (one home each; ``tests/test_layout.py`` keeps the imports acyclic and the
library apart from its application layer ``app`` and its command line ``hf_flop_cli``;
``docs/architecture.md`` has the full map):

* ``config`` FlopConfig and the vocabularies; ``gates`` the gate types; ``counting`` the counting rules;
* ``gated`` the verbs every gated module answers; ``layers`` the gated linear; the levels:
  ``rank``, ``blocks``, ``groups`` (head, row), ``embedding``; ``architectures`` the one table of
  supported layouts, ``recognition`` the layouts read from a model the table lacks, ``layout_check``
  their verification on a small copy; ``linear`` GPT-2's Conv1D orientation;
* ``lookup`` find_flop_model; ``model`` the PEFT tuner (injection); ``accounting`` sparsity_report;
  ``compact`` compaction; ``uniform`` the same heads and FFN width in every layer;
* ``calibration`` calibration batches and the hook runner; ``scores`` the score registry (``obs``
  math in ``obs``); ``oneshot`` / ``ranking`` pruning to a target; ``reconstruction`` the refit
  (math in ``refit``); ``shape_search`` the search over mixes of levels at one size (``shape_options``
  its inputs and result, ``shape_distill`` its optional short distillation);
* ``constraint`` the sparsity constraint; ``trainer`` PruningTrainer, wiring the parts of a run in
  ``training`` (arguments, schedule, phases, optimizer groups, distillation, compacted recovery,
  calibration data, checkpoint state, outcome); ``preflight`` the checks before training;
* ``fsdp`` the gates kept whole under FSDP2;
* ``hub`` saving, cards, publishing; ``onnx_export`` ONNX; ``export_gguf`` / ``gguf_file`` /
  ``gguf_vocab`` GGUF for llama.cpp; ``naming`` parameters in the caller's words;
* ``modeling`` the compacted models (self-contained remote code); ``registration`` what
  ``import hf_flop`` registers; ``app`` what ``hf-flop prune`` runs (never imported by the rest).
"""

from __future__ import annotations

from .accounting import SparsityReport, expected_sparsity, sparsity_report
from .architectures import ARCHITECTURES, ArchSpec, UnsupportedArchitectureError
from .compact import compact
from .config import FlopConfig, FlopConfigError
from .export_gguf import export_gguf
from .fsdp import fsdp_ignored_modules, fsdp_ignored_params, sync_gate_gradients
from .gates import Gate, HardConcreteGate, TopKGate
from .hub import save_compacted
from .hub_push import PushToHubError, push_compacted
from .layers import FlopLinear
from .model import FlopModel, get_flop_model
from .oneshot import prune_oneshot, prune_to_target, warm_start_gates
from .onnx_export import OnnxExportError, export_onnx
from .reconstruction import reconstruct
from .registration import register, register_auto_classes
from .scores import compute_scores
from .shape_options import ShapeCandidate, ShapeMix, ShapeSearchConfig, ShapeSearchResult
from .shape_search import search_shape
from .streaming import StreamResult, prune_checkpoint
from .trainer import PruningArguments, PruningTrainer
from .training import TargetMissedWarning

register()
register_auto_classes()  # compacted models load with AutoModel*.from_pretrained

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "FlopConfig",
    "FlopConfigError",
    "FlopLinear",
    "FlopModel",
    "Gate",
    "PruningArguments",
    "PruningTrainer",
    "PushToHubError",
    "HardConcreteGate",
    "OnnxExportError",
    "ShapeCandidate",
    "ShapeMix",
    "ShapeSearchConfig",
    "ShapeSearchResult",
    "SparsityReport",
    "TargetMissedWarning",
    "TopKGate",
    "UnsupportedArchitectureError",
    "compact",
    "compute_scores",
    "expected_sparsity",
    "export_gguf",
    "export_onnx",
    "fsdp_ignored_modules",
    "fsdp_ignored_params",
    "get_flop_model",
    "prune_oneshot",
    "prune_checkpoint",
    "StreamResult",
    "prune_to_target",
    "push_compacted",
    "reconstruct",
    "save_compacted",
    "search_shape",
    "sparsity_report",
    "sync_gate_gradients",
    "warm_start_gates",
]
