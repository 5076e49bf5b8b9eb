"""tools/report.py's pictures: accuracy per set and run, a confusion matrix, a training run's curves; and
tools/ablate.py's: accuracy per variant.
matplotlib draws into files only (no display); it is imported when a picture is asked for.
"""

import math

from pathvlm.evaluation import read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(runs: list[dict], sets: list[str], path: str):
    """Grouped bars: one group per set, one bar per run, Wilson 95% CI as error bars."""
    plt = _pyplot()
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sets) * max(1, len(runs) / 2) + 2), 3.5))
    for i, run in enumerate(runs):
        xs, ys, lo, hi = [], [], [], []
        for j, s in enumerate(sets):
            m = run["metrics"]["sets"].get(s)
            if m is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * m["accuracy"])
            lo.append(100 * (m["accuracy"] - m["ci_low"]))
            hi.append(100 * (m["ci_high"] - m["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=run["name"])
    ax.set_xticks(range(len(sets)), sets, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(counts: dict[tuple[str, str], int], labels: list[str], title: str, path: str):
    """Rows: gold answer; columns: predicted answer (+ "unparsed"). Cells: item counts, shaded by the
    row's share, so a class the model never names is a pale column whatever the class sizes."""
    plt = _pyplot()
    columns = labels + sorted({p for _, p in counts if p not in labels})  # "unparsed", or a text outside the labels
    cells = [[counts.get((g, p), 0) for p in columns] for g in labels]
    shares = [[n / max(sum(row), 1) for n in row] for row in cells]
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.2, 0.8 * len(labels) + 1.6))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(cells):
        for j, n in enumerate(row):
            dark = shares[i][j] > 0.6
            ax.text(j, i, str(n), ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# the curves worth a first look, in this order; plot_curves(keys=None) draws every numeric key
MAIN_CURVES = ("loss", "eval_loss", "reward/total", "accuracy", "format_rate", "eval_accuracy", "kl",
               "completion_len_mean", "lr", "reward/process/fallback")
# drawn on the same axes as the first: a process reward rising while accuracy stays flat is what a policy
# learning its judge (reward hacking) looks like, and it shows best where the two lines meet
OVERLAYS = {"accuracy": "reward/process"}


def plot_curves(metrics_path: str, path: str, keys: tuple[str, ...] | None = None) -> list[str]:
    """One subplot per numeric key (or per one of `keys` the run logged) of a training run's
    metrics.jsonl, against "step". -> the keys drawn."""
    plt = _pyplot()
    rows = read_jsonl(metrics_path)
    series: dict[str, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, ([], []))
                series[key][0].append(step)
                series[key][1].append(value)
    full = series
    if keys is not None:
        series = {k: series[k] for k in keys if k in series}
    if not series:
        raise ValueError(f"{metrics_path}: no numeric values to plot")
    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    overlays = {k: v for k, v in OVERLAYS.items() if k in series and v in full}
    for ax, (key, (xs, ys)) in zip(axes.flat, series.items()):
        ax.plot(xs, ys, lw=1, marker="o" if len(xs) < 30 else None, ms=3, label=key)  # a few evals: show the points
        if key in overlays:
            ax.plot(*full[overlays[key]], lw=1, color="tab:red", label=overlays[key])
            ax.legend(fontsize=7)
        ax.set_title(key if key not in overlays else f"{key} and {overlays[key]}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if "loss" in key and min(ys) > 0:
            ax.set_yscale("log")  # SFT's loss falls by orders of magnitude: on a linear axis the end is a flat line
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(series)


def plot_ablation(accuracy: dict[str, list[float]], path: str, primary: str):
    """One bar per variant (its mean accuracy over seeds), one dot per seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(accuracy)), 4))
    for i, acc in enumerate(accuracy.values()):
        ax.bar(i, sum(acc) / len(acc), color="#9bb7d4")
        ax.scatter([i] * len(acc), acc, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(accuracy)), list(accuracy), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{primary} test accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
