"""``fop-asdl``: the command line (``train`` one run, ``compare`` a sweep) over YAML configs and overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..data import DatasetFileError
from . import distributed
from .batches import load_data
from .compare import run_compare
from .config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    changed_keys,
    field_docs,
    load_config,
    training_settings,
)
from .environment import (
    ENVIRONMENT,
    append_environment,
    code_differences,
    describe_environment,
    first_record,
)
from .methods import METHODS
from .protocol import RunSpec
from .report import plot_curves, results_markdown
from .search import method_points
from .train import RunDirError, train_run

__all__ = ["main", "build_parser"]

CONFIG_FILE = "config.yaml"
DESCRIPTION = (
    "Train one run (train) or compare SGD, AdamW, K-FAC, FOP, FNGD, HyLo and the baselines (LARS, LAMB, "
    "SOAP, grafted Shampoo, Muon, Schedule-Free AdamW) over batch sizes, an equal-budget hyperparameter "
    "search and seeds (compare), from a YAML config (--config) and overrides (--set)."
)


def build_parser() -> argparse.ArgumentParser:
    fields = "\n".join(f"  {name}: {doc}" for name, doc in field_docs().items())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="YAML file of config fields (default: the built-in " "experiment, as in configs/default.yaml)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields; VALUE is YAML, e.g. --set batch_sizes=[1024,8192] "
        "epochs=5 search_space.fop.damping=[0.01,0.1]",
    )
    common.add_argument(
        "--data-dir", help="folder of the .npz files (same as --set data_dir=...; " "default: $FOP_DATA)"
    )
    common.add_argument("--out", type=Path, help="output folder (default: runs/<command>-<config>-<time>)")
    common.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out from their checkpoints (bit-identical on CPU); "
        "without --config the config saved in --out is used",
    )
    common.add_argument(
        "--allow-mixed-study",
        action="store_true",
        help="with --resume: continue although the library's code (its commit or uncommitted changes), "
        "the torch thread count or an arithmetic library's version differ from the study's first process "
        "(refused otherwise: a study is one code version); environment.jsonl then records what differed",
    )
    common.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (also off when stderr " "is not a terminal)",
    )
    layout = {
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "epilog": "config fields (YAML keys and --set names):\n" + fields,
    }
    parser = argparse.ArgumentParser(prog="fop-asdl", description=DESCRIPTION, **layout)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", parents=[common], help="one run: the sweep's first point unless chosen below", **layout
    )
    names = ", ".join(f"{m.name} ({m.label})" for m in METHODS.values())
    train.add_argument("--method", help=f"one of {names} (default: the first of methods)")
    train.add_argument("--batch-size", type=int, help="global batch size (default: the first of batch_sizes)")
    train.add_argument(
        "--point",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="values of the method's hyperparameters, e.g. lr=0.05 damping=0.01 (default: the first "
        "trial of its search; a name given here replaces that trial's value)",
    )
    train.add_argument("--lr", type=float, help="base lr at base_batch: the same as --point lr=LR")
    train.add_argument("--seed", type=int, help="seed (default: the first of seeds)")
    sub.add_parser(
        "compare",
        parents=[common],
        help="the sweep: methods × batch sizes × search trials × seeds; writes results.md and plots",
        **layout,
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # ASDL 0.1a5 registers non-full backward hooks; PyTorch warns about them on every curvature pass.
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    finished = False
    try:
        code = _run(args, argv)
        finished = True
        return code
    except (ConfigError, RunDirError, FileNotFoundError, DatasetFileError) as error:
        print(f"fop-asdl: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.stop(finished)


def _run(args: argparse.Namespace, argv: List[str]) -> int:
    if args.resume and args.out is None:
        raise RunDirError("--resume needs --out, the folder of the runs to continue.")
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    saved = args.out / CONFIG_FILE if args.out is not None else None
    config_path = args.config or (saved if args.resume and saved.exists() else None)
    config = load_config(config_path, overrides)
    topo = distributed.start(config.device)
    out = (
        args.out
        or Path("runs") / f"{args.command}-{Path(args.config).stem if args.config else 'default'}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out = distributed.agree(topo, out)
    environment = describe_environment(argv, topo.device, topo.world_size)
    if args.resume:
        _check_same_code(out, environment, args.allow_mixed_study)
    if topo.is_main:
        _save_config(config, out, args.resume)
        append_environment(out, environment)
    progress = not args.no_progress and sys.stderr.isatty() and topo.is_main
    spec = _train_point(config, args) if args.command == "train" else None  # validate before loading data
    data = load_data(config, topo.device)
    if spec is not None:
        summary = train_run(spec, data, topo, out / spec.name, environment, resume=args.resume,
                            progress=progress)
        if topo.is_main:
            print(
                json.dumps(
                    {
                        k: summary[k]
                        for k in (
                            "run",
                            "epochs_to_target",
                            "train_seconds_to_target",
                            "best_accuracy",
                            "final_accuracy",
                            "diverged",
                        )
                    },
                    indent=2,
                )
            )
            print(f"outputs: {out / spec.name}", file=sys.stderr)
        return 0
    results = run_compare(config, data, topo, out, environment, resume=args.resume, progress=progress)
    if topo.is_main:
        records = [json.loads(line) for line in (out / ENVIRONMENT).read_text().splitlines()]
        table = results_markdown(config, results, records)
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(
            json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n"
        )
        plots = ", ".join(path.name for path in plot_curves(config, results, out))
        print(table, end="")
        print(
            f"outputs: {out} (results.md, results.json, {plots}, {ENVIRONMENT}, one folder per run)",
            file=sys.stderr,
        )
    return 0


def _train_point(config: ExperimentConfig, args: argparse.Namespace) -> RunSpec:
    """The first trial of the method's search, with the values of ``--point`` / ``--lr`` replacing its own."""
    method = args.method or config.methods[0]
    point = method_points(config, method)[0] if method in config.search_space else {}
    for item in args.point + ([f"lr={args.lr}"] if args.lr is not None else []):
        name, _, value = item.partition("=")
        try:
            point[name.strip()] = float(value)
        except ValueError:
            raise ConfigError("point", f"expected NAME=NUMBER, got {item!r}.") from None
    if "lr" not in point:
        raise ConfigError("lr", f"no --lr given and search_space has no entry for method {method!r}.")
    batch = config.batch_sizes[0] if args.batch_size is None else args.batch_size
    return RunSpec.at(config, method, batch, point, config.seeds[0] if args.seed is None else args.seed)


