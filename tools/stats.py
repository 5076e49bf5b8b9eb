"""Is an ablation's difference real? A test whose unit is the trained model, and a simulator to check it.

An ablation asks whether changing training changes accuracy, so its noise is training randomness (which
model a seed happens to train) as well as the test items. McNemar's test on the pooled (seed, item) pairs
(mcnemar below: right for two fixed models on the same items, as tools/report.py uses it) treats 3 seeds x
300 items as 900 independent answers: it conditions on the trained models and sees only the items. In the
simulator below, made to look like docs/ablations.md's ablation (seed sd 4 points, 80% of it shared by the seed's
two models), it rejects 17% of variants that are no different at the 5% level; 45% at seed sd 6, half shared.

The design is paired twice. Each seed s has one SFT model that the baseline and the variant both start from,
and both answer the same N test items, so with z[s, i] = variant right - baseline right (item i, seed s):

    d_s  = mean_i z[s, i]                    the seed's paired difference
    d    = mean_s d_s                        the estimate
    SE^2 = var_s(d_s)/S + max(0, var_i(zbar_i)/N - var(z)/(S·N))      zbar_i = mean_s z[s, i]
    t    = d / SE with S - 1 degrees of freedom;  95% interval d ± t_{S-1, 0.975}·SE

The first term is the paired t over seeds: the seeds' spread holds training randomness and each seed's
item noise. The second is what the items share across seeds (a variant better at one kind of item is so in
every seed), which the seeds' spread cannot see: the item part of a two-way clustered variance (Cameron,
Gelbach & Miller 2011: V_seed + V_item - V_cell), floored at 0 so it never shrinks the seed term. Without
it, 10 seeds give 21% false positives where such items exist (simulate's variant_item_sd = 1.5; ours 3%). S - 1
degrees of freedom because seeds are what is scarce: at S = 3 the interval is d ± 4.30·SE, not 1.96·SE.
Three seeds cannot show a 3-point difference (power 16%); ten can, mostly (74%).

Why not the alternatives: a two-level bootstrap (resample seeds, then items within) has 10 distinct seed
resamples at S = 3, so its interval is too narrow (8% to 19% false positives at 5% in the simulator); a
mixed-effects logistic model needs an optimiser to say the same thing at the seed level. This is numpy, a page.
The t distribution is computed here, for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4).
"""

import math
from typing import Callable, NamedTuple

import numpy as np
import scipy.stats

from pathvlm.errors import BadInput


# ----------------------------------------------------------------------------------------------
# Student's t and McNemar's test, from scipy.stats

def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|), T ~ t(df)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(2 * scipy.stats.t.sf(abs(t), df))


def t_quantile(q: float, df: int) -> float:
    """The t(df) value with P(T <= x) = q."""
    return float(scipy.stats.t.ppf(q, df))


