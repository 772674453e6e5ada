"""The comparison report's paired columns and its seconds per epoch, recomputed from the runs' summaries."""
from fop_asdl.cli.compare import MethodResult
from fop_asdl.cli.config import load_config
from fop_asdl.cli.report import method_styles, results_markdown

#: Best accuracy and per-epoch training seconds of two seeds per method (what summary.json holds).
RUNS = {"adamw": [(0.84, [10.0, 21.0, 30.0]), (0.77, [11.0, 20.0, 33.0])],
        "kfac": [(0.74, [15.0, 30.0, 45.0]), (0.68, [14.0, 29.0])],  # seed 1 diverged in its third epoch
        "fop": [(0.73, [16.0, 33.0, 48.0]), (0.72, [17.0, 34.0, 50.0])]}


def summary(method, seed, best, totals):
    return {"run": {"seed": seed, "lr": 0.1, "point": {"lr": 0.1}}, "best_accuracy": best,
            "epochs_to_target": None, "train_seconds_to_target": None, "diverged": len(totals) < 3,
            "train_seconds": totals[-1], "curve": {"train_seconds_total": totals}, "config": {}}


def test_paired_differences_against_adamw_and_kfac_and_seconds_per_epoch():
    config = load_config(None, ["methods=[adamw, kfac, fop]", "seeds=[0, 1]", "batch_sizes=[8192]"])
    results = [MethodResult(8192, m, [summary(m, 0, *runs[0])], {"lr": 0.1}, [],
                            [summary(m, seed, *run) for seed, run in enumerate(runs)])
               for m, runs in RUNS.items()]
    table = results_markdown(config, results, [])
    paired = table.split("## Top-1 error")[1].split("## Search")[0]
    assert "| batch | method | top-1 error (%) | vs adamw | vs kfac |" in paired
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in paired.splitlines() if line.startswith("| 8192 |")}
    for method, runs in RUNS.items():
        for column, reference in ((1, "adamw"), (2, "kfac")):
            diffs = [100 * (RUNS[reference][s][0] - runs[s][0]) for s in (0, 1)]  # error minus reference's
            mean = f"{sum(diffs) / 2:+.2f}"
            want = "–" if method == reference else f"{mean} ({min(diffs):+.2f}–{max(diffs):+.2f})"
            assert rows[method][column].rstrip(" |") == want, (method, reference)
    main = {line.split(" | ")[1].split(" @ ")[0]: line for line in table.splitlines() if line.startswith("| 8192 | ")
            and " @ " in line}
    for method, runs in RUNS.items():
        per_epoch = [totals[-1] / len(totals) for _, totals in runs]
        mean = sum(per_epoch) / 2
        assert main[method].endswith(f"| {mean:.1f} ({min(per_epoch):.1f}–{max(per_epoch):.1f}) |"), method


def test_every_method_of_a_whole_switch_study_gets_its_own_line_style():
    """16 methods (the batch-8192 study): no two alike in colour and dash, and a method keeps its style
    wherever it appears (every batch panel, the batch plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [f"m{i}" for i in range(16)]
    styles = method_styles(plt, methods + methods[:3])
    assert list(styles) == methods
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == 16
    assert len({s["color"] for s in method_styles(plt, methods[:10]).values()}) == 10
