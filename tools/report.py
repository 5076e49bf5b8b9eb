"""Statistics and reporting over finished runs: no model, no torch.

    python tools/report.py runs/base runs/sft runs/grpo --out runs/report     # report.md + accuracy.png
    python tools/report.py runs/base runs/sft runs/grpo --train runs/sft runs/grpo   # + training curves
    python tools/report.py curves runs/grpo/metrics.jsonl --out curves.png   # every curve of one run

report.md holds the accuracy table (ours beside the paper's Table V and Table IV), a McNemar
test for every pair of runs on the items both answered, for runs evaluated with a judge the
reasoning-quality means, per run and set what was confused with what (a gold-vs-predicted matrix
where the gold answers take at most 12 distinct texts, such as the demo's stains or a classification
set; else the most frequent confusions, as for PathMMU), and the training runs' main curves.
Confidence intervals are Wilson 95%.
"""

import argparse
import itertools
import json
import os
import sys

# run as `python tools/report.py`, only tools/ is on sys.path: add the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathvlm.errors import BadInput, path_problem, reading, run_script  # noqa: E402
from pathvlm.evaluation import confusion, read_jsonl  # noqa: E402
from pathvlm.provenance import eval_settings, is_tiny, settings_warnings  # noqa: E402
from tools.paper import PAPER, PAPER_COLUMNS  # noqa: E402
from tools.plots import MAIN_CURVES, plot_accuracy, plot_confusion, plot_curves  # noqa: E402
from tools.stats import mcnemar  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The paper's numbers (accuracy, %): Table V and Table IV, in paper.py (tools/reproduce.py reads them too)


def paper_rows() -> dict[str, dict[str, float]]:
    """Table V and Table IV as one set of rows: {row label: {paper column: accuracy %}}."""
    return PAPER


# ----------------------------------------------------------------------------------------------
# Reading runs

def load_run(run_dir: str) -> dict:
    """-> {"name", "metrics", "correct": {(set, id): bool}} from an eval.py output_dir."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):  # a training run's log, one row a step
            raise BadInput(f"{run_dir} is a training run's output_dir, not an evaluation: evaluate it first "
                           f"(python eval.py <config> adapter={run_dir}) and report that eval's output_dir")
        why = path_problem(run_dir, "directory") or "holds no metrics.json"
        raise BadInput(f"{run_dir} {why}: give an eval.py output_dir")
    with reading(path, "the evaluation", "evaluate again into that folder (eval.py writes it at its end)"):
        with open(path) as f:
            metrics = json.load(f)
        if not isinstance(metrics, dict) or not isinstance(metrics.get("sets"), dict):
            raise ValueError("no 'sets' in it: written by an older eval.py, or not by eval.py")
    pred_path = os.path.join(run_dir, "predictions.jsonl")
    with reading(pred_path, "the predictions", "evaluate again into that folder"):
        preds = read_jsonl(pred_path) if os.path.isfile(pred_path) else []
    name = metrics.get("run") or os.path.basename(os.path.normpath(run_dir))
    config_path = os.path.join(run_dir, "config.yaml")
    config = {}
    if os.path.isfile(config_path):
        import yaml

        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    return {"name": name, "metrics": metrics, "correct": {(p["set"], p["id"]): bool(p["correct"]) for p in preds},
            "confusion": {s: confusion([p for p in preds if p["set"] == s]) for s in metrics["sets"]},
            "config": config}


def caveats(runs: list[dict]) -> list[str]:
    """What a reader must know before comparing these rows: settings that change the answers and differ between
    runs (provenance.eval_settings: max_new_tokens, prompt, parser, quantization, image budget, ...), and runs
    of the embedded tiny model beside the paper's 7B numbers."""
    notes = settings_warnings({r["name"]: eval_settings(r["config"], r["metrics"]) for r in runs})
    tiny = [r["name"] for r in runs if is_tiny(r["config"].get("model", r["metrics"].get("model")))]
    if tiny:
        notes.append(f"{', '.join(tiny)}: the embedded tiny model (a few million parameters, random vision tower). "
                     "The paper's rows are Qwen2.5-VL-7B's: they are beside it for the layout, not as a target.")
    return notes


