"""`mlds analyze`: the analysis the datasets exist for (docs/workloads.md §10), as a report with figures.

Registered in :data:`mlds_cli.main.COMMANDS` as ``analyze``. Reads one or more dataset folders through
:func:`mlds_data.dataset.load` (pull an S3 dataset first), and writes ``report.md``, ``report.json``
and three PNGs (matplotlib, Agg backend) to ``--out``.

Protocol (docs/workloads.md §10, with the choices below):

- **Features**: the flattened weights, one row per network (4,364 values for the ds1 network),
  standardised (a ``StandardScaler`` fitted on the training part of each split only).
- **Tasks**: (a) which ds1 machine (5-way); (b) which of the ds1 + ds2 machines (10-way); (c) for each
  machine present in both, clean (ds1) vs modified (ds2). Any other dataset with several targets gets
  a "which target" task.
- **Classifiers**: k-NN (k=3: with 8 networks per target a fold trains on 6 or 7 per class, and k=5
  would let one class's neighbourhood be outvoted by construction), logistic regression (L2, C=1),
  a random forest (100 trees) and a small MLP (one hidden layer of 32, L2 1e-3, Adam).
- **Evaluation**: repeated stratified k-fold, ``--seeds`` repetitions (default 5) of ``--folds``
  folds (default 5). Each fold *is* a stratified 80/20 split; over one repetition every network is
  tested exactly once, so a seed's accuracy is over all networks rather than over the 1 or 2 per class
  an 80/20 split of a small dataset would test. The spread is over the seeds (mean, sample standard
  deviation, min and max). ``--test-size 0.2`` switches to the literal protocol instead: one stratified
  shuffled split per seed. Folds are capped at the smallest class's size.
- **Also from the weights, not in the spec: canonical weights and per-tensor statistics.** Hidden
  units can be permuted (and tanh units negated) without changing what a network computes, so the raw
  weights of independently initialised networks are not aligned coordinate by coordinate; with tens of
  networks per target the raw protocol can sit near chance. Two feature sets remove that symmetry,
  each reported beside the raw result, never instead of it:

  - *canonical weights* (GRU networks only): the same 4,364 flattened weights after
    :func:`mlds_data.canonical.canonicalize` has sign-normalised and sorted every network's hidden
    units. Each network still computes what it did; only the coordinates are made comparable.
  - *weight statistics*: for each parameter tensor, its mean, standard deviation, mean absolute value
    and 7 quantiles (min, 10%, 25%, median, 75%, 90%, max), which no permutation changes (10 x 26 = 260
    features for the ds1 network).

  Both are standardised like the raw weights.
- **Baseline**: the same classifiers on the final losses only (log10 of training and evaluation MSE,
  standardised): every converged network meets the same criterion, so the spec expects this near
  chance. Also, separately, the evaluation loss alone: the criterion bounds only that loss, while the
  final training loss is free to differ by target (and does: see the reference study). Chance is the
  majority class's share.
- **Figures**: ``projection.png`` (PCA of the standardised raw and canonical weights, t-SNE of the
  canonical ones, coloured by target),
  ``confusion.png`` (out-of-fold predictions of the classifier with the best mean accuracy, summed
  over seeds, for each multi-class task), ``accuracy.png`` (each classifier on weights against the
  loss-only baseline, per task, with chance marked).

Classifiers that stop at their iteration cap (scikit-learn's ConvergenceWarning) still give their
predictions; the number of such fits is recorded in the report rather than raised.

Threads: BLAS and OpenMP are held to one thread while classifiers fit (``threadpool_limits``). The
matrices are tiny (tens of networks); with default threads, logistic regression fitted 25 times slower
on a shared 2-core machine (spin-waiting threads, as docs/workloads.md §4 notes for training).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from mlds_data.canonical import canonicalize, is_gru_layout
from mlds_data.dataset import Networks, load

__all__ = [
    "CLASSIFIERS",
    "FEATURES",
    "Task",
    "analyze",
    "analyze_command",
    "evaluate",
    "make_classifier",
    "render_markdown",
    "tasks_for",
    "weight_statistics",
]

#: name -> what the report calls it.
CLASSIFIERS: dict[str, str] = {
    "knn": "k-NN (k=3)",
    "logreg": "logistic regression",
    "forest": "random forest (100 trees)",
    "mlp": "MLP (32 hidden)",
}

#: Feature sets: name -> what the report calls it. "weights" is the spec's protocol; "canonical" exists
#: only for the GRU network; "loss" is the spec's baseline, "eval_loss" the criterion's loss alone.
FEATURES: dict[str, str] = {
    "weights": "raw weights",
    "canonical": "canonical weights",
    "stats": "weight statistics",
    "loss": "losses only",
    "eval_loss": "evaluation loss only",
}
#: The baselines among FEATURES: no weights in them.
BASELINES = ("loss", "eval_loss")
DEFAULT_SEEDS = 5
DEFAULT_FOLDS = 5
#: k-NN's k (see the module docs); lowered for a split whose smallest training class is smaller.
KNN_NEIGHBOURS = 3
#: Networks per class below which a task's accuracies are marked as not meaningful: with fewer, one
#: network more or less right moves the accuracy by 5 points or more, and the spread over seeds
#: (which re-split the same few networks) understates how uncertain it is.
MIN_RELIABLE_PER_CLASS = 10
FIGURES = ("projection.png", "confusion.png", "accuracy.png")


def make_classifier(name: str, seed: int, *, neighbours: int = KNN_NEIGHBOURS) -> Any:
    """A fresh pipeline: standardise, then classifier ``name`` (seeded where it is random).

    ``neighbours`` is k-NN's k; :func:`evaluate` lowers it when a training split has fewer networks of
    some class than that (tiny datasets), which scikit-learn would otherwise refuse.
    """
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415 - scikit-learn loads in seconds
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.neighbors import KNeighborsClassifier  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    models: dict[str, Callable[[], Any]] = {
        "knn": lambda: KNeighborsClassifier(n_neighbors=neighbours),
        "logreg": lambda: LogisticRegression(C=1.0, max_iter=2000),
        "forest": lambda: RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-3, max_iter=1000, random_state=seed),
    }
    if name not in models:
        raise click.BadParameter(f"unknown classifier {name!r}; choose from {', '.join(models)}")
    return make_pipeline(StandardScaler(), models[name]())


@dataclass
class Task:
    """One classification problem over a subset of the networks."""

    name: str  # machine-readable: machines-ds1, machines-ds1-ds2, modified-Parity, targets-ds3
    title: str
    rows: npt.NDArray[np.int64]  # indices into the Networks
    labels: npt.NDArray[Any]  # one class name per row
    kind: str  # "machines" | "modified" | "targets"
    dropped: dict[str, int] = field(default_factory=dict)  # classes left out (too few networks) -> count


def _base_machine(target: str) -> str:
    return target.removesuffix("Machine").removesuffix("Modified")


def tasks_for(nets: Networks) -> list[Task]:
    """The tasks docs/workloads.md §10 asks for, as far as the datasets at hand allow (see module docs)."""
    targets = nets.labels
    datasets = np.asarray([str(d) for d in nets.table.column("dataset").to_pylist()])
    tasks: list[Task] = []

    def add(name: str, title: str, mask: npt.NDArray[np.bool_], labels: npt.NDArray[Any], kind: str) -> None:
        if len(set(labels[mask].tolist())) >= 2:
            tasks.append(Task(name, title, np.flatnonzero(mask).astype(np.int64), labels[mask], kind))

    ds1, ds2 = datasets == "ds1", datasets == "ds2"
    n1, n2 = len(set(targets[ds1].tolist())), len(set(targets[ds2].tolist()))
    add("machines-ds1", f"Which machine, {n1}-way (ds1)", ds1, targets, "machines")
    if ds2.any():
        add("machines-ds2", f"Which machine, {n2}-way (ds2)", ds2, targets, "machines")
    if ds1.any() and ds2.any():
        add("machines-ds1-ds2", f"Which machine, {n1 + n2}-way (ds1 + ds2)", ds1 | ds2, targets, "machines")
        bases = np.asarray([_base_machine(t) for t in targets])
        clean = np.where(ds1, "clean", "modified")
        for base in dict.fromkeys(bases[ds1].tolist()):
            if base in set(bases[ds2].tolist()):
                mask = (ds1 | ds2) & (bases == base)
                add(f"modified-{base}", f"{base}: clean (ds1) vs modified (ds2)", mask, clean, "modified")
    for ds in sorted(set(datasets.tolist()) - {"ds1", "ds2"}):
        mask = datasets == ds
        n = len(set(targets[mask].tolist()))
        add(f"targets-{ds}", f"Which target, {n}-way ({ds})", mask, targets, "targets")
    return tasks


@dataclass
class Score:
    """Accuracy over seeds."""

    per_seed: list[float]
    not_converged: int = 0  # fits that stopped at their iteration cap
    neighbours: int | None = None  # k-NN: the smallest k used (lowered for small classes)

    def summary(self) -> dict[str, Any]:
        a = np.asarray(self.per_seed)
        return {
            "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()),
            "max": float(a.max()),
            "per_seed": [round(float(x), 6) for x in a],
            "fits_at_iteration_cap": self.not_converged,
            **({"knn_k_min": self.neighbours} if self.neighbours is not None else {}),
        }


@dataclass
class TaskResult:
    task: Task
    folds: int
    chance: float
    # feature set (a FEATURES key) -> classifier -> accuracy over seeds
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    # (feature set, classifier) -> out-of-fold predictions of every seed, concatenated
    predictions: dict[tuple[str, str], npt.NDArray[Any]] = field(default_factory=dict)

    def best(self, kind: str) -> str:
        """The classifier with the best mean accuracy on feature set ``kind``."""
        return max(self.scores[kind], key=lambda n: self.scores[kind][n].summary()["mean"])


def _splits(y: npt.NDArray[Any], seed: int, folds: int, test_size: float | None) -> list[tuple[Any, Any]]:
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit  # noqa: PLC0415

    x = np.zeros(len(y))
    if test_size is not None:
        return list(StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(x, y))
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))


def evaluate(
    features: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    y: npt.NDArray[Any],
    classifier: str,
    *,
    seeds: Sequence[int],
    folds: int,
    test_size: float | None = None,
) -> tuple[Score, npt.NDArray[Any]]:
    """Accuracy of ``classifier`` per seed, and the test predictions (in row order per seed; -1 where untested)."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # noqa: PLC0415 - see module docs

    with threadpool_limits(limits=1):
        return _evaluate(features, y, classifier, seeds=seeds, folds=folds, test_size=test_size)


