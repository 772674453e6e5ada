"""An ``Embedding`` called on ids shared by the whole batch (``wpe(torch.arange(T))``, nanoGPT's position
embedding) leaves the blocks of the methods that precondition Embeddings, found on the step that first
captures it.

Its output has no sample dimension: autograd sums the samples' gradients before any hook sees them, so no
per-sample curvature (K-FAC's B factor, FNGD's and HyLo's per-sample rows) can be formed for it. The
method gives it the plain gradient, as for a layer it does not know, and says so in a warning and in
``coverage()``. Which module is called that way shows only when the model runs, so the maker is rebuilt in
place with the module ignored (its constructor run again on the arguments it was made with), keeping the
registered calls and the state of its other blocks.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Dict, FrozenSet, Tuple

import asdl
from torch import nn

__all__ = ["SharedIdsFound", "ignore_shared_ids", "shared_ids_message", "shared_ids_reason"]

#: What ASDL's ``setup_model_call`` / ``setup_loss_call`` / ``setup_loss_repr`` register on a maker.
_CALL_ATTRIBUTES = ("_model_fn", "_model_args", "_model_kwargs", "_model_vmap_info", "_loss_fn", "_loss_fn_args",
                    "_loss_fn_kwargs", "_loss_vmap_info", "_dummy_loss", "_dummy_logits")


def shared_ids_message(module: nn.Module, shape: Tuple[int, ...], batch_size: int) -> str:
    """The clear error for a block whose input's dim 0 (of ``shape``) is not the batch's, with the remedies."""
    seen = f"with leading dimension {shape[0]}" if shape else "without dimensions (a scalar)"
    return (f"fop_asdl: block {module.__class__.__name__} received a tensor {seen}, but the "
            f"batch has {batch_size} samples. The gradient maker needs dim 0 to be the sample index inside every "
            f"preconditioned layer; list this module in PreconditioningConfig.ignore_modules"
            + (" or give it ids of shape (n, ...), e.g. positions.expand(n, -1) in place of arange(T)."
               if isinstance(module, nn.Embedding) else "."))


class SharedIdsFound(ValueError):
    """Raised from a block's forward when an ``Embedding`` block sees ids without the sample dimension; the
    step template catches it and calls :func:`ignore_shared_ids`. Its message is the clear error a caller
    outside that template sees."""

    def __init__(self, module: nn.Module, shape: Tuple[int, ...], batch_size: int):
        super().__init__(shared_ids_message(module, tuple(shape), batch_size))
        self.module, self.shape = module, tuple(shape)


def _strip(state: Any, names: Tuple[str, ...], modules: FrozenSet[str]) -> Any:
    """``state`` without the entries keyed by one of ``names`` in its per-block dicts: those whose every key
    is a module name (of ``modules``), so that a module named like a state key ('step', HyLo's 'g') keeps it."""
    if not isinstance(state, dict):
        return state
    per_block = bool(state) and all(isinstance(k, str) and k in modules for k in state)
    return {k: _strip(v, names, modules) for k, v in state.items() if not (per_block and k in names)}


def ignore_shared_ids(maker: Any, found: SharedIdsFound) -> None:
    """Rebuild ``maker`` in place with ``found.module`` among its ignored modules and warn once, naming it.

    The rebuild runs the maker's constructor on the arguments it was made with (kept by
    :meth:`~fop_asdl.engine.step.SteppedGradientMaker.__new__`), the config's ``ignore_modules`` extended; the
    registered model and loss calls and the state of the other blocks carry over (``state_dict`` round trip,
    the module's entries dropped). The user's own ``ignore_modules`` stay what ``coverage()`` reports as theirs.
    """
    module = found.module
    if any(m is module for m, _ in maker._shared_ids):
        raise found  # already ignored, yet captured: a bug, not a model to adapt to
    name = next(n for n, m in maker.model.named_modules() if m is module)
    args, kwargs = maker._init_call
    bound = inspect.signature(type(maker).__init__).bind(maker, *args, **kwargs)
    config = bound.arguments.get("config") or asdl.PreconditioningConfig()
    bound.arguments["config"] = dataclasses.replace(
        config, ignore_modules=list(config.ignore_modules or []) + [module])
    user_rules = list(config.ignore_modules or [])
    shared = maker._shared_ids + [(module, found.shape)]
    modules = frozenset(key for path, _ in maker.model.named_modules() for key in (path, path.replace(".", "/")))
    state = _strip(maker.state_dict(), (name, name.replace(".", "/")), modules)
    calls: Dict[str, Any] = {k: v for k, v in vars(maker).items() if k in _CALL_ATTRIBUTES}
    with warnings.catch_warnings():  # its construction warnings were given once; this one names the module
        warnings.simplefilter("ignore")
        type(maker).__init__(*bound.args, **bound.kwargs)
    vars(maker).update(calls)
    maker._init_call = (args, kwargs)
    maker._shared_ids = shared
    maker._user_ignore_modules = user_rules
    maker.load_state_dict(state)
    warnings.warn(f"fop_asdl: {maker.method_label} gives {name} (Embedding) the plain gradient: "
                  f"{shared_ids_reason(found.shape)}. Give it ids of shape (n, ...), e.g. "
                  f"positions.expand(n, -1), to precondition it.", UserWarning)


def shared_ids_reason(shape: Tuple[int, ...]) -> str:
    """Why a module found by :class:`SharedIdsFound` gets the plain gradient (for the warning and coverage)."""
    return (f"called on ids shared by the whole batch (shape {tuple(shape)}), whose per-sample gradients "
            f"autograd sums before any hook sees them")
