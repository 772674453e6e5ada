"""The runner's method table: everything the runner knows about a method is its one :class:`MethodSpec`.

A runner method is a torch optimizer fed by a gradient maker (``fop_asdl.make_gradient_maker``): SGD,
AdamW and the baselines of docs/baselines.md (LARS, LAMB, SOAP, grafted Shampoo, Muon, Schedule-Free AdamW,
from optional pinned libraries) step on the plain mean gradient of the ``"sgd"`` maker, K-FAC, FOP, FNGD
and HyLo on their preconditioned gradients, with SGD momentum. The rest of the runner reads this table and
names no method: the config checks (which names exist, what each may search, the valid ranges), the search
(the order of a point's dimensions), the protocol (the optimizer, the maker and its options), the training
loop (its hooks) and the report.

Adding a method is one entry in :data:`METHODS` (and its tests and docs). Inside the entry, a new torch
optimizer is an :class:`OptimizerSpec`; a new searched value a :class:`Hyperparameter`, which (lr aside)
is a field of :class:`~.experiment.ExperimentSettings`. A built-in grid for the method (so that
``--set methods=[name]`` runs with nothing else) is the built-in experiment's ``search_space`` default,
spelled out in ``configs/default.yaml``; it is optional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import asdl
import torch
from torch import nn

from ..optim import baselines
from .experiment import ExperimentSettings

__all__ = [
    "Hyperparameter",
    "OptimizerSpec",
    "MakerInputs",
    "EpochStart",
    "MethodSpec",
    "SGD_MOMENTUM",
    "ADAMW",
    "METHODS",
    "searchable",
    "in_range",
    "missing_library",
]


# --- what a search may vary -------------------------------------------------------------------------
@dataclass(frozen=True)
class Hyperparameter:
    """A value a method's search may vary: ``lr`` (the base learning rate at ``base_batch``) or the config
    field of this name (its value in the config is what runs when the search leaves it alone)."""

    name: str
    valid: Callable[[float], bool]
    valid_text: str  # the valid range in words, for messages: "> 0", "in (0, 1]"


def _positive(v: float) -> bool:
    return 0 < v < math.inf


LR = Hyperparameter("lr", _positive, "> 0")
WEIGHT_DECAY = Hyperparameter("weight_decay", lambda v: 0 <= v < math.inf, ">= 0")
MOMENTUM = Hyperparameter("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
DAMPING = Hyperparameter("damping", _positive, "> 0")
EMA_DECAY = Hyperparameter("ema_decay", lambda v: 0 < v <= 1, "in (0, 1]")
FNGD_ALPHA = Hyperparameter("fngd_alpha", _positive, "> 0")
OTHERS_LR = Hyperparameter("others_lr", _positive, "> 0")


# --- the torch optimizers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """A torch optimizer as the runner builds it: ``build(parameters, lr, config)``, with the run's
    (batch-scaled) lr and its config (``update_interval`` resolved to the run's interval in steps, an int),
    reading the config fields of ``hyperparameters`` (lr first)."""

    label: str
    hyperparameters: Tuple[Hyperparameter, ...]
    build: Callable[[Iterable[nn.Parameter], float, ExperimentSettings], torch.optim.Optimizer]


#: torch's SGD with momentum and coupled weight decay (the optimizer's L2).
SGD_MOMENTUM = OptimizerSpec(
    "SGD momentum", (LR, WEIGHT_DECAY, MOMENTUM),
    lambda params, lr, c: torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay),
)
#: torch's AdamW: its own betas, decoupled weight decay.
ADAMW = OptimizerSpec(
    "AdamW", (LR, WEIGHT_DECAY),
    lambda params, lr, c: torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay),
)

# The baselines of docs/baselines.md, each from its pinned library with its paper's defaults
# (fop_asdl.optim.baselines). SOAP and Shampoo refresh their bases / roots at the run's update interval, as
# K-FAC and FOP do. The hyperparameter after lr is the one a method's built-in search varies besides lr.
LARS = OptimizerSpec("LARS", (LR, WEIGHT_DECAY, MOMENTUM), lambda params, lr, c: baselines.lars(
    params, lr, momentum=c.momentum, weight_decay=c.weight_decay))
LAMB = OptimizerSpec("LAMB", (LR, WEIGHT_DECAY), lambda params, lr, c: baselines.lamb(
    params, lr, weight_decay=c.weight_decay))
SOAP = OptimizerSpec("SOAP", (LR, WEIGHT_DECAY), lambda params, lr, c: baselines.soap(
    params, lr, weight_decay=c.weight_decay, precondition_frequency=c.update_interval))
GRAFTED_SHAMPOO = OptimizerSpec(
    "Shampoo grafted to RMSProp", (LR, MOMENTUM, WEIGHT_DECAY), lambda params, lr, c: baselines.grafted_shampoo(
        params, lr, momentum=c.momentum, weight_decay=c.weight_decay,
        precondition_frequency=c.update_interval))
MUON = OptimizerSpec("Muon", (LR, MOMENTUM, WEIGHT_DECAY, OTHERS_LR), lambda params, lr, c: baselines.muon(
    params, lr, momentum=c.momentum, weight_decay=c.weight_decay))
ADAMW_SCHEDULEFREE = OptimizerSpec("Schedule-Free AdamW", (LR, WEIGHT_DECAY), lambda params, lr, c: (
    baselines.adamw_schedulefree(params, lr, weight_decay=c.weight_decay)))


# --- what a method's functions see ------------------------------------------------------------------
@dataclass(frozen=True)
class MakerInputs:
    """What a method's own maker options are made from."""

    config: ExperimentSettings  # the run's config, its searched values written in
    steps_per_epoch: Optional[int]  # optimizer steps per epoch at the run's batch size


@dataclass(frozen=True)
class EpochStart:
    """What an ``epoch_start`` hook sees: called after an epoch's evaluation and plateau step, before the
    next epoch trains (not before the first, nor on resume)."""

    maker: asdl.GradientMaker
    optimizer: torch.optim.Optimizer
    epoch: int  # the 0-based index of the epoch about to start (= the number of epochs done)
    lr_dropped: bool  # the lr at the end of the finished epoch is below its lr at its start


def _no_options(run: MakerInputs) -> Dict[str, Any]:
    return {}


# --- a method ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One runner method: its optimizer, its gradient maker and how the config reaches them.

    Options every maker takes are not listed here (``micro_batch_size``, passed when set and below a
    rank's batch). The ``takes_*`` flags say which of the study's shared settings reach this method; a
    setting it does not take is withheld, not an error, so one study can set ``kl_clip`` for the methods
    that take it and still run the others.
    """

    name: str  # the name in configs, run folders and --method
    label: str  # in words, for --help: "K-FAC + SGD momentum"
    optimizer: OptimizerSpec
    maker: str  # the make_gradient_maker name; "sgd": the plain mean gradient
    #: The maker gets an ``asdl.PreconditioningConfig`` (damping, ema_decay, the run's update interval for
    #: curvature and preconditioner; with others_optimizer set, normalization layers left out); else None.
    preconditioning: bool = False
    #: Searchable besides the optimizer's hyperparameters, in the order a search point lists them.
    maker_hyperparameters: Tuple[Hyperparameter, ...] = ()
    #: The method's own maker options, from the run's config and epoch length.
    options: Callable[[MakerInputs], Dict[str, Any]] = _no_options
    takes_kl_clip: bool = False  # kl_clip, with the run's current lr (warm-up and schedule included)
    needs_lr: bool = False  # the run's current lr whatever kl_clip says (K-BFGS's second pass at θ − lr·Δ)
    takes_ema_bias_correction: bool = False  # ema_bias_correction=True, when set
    #: others_optimizer "adamw" (the paper's transformer protocol): this method's optimizer steps the blocks
    #: its maker preconditions, AdamW (others_lr, others_weight_decay) every other parameter.
    takes_others_optimizer: bool = False
    #: The maker's per-block β and η (``last_stats``) go into each epoch's ``fop_stats`` and the summary's
    #: ``fop_stats_per_epoch``.
    block_stats: bool = False
    #: Called between epochs (:class:`EpochStart`); None: nothing to do.
    epoch_start: Optional[Callable[[EpochStart], None]] = None
    #: The import names of the optional libraries its optimizer comes from (the ``baselines`` extra): a
    #: config or run naming the method is refused, with the command that installs them, when one is missing.
    libraries: Tuple[str, ...] = ()
    #: The parameters its optimizer steps when it cannot step them all (Muon: hidden weight matrices); AdamW
    #: (``others_lr``, ``others_weight_decay``) steps the rest, the two joined by ``HybridOptimizer``.
    own_parameters: Optional[Callable[[nn.Module], List[nn.Parameter]]] = None
    #: The optimizer keeps the weights it trains apart from those it evaluates (Schedule-Free: y and x):
    #: the runner calls ``optimizer.eval()`` before each evaluation, so a checkpoint holds the evaluated
    #: weights, and ``optimizer.train()`` before each epoch trains.
    optimizer_modes: bool = False

    @property
    def hyperparameters(self) -> Tuple[Hyperparameter, ...]:
        """What a search may vary, in order (a Halton point's dimensions and the run folder follow it):
        the optimizer's (lr first), then the maker's."""
        return self.optimizer.hyperparameters + self.maker_hyperparameters

    @property
    def hyperparameter_names(self) -> Tuple[str, ...]:
        return tuple(h.name for h in self.hyperparameters)


def _table(*methods: MethodSpec) -> Dict[str, MethodSpec]:
    return {m.name: m for m in methods}


#: The runner's methods by name, in the order ``--help`` lists them.
METHODS: Dict[str, MethodSpec] = _table(
    MethodSpec(name="sgd", label="SGD momentum", optimizer=SGD_MOMENTUM, maker="sgd"),
    MethodSpec(name="adamw", label="AdamW", optimizer=ADAMW, maker="sgd"),
    MethodSpec(
        name="kfac",
        label="K-FAC + SGD momentum",
        optimizer=SGD_MOMENTUM,
        maker="kfac",
        preconditioning=True,
        maker_hyperparameters=(DAMPING, EMA_DECAY),
        takes_kl_clip=True,
        takes_ema_bias_correction=True,
        takes_others_optimizer=True,
    ),
    MethodSpec(
        name="fop",
        label="FOP + SGD momentum",
        optimizer=SGD_MOMENTUM,
        maker="fop",
        preconditioning=True,
        maker_hyperparameters=(DAMPING, EMA_DECAY),
        takes_kl_clip=True,
        takes_ema_bias_correction=True,
        takes_others_optimizer=True,
        block_stats=True,
    ),
    MethodSpec(
        name="fngd",
        label="FNGD + SGD momentum",
        optimizer=SGD_MOMENTUM,
        maker="fngd",  # no PreconditioningConfig: FNGD forms its own coefficients
        maker_hyperparameters=(FNGD_ALPHA,),
        # iters_per_epoch: where its coefficient epoch ends; alpha: its damping λ = α‖K‖_F.
        options=lambda run: {"iters_per_epoch": run.steps_per_epoch, "alpha": run.config.fngd_alpha},
        # Refused by its maker: after its coefficient epochs it reuses stored weights, so its step is not
        # F̃⁻¹g for any F̃ of the batch and has no Fisher norm to bound.
        takes_kl_clip=False,
    ),
    MethodSpec(
        name="hylo",
        label="HyLo + SGD momentum",
        optimizer=SGD_MOMENTUM,
        maker="hylo",
        preconditioning=True,
        maker_hyperparameters=(DAMPING,),
        options=lambda run: {"iters_per_epoch": run.steps_per_epoch},  # it picks KID or KIS per epoch
        takes_kl_clip=True,
        # Its "gradient" switch policy turns to KID for some epochs after an lr decay.
        epoch_start=lambda e: e.maker.on_epoch_start(e.epoch, e.lr_dropped),
    ),
    # ASDL's other preconditioners, fixed (docs/methods/): SGD momentum on their preconditioned gradients.
    MethodSpec(name="smw_ng", label="SMW-NG + SGD momentum", optimizer=SGD_MOMENTUM, maker="smw_ng",
               preconditioning=True, maker_hyperparameters=(DAMPING,), takes_kl_clip=True),
    MethodSpec(name="seng", label="SENG + SGD momentum", optimizer=SGD_MOMENTUM, maker="seng",
               preconditioning=True, maker_hyperparameters=(DAMPING,)),  # refuses kl_clip: its step is sketched
    MethodSpec(name="diag_ng", label="diagonal NG + SGD momentum", optimizer=SGD_MOMENTUM, maker="diag_ng",
               preconditioning=True, maker_hyperparameters=(DAMPING, EMA_DECAY), takes_kl_clip=True,
               takes_ema_bias_correction=True),
    # K-BFGS takes its (s, y) pair from a second pass at θ − lr·Δ: it needs the run's current lr.
    MethodSpec(name="kbfgs", label="K-BFGS + SGD momentum", optimizer=SGD_MOMENTUM, maker="kbfgs",
               preconditioning=True, maker_hyperparameters=(DAMPING, EMA_DECAY), needs_lr=True),
    # Its preconditioner fits itself (precond_lr); the search varies the lr of the step.
    MethodSpec(name="kron_psgd", label="Kronecker PSGD + SGD momentum", optimizer=SGD_MOMENTUM,
               maker="kron_psgd", preconditioning=True),
    # EKFAC (docs/methods/ekfac.md): K-FAC's factors, eigenbases refreshed and rescaling re-estimated at the
    # run's interval; its damping is added to s, so it is less damped than K-FAC at the same value.
    MethodSpec(name="ekfac", label="EKFAC + SGD momentum", optimizer=SGD_MOMENTUM, maker="ekfac",
               preconditioning=True, maker_hyperparameters=(DAMPING, EMA_DECAY), takes_kl_clip=True,
               takes_ema_bias_correction=True, takes_others_optimizer=True),
    MethodSpec(name="fop_ekfac", label="FOP over EKFAC + SGD momentum", optimizer=SGD_MOMENTUM, maker="fop",
               preconditioning=True, maker_hyperparameters=(DAMPING, EMA_DECAY),
               options=lambda run: {"curvature": "ekfac"}, takes_kl_clip=True, takes_ema_bias_correction=True,
               takes_others_optimizer=True, block_stats=True),
    # Shampoo (docs/methods/shampoo.md): damping is its ε (roots of L + εI). Factors of at most 256×256 (ASDL's
    # whole matrices take seconds per root step on a 3072-wide layer); grafted to SGD's step norm, so SGD's
    # learning rates carry over (its own step's norm is unrelated to the gradient's). It refuses kl_clip.
    MethodSpec(name="shampoo", label="Shampoo (SGD-grafted) + SGD momentum", optimizer=SGD_MOMENTUM,
               maker="shampoo", preconditioning=True, maker_hyperparameters=(DAMPING, EMA_DECAY),
               options=lambda run: {"block_size": 256, "grafting": "sgd"}),
    # The baselines (docs/baselines.md): optimizers on the plain mean gradient of the "sgd" maker.
    MethodSpec(name="lars", label="LARS", optimizer=LARS, maker="sgd", libraries=("pytorch_optimizer",)),
    MethodSpec(name="lamb", label="LAMB", optimizer=LAMB, maker="sgd", libraries=("pytorch_optimizer",)),
    MethodSpec(name="soap", label="SOAP", optimizer=SOAP, maker="sgd", libraries=("pytorch_optimizer",)),
    MethodSpec(name="shampoo_grafted", label="Shampoo grafted to RMSProp, an optimizer",
               optimizer=GRAFTED_SHAMPOO, maker="sgd", libraries=("pytorch_optimizer",)),
    # Its author's recipe: Muon for the hidden weight matrices, AdamW for every other parameter.
    MethodSpec(name="muon", label="Muon + AdamW", optimizer=MUON, maker="sgd",
               libraries=("pytorch_optimizer",), own_parameters=baselines.hidden_matrices),
    # Trains at y, is evaluated (and checkpointed) at x.
    MethodSpec(name="adamw_schedulefree", label="Schedule-Free AdamW", optimizer=ADAMW_SCHEDULEFREE,
               maker="sgd", libraries=("schedulefree",), optimizer_modes=True),
)


def searchable() -> Dict[str, Hyperparameter]:
    """Every hyperparameter some method of :data:`METHODS` may search, by name, in table order (lr first,
    then config fields). One config field has one valid range, so two methods naming the same field must
    name the same :class:`Hyperparameter`."""
    out: Dict[str, Hyperparameter] = {}
    for method in METHODS.values():
        for h in method.hyperparameters:
            if out.setdefault(h.name, h) is not h:
                raise ValueError(f"method {method.name!r}: two different hyperparameters are named {h.name!r}.")
    return out


def in_range(name: str, value: float) -> bool:
    """``value`` is valid for the searchable hyperparameter ``name``."""
    return searchable()[name].valid(value)


def missing_library(method: MethodSpec) -> Optional[str]:
    """Why ``method`` cannot run here (a library it needs is missing; how to install it), or None."""
    missing = baselines.missing_libraries(method.libraries)
    if not missing:
        return None
    return (f"method {method.name!r} needs {', '.join(missing)}, which is not installed: "
            f"{baselines.install_hint(missing)}.")
