"""One training run: the ASDL training loop, per-epoch evaluation, outputs, checkpoints and resume.

Every method goes through the same loop (``setup_model_call`` / ``setup_loss_call`` /
``forward_and_backward``, then ``optimizer.step()``), plus the hooks its entry in the method table names.
Within an epoch nothing waits on the device: the loss and FOP's β/η are summed on the device and read once
per epoch, after the epoch's clock stops.
Training time and evaluation time are kept apart; "seconds to target" counts training time only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data import ArrayDataset
from .batches import AUGMENT_SEED_OFFSET, EpochBatches, augmentation
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import changed_keys, training_settings, with_defaults
from .distributed import Topology
from .methods import EpochStart
from .protocol import (
    RunSpec,
    build_gradient_maker,
    build_model_for,
    build_optimizer,
    build_scheduler,
    loss_function,
)
from .stats import BlockStats
from .warmup import warmed_up, warmup_factor, warmup_steps

__all__ = ["train_run", "RunDirError", "CHECKPOINT", "EPOCHS", "SUMMARY"]

CHECKPOINT, EPOCHS, SUMMARY = "checkpoint.pt", "epochs.jsonl", "summary.json"


class RunDirError(RuntimeError):
    """The output folder holds a run this command must not touch: no ``--resume``, or other settings."""


class Trainer:
    """The state of one run (model, optimizer, schedule, gradient maker, data generators, history)."""

    def __init__(self, spec: RunSpec, data: ArrayDataset, topo: Topology):
        c = spec.config
        self.spec, self.data, self.topo = spec, data, topo
        torch.manual_seed(spec.seed)  # model init, and the global RNG ASDL's Monte-Carlo Fisher samples from
        self.model = build_model_for(c, data).to(topo.device)
        self.batches = EpochBatches(data, c, spec.batch_size, spec.seed, topo)
        self.warmup = warmup_steps(c, self.batches.steps_per_epoch)
        self._warmup_now = 1.0  # the warm-up factor of the step being taken
        self.maker = build_gradient_maker(spec, self.model, self.batches.local, self.batches.steps_per_epoch,
                                          lr=lambda: self.optimizer.param_groups[0]["lr"] * self._warmup_now)
        self.optimizer = build_optimizer(spec, self.model, self.maker)  # the hybrid protocol asks the maker
        self.scheduler = build_scheduler(spec, self.optimizer, self.batches.steps_per_epoch)
        self.loss_fn = loss_function(c)
        self.stats = BlockStats() if spec.method_spec.block_stats else None
        self.history: List[Dict[str, Any]] = []
        self.diverged = False

    # --- the loop ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return len(self.history)

    def done(self) -> bool:
        c = self.spec.config
        reached = bool(self.history) and self.history[-1]["test_accuracy"] >= c.target_accuracy
        return self.diverged or self.epoch >= self.spec.epochs or (c.stop_at_target and reached)

    def run_epoch(self, on_step: Callable[[], Any]) -> Dict[str, Any]:
        """Train one epoch, evaluate, step the plateau schedule; returns the epoch's record."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, steps, seconds = self._train_epoch(on_step)
        self._optimizer_mode(training=False)  # Schedule-Free: the weights to evaluate (and checkpoint)
        start = time.perf_counter()
        accuracy = evaluate(self.model, self.data.x_test, self.data.y_test, self.spec.config.eval_batch_size)
        eval_seconds = time.perf_counter() - start
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(accuracy)
        epoch_start = self.spec.method_spec.epoch_start
        if epoch_start is not None:
            dropped = self.optimizer.param_groups[0]["lr"] < lr
            epoch_start(EpochStart(self.maker, self.optimizer, self.epoch + 1, dropped))
        loss = loss_sum.item() / max(steps, 1)
        self.diverged = self.diverged or not math.isfinite(loss)
        previous = self.history[-1]["train_seconds_total"] if self.history else 0.0
        record = {
            "epoch": self.epoch + 1,
            "train_loss": loss if math.isfinite(loss) else None,
            "test_accuracy": accuracy,
            "lr": lr,
            "train_seconds": seconds,
            "train_seconds_total": previous + seconds,
            "eval_seconds": eval_seconds,
            "steps": steps,
            "load_average": _load_average(),
        }
        if self.stats is not None:
            record["fop_stats"] = self.stats.read()
        self.history.append(record)
        return record

    def _train_epoch(self, on_step: Callable[[], Any]) -> Tuple[Tensor, int, float]:
        device = self.topo.device
        loss_sum = torch.zeros((), device=device)
        steps = 0
        per_step_schedule = self.scheduler is not None and not isinstance(
            self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
        )
        done = sum(r["steps"] for r in self.history)  # steps before this epoch: where the warm-up stands
        self._optimizer_mode(training=True)
        start = time.perf_counter()
        for x, y in self.batches.epoch():
            self._warmup_now = warmup_factor(done + steps, self.warmup)
            self.optimizer.zero_grad(set_to_none=True)
            dummy_y = self.maker.setup_model_call(self.model, x)
            self.maker.setup_loss_call(self.loss_fn, dummy_y, y)
            try:
                _, loss = self.maker.forward_and_backward()
            except FloatingPointError:  # the maker refuses a NaN/Inf step rather than taking it
                self.diverged = True
                break
            with warmed_up(self.optimizer, self._warmup_now):
                self.optimizer.step()
            if per_step_schedule:
                self.scheduler.step()
            loss_sum += loss.detach()
            if self.stats is not None:
                self.stats.add(self.maker.last_stats)
            steps += 1
            on_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock must include the queued work
        return loss_sum, steps, time.perf_counter() - start

    def _optimizer_mode(self, training: bool) -> None:
        """``optimizer.train()`` / ``.eval()`` for a method whose entry says its optimizer has modes."""
        if self.spec.method_spec.optimizer_modes:
            self.optimizer.train() if training else self.optimizer.eval()

    # --- results ----------------------------------------------------------------------------------
    def summary(self, environment: Dict[str, Any]) -> Dict[str, Any]:
        c, spec = self.spec.config, self.spec
        accuracies = [r["test_accuracy"] for r in self.history]
        reached = next((r for r in self.history if r["test_accuracy"] >= c.target_accuracy), None)
        summary = {
            "run": spec.describe(),
            "config": dataclasses.asdict(c),
            "seeds": {
                "model_init": spec.seed,
                "data_order": spec.seed,
                "augmentation": spec.seed + AUGMENT_SEED_OFFSET,
            },
            "augmentation": augmentation(c),
            "train_size": len(self.data.x_train),
            "test_size": len(self.data.x_test),
            "target_accuracy": c.target_accuracy,
            "epochs_to_target": reached["epoch"] if reached else None,
            "train_seconds_to_target": reached["train_seconds_total"] if reached else None,
            "best_accuracy": max(accuracies, default=None),
            "final_accuracy": accuracies[-1] if accuracies else None,
            "epochs_run": self.epoch,
            "warmup_steps": self.warmup,
            "diverged": self.diverged,
            "train_seconds": self.history[-1]["train_seconds_total"] if self.history else 0.0,
            "eval_seconds": sum(r["eval_seconds"] for r in self.history),
            "curve": {
                "test_accuracy": accuracies,
                "train_seconds_total": [r["train_seconds_total"] for r in self.history],
            },
            "coverage": self.maker.coverage().as_dict(),
            "environment": environment,
        }
        if self.stats is not None:
            summary["fop_stats_per_epoch"] = [r["fop_stats"] for r in self.history]
        return summary

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "run": self.spec.describe(),
            "config": dataclasses.asdict(self.spec.config),
            "history": self.history,
            "diverged": self.diverged,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "maker": self.maker.state_dict() if hasattr(self.maker, "state_dict") else None,
            "batches": self.batches.state_dict(),
            "rng": rng_state(self.topo.device),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, current, saved in (
            ("run", self.spec.describe(), state["run"]),
            ("config", training_settings(dataclasses.asdict(self.spec.config)),
             training_settings(with_defaults(state["config"]))),
        ):
            changed = changed_keys(current, saved)
            if changed:
                raise RunDirError(
                    f"the checkpoint was written with other settings ({', '.join(changed)}); "
                    f"resume with the same config, or start a new run directory."
                )
        self.history, self.diverged = state["history"], state["diverged"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["maker"] is not None:
            self.maker.load_state_dict(state["maker"])
        self.batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"], self.topo.device)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Test accuracy in eval mode (BatchNorm running statistics); one host read at the end."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()
    model.train()
    return correct.item() / len(x)


def train_run(
    spec: RunSpec,
    data: ArrayDataset,
    topo: Topology,
    run_dir: Path,
    environment: Dict[str, Any],
    resume: bool = False,
    progress: bool = False,
) -> Dict[str, Any]:
    """Train (or, with ``resume``, continue) the run ``spec`` in ``run_dir``; returns its summary.

    Rank 0 writes ``epochs.jsonl`` (one record per epoch), ``checkpoint.pt`` (after every epoch) and
    ``summary.json`` (at the end, with ``environment``: this process's record). A finished run is not
    trained again on resume.
    """
    trainer = Trainer(spec, data, topo)
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        if not resume:
            raise RunDirError(
                f"{run_dir} already holds a run; pass --resume to continue it, or another --out."
            )
        trainer.load_state_dict(load_checkpoint(checkpoint))
    if topo.is_main:
        print(f"{spec.name}: {trainer.maker.coverage().summary()}", file=sys.stderr, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_lines(run_dir / EPOCHS, trainer.history)  # drops records written after the checkpoint
    steps = trainer.batches.steps_per_epoch
    with tqdm(
        total=spec.epochs * steps,
        initial=trainer.epoch * steps,
        desc=spec.name,
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=not progress,
    ) as bar:
        while not trainer.done():
            record = trainer.run_epoch(lambda: bar.update(1))
            bar.set_postfix(acc=f"{record['test_accuracy']:.3f}")
            state = trainer.state_dict()  # on every rank: a sharded maker gathers its curvature collectively
            if topo.is_main:
                _write_lines(run_dir / EPOCHS, [record], append=True)
                save_checkpoint(checkpoint, state)
    summary = trainer.summary(environment)
    if topo.is_main:
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_average() -> Optional[float]:
    """The machine's 1-minute load average after the epoch: above the threads this run uses, other work
    shared the cores and the epoch's seconds are inflated (its accuracies are not)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _write_lines(path: Path, records: List[Dict[str, Any]], append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
