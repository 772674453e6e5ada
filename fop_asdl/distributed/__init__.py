"""The sharded path on ``torch.distributed``: who owns each block (``assignment``), the collectives
(``comm``) and the step's reductions and broadcasts (``sharded``). The makers use it by themselves when
``torch.distributed`` is initialised with several ranks."""
from .assignment import assign_owners, block_cost
from .comm import CollectiveError, Communicator
from .sharded import ShardedSync, resolve_sub_batches

__all__ = ["assign_owners", "block_cost", "CollectiveError", "Communicator", "ShardedSync", "resolve_sub_batches"]