def _check_same_code(out: Path, environment: Dict[str, Any], allow: bool) -> None:
    """Refuse to resume a study with code that computes differently from its first process's, unless
    ``allow``: then ``environment`` (this process's record) says what differed."""
    first = first_record(out)
    differences = code_differences(first, environment) if first is not None else []
    if not differences:
        return
    if not allow:
        git = first["git"] or {}
        raise RunDirError(
            f"{out} was started at commit {git.get('commit', '?')[:12]} with {first['threads']['torch']} "
            f"torch threads ({ENVIRONMENT}, first line); this process differs in: {', '.join(differences)}. "
            f"A study is one code version: resume it from that commit, without uncommitted library changes "
            f"if it had none, with the same threads (torch.set_num_threads / OMP_NUM_THREADS) and library "
            f"versions, or pass --allow-mixed-study, which {ENVIRONMENT} then records."
        )
    environment["resumed_despite"] = differences


def _save_config(config: ExperimentConfig, out: Path, resume: bool) -> None:
    """Write ``out/config.yaml``; on resume, refuse a config that trains differently from the saved one."""
    path = out / CONFIG_FILE
    current = dataclasses.asdict(config)
    if resume and path.exists():
        saved = dataclasses.asdict(build_config(yaml.safe_load(path.read_text())))
        changed = changed_keys(training_settings(current), training_settings(saved))
        if changed:
            raise RunDirError(
                f"{path} was written with other values of {', '.join(changed)}; resume with the "
                f"same config, or start a new --out."
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(current, sort_keys=False))