class McNemar(NamedTuple):
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    p_exact: float  # exact binomial test on the discordant pairs
    p_chi2: float  # chi² with continuity correction, (|b - c| - 1)² / (b + c)


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> McNemar:
    """McNemar's test on paired items (the same questions answered by two models, tools/report.py). Only
    the discordant pairs count: under H0 each is equally likely to favour A or B, so the exact p is the
    two-sided binomial test of b in b + c at 1/2."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired lists differ in length: {len(a_correct)} vs {len(b_correct)}")
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    if b + c == 0:
        return McNemar(b, c, 1.0, 1.0)
    p_exact = float(scipy.stats.binomtest(b, b + c, 0.5).pvalue)
    # as R's mcnemar.test and statsmodels: the correction is not clipped at 0, so b = c gives p < 1
    # for small b; the exact p is the one to trust there
    p_chi2 = float(scipy.stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1))
    return McNemar(b, c, p_exact, p_chi2)


# ----------------------------------------------------------------------------------------------
# The test, and Holm's correction for several variants against one baseline

class Difference(NamedTuple):
    diff: float  # variant - baseline accuracy, in points
    low: float  # 95% interval, points (nan with one seed: training randomness is not measured)
    high: float
    p: float  # two-sided, t with seeds - 1 df (nan with one seed)
    seeds: int
    items: int
    note: str = ""  # what the table must say beside the numbers: no variation seen, 1 degree of freedom, nan


def seed_item_test(base: np.ndarray, variant: np.ndarray, level: float = 0.95) -> Difference:
    """Paired test of variant against baseline over seeds and items (the module docstring's equations).
    base, variant: (S, N) right/wrong, row s from seed s's SFT model, column i the same item in both."""
    base, variant = np.asarray(base, dtype=float), np.asarray(variant, dtype=float)
    if base.shape != variant.shape or base.ndim != 2:
        raise ValueError(f"expected two (seeds, items) arrays of one shape, got {base.shape} and {variant.shape}")
    z = variant - base  # (S, N)
    n_seeds, n_items = z.shape
    if not np.isfinite(z).all():  # an answer missing (None) or not a number: no test rather than p = 0
        return Difference(math.nan, math.nan, math.nan, math.nan, n_seeds, n_items,
                          "not tested: a run has no right/wrong for some item")
    diff = 100 * z.mean()
    if n_seeds < 2:
        return Difference(diff, math.nan, math.nan, math.nan, n_seeds, n_items)
    v_seed = z.mean(axis=1).var(ddof=1) / n_seeds
    v_item = z.mean(axis=0).var(ddof=1) / n_items if n_items > 1 else 0.0
    v_cell = z.var(ddof=1) / (n_seeds * n_items)
    se = 100 * math.sqrt(v_seed + max(0.0, v_item - v_cell))
    if se == 0:  # every seed gave the same difference: no variation was seen, which is no certainty
        return Difference(diff, math.nan, math.nan, math.nan, n_seeds, n_items,
                          f"not tested: no variation seen over {n_seeds} seeds (standard error 0)")
    half = t_quantile((1 + level) / 2, n_seeds - 1) * se
    note = "1 degree of freedom (2 seeds): a wide interval resting on two draws" if n_seeds == 2 else ""
    return Difference(diff, diff - half, diff + half, t_two_sided_p(diff / se, n_seeds - 1), n_seeds, n_items, note)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the k-th smallest p is multiplied by
    m - k + 1 (m tests), then made non-decreasing and capped at 1. nan (no test) stays nan, not counted."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# A simulated ablation where the truth is known

def simulate(rng: np.random.Generator, seeds: int, items: int, diff: float, seed_sd: float,
             shared: float = 0.8, base_accuracy: float = 0.68, item_sd: float = 3.0, sft_item_sd: float = 3.0,
             variant_item_sd: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One baseline-vs-variant ablation -> (base, variant), each (seeds, items) of right/wrong.

    Per seed, each of the two models has an accuracy on the population of items the test set is drawn from
        acc[v, s] = base_accuracy + (diff·[v = variant] + u[v, s]) / 100     (diff, u in points)
        u[v, s] = seed_sd·(sqrt(shared)·a_s + sqrt(1 - shared)·e[v, s]),    a, e ~ N(0, 1)
    so diff is the true difference, seed_sd the sd over seeds of one variant's accuracy (training
    randomness) and `shared` the correlation of two variants' accuracies through their seed's SFT model.
    The test set: `items` fresh items, P(right) = sigmoid(shift[v, s] + b_i + c[s, i] + w[v, i]) with
        b_i ~ N(0, item_sd²)            difficulty, the same for every model
        c[s, i] ~ N(0, sft_item_sd²)    what seed s's SFT model knows of item i, shared by its two models
        w[v, i] ~ N(0, variant_item_sd²) items one variant is better at, in every seed
    and shift[v, s] solved (Newton, Gauss-Hermite over the item population) so the population accuracy is
    acc[v, s]. The defaults give ~16% of paired answers discordant; docs/ablations.md's run had 2% (kl_coef=0)
    to 22% (γ), and 0.67 to 0.94 for `shared`."""
    a, e = rng.standard_normal(seeds), rng.standard_normal((2, seeds))
    u = seed_sd * (math.sqrt(shared) * a + math.sqrt(1 - shared) * e)  # (2, S)
    accuracy = np.clip(base_accuracy + (np.array([[0.0], [diff]]) + u) / 100, 0.02, 0.98)[..., None]  # (2, S, 1)
    # population accuracy of a model = E sigmoid(shift + τ·x), x ~ N(0, 1), τ² the item terms' total variance
    x, weight = np.polynomial.hermite_e.hermegauss(40)
    weight = weight / weight.sum()
    tau = math.sqrt(item_sd ** 2 + sft_item_sd ** 2 + variant_item_sd ** 2)
    shift = np.zeros((2, seeds, 1))
    for _ in range(30):  # population accuracy is increasing and smooth in shift
        prob = 1 / (1 + np.exp(-(shift + tau * x)))  # (2, S, 40)
        slope = (prob * (1 - prob) * weight).sum(-1, keepdims=True)
        shift -= ((prob * weight).sum(-1, keepdims=True) - accuracy) / slope
    logit = (shift + rng.normal(0, item_sd, items) + rng.normal(0, sft_item_sd, (seeds, items))
             + rng.normal(0, variant_item_sd, (2, 1, items)))  # (2, S, N)
    right = rng.random(logit.shape) < 1 / (1 + np.exp(-logit))  # (2, S, N)
    return right[0], right[1]


def rejection_rate(test: Callable[[np.ndarray, np.ndarray], float], sims: int, seed: int = 0,
                   alpha: float = 0.05, **ablation) -> float:
    """The fraction of `sims` simulated ablations (simulate(**ablation)) in which test(base, variant),
    a p-value, is below alpha: the false-positive rate when diff = 0, the power otherwise."""
    rng = np.random.default_rng(seed)
    return float(np.mean([test(*simulate(rng, **ablation)) < alpha for _ in range(sims)]))


def seed_item_p(base: np.ndarray, variant: np.ndarray) -> float:
    return seed_item_test(base, variant).p


def seeds_needed(diff: float, seed_sd: float, items: int, power: float = 0.8, sims: int = 400,
                 max_seeds: int = 40, seed: int = 0, **ablation) -> tuple[int | None, list[tuple[int, float]]]:
    """How many seeds (per variant) detect a true difference of `diff` points with this power at 5%,
    by simulation -> (seeds or None when max_seeds is not enough, [(seeds, power)] as tried)."""
    tried = []
    for n in range(2, max_seeds + 1):
        tried.append((n, rejection_rate(seed_item_p, sims, seed, seeds=n, items=items, diff=diff,
                                        seed_sd=seed_sd, **ablation)))
        if tried[-1][1] >= power:
            return n, tried
    return None, tried


# ----------------------------------------------------------------------------------------------
# The simulator's spreads, estimated from an ablation already run

def _discordance(models: np.ndarray, same_seed: bool) -> float:
    """models: (M, S, N) right/wrong, model 0 the baseline -> how often two models answer an item differently:
    the baseline and another model of the same seed (same_seed), or two baselines of different seeds."""
    if same_seed:
        return float(np.mean(models[0][None] != models[1:]))
    base = models[0]
    return float(np.mean([np.mean(base[a] != base[b]) for a in range(len(base)) for b in range(a + 1, len(base))]))


def estimate_spreads(models: np.ndarray, sims: int = 20, seed: int = 0,
                     grid: tuple = tuple(np.arange(0.0, 6.01, 0.5))) -> dict:
    """An ablation's answers -> the simulate() settings that look like it, for seeds_needed.

    models: (M, S, N) right/wrong, model 0 the baseline and 1... the variants, row s from seed s, S >= 3.
      seed_sd   the sd over seeds of a model's accuracy (root mean square over models; it holds the item
                noise of the test set too, so it errs on the side of more seeds)
      shared    the correlation over seeds of the baseline's and a variant's accuracy (mean over variants)
      item_sd, sft_item_sd   on the grid, the pair whose simulated ablations (same S, N, accuracy, seed_sd,
                shared; no true difference) are nearest in two observed rates: how often the baseline and a
                variant of one seed disagree on an item (both terms move it), and how often two seeds'
                baselines do (only sft_item_sd and chance move it apart)
    Every estimate from a handful of seeds is rough: the caller says it was estimated, and from how many."""
    models = np.asarray(models, dtype=bool)
    n_models, n_seeds, n_items = models.shape
    if n_models < 2 or n_seeds < 3:
        raise ValueError(f"estimating the spreads needs a baseline, a variant and 3 or more seeds; got {n_models} "
                         f"model(s) x {n_seeds} seed(s)")
    accuracy = 100 * models.mean(axis=2)  # (M, S)
    seed_sd = float(np.sqrt(np.mean(accuracy.var(axis=1, ddof=1))))
    corr = [np.corrcoef(accuracy[0], accuracy[m])[0, 1] for m in range(1, n_models)]
    shared = float(np.clip(np.nanmean(corr) if not np.isnan(corr).all() else 0.0, 0.0, 0.99))
    observed = np.array([_discordance(models, True), _discordance(models, False)])
    base_accuracy = float(np.clip(models[0].mean(), 0.05, 0.95))
    best = None
    for item_sd in grid:
        for sft_item_sd in grid:
            rng = np.random.default_rng(seed)  # the same draws at every grid point: a smooth criterion
            rates = np.mean([[_discordance(np.stack(pair), same) for same in (True, False)] for pair in
                             (simulate(rng, n_seeds, n_items, 0.0, seed_sd, shared, base_accuracy, item_sd,
                                       sft_item_sd) for _ in range(sims))], axis=0)
            distance = float(np.sum((rates - observed) ** 2))
            if best is None or distance < best[0]:
                best = (distance, float(item_sd), float(sft_item_sd))
    return {"seed_sd": seed_sd, "shared": shared, "item_sd": best[1], "sft_item_sd": best[2],
            "seeds": n_seeds, "items": n_items, "base_accuracy": base_accuracy}


# what --power assumes where neither the user nor an ablation's runs say: docs/ablations.md's demo ablation
# (seed sd 4 points, 80% of it shared) and simulate's item spreads
POWER_DEFAULTS = {"seed_sd": 4.0, "shared": 0.8, "item_sd": 3.0, "sft_item_sd": 3.0, "items": 300}


def power_report(diff: float, given: dict, estimated: dict, source: str, sims: int, max_seeds: int) -> str:
    """--power: the seeds needed for 80% power at 5% (seeds_needed), with the power at each count tried. Each
    setting is the given one, else the estimated one (estimate_spreads of the runs in `source`), else
    POWER_DEFAULTS; the header says which of the three each value is."""
    settings, origin = {}, {}
    for key, default in POWER_DEFAULTS.items():
        for value, said in ((given.get(key), "given"), (estimated.get(key), "estimated"), (default, "default")):
            if value is not None:
                settings[key], origin[key] = value, said
                break
    bounds = {"--diff": (diff, -100, 100), "--seed-sd": (settings["seed_sd"], 0, 100),
              "--shared": (settings["shared"], 0, 1), "--items": (settings["items"], 1, 10**6),
              "--item-sd": (settings["item_sd"], 0, 20), "--seed-item-sd": (settings["sft_item_sd"], 0, 20), "--sims": (sims, 1, 10**6),
              "--max-seeds": (max_seeds, 2, 1000)}
    for option, (value, low, high) in bounds.items():  # else nan powers, or a math domain error deep in simulate
        if not (isinstance(value, (int, float)) and low <= value <= high):
            raise BadInput(f"--power: {option} must be between {low} and {high}, got {value}")
    needed, tried = seeds_needed(diff, settings["seed_sd"], settings["items"], sims=sims, max_seeds=max_seeds,
                                 shared=settings["shared"], item_sd=settings["item_sd"],
                                 sft_item_sd=settings["sft_item_sd"])
    names = {"seed_sd": "seed sd (points)", "shared": "shared by the seed's two models", "items": "items",
             "item_sd": "item spread (logit sd)", "sft_item_sd": "seed-by-item spread (logit sd)"}
    lines = [f"true difference {diff:g} points; {sims} simulated ablations per row"]
    lines += [f"  {names[k]}: {settings[k]:.3g} ({origin[k]})" for k in names]
    if "estimated" in origin.values():
        lines.append(f"  estimated from {source}: rough from {estimated['seeds']} seeds; give a value to override it")
    lines += ["seeds  power"] + [f"{n:5d}  {power:.2f}" for n, power in tried]
    lines.append(f"{needed} seeds per variant give 80% power" if needed else
                 f"more than {max_seeds} seeds per variant: 80% power is out of reach")
    return "\n".join(lines)