def set_names(runs: list[dict]) -> list[str]:
    names = []
    for run in runs:
        names += [s for s in run["metrics"]["sets"] if s not in names]
    return names


# ----------------------------------------------------------------------------------------------
# Tables

def accuracy_table(runs: list[dict]) -> str:
    """Rows = our runs, then the paper's; columns = sets. Ours: accuracy % (Wilson 95% CI)."""
    sets = set_names(runs)
    header = ["run"] + [f"{s} ({PAPER_COLUMNS[s]})" if s in PAPER_COLUMNS else s for s in sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = []
        for s in sets:
            m = run["metrics"]["sets"].get(s)
            cells.append("" if m is None else
                         f"{100 * m['accuracy']:.1f} ({100 * m['ci_low']:.1f}–{100 * m['ci_high']:.1f}), n={m['n']}")
        tiny = is_tiny(run["config"].get("model", run["metrics"].get("model")))
        label = run["name"] + (" (tiny model, not comparable)" if tiny else "")  # beside the paper's rows below
        lines.append("| " + " | ".join([label] + cells) + " |")
    if any(s in PAPER_COLUMNS for s in sets):
        for label, row in paper_rows().items():
            cells = [f"{row[PAPER_COLUMNS[s]]:.2f}" if PAPER_COLUMNS.get(s) in row else "" for s in sets]
            lines.append("| " + " | ".join([f"paper: {label}"] + cells) + " |")
    return "\n".join(lines)


def mcnemar_table(runs: list[dict]) -> str:
    """Every pair of runs, every set both evaluated, on the ids both answered."""
    lines = ["| A | B | set | paired n | acc A | acc B | b (A only) | c (B only) | p exact | p χ² |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ra, rb in itertools.combinations(runs, 2):
        for s in set_names([ra, rb]):
            keys = sorted(k for k in ra["correct"] if k[0] == s and k in rb["correct"])
            if not keys:
                continue
            a = [ra["correct"][k] for k in keys]
            b = [rb["correct"][k] for k in keys]
            t = mcnemar(a, b)
            lines.append(f"| {ra['name']} | {rb['name']} | {s} | {len(keys)} | {100 * sum(a) / len(a):.1f} | "
                         f"{100 * sum(b) / len(b):.1f} | {t.b} | {t.c} | {t.p_exact:.3g} | {t.p_chi2:.3g} |")
    return "\n".join(lines)


# the keys eval.py writes under sets[name]["reasoning"] (reasoning.REASONING_KEYS + the process reward);
# named here because tools/report.py reads finished runs without importing eval.py and its torch
REASONING_COLUMNS = {"reasoning_accuracy": "reasoning acc.", "knowledge_accuracy": "knowledge acc.",
                     "rigor": "rigor", "professionalism": "professionalism", "clarity": "clarity",
                     "conciseness": "conciseness", "process_score": "process reward"}


def reasoning_table(runs: list[dict]) -> str | None:
    """One row per judged (run, set): the judge, how many items the means cover, each mean (0-1).
    None when no run was judged."""
    lines = ["| run | set | judge | judged / n | " + " | ".join(REASONING_COLUMNS.values()) + " |",
             "|" + "---|" * (4 + len(REASONING_COLUMNS))]
    for run in runs:
        judge = run["metrics"].get("judge", {})
        label = judge.get("kind", "?") + (f" ({judge['model']})" if "model" in judge else "")
        for s, m in run["metrics"]["sets"].items():
            r = m.get("reasoning")
            if r is None:
                continue
            cells = ["–" if r.get(k) is None else f"{r[k]:.2f}" for k in REASONING_COLUMNS]
            lines.append(f"| {run['name']} | {s} | {label} | {r['n_judged']} / {m['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def controls_table(runs: list[dict]) -> str | None:
    """One row per (run, set) answered with eval.py's image_controls: accuracy % on the real images and
    under each control ("–": skipped). None when no run has controls."""
    controls = list(dict.fromkeys(c for run in runs for m in run["metrics"]["sets"].values()
                                  for c in m.get("controls", {})))
    lines = ["| run | set | n | real images | " + " | ".join(controls) + " |", "|" + "---|" * (4 + len(controls))]
    for run in runs:
        for s, m in run["metrics"]["sets"].items():
            if "controls" in m:
                shown = [m["controls"].get(c, {}) for c in controls]
                cells = [f"{100 * c['accuracy']:.1f}" if "accuracy" in c else "–" for c in shown]
                lines.append(f"| {run['name']} | {s} | {m['n']} | {100 * m['accuracy']:.1f} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines) if controls else None


def kinds_table(runs: list[dict]) -> str | None:
    """One row per (run, set) holding open questions: closed and open counts, closed accuracy, and on the open
    ones exact match, token F1, recall and judged accuracy % (eval.py with judge=; "–" without). None when no
    set of any run has open questions."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| run | set | closed | closed acc | open | exact | F1 | recall | judged |", "|---" * 9 + "|"]
    for run in runs:
        for s, m in run["metrics"]["sets"].items():
            kinds = m.get("kinds", {})
            if kinds.get("open"):
                judged = m.get("reasoning", {}).get("open_judged")
                lines.append(f"| {run['name']} | {s} | {kinds.get('closed', 0)} | {pct(m.get('closed_accuracy'))} | "
                             f"{kinds['open']} | {pct(m['open_exact'])} | {pct(m['open_f1'])} | "
                             f"{pct(m['open_recall'])} | {pct(judged)} |")
    return "\n".join(lines) if len(lines) > 2 else None


# a set whose gold answers take at most this many distinct texts gets a matrix, others a list
MAX_MATRIX_LABELS = 12


def confusion_labels(counts: dict[tuple[str, str], int]) -> list[str] | None:
    """The gold labels in a fixed order, or None when the set has no fixed label set (too many)."""
    gold = sorted({g for g, _ in counts})
    return gold if 0 < len(gold) <= MAX_MATRIX_LABELS else None


def top_confusions(counts: dict[tuple[str, str], int], k: int = 10) -> str:
    """The k most frequent (gold, predicted) pairs that differ, as a markdown table."""
    wrong = sorted(((n, g, p) for (g, p), n in counts.items() if g != p), key=lambda t: (-t[0], t[1], t[2]))[:k]
    total = sum(counts.values())
    lines = ["| gold | predicted | items | % of set |", "|---|---|---|---|"]
    lines += [f"| {g} | {p} | {n} | {100 * n / total:.1f} |" for n, g, p in wrong]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def write_report(run_dirs: list[str], out_dir: str, train_dirs: tuple[str, ...] = ()) -> str:
    """report.md, accuracy.png, a confusion picture per (run, set) with a fixed label set and, for
    each training output_dir in train_dirs, its main curves, in out_dir. -> the path of report.md."""
    runs = [load_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    # a report replaces the one there: its pictures go too, or those of runs no longer in it would stay
    stale = [n for n in os.listdir(out_dir) if n == "report.md" or n.endswith(".png")]
    if stale:
        print(f"replacing the report in {out_dir} (give --out for another directory)")
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    plot_accuracy(runs, set_names(runs), os.path.join(out_dir, "accuracy.png"))
    notes = caveats(runs)
    parts = ["# Evaluation report", "",
             "Accuracy %, Wilson 95% interval in brackets. Paper rows: PathVLM-R1 Table V (PathMMU) and "
             "Table IV (OmniMedVQA, out of distribution; its base model is Qwen2.5-VL-7B).", "",
             *[f"> {note}\n" for note in notes],
             accuracy_table(runs), "", "![accuracy per set](accuracy.png)", ""]
    kinds = kinds_table(runs)
    if kinds is not None:
        parts += ["## Open questions", "",
                  "Sets with open questions (no options), % per kind: the accuracy above counts a closed item by its "
                  "letter and an open one by exact match after normalisation (openqa.normalise); F1 and recall are "
                  "token overlap with the best reference, judged is a judge's equivalence verdict (eval.py judge=).",
                  "", kinds, ""]
    controls = controls_table(runs)
    if controls is not None:
        parts += ["## Image-reliance controls", "",
                  "Accuracy % on the same questions with every image blank (mid-grey) or swapped for another item's "
                  "(shuffled). A model that reads the image falls to chance there; one that stays near its real-image "
                  "accuracy answers from the text.", "", controls, ""]
    reasoning = reasoning_table(runs)
    if reasoning is not None:
        parts += ["## Reasoning quality", "",
                  "Means (0-1) of a judge's scores (pathvlm/reasoning.py's REASONING_RUBRIC; process reward: "
                  "rewards.py's rubric, "
                  "the one GRPO trains on). Items whose judge reply failed or did not parse are left out: "
                  "judged / n. Compare runs graded by the same judge only.", "",
                  reasoning, ""]
    if len(runs) > 1:
        parts += ["## Paired comparisons (McNemar)", "",
                  "b: items A got right and B wrong; c: the reverse. Items paired by (set, id).", "",
                  mcnemar_table(runs), ""]
    parts += confusion_section(runs, out_dir)
    if train_dirs:
        parts += ["## Training curves", ""]
        for d in train_dirs:
            name = os.path.basename(os.path.normpath(d))
            plot_curves(os.path.join(d, "metrics.jsonl"), os.path.join(out_dir, f"curves_{name}.png"), MAIN_CURVES)
            parts += [f"![{name} training curves](curves_{name}.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def confusion_section(runs: list[dict], out_dir: str) -> list[str]:
    """Markdown lines: per run and set, a matrix picture (fixed label set) or the top confusions."""
    parts = []
    for run in runs:
        for s, counts in run["confusion"].items():
            if not counts:  # predictions written before eval.py recorded option texts
                continue
            labels = confusion_labels(counts)
            title = f"{run['name']} on {s}"
            if labels is None:
                parts += [f"**{title}**: most frequent confusions", "", top_confusions(counts), ""]
            else:
                png = f"confusion_{safe_name(run['name'])}_{safe_name(s)}.png"
                plot_confusion(counts, labels, title, os.path.join(out_dir, png))
                parts += [f"![{title}: gold vs predicted]({png})", ""]
    return ["## What was confused with what", "",
            "Gold answer (rows) against the predicted one, by option text; \"unparsed\": no option could be read.",
            ""] + parts if parts else []


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "curves":
        parser = argparse.ArgumentParser(prog="tools/report.py curves", description="plot a training metrics.jsonl")
        parser.add_argument("metrics", help="a training run's metrics.jsonl")
        parser.add_argument("--out", default=None, help="PNG path (default: curves.png beside the metrics)")
        args = parser.parse_args(argv[1:])
        out = args.out or os.path.join(os.path.dirname(args.metrics), "curves.png")
        keys = plot_curves(args.metrics, out)
        print(f"wrote {out}: {', '.join(keys)}")
        return
    parser = argparse.ArgumentParser(prog="tools/report.py", description="accuracy and McNemar tables over eval runs")
    parser.add_argument("runs", nargs="+", help="eval.py output directories")
    parser.add_argument("--out", default="runs/report", help="directory for report.md and its pictures")
    parser.add_argument("--train", nargs="*", default=[], help="training output_dirs whose curves to draw")
    args = parser.parse_args(argv)
    for d in args.train:
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            sys.exit(f"--train {d}: no metrics.jsonl there (is it a train_sft.py / train_grpo.py output_dir?)")
    real = [os.path.realpath(d) for d in args.runs]
    twice = next((d for i, d in enumerate(args.runs) if real[i] in real[:i]), None)
    if twice:  # a run against itself: every McNemar p 1, every row doubled
        raise BadInput(f"{twice} is given twice: give each evaluation once")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BadInput(f"--out {args.out} is a file: give a directory for report.md and its pictures")
    path = write_report(args.runs, args.out, tuple(args.train))
    print(open(path).read())
    print(f"wrote {path}")


if __name__ == "__main__":
    run_script(main)
