"""A model for a task: find it (a default name, a local folder or a Hub id), its tokenizer, the float32 model.

The CLI's job and the examples load models through these, so an option error reads the same in both.
"""

from __future__ import annotations

from pathlib import Path

from .embedded import resolve_model


def find_model(name_or_path: str) -> str:
    """``resolve_model``, then make sure there is a model to load: the path for ``from_pretrained``.

    A local folder must hold a ``config.json`` (``ValueError`` otherwise); a path-like name that
    does not exist raises ``FileNotFoundError``; anything else must be a Hub id whose config loads
    (``ValueError`` with the loader's reason otherwise).
    """
    path = resolve_model(name_or_path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json; pass a folder written by save_pretrained.")
        return str(local)
    if name_or_path.startswith((".", "/", "~")) or len(Path(name_or_path).parts) > 2:  # cannot be a Hub id
        raise FileNotFoundError(f"model path {name_or_path} does not exist.")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load model {name_or_path!r}: not a local folder, and not a reachable Hub id "
            f"({str(err).splitlines()[0]})."
        ) from None
    return path


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_classifier(path: str, num_labels: int | None, tokenizer, label_names: list[str] | None = None):
    import torch
    from transformers import AutoModelForSequenceClassification

    labels = {}
    if label_names:
        if num_labels is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names={label_names} has {len(label_names)} names for num_labels={num_labels}.")
        # named classes: pipeline() and the saved config answer "positive", not "LABEL_1"
        labels = {
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=torch.float32, **labels
    )
    if tokenizer is not None and model.config.pad_token_id is None:
        # decoder classifiers read each row's last non-pad token, which needs the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load_causal_lm(path: str, num_labels: int | None, tokenizer, label_names: list[str] | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


_TASK_LOADERS = {"seq-cls": _load_classifier, "causal-lm": _load_causal_lm}


def load_task_model(
    path: str, task: str, num_labels: int | None = None, tokenizer=None, label_names: list[str] | None = None
):
    """The float32 model for ``task`` (``"seq-cls"`` or ``"causal-lm"``, as in ``hf_flop.metrics.TASKS``).

    For ``"seq-cls"``, ``num_labels`` sizes the classifier head, ``tokenizer`` supplies the pad id
    when the config has none, and ``label_names`` (the dataset's class names, e.g. ``TaskData``'s
    ``label_names``) become the config's ``id2label`` / ``label2id``; ``"causal-lm"`` ignores them.
    """
    if task not in _TASK_LOADERS:
        raise ValueError(f"task={task!r} is not valid; use one of {list(_TASK_LOADERS)}.")
    return _TASK_LOADERS[task](path, num_labels, tokenizer, label_names)
