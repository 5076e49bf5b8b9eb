"""The paper's numbers (PathVLM-R1, Tables IV and V), how one of ours is read beside them, and tools/reproduce.py's
report of its rows beside them (write_report).

tools/report.py prints them under any runs; tools/reproduce.py puts each of its rows beside its own. No torch, no model.
"""

import json
import os

from pathvlm.evaluation import wilson_interval
from pathvlm.provenance import describe_commit, settings_warnings

# Table V (PathMMU) and Table IV (OmniMedVQA, out of distribution), accuracy %, as published. The rows are the
# paper's training recipes; configs/ has one config per 7B row (the row letter is in its first line):
#   base  Qwen2.5-VL-Instruct, no training                         configs/eval.yaml
#   α     SFT on the 3,000 SFT items, from the base                 configs/sft.yaml
#   β     α + GRPO on the 1,000 RL items (format + accuracy)        configs/grpo.yaml
#   γ     α + more SFT on the same 1,000 RL items                   configs/sft_more.yaml
#   δ     SFT on the 1,000 RL items, from the base                  configs/sft_rl_items.yaml
#   ε     GRPO (format + accuracy) on the RL items, from the base   configs/grpo_from_base.yaml
#   R1    β + GRPO with the process reward too (PathVLM-R1)         configs/grpo_process.yaml
# Table IV's "SFT" comparison row is γ. A row or column the paper does not give has no number here.
OMNI = ("Chest CT Scan", "ISIC2020", "Retinal OCT-C8", "Diabetic Retinopathy")
PAPER = {
    "Qwen2.5-VL-7B (base)": {"PathMMU": 51.60, **dict(zip(OMNI, (48.60, 56.59, 57.19, 70.80)))},
    "7B α: SFT": {"PathMMU": 57.60},
    "7B β: α + GRPO": {"PathMMU": 63.90},
    "7B γ: α + more SFT (Table IV's SFT)": {"PathMMU": 59.90, **dict(zip(OMNI, (40.60, 45.40, 45.80, 32.00)))},
    "7B δ: SFT on the RL items": {"PathMMU": 52.90},
    "7B ε: GRPO from the base": {"PathMMU": 56.10},
    "PathVLM-R1": {"PathMMU": 65.50, **dict(zip(OMNI, (44.00, 80.00, 49.20, 59.80)))},
    "Qwen2.5-VL-3B (base)": {"PathMMU": 44.50, **dict(zip(OMNI, (38.60, 34.59, 60.40, 64.20)))},
    "3B α: SFT": {"PathMMU": 54.60},
    "3B β: α + GRPO": {"PathMMU": 56.90},
    "3B γ: α + more SFT": {"PathMMU": 54.40},
    "3B δ: SFT on the RL items": {"PathMMU": 52.10},
    "3B ε: GRPO from the base": {"PathMMU": 49.60},
    "Qwen2.5-VL-32B (base)": {"PathMMU": 54.20},
}
# our prepared set name -> the paper's column
PAPER_COLUMNS = {"pathmmu": "PathMMU", "chest_ct": "Chest CT Scan", "isic2020": "ISIC2020",
                 "oct_c8": "Retinal OCT-C8", "diabetic_retinopathy": "Diabetic Retinopathy"}

# tools/reproduce.py's row -> the paper's row, per model size. The paper trains no 3B R1: that row has no number.
PAPER_ROWS = {
    "7b": {"base": "Qwen2.5-VL-7B (base)", "alpha": "7B α: SFT", "beta": "7B β: α + GRPO",
           "gamma": "7B γ: α + more SFT (Table IV's SFT)", "delta": "7B δ: SFT on the RL items",
           "epsilon": "7B ε: GRPO from the base", "r1": "PathVLM-R1"},
    "3b": {"base": "Qwen2.5-VL-3B (base)", "alpha": "3B α: SFT", "beta": "3B β: α + GRPO",
           "gamma": "3B γ: α + more SFT", "delta": "3B δ: SFT on the RL items",
           "epsilon": "3B ε: GRPO from the base"},
}


def paper_number(size: str, row: str, set_name: str) -> float | None:
    """The paper's accuracy % for our row and prepared set at a model size, or None where it gives none."""
    label = PAPER_ROWS.get(size, {}).get(row)
    return PAPER.get(label, {}).get(PAPER_COLUMNS.get(set_name))


def beside_paper(correct: int, n: int, paper: float | None) -> dict:
    """Our accuracy with its Wilson 95% interval (in %) and where the paper's number falls:
    "inside", "above" or "below" the interval, or None without a paper number or without items.
    50/100 -> 50.0 [40.4, 59.6]: 51.6 is inside, 63.9 above, 39.0 below."""
    low, high = wilson_interval(correct, n)
    ours = {"correct": correct, "n": n, "accuracy": 100 * correct / n if n else None,
            "low": 100 * low, "high": 100 * high, "paper": paper}
    if paper is None or n == 0:
        return {**ours, "paper_is": None}
    where = "above" if paper > 100 * high else "below" if paper < 100 * low else "inside"
    return {**ours, "paper_is": where}


# ----------------------------------------------------------------------------------------------
# tools/reproduce.py's report: its rows (reproduce.row_result) beside the paper's

