"""Peak memory of streaming pruning (hf_flop.prune_checkpoint) against loading the whole model.

Writes a random Llama (8 layers, hidden 512, vocabulary 8,000; float32) to a temporary folder, then
runs each route in a fresh process and prints its peak resident set size (``ru_maxrss``):

* ``baseline``: import hf_flop and read the calibration batches, nothing else;
* ``in-memory``: ``from_pretrained`` + ``prune_oneshot`` + ``compact`` + ``save_pretrained``;
* ``streamed``: ``prune_checkpoint`` (two passes, global ranking).

    OMP_NUM_THREADS=1 python benchmarks/stream_memory.py      # -> benchmarks/results/stream_memory.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS, HIDDEN, VOCAB = 8, 512, 8000


def _batches():
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 128), generator=g)} for _ in range(8)]


def _route(name: str, folder: Path) -> None:
    from hf_flop import FlopConfig, compact, prune_checkpoint, prune_oneshot

    data = _batches()
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    options = {"progress": False}
    if name == "in-memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder / "src")
        compact(prune_oneshot(model, config, data, reconstruct_options=options)).save_pretrained(folder / name)
    elif name == "streamed":
        prune_checkpoint(folder / "src", folder / name, config, data, reconstruct_options=options)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"route": name, "peak_rss_mb": round(peak_mb, 1)}))


def main() -> None:
    if len(sys.argv) == 3:
        _route(sys.argv[1], Path(sys.argv[2]))
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=1408,
            num_hidden_layers=LAYERS,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        model.save_pretrained(folder / "src")
        del model
        result = {"params_mb": round(params * 4 / 2**20, 1), "one_layer_mb": round(layer * 4 / 2**20, 1), "routes": {}}
        for name in ("baseline", "in-memory", "streamed"):
            run = subprocess.run([sys.executable, __file__, name, str(folder)], check=True, capture_output=True, text=True)
            result["routes"][name] = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, write_json

    write_json(RESULTS / "stream_memory.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