def _evaluate(
    features: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    y: npt.NDArray[Any],
    classifier: str,
    *,
    seeds: Sequence[int],
    folds: int,
    test_size: float | None,
) -> tuple[Score, npt.NDArray[Any]]:
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415

    accs: list[float] = []
    capped = 0
    preds = []
    smallest_k: int | None = None
    for seed in seeds:
        pred = np.full(len(y), None, dtype=object)
        for train, test in _splits(y, seed, folds, test_size):
            neighbours = KNN_NEIGHBOURS
            if classifier == "knn":
                neighbours = max(1, min(KNN_NEIGHBOURS, int(np.unique(y[train], return_counts=True)[1].min())))
                smallest_k = neighbours if smallest_k is None else min(smallest_k, neighbours)
            model = make_classifier(classifier, seed, neighbours=neighbours)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(features[train], y[train])
            capped += sum(1 for w in caught if issubclass(w.category, ConvergenceWarning))
            pred[test] = model.predict(features[test])
        tested = np.asarray([p is not None for p in pred])
        accs.append(float(np.mean(pred[tested] == y[tested])))
        preds.append(pred)
    return Score(accs, capped, smallest_k), np.concatenate(preds)


def _loss_features(
    nets: Networks, rows: npt.NDArray[np.int64], names: Sequence[str] = ("train_loss", "eval_loss")
) -> npt.NDArray[np.float64]:
    table = nets.table.take(rows)
    cols = []
    for name in names:
        values = np.asarray(table.column(name).to_pylist(), dtype=np.float64)
        cols.append(np.log10(np.clip(values, 1e-30, None)))
    return np.stack(cols, axis=1)


