"""The comparison's report: a markdown table (``results.md``), accuracy curves and, over several batch sizes,
best accuracy against batch size (PNG, matplotlib Agg)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .compare import MethodResult
from .config import ExperimentConfig
from .methods import METHODS
from .search import point_text

__all__ = ["results_markdown", "plot_curves", "accuracy_by_batch", "method_styles"]

DASH = "–"
#: The method whose seconds to target the speed-up column divides by.
SPEEDUP_BASELINE = "sgd"


def _spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """``mean (min–max)``; a single value, or identical ones, alone."""
    if len(values) == 1 or min(values) == max(values):
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ({fmt(min(values))}{DASH}{fmt(max(values))})"


def _to_target(runs: List[Dict], key: str, fmt: Callable[[float], str]) -> str:
    reached = [r[key] for r in runs if r[key] is not None]
    if not reached:
        return DASH
    text = _spread(reached, fmt)
    return text if len(reached) == len(runs) else f"{text} [{len(reached)}/{len(runs)} seeds]"


def _mean_seconds(result: MethodResult) -> Optional[float]:
    """Mean training seconds to target when every seed reached it, else None."""
    seconds = [r["train_seconds_to_target"] for r in result.runs]
    return statistics.mean(seconds) if all(s is not None for s in seconds) else None


def _seconds_per_epoch(runs: List[Dict]) -> str:
    """Training seconds per completed epoch, mean (min–max) over the seeds: the wall-clock cost of a method
    beside its accuracy (a diverged run counts the epochs it completed)."""
    per_epoch = [r["train_seconds"] / len(r["curve"]["train_seconds_total"]) for r in runs
                 if r["curve"]["train_seconds_total"]]
    return _spread(per_epoch, lambda x: f"{x:.1f}") if per_epoch else DASH


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _points(x: float) -> str:
    return f"{x:+.2f}"


def _epochs(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.1f}"


def results_markdown(
    config: ExperimentConfig, results: List[MethodResult], environments: Sequence[Dict[str, Any]]
) -> str:
    """The comparison table, the whole search it was built from, and the processes that ran it."""
    n, first = len(config.seeds), config.seeds[0]
    target = _pct(config.target_accuracy)
    trials = len(results[0].search) if results else 0
    lines = [
        f"# {config.dataset}, {config.model}: epochs and seconds to {target} % test accuracy",
        "",
        f"Each row is one method at the best point of its search ({trials} trials per method on seed "
        f"{first}: fewest epochs to the target, then best accuracy), run with {n} seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, config.seeds))}). Values: mean (min{DASH}max) over the seeds. Seconds: "
        f"training time only, evaluation excluded. {DASH}: target never reached; [k/{n} seeds]: only k "
        f"seeds reached it, the mean is over those. Speed-up: SGD's mean seconds to target over the "
        f"method's, at the same batch size (only when every seed of both reached the target). "
        f"lr = base lr · batch / {config.base_batch}. [edge: ...]: the chosen value is the lowest or "
        f"highest tried, so the best may lie beyond the range searched. s / epoch: training seconds per "
        f"epoch, the machine and its load at the time (Environment below).",
        "",
        "| batch | method @ chosen point (lr) | seeds | epochs to target | seconds to target "
        "| best test acc (%) | speed-up vs SGD | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sgd = {r.batch_size: _mean_seconds(r) for r in results if r.method == SPEEDUP_BASELINE}
    for r in results:
        lr = r.runs[0]["run"]["lr"]
        mine, base = _mean_seconds(r), sgd.get(r.batch_size)
        speedup = f"{base / mine:.2f}×" if mine and base else DASH
        best = [s["best_accuracy"] for s in r.runs if s["best_accuracy"] is not None]
        diverged = sum(s["diverged"] for s in r.runs)
        lines.append(
            f"| {r.batch_size} | {r.method} @ {point_text(r.best_point)} ({lr:.4g}){_edge_note(r.edges)} "
            f"| {len(r.runs)} | {_to_target(r.runs, 'epochs_to_target', _epochs)} "
            f"| {_to_target(r.runs, 'train_seconds_to_target', lambda x: f'{x:.1f}')} "
            f"| {_spread(best, _pct) if best else DASH}{f' ({diverged} diverged)' if diverged else ''} "
            f"| {speedup} | {_seconds_per_epoch(r.runs)} |"
        )
    sections = [_paired_errors(results), _search_table(config, results), _environment(environments)]
    return "\n".join(lines + [line for section in sections if section for line in [""] + section]) + "\n"


#: Methods the others are compared with, seed by seed (the long-tail papers' Table 4 rows; AdamW, the
#: first-order method large-batch studies are measured against); a column only where the study ran it.
REFERENCES = ("adamw", "kfac", "sgd")


def _paired_errors(results: List[MethodResult]) -> List[str]:
    """Top-1 error (100 − best accuracy) per method and its difference from each reference method, seed by
    seed: seeds share initial weights and batches, so the per-seed difference is the one to trust, and its
    spread says whether a gap is larger than what the seed alone moves."""
    def errors(r: MethodResult) -> Dict[int, float]:
        return {s["run"]["seed"]: 100 * (1 - s["best_accuracy"]) for s in r.runs if s["best_accuracy"] is not None}

    by_key = {(r.batch_size, r.method): errors(r) for r in results}
    references = [m for m in REFERENCES if any(m == r.method for r in results)]
    if not references:
        return []
    lines = [
        "## Top-1 error and paired differences",
        "",
        "Top-1 error = 100 − best test accuracy (%), mean (min–max) over the seeds. vs <method>: this "
        "method's error minus the reference's on the same seed, in points (negative: fewer errors), "
        "mean (min–max) over the seeds both ran.",
        "",
        "| batch | method | top-1 error (%) | " + " | ".join(f"vs {m}" for m in references) + " |",
        "|---|---|---|" + "---|" * len(references),
    ]
    for r in results:
        mine = by_key[(r.batch_size, r.method)]
        cells = []
        for ref in references:
            theirs = by_key.get((r.batch_size, ref), {})
            shared = sorted(set(mine) & set(theirs))
            cells.append(_spread([mine[s] - theirs[s] for s in shared], _points)
                         if shared and ref != r.method else DASH)
        error = _spread(list(mine.values()), lambda x: f"{x:.2f}") if mine else DASH
        lines.append(f"| {r.batch_size} | {r.method} | {error} | " + " | ".join(cells) + " |")
    return lines


def _edge_note(flags: List[str]) -> str:
    return f" [edge: {', '.join(flags)}]" if flags else ""


def _search_table(config: ExperimentConfig, results: List[MethodResult]) -> List[str]:
    """Every trial of the first seed: the values it ran with (searched or, blank if unused, the config's)."""
    names = list(dict.fromkeys(
        name for r in results for name in METHODS[r.method].hyperparameter_names
        if name in config.search_space[r.method]
    ))
    spaces = "; ".join(
        f"{m} " + ", ".join(f"{k} {_values(config.search, v)}" for k, v in config.search_space[m].items())
        for m in config.methods
    )
    kind = "every combination of" if config.search == "grid" else "Halton points, log-uniform in"
    columns = ["base lr" if k == "lr" else k for k in names]
    lines = [
        f"## Search (seed {config.seeds[0]})",
        "",
        f"Trials per method: {len(results[0].search) if results else 0}, {kind}: {spaces}. A column a "
        f"method does not search shows its config value, blank where the method does not use it.",
        "",
        f"| batch | method | {' | '.join(columns)} | lr | epochs to target | seconds to target "
        f"| best test acc (%) | chosen |",
        "|---|---|" + "---|" * len(columns) + "---|---|---|---|---|",
    ]
    for r in results:
        for s in r.search:
            run = s["run"]
            values = [
                f"{run['point'].get(k, s['config'].get(k)):g}" if k in METHODS[r.method].hyperparameter_names else ""
                for k in names
            ]
            epochs, seconds = s["epochs_to_target"], s["train_seconds_to_target"]
            chosen = f"✓{_edge_note(r.edges)}" if run["point"] == r.best_point else ""
            lines.append(
                f"| {r.batch_size} | {r.method} | {' | '.join(values)} | {run['lr']:.4g} "
                f"| {DASH if epochs is None else epochs} | {DASH if seconds is None else f'{seconds:.1f}'} "
                f"| {_pct(s['best_accuracy'])}{' (diverged)' if s['diverged'] else ''} | {chosen} |"
            )
    return lines


def _environment(records: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per process that worked on the folder (the first run and every resume)."""
    lines = [
        "## Environment",
        "",
        f"{len(records)} process{'es' if len(records) > 1 else ''} (full records: environment.jsonl, and "
        f"each run's summary.json):",
        "",
    ]
    for e in records:
        v, git, t = e["versions"], e["git"], e["threads"]
        dirty = " (uncommitted changes)" if git and git["dirty"] else ""
        commit = f" at commit {git['commit'][:12]}{dirty}" if git else ""
        omp = f", OMP_NUM_THREADS={t['OMP_NUM_THREADS']}" if t["OMP_NUM_THREADS"] else ""
        lines.append(
            f"- {e['started']}: `{e['command']}`; fop_asdl {v['fop_asdl']}{commit}, torch {v['torch']}, "
            f"asdl {v['asdl']}; {e['gpu'] or e['cpu']}, {e['cpus_usable']} of {e['cpu_count']} cores usable, "
            f"torch threads {t['torch']}{omp}; device {e['device']}, world size {e['world_size']}."
            + (f" Resumed with --allow-mixed-study although {', '.join(e['resumed_despite'])} differed "
               f"from the first process's." if e.get("resumed_despite") else "")
        )
    return lines


def _values(mode: str, values: List[float]) -> str:
    if mode == "grid":
        return "{" + ", ".join(f"{v:g}" for v in values) + "}"
    return f"[{values[0]:g}, {values[1]:g}]"


def accuracy_by_batch(results: List[MethodResult]) -> Dict[str, List[Tuple[int, float, float, float]]]:
    """Per method, ``(batch size, mean, min, max)`` of the best test accuracy over the seeds at the chosen
    point, in the order the batch sizes ran: the paper's scaling claim in numbers."""
    by_method: Dict[str, List[Tuple[int, float, float, float]]] = {}
    for r in results:
        best = [s["best_accuracy"] or 0.0 for s in r.runs]
        by_method.setdefault(r.method, []).append((r.batch_size, statistics.mean(best), min(best), max(best)))
    return by_method


def plot_curves(config: ExperimentConfig, results: List[MethodResult], out_dir: Path) -> List[Path]:
    """Test accuracy vs epoch and vs training seconds: one panel per batch size, one line per method
    (mean over its seeds, over the epochs every seed ran); with several batch sizes also best accuracy vs
    batch size (``accuracy_vs_batch.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r.batch_size for r in results))
    styles = method_styles(plt, [r.method for r in results])
    paths = []
    for x_key, x_label, name in (
        ("epoch", "epoch", "accuracy_vs_epoch.png"),
        ("train_seconds_total", "training time (s)", "accuracy_vs_time.png"),
    ):
        fig, axes = plt.subplots(
            1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False, sharey=True
        )
        for ax, batch in zip(axes[0], batches):
            for r in (r for r in results if r.batch_size == batch):
                curves = [s["curve"] for s in r.runs]
                length = min(len(c["test_accuracy"]) for c in curves)
                if length == 0:
                    continue
                acc = [statistics.mean(c["test_accuracy"][i] for c in curves) for i in range(length)]
                x = (
                    list(range(1, length + 1))
                    if x_key == "epoch"
                    else [statistics.mean(c["train_seconds_total"][i] for c in curves) for i in range(length)]
                )
                ax.plot(x, acc, marker=".", label=f"{r.method} @ {point_text(r.best_point)}", **styles[r.method])
            ax.axhline(config.target_accuracy, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"batch {batch}")
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
            # below the panel, not over the curves (a study of the whole switch has 16 lines)
            ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
        axes[0][0].set_ylabel(f"test accuracy (mean of {len(config.seeds)} seeds)")
        path = out_dir / name
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    if len(batches) > 1:
        paths.append(_plot_batch_scaling(plt, config, results, out_dir / "accuracy_vs_batch.png", styles))
    return paths


def _plot_batch_scaling(plt: Any, config: ExperimentConfig, results: List[MethodResult], path: Path,
                        styles: Dict[str, Dict[str, Any]]) -> Path:
    """Best accuracy against batch size per method, log x, the seeds' min-max as error bars, each method in
    the style of its curves (:func:`method_styles`)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, rows in accuracy_by_batch(results).items():
        batch, mean, low, high = (list(column) for column in zip(*rows))
        errors = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
        ax.errorbar(batch, mean, yerr=errors, marker="o", capsize=3, label=method, **styles[method])
    ticks = sorted({r.batch_size for r in results})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"best test accuracy ({len(config.seeds)} seeds: mean, min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def method_styles(plt: Any, methods: List[str]) -> Dict[str, Dict[str, Any]]:
    """One colour per method, the same in every panel and plot: tab10 up to 10 methods, else tab20 with
    every second method dashed, so no two lines look alike."""
    methods = list(dict.fromkeys(methods))
    many = len(methods) > 10
    colors = plt.get_cmap("tab20" if many else "tab10").colors
    return {m: {"color": colors[i % len(colors)], "linestyle": "--" if many and i % 2 else "-"}
            for i, m in enumerate(methods)}