def cell(r: dict | None, with_paper: bool = True) -> str:
    """"41.2 [35.0–47.7]" (+ "; paper 51.60, **above**" where the paper's number is outside the interval)."""
    if r is None:
        return "–"
    text = f"{r['accuracy']:.1f} [{r['low']:.1f}–{r['high']:.1f}]"
    if with_paper and r["paper"] is not None:
        text += f"; paper {r['paper']:.2f}" + ("" if r["paper_is"] == "inside" else f", **{r['paper_is']}**")
    return text


def provenance_line(result: dict) -> str:
    """The provenance table's row: commits, weights, data, judges, configs, time, from the stages' records."""
    stages = result["provenance"]
    if not all(p.get("recorded", True) for p in stages):
        missing = ", ".join(p["stage"] for p in stages if not p.get("recorded", True))
        return f"| {result['letter']} | not recorded for {missing} (finished outside tools/reproduce.py) |||||||"
    commits = sorted({describe_commit(p["commit"]) for p in stages})
    weights = stages[-1]["weights"]
    model = weights["model"] + (f"@{weights['model_revision'][:10]}" if weights.get("model_revision") else "")
    train_data = "; ".join(dict.fromkeys(f"{os.path.basename(path)} {sha[:10]}" for p in stages
                                         if p["stage"].endswith("train") for path, sha in p["data_sha256"].items()
                                         if sha)) or "–"
    judges = [f"{p['stage']}: {p['judge']}" for p in stages if p["judge"] != "none"] or ["none"]
    configs = " → ".join(f"{p['config_file']} ({p['config_sha256'][:8]})" for p in stages)
    minutes = sum(p["seconds"] for p in stages) / 60
    took = f"{minutes:.1f} min" if minutes < 60 else f"{minutes / 60:.1f} h"
    return (f"| {result['letter']} | {', '.join(commits)} | {model} | {weights.get('adapter') or '–'} | "
            f"{train_data} | {'; '.join(judges)} | {configs} | {took} |")


def write_report(results: list[dict], out: str, size: str, dry_run: bool, command: str) -> str:
    """report.md and report.json in out -> the markdown."""
    warnings = settings_warnings({r["letter"]: r["settings"] for r in results})
    title = ("Dry run: the tiny model on fixtures (its numbers say nothing about the paper's)" if dry_run else
             f"PathVLM-R1 reproduced: {results[0]['model'] if results else size}")
    lines = [f"# {title}", "", f"`{command}`", "",
             f"Accuracy %, Wilson 95% interval in brackets, beside the {size.upper()} numbers of the paper's Table V "
             "(PathMMU) and Table IV (OmniMedVQA, out of distribution). **above** / **below**: the paper's number "
             "lies outside our interval. A row the paper gives no number for has none.", ""]
    lines += [f"> {w}\n" for w in warnings]
    lines += ["## Table V: PathMMU", "",
              "| row | recipe | model | ours % [95% CI] | n | paper % | paper vs. our interval |", "|---" * 7 + "|"]
    for r in results:
        m = r["sets"]["pathmmu"]
        paper = "–" if m is None or m["paper"] is None else f"{m['paper']:.2f}"
        where = "–" if m is None or m["paper_is"] is None else m["paper_is"] if m["paper_is"] == "inside" \
            else f"**{m['paper_is']}**"
        lines.append(f"| {r['letter']} | {r['recipe']} | {r['label']} | {cell(m, False)} | {m['n'] if m else '–'} | "
                     f"{paper} | {where} |")
    omni = [s for s in PAPER_COLUMNS if s != "pathmmu"]
    lines += ["", "## Table IV: OmniMedVQA", "", "| row | model | " + " | ".join(PAPER_COLUMNS[s] for s in omni) + " |",
              "|---|---|" + "---|" * len(omni)]
    for r in results:
        lines.append(f"| {r['letter']} | {r['label']} | " + " | ".join(cell(r["sets"][s]) for s in omni) + " |")
    ns = {s: sorted({r["sets"][s]["n"] for r in results if r["sets"][s]}) for s in omni}
    lines += ["", "Items per set: " + ", ".join(f"{PAPER_COLUMNS[s]} {'/'.join(map(str, n)) or '–'}"
                                                for s, n in ns.items()) + ".", ""]
    lines += ["## Provenance", "", "Each row's stages, its starting rows' included: the commit, the base model (its "
              "hub revision where it came from the hub), the adapter's fingerprint, the training splits' sha256, the "
              "judge, each stage's config (the sha256 of the resolved config it saved) and the wall-clock time. "
              "Library versions, test-split hashes and every resolved config: report.json, and provenance.json "
              "beside each stage's output.", "",
              "| row | commit | model | adapter | training data sha256 | judge | configs | time |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [provenance_line(r) for r in results]
    libraries = {json.dumps(p["libraries"], sort_keys=True) for r in results for p in r["provenance"]
                 if p.get("recorded", True)}
    for text in sorted(libraries):
        lines += ["", "Libraries" + (" (they differ between stages)" if len(libraries) > 1 else "") + ": "
                  + ", ".join(f"{k} {v}" for k, v in json.loads(text).items() if v)]
    markdown = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"command": command, "size": size, "dry_run": dry_run, "warnings": warnings, "rows": results}, f,
                  indent=1, ensure_ascii=False)
    return markdown
