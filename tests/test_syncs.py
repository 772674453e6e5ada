"""Host syncs of a step, counted on the CPU (fop_asdl.diagnostics.syncs): what would stall a GPU."""

import torch

from fop_asdl.diagnostics.syncs import HostSyncCounter


# --- the counter ------------------------------------------------------------------------------------
def test_the_counter_counts_every_kind_of_sync_and_nothing_else():
    x = torch.randn(4, 4)
    spd = x @ x.T + torch.eye(4)
    with HostSyncCounter() as counter:
        y = (x * 2 + 1).sum(0)  # arithmetic and reductions: no sync
        torch.linalg.cholesky_ex(spd)  # the _ex solvers keep their error codes on the device
    assert counter.count == 0, counter.report()
    syncs = [
        ("_local_scalar_dense", lambda: y.sum().item()),
        ("_local_scalar_dense", lambda: bool(y.sum() > 0)),
        ("_local_scalar_dense", lambda: float(y.sum())),
        ("_local_scalar_dense", lambda: max(y.sum(), 1e-7)),  # a comparison with a Python number
        ("tolist", lambda: y.tolist()),
        ("numpy", lambda: y.numpy()),
        ("nonzero", lambda: y.nonzero()),
        ("index", lambda: y[y > 0]),  # a boolean mask: the output's length depends on the data
        ("masked_select", lambda: torch.masked_select(y, y > 0)),
        ("_unique2", lambda: torch.unique(y)),
        ("repeat_interleave", lambda: torch.repeat_interleave(torch.tensor([1, 2]))),
        ("equal", lambda: torch.equal(y, y)),
        ("_linalg_check_errors", lambda: torch.linalg.cholesky(spd)),
        ("_linalg_check_errors", lambda: torch.linalg.inv(spd)),
        ("_linalg_eigh", lambda: torch.linalg.eigh(spd)),
    ]
    for op, sync in syncs:
        with HostSyncCounter() as counter:
            sync()
        assert counter.by_op() == {op: 1}, (op, counter.report())
        assert counter.events[0].where.startswith(__file__.rsplit("/", 1)[0]), counter.events[0].stack
    assert "tolist" not in vars(torch.Tensor)  # the Tensor methods are restored on exit


def test_a_copy_counts_only_between_the_host_and_a_device_and_only_when_blocking():
    x = torch.randn(3)
    with HostSyncCounter() as counter:
        x.to("cpu", torch.float64)
        x.clone().copy_(x)
    assert counter.count == 0
    device = torch.empty(3, device="meta")  # stands for a GPU tensor on a machine without one
    to_copy, copy = torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default
    assert HostSyncCounter._syncs("_to_copy", to_copy, (device,), {"device": "cpu"})  # device to host
    assert HostSyncCounter._syncs("_to_copy", to_copy, (x,), {"device": "meta"})  # host to device
    assert not HostSyncCounter._syncs("_to_copy", to_copy, (x,), {"device": "meta", "non_blocking": True})
    assert not HostSyncCounter._syncs("_to_copy", to_copy, (x,), {"dtype": torch.float64})
    assert HostSyncCounter._syncs("copy_", copy, (x, device), {})
    assert HostSyncCounter._syncs("copy_", copy, (device, x), {})
    assert not HostSyncCounter._syncs("copy_", copy, (device, x, True), {})
    assert not HostSyncCounter._syncs("copy_", copy, (device, device), {})
