"""The preconditioning half of a Kronecker-curvature step: F̃⁻¹g per owned block from the committed curvature
(K-FAC's by default, EKFAC's and FOP's through the hooks), and the results written into ``p.grad`` with
kl_clip's ν. A mixin of :class:`~fop_asdl.curvature.kron_step.CurvatureStepMaker`, which provides the ASDL
matrices (``named_modules_for_curvature``, ``_fisher_attr``), ``grad_scale``, the sync, ``stat_keys``,
``kl_clip`` and the learning rate."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..engine.loss import loss_scale
from ..engine.trust_region import step_factor
from ..engine.vectors import BlockVector, scaled, stacked, write_block
from .products import apply_inverse, gram, has_inverse

__all__ = ["BlockGradients", "KronPreconditioning"]

#: Per block: (g_avg, the stack [g_avg; g_diff] or None), (weight, bias) pairs as ASDL's matrices act on them.
BlockGradients = Dict[str, Tuple[BlockVector, Optional[BlockVector]]]


class KronPreconditioning:
    """F̃⁻¹g for every owned block and the results in ``p.grad`` (see the module docstring)."""

    def _precondition(self, gradients: BlockGradients) -> Dict[str, Tuple[BlockVector, Optional[Tensor]]]:
        """(preconditioned gradient, per-block stats or None) of every owned block, from the committed
        curvature and inverses; ``gradients`` may be consumed. K-FAC's (and EKFAC's, through
        :meth:`_has_curvature` and :meth:`_inverse`): F̃⁻¹g_avg, with its squared F̃-norm as ``kl_base``."""
        results: Dict[str, Tuple[BlockVector, Optional[Tensor]]] = {}
        for name, _, matrix, g_avg, _ in self._blocks_with_curvature(gradients, results):
            vector = scaled(stacked(g_avg), self.grad_scale)
            weight, bias = self._inverse(name, matrix, vector)
            norm = gram(vector, (weight, bias)).reshape(1)
            results[name] = ((weight[0], None if bias is None else bias[0]), norm)
        return results

    def _blocks_with_curvature(self, gradients: BlockGradients, results: Dict[str, Any]
                               ) -> Iterator[Tuple[str, nn.Module, Any, BlockVector, Optional[BlockVector]]]:
        """(name, module, ASDL matrix, g_avg, [g_avg; g_diff] or None) of every owned block with curvature,
        popped from ``gradients`` in block order (to keep memory flat); a block without any yet gets its plain
        gradient in ``results``, as ASDL's K-FAC gives it."""
        for name, module in self.named_modules_for_curvature:
            if name not in gradients:
                continue  # not owned here, or the block took no part in the loss (autograd leaves None too)
            g_avg, pair = gradients.pop(name)
            matrix = getattr(module, self._fisher_attr, None)
            if not self._has_curvature(name, matrix):
                # a view of the stack would keep g_diff alive in p.grad
                results[name] = (g_avg if pair is None else tuple(None if t is None else t.clone() for t in g_avg),
                                 None)
                continue
            yield name, module, matrix, g_avg, pair

    def _has_curvature(self, name: str, matrix: Any) -> bool:
        """Whether the block ``name`` has the curvature :meth:`_inverse` applies: K-FAC's inverses here."""
        return has_inverse(matrix)

    def _inverse(self, name: str, matrix: Any, vec: BlockVector) -> BlockVector:
        """F̃⁻¹ v for a stack v: K-FAC's here."""
        return apply_inverse(matrix, vec)

    def _results(self, plan: Any) -> Dict[str, Tuple[BlockVector, Optional[Tensor]]]:
        """Every block's shared (preconditioned gradient, stats): formed before the check on a plain step,
        here from the just-committed curvature and inverses otherwise."""
        if plan.results is not None:
            return plan.results
        return self._sync.share(self._precondition(plan.gradients), self._block_shapes(), len(self.stat_keys))

    def _write_results(self, results: Dict[str, Tuple[BlockVector, Optional[Tensor]]]) -> None:
        """Every block's shared result into ``p.grad`` (scaled by ν with kl_clip) and its stats into
        ``last_stats``."""
        self.last_stats = {name: dict(zip(self.stat_keys, results[name][1].unbind()))
                           for name, _ in self.named_modules_for_curvature
                           if name in results and results[name][1] is not None}
        kl = [v for stats in self.last_stats.values() for k, v in stats.items() if k.startswith("kl_")]
        nu = step_factor(self.kl_clip, self._lr, kl, loss_scale(self.grad_scaler, self.device))
        if self.kl_clip is not None:
            self.last_nu = nu
        for name, module in self.named_modules_for_curvature:
            if name not in results:
                continue
            vector, stats = results[name]
            if nu is not None and stats is not None:
                # NaN stats: the owner had no curvature and wrote the plain gradient, which ν does not scale
                factor = torch.where(torch.isnan(stats[-1]), torch.ones_like(nu), nu)
                vector = scaled(vector, factor)
            write_block(module, vector)
