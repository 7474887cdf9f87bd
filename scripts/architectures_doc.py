"""Write docs/architectures.md: what works for each model family, from the per-architecture tests' results.

    python scripts/architectures_doc.py            # runs the tests below (slow ONNX ones included), then writes
    python scripts/architectures_doc.py run.xml    # reads a JUnit file of an earlier run of the same tests

A cell is "yes" only when every test behind it passed for that family in this run. Families that are
refused are tried live (tiny configs) and listed with the first sentence of hf_flop's refusal. Only the
sections between the page's markers are rewritten; the prose around them is edited by hand.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architectures.md"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# column -> test functions (file::name) whose cases for the family must pass; a case names its family in brackets
COLUMNS = {
    "inject + train": ["test_structures::test_all_levels_keep_outputs_and_train"],
    "heads, rows": ["test_structures::test_closed_units_own_exactly_their_rows"],
    "compact exact": ["test_compact::test_compact_is_exact_and_has_the_reported_size"],
    "uniform, stock class": ["test_uniform::test_oneshot_gives_the_same_shapes_in_every_layer_at_the_target"],
    "ONNX": [
        "test_onnx_export::test_onnx_runtime_matches_the_compacted_model",
        "test_onnx_export::test_the_other_architectures_export_too",
    ],
    "layer (depth)": ["test_depth_compact::test_every_architecture_compacts_removed_layers_exactly"],
    "hidden (width)": ["test_hidden::test_the_other_llama_family_tables_compact_exactly"],
}
# the mixture-of-experts families (their own tests): column -> tests
MOE_COLUMNS = {
    "inject, experts counted": ["test_experts::test_injection_keeps_outputs_and_counts_the_experts"],
    "head + row + expert one-shot, compact exact": ["test_experts::test_oneshot_with_refit_compacts_exactly"],
    "bf16 as the stock experts": ["test_experts::test_half_precision_computes_as_the_stock_experts"],
}
# tests that cover every family at once (one case): reload in a fresh process, with and without hf_flop
WHOLE = {
    "reload without hf_flop": ["test_compact::test_load_in_a_fresh_process[without]"],
    "uniform reload, no hf_flop": ["test_uniform::test_saved_uniform_models_load_with_plain_transformers"],
}
REFUSED = {  # families outside the table whose layout recognition cannot read (yet): config class, model class
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}


def _run_tests() -> Path:
    out = Path(tempfile.mkdtemp()) / "architectures.xml"
    every = [*COLUMNS.values(), *WHOLE.values(), *MOE_COLUMNS.values()]
    files = sorted({f"tests/{name.split('::')[0]}.py" for names in every for name in names})
    functions = {name.split("::")[1].split("[")[0] for names in every for name in names}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "slow or not slow", "-k", " or ".join(sorted(functions))]
    subprocess.run([*command, *files, f"--junitxml={out}"], cwd=ROOT, check=False)
    return out


def _results(junit: Path) -> dict[str, bool]:
    """'file::name[params]' -> passed."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        failed = any(child.tag in ("failure", "error", "skipped") for child in case)
        found[f"{module}::{case.get('name')}"] = not failed
    return found


def _family_cell(results: dict[str, bool], tests: list[str], family: str) -> str:
    cases = [ok for key, ok in results.items() if any(key.startswith(t + "[") for t in tests)]
    mine = [ok for key, ok in results.items() if any(key.startswith(t + "[") for t in tests) and _names(key, family)]
    if not cases or not mine:
        return "-"
    return "yes" if all(mine) else "FAILED"


def _names(key: str, family: str) -> bool:
    params = key.split("[", 1)[1].rstrip("]")
    return params == family or params.startswith(family + "-")


def _refusal(family: str) -> str:
    import torch
    import transformers

    from hf_flop import FlopConfig, get_flop_model

    config_name, class_name, extra = REFUSED[family]
    sizes = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    sizes |= dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    sizes |= (
        {"num_key_value_heads": 2} if "num_key_value_heads" in getattr(transformers, config_name)().to_dict() else {}
    )
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(getattr(transformers, config_name)(**sizes, **extra))
    try:
        get_flop_model(model, FlopConfig(levels=["head", "row"]))
    except Exception as err:  # the refusal is what the page reports
        reason = str(err)
        reason = reason[reason.find("hf_flop could not") :] if "hf_flop could not" in reason else reason
        return reason.split(". ")[0].rstrip(".").replace("|", "/") + "."
    return "not refused any more: move it to the tests' builders (tests/tiny_models.py) and the table above"


def main() -> None:
    from test_uniform import LEVELS
    from tiny_models import ALL_BUILDERS, MOE_BUILDERS, RECOGNISED_BUILDERS

    from hf_flop.architectures import ARCHITECTURES

    results = _results(Path(sys.argv[1]) if len(sys.argv) > 1 else _run_tests())
    whole = {column: all(results.get(t, False) for t in tests) for column, tests in WHOLE.items()}
    header = ["family", "layout", *COLUMNS, *WHOLE, "GGUF"]
    rows = []
    for family in sorted(ALL_BUILDERS, key=lambda f: (f in RECOGNISED_BUILDERS, f)):
        layout = "recognised" if family in RECOGNISED_BUILDERS else "table"
        cells = [_family_cell(results, tests, family) for tests in COLUMNS.values()]
        levels = "+".join(LEVELS.get(family, []))
        cells[3] = f"{cells[3]} ({levels})" if cells[3] == "yes" else cells[3]
        cells += ["yes" if ok else "FAILED" for ok in whole.values()]
        spec = ARCHITECTURES.get(family)
        cells.append(f"yes ({spec.gguf} / deci graph)" if spec is not None and spec.gguf else "no")
        rows.append([family, layout, *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    moe = ["| family | " + " | ".join(MOE_COLUMNS) + " |", "|" + "---|" * (len(MOE_COLUMNS) + 1)]
    moe += [
        f"| {family} | " + " | ".join(_family_cell(results, tests, family) for tests in MOE_COLUMNS.values()) + " |"
        for family in sorted(MOE_BUILDERS)
    ]
    refused = [f"| {family} | {_refusal(family)} |" for family in REFUSED]
    page = PAGE.read_text()
    page = _replace_section(page, "families", "\n".join(lines))
    page = _replace_section(page, "experts", "\n".join(moe))
    page = _replace_section(page, "refused", "| family | why |\n|---|---|\n" + "\n".join(refused))
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")


def _replace_section(page: str, name: str, body: str) -> str:
    """The text between ``<!-- name -->`` and ``<!-- /name -->`` replaced by ``body`` (the prose around is kept)."""
    start, end = f"<!-- {name}: generated by scripts/architectures_doc.py -->", f"<!-- /{name} -->"
    if start not in page or end not in page:
        raise SystemExit(f"{PAGE} lacks the markers {start} ... {end}")
    head, rest = page.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


if __name__ == "__main__":
    main()