#: Per-tensor statistics: mean, sd, mean |w|, then these quantiles.
_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def weight_statistics(weights: npt.NDArray[np.float32], nets: Networks) -> npt.NDArray[np.float64]:
    """Permutation-invariant features: 10 statistics of each parameter tensor (see module docs)."""
    cols: list[npt.NDArray[Any]] = []
    for p in nets.layout:
        w = weights[:, p.start : p.stop].astype(np.float64)
        cols += [w.mean(axis=1), w.std(axis=1), np.abs(w).mean(axis=1)]
        cols += list(np.quantile(w, _QUANTILES, axis=1))
    return np.stack(cols, axis=1)


def feature_sets(weights: npt.NDArray[np.float32], nets: Networks) -> dict[str, npt.NDArray[Any]]:
    """Every weight feature set for ``nets``, by FEATURES key (not the loss baseline)."""
    sets: dict[str, npt.NDArray[Any]] = {"weights": weights}
    if is_gru_layout(nets.layout):
        sets["canonical"] = canonicalize(weights, nets.layout)
    sets["stats"] = weight_statistics(weights, nets)
    return sets


def run_task(
    task: Task,
    features: dict[str, npt.NDArray[Any]],
    nets: Networks,
    *,
    classifiers: Sequence[str],
    seeds: Sequence[int],
    folds: int,
    test_size: float | None,
    jobs: int = 1,
    log: Callable[[str], None] = lambda _m: None,
) -> TaskResult | str:
    """Every classifier on every feature set and on losses for ``task``; or why the task cannot be run.

    A class of a single network cannot be both trained on and tested: it is dropped from the task (and
    listed in ``task.dropped``); the task is skipped if fewer than two classes remain. ``jobs`` > 1 runs
    the (feature set, classifier) evaluations in that many processes; every fit is seeded, so the
    numbers do not depend on it.
    """
    classes, counts = np.unique(task.labels, return_counts=True)
    lonely = {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n < 2}
    if lonely:
        keep = np.asarray([str(v) not in lonely for v in task.labels])
        task.rows, task.labels, task.dropped = task.rows[keep], task.labels[keep], lonely
        classes, counts = np.unique(task.labels, return_counts=True)
        task.title = re.sub(r"\d+-way", f"{len(classes)}-way", task.title)
    if len(classes) < 2:
        return f"fewer than two classes with at least 2 networks ({', '.join(f'{c} {n}' for c, n in lonely.items())})"
    y = task.labels
    k = min(folds, int(counts.min()))
    result = TaskResult(task, folds=k if test_size is None else 0, chance=float(counts.max() / counts.sum()))
    sets = {kind: f[task.rows] for kind, f in features.items()} | {
        "loss": _loss_features(nets, task.rows),
        "eval_loss": _loss_features(nets, task.rows, ["eval_loss"]),
    }
    work = [(kind, name) for kind in sets for name in classifiers]
    fits = len(work) * len(seeds) * (k if test_size is None else 1)
    log(
        f"{task.name}: {len(classes)} classes, {len(y)} networks (smallest class {int(counts.min())}); "
        f"{len(work)} evaluations ({len(sets)} feature sets x {len(classifiers)} classifiers), {fits:,} fits"
        + (f" in {jobs} processes" if jobs > 1 else "")
    )
    if jobs > 1:
        from joblib import Parallel, delayed  # type: ignore[import-untyped]  # noqa: PLC0415 - scikit-learn's own dependency

        outs = Parallel(n_jobs=jobs)(
            delayed(evaluate)(sets[kind], y, name, seeds=seeds, folds=k, test_size=test_size) for kind, name in work
        )
    else:
        outs = []
        for i, (kind, name) in enumerate(work, 1):
            t0 = time.monotonic()
            outs.append(evaluate(sets[kind], y, name, seeds=seeds, folds=k, test_size=test_size))
            score = outs[-1][0]
            label = CLASSIFIERS[name]
            if score.neighbours is not None and score.neighbours < KNN_NEIGHBOURS:
                label = f"k-NN (k lowered to {score.neighbours}: small classes)"
            took = time.monotonic() - t0
            log(f"  [{i}/{len(work)}] {FEATURES[kind]}, {label}: {float(np.mean(score.per_seed)):.3f} ({took:.1f} s)")
    for (kind, name), (score, pred) in zip(work, outs, strict=True):
        result.scores.setdefault(kind, {})[name] = score
        if kind not in BASELINES:
            result.predictions[kind, name] = pred
    return result


# ------------------------------------------------------------------------------------------- figures


def _palette(n: int) -> list[Any]:
    import matplotlib as mpl  # noqa: PLC0415

    cmap = mpl.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_projection(features: dict[str, npt.NDArray[Any]], nets: Networks, path: Path, seed: int = 0) -> dict[str, Any]:
    """PCA of the standardised raw (and canonical) weights, and t-SNE of the canonical ones where they
    exist (else of the raw ones); coloured by target, marker by dataset."""
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from sklearn.decomposition import PCA  # noqa: PLC0415
    from sklearn.manifold import TSNE  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    panels = []
    explained: dict[str, list[float]] = {}
    zp = np.empty(0)
    for kind in ("weights", "canonical"):
        if kind not in features:
            continue
        z = StandardScaler().fit_transform(features[kind])
        pca = PCA(n_components=min(50, *z.shape), random_state=seed).fit(z)
        zp = pca.transform(z)
        ratio = pca.explained_variance_ratio_
        explained[kind] = [float(v) for v in ratio[:2]]
        panels.append((f"PCA, {FEATURES[kind]}", zp[:, :2], f"PC1 ({ratio[0]:.1%}) / PC2 ({ratio[1]:.1%})"))
    n = len(zp)
    if n >= 10:
        perplexity = float(min(30.0, (n - 1) / 3))
        zt = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(zp)
        kind = "canonical" if "canonical" in features else "weights"
        panels.append((f"t-SNE of the first 50 PCs, {FEATURES[kind]}", zt, f"perplexity {perplexity:.0f}"))
    labels = nets.labels
    datasets = [str(d) for d in nets.table.column("dataset").to_pylist()]
    targets = list(dict.fromkeys(labels.tolist()))
    colours = dict(zip(targets, _palette(len(targets)), strict=True))
    markers = dict(zip(sorted(set(datasets)), "o^sDvP*X", strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, (title, pts, sub) in zip(axes[0], panels, strict=True):
        for t in targets:
            for ds, m in markers.items():
                sel = (labels == t) & (np.asarray(datasets) == ds)
                if sel.any():
                    ax.scatter(pts[sel, 0], pts[sel, 1], c=[colours[t]], marker=m, s=36, label=t, edgecolors="none")
        ax.set_title(f"{title}\n{sub}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    width = features["weights"].shape[1]
    fig.suptitle(f"{n} networks, standardised flattened weights ({width:,} values)")
    fig.tight_layout(rect=(0, 0, 0.8 if len(panels) < 3 else 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"pca_explained_variance": explained["weights"], "pca_explained_variance_by_features": explained}


def plot_confusions(results: Sequence[TaskResult], path: Path) -> dict[str, Any]:
    """Row-normalised confusion matrices of each multi-class task's best classifier (weights)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from sklearn.metrics import confusion_matrix  # noqa: PLC0415

    chosen = [r for r in results if r.task.kind != "modified"] or list(results[:1])
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.8 * len(chosen), 5.4), squeeze=False)
    out: dict[str, Any] = {}
    for ax, r in zip(axes[0], chosen, strict=True):
        scores = {(k, n): v for k, by in r.scores.items() if k not in BASELINES for n, v in by.items()}
        kind, best = max(scores, key=lambda kn: scores[kn].summary()["mean"])
        pred = r.predictions[kind, best]
        truth = np.tile(r.task.labels, len(pred) // len(r.task.labels))
        tested = np.asarray([p is not None for p in pred])
        classes = list(dict.fromkeys(r.task.labels.tolist()))
        cm = confusion_matrix(truth[tested].astype(str), pred[tested].astype(str), labels=classes)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        short = [c.removesuffix("Machine") for c in classes]
        ax.set_xticks(range(len(classes)), short, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), short, fontsize=8)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{r.task.title}\n{CLASSIFIERS[best]} on {FEATURES[kind]}, out-of-fold, all seeds", fontsize=10)
        out[r.task.name] = {"features": kind, "classifier": best, "classes": classes, "counts": cm.tolist()}
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(results: Sequence[TaskResult], path: Path) -> None:
    """Per task, each classifier on raw weights (solid), canonical weights (light), weight statistics
    (dotted), losses only (hatched) and the evaluation loss only (crossed); chance marked."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(results[0].scores["weights"])
    all_styles: dict[str, dict[str, Any]] = {
        "weights": {},
        "canonical": {"alpha": 0.45},
        "stats": {"hatch": "...", "alpha": 0.55},
        "loss": {"hatch": "///", "fill": False},
        "eval_loss": {"hatch": "xx", "fill": False, "alpha": 0.6},
    }
    styles = [(k, FEATURES[k], v) for k, v in all_styles.items() if k in results[0].scores]
    width = 0.8 / (len(styles) * len(names))
    colours = _palette(len(names))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 * len(results) + 2) + 3.0, 4.8))
    for t, r in enumerate(results):
        for c, name in enumerate(names):
            for j, (kind, label, style) in enumerate(styles):
                score = r.scores[kind][name].summary()
                ax.bar(
                    t - 0.4 + width * (len(styles) * c + j + 0.5),
                    score["mean"],
                    width,
                    yerr=score["std"],
                    color=colours[c],
                    edgecolor=colours[c],
                    capsize=2,
                    label=f"{CLASSIFIERS[name]}: {label}" if t == 0 else "_nolegend_",
                    **style,
                )
        ax.hlines(
            r.chance,
            t - 0.42,
            t + 0.42,
            colors="black",
            linestyles="dashed",
            label="chance (majority class)" if t == 0 else "_nolegend_",
        )
    ax.set_xticks(range(len(results)), [r.task.name for r in results], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report


def _describe_sources(nets: Networks, sources: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    roots = nets.table.column("root").to_pylist()
    for src in dict.fromkeys(roots):
        sel = nets.table.filter(np.asarray([r == src for r in roots]))
        rows = sel.to_pylist()
        per: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            per.setdefault(str(r["target"]), []).append(r)
        targets = {}
        for t, rs in per.items():
            epochs = [int(r["epochs"]) for r in rs if r.get("epochs") is not None]
            losses = [float(r["eval_loss"]) for r in rs if r.get("eval_loss") is not None]
            targets[t] = {
                "networks": len(rs),
                "epochs_mean": float(np.mean(epochs)) if epochs else None,
                "epochs_min": min(epochs) if epochs else None,
                "epochs_max": max(epochs) if epochs else None,
                "eval_loss_median": float(np.median(losses)) if losses else None,
                "retried": sum(1 for r in rs if (r.get("attempt") or 0) > 0),
            }

        def distinct(col: str, rs: list[dict[str, Any]] = rows) -> list[Any]:
            return sorted({r.get(col) for r in rs if r.get(col) is not None}, key=str)

        out.append(
            {
                "path": _rel(src),
                # A folder without manifest.parquet is a campaign still running (rows from its parts).
                "manifest_final": (Path(src) / "manifest.parquet").is_file(),
                "campaigns": distinct("campaign"),
                "datasets": distinct("dataset"),
                "networks": len(rows),
                "campaign_seeds": distinct("campaign_seed"),
                "max_epochs": distinct("max_epochs"),
                "target_loss": distinct("target_loss"),
                "learning_rate": distinct("learning_rate"),
                "batch_size": distinct("batch_size"),
                "devices": distinct("device_name"),
                "torch_versions": distinct("torch_version"),
                "training_seconds": float(sum(float(r.get("seconds") or 0) for r in rows)),
                "targets": targets,
            }
        )
    del sources
    return out


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("../..") else rel


def _too_few(few: dict[str, int]) -> str:
    return (
        f". **Too few networks: {few['smallest_class']} in the smallest class (at least {few['needed']} needed); "
        "these accuracies are not meaningful estimates.**"
    )


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def render_markdown(report: dict[str, Any], notes: str | None = None) -> str:
    """``report.md`` from ``report.json``'s content (and the optional notes, verbatim)."""
    p = report["protocol"]
    lines = [f"# {report['title']}", ""]
    lines += [
        f"Generated by `mlds analyze` (mlds {report['mlds_version']}) on {report['generated']}, "
        f"in {report['seconds']:.0f} s. Every figure below is computed from the datasets listed; "
        "`report.json` holds the same numbers (and every seed's).",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Headline", ""]
    for t in report["tasks"]:
        if "skipped" in t:
            continue

        def best(kind: str, t: dict[str, Any] = t) -> str:
            n = max(t[kind], key=lambda n: t[kind][n]["mean"])
            return f"{t[kind][n]['mean']:.1%} ± {t[kind][n]['std']:.1%} ({CLASSIFIERS[n]})"

        kinds = [k for k in FEATURES if k in t]
        lines.append(
            f"- **{t['title']}** (chance {t['chance']:.1%}; best classifier of each): "
            + "; ".join(f"{FEATURES[k]} {best(k)}" for k in kinds)
            + (_too_few(t["too_few"]) if "too_few" in t else "")
        )
    lines += ["", "## Data", ""]
    for s in report["sources"]:
        lines += [
            f"`{s['path']}`: {', '.join(map(str, s['datasets']))}, campaign {', '.join(map(str, s['campaigns']))} "
            f"(seed {', '.join(map(str, s['campaign_seeds']))}), {s['networks']} networks; criterion eval MSE < "
            f"{', '.join(f'{v:g}' for v in s['target_loss'])}, epoch cap {', '.join(map(str, s['max_epochs']))}, "
            f"learning rate {', '.join(f'{v:g}' for v in s['learning_rate'])}, batch "
            f"{', '.join(map(str, s['batch_size']))}; trained on {', '.join(map(str, s['devices']))} "
            f"(torch {', '.join(map(str, s['torch_versions']))}), {s['training_seconds'] / 3600:.2f} network-hours."
            + (
                ""
                if s.get("manifest_final", True)
                else " **The campaign had not finished**: these are the networks verified when the analysis ran."
            ),
            "",
            "| target | networks | epochs mean [min–max] | eval MSE median | retried |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, t in s["targets"].items():
            ep = (
                f"{t['epochs_mean']:.0f} [{t['epochs_min']}–{t['epochs_max']}]" if t["epochs_mean"] is not None else "-"
            )
            loss = f"{t['eval_loss_median']:.2e}" if t["eval_loss_median"] is not None else "-"
            lines.append(f"| {name} | {t['networks']} | {ep} | {loss} | {t['retried']} |")
        lines.append("")
    ev = p["evaluation"]
    lines += [
        "## Protocol",
        "",
        f"- Features: {p['features']}.",
        *(f"- Also reported: {a}." for a in (p["also"] if isinstance(p["also"], list) else [p["also"]])),
        f"- Baseline: {p['baseline']}.",
        f"- Classifiers: {'; '.join(f'{CLASSIFIERS[k]} (`{v}`)' for k, v in p['classifiers'].items())}.",
        f"- Evaluation: {ev['description']}. Seeds {', '.join(map(str, ev['seeds']))}; the spread is over seeds "
        "(mean ± sample sd [min–max]).",
        "",
        "## Results",
        "",
    ]
    for t in report["tasks"]:
        lines += [f"### {t['title']}", ""]
        if "skipped" in t:
            lines += [f"Skipped: {t['skipped']}.", ""]
            continue
        if "too_few" in t:
            lines += [f"> Warning{_too_few(t['too_few']).removeprefix('.')}", ""]
        counts = ", ".join(f"{k} {v}" for k, v in t["classes"].items())
        folds = f"{t['folds']}-fold" if t["folds"] else "one 80/20 split per seed"
        dropped = t.get("dropped") or {}
        note = (
            " Left out (a class needs 2 networks to be trained on and tested): "
            + ", ".join(f"{k} ({v} network)" for k, v in dropped.items())
            + "."
            if dropped
            else ""
        )
        kinds = [k for k in FEATURES if k in t]
        heads = {
            "weights": "raw weights (the spec's protocol)",
            "loss": "losses only (the spec's baseline)",
            "eval_loss": "evaluation loss only (the criterion)",
        }
        lines += [
            f"{sum(t['classes'].values())} networks ({counts}); {folds}; chance {t['chance']:.3f}.{note}",
            "",
            "| classifier | " + " | ".join(heads.get(k, FEATURES[k]) for k in kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for name in t["weights"]:
            capped = sum(t[k][name]["fits_at_iteration_cap"] for k in kinds)
            note = f" ({capped} fits stopped at the iteration cap)" if capped else ""
            lines.append(f"| {CLASSIFIERS[name]}{note} | " + " | ".join(_fmt(t[k][name]) for k in kinds) + " |")
        lines.append("")
    lines += ["## Figures", ""]
    for fig, caption in (
        (
            "projection.png",
            "Standardised weights projected to 2-D (PCA of the raw and the canonical weights; t-SNE of the "
            "first 50 PCs), coloured by target.",
        ),
        ("confusion.png", "Confusion matrices of the best classifier on weights (out-of-fold, all seeds)."),
        (
            "accuracy.png",
            "Accuracy per classifier: raw weights (solid), canonical weights (light), weight statistics (dotted), "
            "losses only (hatched), evaluation loss only (crossed); dashes: chance.",
        ),
    ):
        if fig in report["figures"]:
            lines += [f"![{caption}]({fig})", "", f"*{caption}*", ""]
    env = report["environment"]
    lines += [
        "## Environment",
        "",
        f"Python {env['python']}, numpy {env['numpy']}, scikit-learn {env['sklearn']}, "
        f"matplotlib {env['matplotlib']}; {env['machine']}.",
        "",
    ]
    return "\n".join(lines)


def analyze(
    sources: Sequence[str],
    out: Path,
    *,
    classifiers: Sequence[str] = tuple(CLASSIFIERS),
    seeds: int = DEFAULT_SEEDS,
    folds: int = DEFAULT_FOLDS,
    test_size: float | None = None,
    first: int | None = None,
    jobs: int = 1,
    figures: bool = True,
    title: str = "MLDS weight-space analysis",
    notes: str | None = None,
    command: str = "",
    log: Callable[[str], None] = lambda _m: None,
    warn: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the protocol on ``sources`` and write the report to ``out``; returns the report (report.json).

    ``log`` gets progress lines; ``warn`` gets what a reader of the report must know (too few networks).
    """
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - no type info; scikit-learn's own dependency

    with threadpool_limits(limits=1):
        return _analyze(
            sources,
            out,
            classifiers=classifiers,
            seeds=seeds,
            folds=folds,
            test_size=test_size,
            first=first,
            jobs=jobs,
            figures=figures,
            title=title,
            notes=notes,
            command=command,
            log=log,
            warn=warn,
        )


def _task_entry(task: Task, r: TaskResult | str) -> dict[str, Any]:
    """A task's entry in report.json: its classes, and its scores or why it was skipped."""
    classes = dict(zip(*np.unique(task.labels, return_counts=True), strict=True))
    entry: dict[str, Any] = {
        "name": task.name,
        "title": task.title,
        "kind": task.kind,
        "classes": {str(k): int(v) for k, v in classes.items()},
    }
    if isinstance(r, str):
        entry["skipped"] = r
    else:
        entry |= {"chance": r.chance, "folds": r.folds}
        smallest = int(min(classes.values()))
        if smallest < MIN_RELIABLE_PER_CLASS:
            entry["too_few"] = {"smallest_class": smallest, "needed": MIN_RELIABLE_PER_CLASS}
        entry |= {kind: {k: v.summary() for k, v in by.items()} for kind, by in r.scores.items()}
    if task.dropped:
        entry["dropped"] = task.dropped
        entry["classes"] = {k: v for k, v in entry["classes"].items() if k not in task.dropped}
    return entry


def _warn_if_too_few(task: Task, warn: Callable[[str], None]) -> None:
    """Before a task's fits (which can take minutes): say when its classes are too small to mean much."""
    counts = np.unique(task.labels, return_counts=True)[1]
    usable = counts[counts >= 2]  # classes of one network are dropped from the task (run_task)
    if len(usable) >= 2 and int(usable.min()) < MIN_RELIABLE_PER_CLASS:
        warn(
            f"warning: {task.name}: only {int(usable.min())} networks in its smallest class (at least "
            f"{MIN_RELIABLE_PER_CLASS} needed for a meaningful accuracy); its results are marked as too few "
            "in the report; train more networks per target"
        )


def _analyze(
    sources: Sequence[str],
    out: Path,
    *,
    classifiers: Sequence[str],
    seeds: int,
    folds: int,
    test_size: float | None,
    first: int | None,
    jobs: int,
    figures: bool,
    title: str,
    notes: str | None,
    command: str,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict[str, Any]:
    started = time.monotonic()
    nets = load(*sources)
    if first is not None:
        nets = nets.subset(first=first)
    if len(nets) == 0:
        raise click.ClickException("no networks in the datasets given")
    t0 = time.monotonic()
    log(f"loading the weights of {len(nets)} networks")
    weights = nets.weights()
    log(f"loaded {len(nets)} networks x {weights.shape[1]:,} weights in {time.monotonic() - t0:.2f} s")
    features = feature_sets(weights, nets)
    seed_list = list(range(seeds))
    tasks = tasks_for(nets)
    if not tasks:
        raise click.ClickException("nothing to classify: the datasets hold a single target")
    results: list[TaskResult] = []
    task_json: list[dict[str, Any]] = []
    for task in tasks:
        t0 = time.monotonic()
        _warn_if_too_few(task, warn)
        r = run_task(
            task,
            features,
            nets,
            classifiers=classifiers,
            seeds=seed_list,
            folds=folds,
            test_size=test_size,
            jobs=jobs,
            log=log,
        )
        entry = _task_entry(task, r)
        if isinstance(r, str):
            log(f"{task.name}: skipped: {r}")
        else:
            results.append(r)
            bests = ", ".join(
                f"{FEATURES[kind]} {r.best(kind)} {r.scores[kind][r.best(kind)].summary()['mean']:.3f}"
                for kind in r.scores
            )
            log(f"{task.name}: best of {bests}; chance {r.chance:.3f} ({time.monotonic() - t0:.1f} s)")
        task_json.append(entry)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Any] = {}
    if figures and results:
        import matplotlib as mpl  # noqa: PLC0415

        mpl.use("Agg")
        figs["projection.png"] = plot_projection(features, nets, out / "projection.png")
        figs["confusion.png"] = plot_confusions(results, out / "confusion.png")
        plot_accuracy(results, out / "accuracy.png")
        figs["accuracy.png"] = {}
    from importlib.metadata import version  # noqa: PLC0415

    import matplotlib as mpl  # noqa: PLC0415
    import sklearn  # noqa: PLC0415

    desc = (
        f"repeated stratified k-fold: {seeds} seeds x up to {folds} folds (each fold a stratified 80/20 split when "
        "k=5); a seed's accuracy is over its out-of-fold predictions of every network"
        if test_size is None
        else f"one stratified shuffled split per seed, test fraction {test_size}"
    )
    report: dict[str, Any] = {
        "title": title,
        "mlds_version": version("mlds"),
        "generated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "command": command,
        "sources": _describe_sources(nets, sources),
        "networks": len(nets),
        "protocol": {
            "features": f"flattened weights ({weights.shape[1]:,} float32 values per network, model.safetensors "
            "order), standardised on each training split",
            "also": [
                *(
                    [
                        "canonical weights: the same flattened weights after each network's hidden units are "
                        "sign-normalised and sorted (mlds_data.canonical; every network still computes what "
                        "it did), standardised"
                    ]
                    if "canonical" in features
                    else []
                ),
                "per-tensor statistics of the weights (mean, sd, mean |w|, quantiles 0, .1, .25, .5, .75, .9, 1 "
                f"of each of the {len(nets.layout)} tensors: {features['stats'].shape[1]} features), standardised; "
                "invariant to permutations of hidden units, unlike the raw weights",
            ],
            "baseline": "the same classifiers on log10 of the final training and evaluation MSE, standardised; and, "
            "separately, on log10 of the final evaluation MSE alone (the loss the convergence criterion bounds)",
            "classifiers": {k: repr(make_classifier(k, 0)[-1]) for k in classifiers},
            "evaluation": {"seeds": seed_list, "folds": folds, "test_size": test_size, "description": desc},
        },
        "tasks": task_json,
        "figures": figs,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
            "matplotlib": mpl.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
        "seconds": 0.0,
    }
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, notes))
    return report


@click.command("analyze")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the report.")
@click.option("--seeds", type=click.IntRange(1, 100), default=DEFAULT_SEEDS, show_default=True, help="Repetitions.")
@click.option("--folds", type=click.IntRange(2, 20), default=DEFAULT_FOLDS, show_default=True, help="Folds per seed.")
@click.option(
    "--test-size",
    type=click.FloatRange(0.05, 0.5),
    default=None,
    help="Instead of k-fold: one stratified split per seed with this test fraction (the spec's literal 0.2).",
)
@click.option(
    "--classifiers",
    default=",".join(CLASSIFIERS),
    show_default=True,
    help="Comma-separated subset of knn, logreg, forest, mlp.",
)
@click.option("--first", type=click.IntRange(min=2), default=None, help="Only the first N networks of each target.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Processes for the classifier fits (the results do not depend on it).",
)
@click.option("--no-figures", is_flag=True, help="Skip the PNGs.")
@click.option("--title", default="MLDS weight-space analysis", show_default=True, help="The report's title.")
@click.option(
    "--notes",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Markdown to include in the report verbatim (how the datasets were made, deviations).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def analyze_command(
    sources: tuple[str, ...],
    out: Path,
    seeds: int,
    folds: int,
    test_size: float | None,
    classifiers: str,
    first: int | None,
    jobs: int,
    no_figures: bool,
    title: str,
    notes: Path | None,
    quiet: bool,
) -> None:
    """Classify networks by their weights (docs/workloads.md §10) and write report.md, report.json and figures.

    SOURCES are dataset folders (pulled, or `mlds run --store` folders) or subset .parquet files; several
    combine (ds1 and ds2 give the 10-way and clean-vs-modified tasks).
    """
    names = [c.strip() for c in classifiers.split(",") if c.strip()]
    for n in names:
        if n not in CLASSIFIERS:
            raise click.BadParameter(f"unknown classifier {n!r}; choose from {', '.join(CLASSIFIERS)}")
    parts = ["mlds analyze", *map(shlex.quote, sources), "--out", shlex.quote(str(out))]
    if seeds != DEFAULT_SEEDS:
        parts += ["--seeds", str(seeds)]
    if folds != DEFAULT_FOLDS:
        parts += ["--folds", str(folds)]
    if test_size is not None:
        parts += ["--test-size", str(test_size)]
    if names != list(CLASSIFIERS):
        parts += ["--classifiers", ",".join(names)]
    if first is not None:
        parts += ["--first", str(first)]
    if notes is not None:
        parts += ["--notes", shlex.quote(str(notes))]
    if title != "MLDS weight-space analysis":
        parts += ["--title", shlex.quote(title)]
    report = analyze(
        sources,
        out,
        classifiers=names,
        seeds=seeds,
        folds=folds,
        test_size=test_size,
        first=first,
        jobs=jobs,
        figures=not no_figures,
        title=title,
        notes=notes.read_text() if notes is not None else None,
        command=" ".join(parts),
        log=(lambda _m: None) if quiet else (lambda m: click.echo(m, err=True)),
        warn=lambda m: click.echo(m, err=True),
    )
    few = [t["name"] for t in report["tasks"] if "too_few" in t]
    click.echo(
        f"wrote {out / 'report.md'} and {out / 'report.json'} ({report['seconds']:.0f} s)"
        + (f"; too few networks for meaningful accuracies in: {', '.join(few)} (marked in the report)" if few else "")
    )
