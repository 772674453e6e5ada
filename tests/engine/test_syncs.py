"""Host syncs of a step, counted on the CPU (fop_asdl.diagnostics.syncs): what would stall a GPU.

The counter itself counts what it must; a plain step of every method of the switch but SENG does at most one
(the fused finiteness check behind the clear error); a curvature, coefficient or refresh step does a number
that does not grow with the number of blocks (EKFAC and Shampoo: one per factor size, SENG: one per truncated
block, every step); the runner's training loop adds none between epochs.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
import fop_asdl.cli.train as train_module
from fop_asdl.cli import main
from fop_asdl.diagnostics.syncs import HostSyncCounter, count_syncs

from scaffold import config, small_image_batch, step

METHODS = ["sgd", "kfac", "fop", "fngd", "hylo"]
#: The methods issue 23 added to the switch; SENG, whose every step truncates each convolution's positions by an
#: SVD, has tests of its own below.
MORE_METHODS = ["ekfac", "shampoo", "diag_ng", "kbfgs", "kron_psgd", "smw_ng"]
OPTIONS = {"kbfgs": {"lr": 0.1}}  # its second pass steps back by the learning rate
INTERVAL = 2  # curvature / refresh every other step
ITERS_PER_EPOCH = 2  # FNGD's coefficient epoch and HyLo's epoch: two steps


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


# --- the makers -------------------------------------------------------------------------------------
def net(extra_blocks: int = 0) -> nn.Module:
    """Conv2d, BatchNorm, Linear, LayerNorm blocks, and ``extra_blocks`` more Linear ones."""
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
              nn.LayerNorm(8), nn.Tanh()]
    for _ in range(extra_blocks):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 3)).double()


def counts_per_step(name, extra_blocks=0, steps=6, loss_fn=F.cross_entropy, **options):
    """Syncs of each of ``steps`` steps of ``name``'s maker (curvature or refresh on even steps)."""
    torch.manual_seed(0)
    model = net(extra_blocks)
    if name in ("fngd", "hylo"):
        options.setdefault("iters_per_epoch", ITERS_PER_EPOCH)
    options = {**OPTIONS.get(name, {}), **options}
    cfg = config(curvature_upd_interval=INTERVAL, preconditioner_upd_interval=INTERVAL)
    maker = fop_asdl.make_gradient_maker(name, model, cfg, **options)
    counts = []
    for i in range(steps):
        x, t = small_image_batch(i)
        _, counter = count_syncs(lambda: step(maker, model, x, t, loss_fn))
        counts.append(counter)
    return counts


def plain_steps(name, counts):
    """The steps that form no curvature, coefficients or low-rank factors."""
    if name == "fngd":  # coefficients in epoch 0 (steps 0, 1); weighted sums after
        return counts[ITERS_PER_EPOCH:]
    return counts[1::INTERVAL]


def heavy_steps(name, counts):
    if name == "fngd":
        return counts[:ITERS_PER_EPOCH]
    return counts[0::INTERVAL]


@pytest.mark.parametrize("name", METHODS + MORE_METHODS)
def test_a_plain_step_does_at_most_one_sync(name):
    for counter in plain_steps(name, counts_per_step(name)):
        assert counter.count <= 1, counter.report()
        assert all("_check_finite" in " ".join(e.stack) for e in counter.events), counter.report()


@pytest.mark.parametrize("name, options", [
    ("kfac", {}), ("fop", {}), ("fngd", {}), ("hylo", {}), ("sgd", {}),
    ("fop", {"fisher_type": "fisher_emp", "projection_metric": "damped"}),
    ("kfac", {"fisher_type": "fisher_exact", "micro_batch_size": 3}),
    ("fop", {"micro_batch_size": 3, "kl_clip": 1e-3, "lr": 0.1}),
    ("kfac", {"swift": True}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_a_curvature_or_refresh_step_does_syncs_that_do_not_grow_with_the_blocks(name, options):
    few, many = (heavy_steps(name, counts_per_step(name, extra, **options)) for extra in (0, 4))
    for small, large in zip(few, many):
        assert large.count == small.count <= 2, (small.report(), large.report())


@pytest.mark.parametrize("name", ["diag_ng", "kbfgs", "kron_psgd", "smw_ng"])
def test_the_other_methods_curvature_steps_do_only_the_check(name):
    for small, large in zip(*(heavy_steps(name, counts_per_step(name, extra)) for extra in (0, 4))):
        assert large.count == small.count == 1, (small.report(), large.report())


@pytest.mark.parametrize("name, where, others", [
    ("ekfac", "eigenbases", ["invert_all", "_check_finite"]),  # K-FAC's curvature step and the eigenbases
    ("shampoo", "inverse_root", ["_check_finite"]),
])
def test_an_eigendecomposition_step_reads_one_flag_per_factor_size(name, where, others):
    """torch.linalg.eigh has no error-free variant: each call reads its convergence flag on the host. The
    factors of one size share one batched call, so four more blocks of the sizes already there add none."""
    few, many = (heavy_steps(name, counts_per_step(name, extra)) for extra in (0, 4))
    for small, large in zip(few, many):
        assert large.count == small.count, (small.report(), large.report())
        eigh = [e for e in small.events if e.op == "_linalg_eigh"]
        assert eigh and all(where in e.where for e in eigh), small.report()
        rest = [e.where.split()[-1] for e in small.events if e.op != "_linalg_eigh"]  # the calling function
        assert sorted(rest) == sorted(others), small.report()


def test_seng_reads_one_svd_flag_per_truncated_block_on_every_step():
    """SENG truncates each sample's output gradient over a convolution's positions (36 here, rank 16) by an
    SVD on every step, batched over the samples: one flag per such block, besides the check. Linear blocks
    have one position each and add none."""
    few, many = counts_per_step("seng"), counts_per_step("seng", extra_blocks=4)
    for small, large in zip(few, many):
        assert large.count == small.count == 2, (small.report(), large.report())
        assert [e.op for e in small.events] == ["_linalg_svd", "_local_scalar_dense"], small.report()


def test_the_curvature_steps_two_syncs_are_the_check_and_the_inverses():
    """K-FAC's and FOP's curvature step: the fused check, and one read of which blocks' inverses need the
    eigenvalue-floor fallback (was: ~7 per block, ASDL's π and all-zero tests and Cholesky checks)."""
    for name in ("kfac", "fop"):
        counter = counts_per_step(name, extra_blocks=4, steps=1)[0]
        places = sorted(e.where.rsplit(" ", 1)[1] for e in counter.events)
        assert places == ["_check_finite", "invert_all"], counter.report()


@pytest.mark.parametrize("scaler", [False, True])
def test_nan_logits_on_a_monte_carlo_curvature_step_still_raise_or_skip(scaler):
    """Sampling ASDL's Fisher from NaN logits no longer reads the device first: the NaN loss reaches the
    fused check, which raises the clear error, or with a GradScaler skips the step."""
    validation = torch.distributions.Distribution._validate_args  # torch.compile (dynamo) turns it off for good
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        check_nan_logits(scaler)
        assert torch.distributions.Distribution._validate_args  # switched back on after the Fisher pass
    finally:
        torch.distributions.Distribution.set_default_validate_args(validation)


def check_nan_logits(scaler):
    torch.manual_seed(0)
    model = net().float()
    grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
    maker = fop_asdl.make_gradient_maker("fop", model, config(), fisher_type="fisher_mc", grad_scaler=grad_scaler)
    x, t = small_image_batch(0)
    x = x.float()
    x[2] = float("nan")
    if scaler:
        step(maker, model, x, t)
        assert maker.last_step_skipped and maker.state["step"] == 0
    else:
        with pytest.raises(FloatingPointError, match="NaN or Inf in the loss.*Nothing was updated"):
            step(maker, model, x, t)


class Masked(nn.Module):
    """The logits of class 2 set to ``fill``: a masked class (−Inf), or its finite stand-in."""

    def __init__(self, body: nn.Module, fill: float) -> None:
        super().__init__()
        self.body, self.fill = body, fill

    def forward(self, x):
        out = self.body(x)
        mask = torch.zeros(out.shape[-1], dtype=out.dtype)
        mask[2] = self.fill
        return out + mask


def test_masked_logits_are_sampled_as_a_distribution_without_the_masked_class():
    """−Inf logits (a masked class) were refused with the check this sync was; now the Monte-Carlo Fisher
    never draws that class, as with a finite −1e30 in its place."""
    grads = {}
    for fill in (float("-inf"), -1e30):
        torch.manual_seed(0)
        model = Masked(net(), fill)
        maker = fop_asdl.make_gradient_maker("fop", model, config(), fisher_type="fisher_mc")
        for i in range(2):
            x, t = small_image_batch(i)
            step(maker, model, x, t % 2)
        grads[fill] = [p.grad for p in model.parameters()]
    for masked, finite in zip(*grads.values()):
        torch.testing.assert_close(masked, finite, rtol=1e-12, atol=0)


# --- the runner ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kfac", "fop", "hylo"])
def test_the_runners_loop_adds_no_sync_between_epoch_boundaries(tmp_path, monkeypatch, method):
    """Every sync of an epoch's training is inside the maker's step: the loss and FOP's β/η stay on the
    device until the epoch ends."""
    counters = []
    original = train_module.Trainer._train_epoch

    def counted(self, on_step):
        with HostSyncCounter() as counter:
            out = original(self, on_step)
        counters.append(counter)
        return out

    monkeypatch.setattr(train_module.Trainer, "_train_epoch", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--method", method, "--batch-size", "100", "--lr", "0.05", "--no-progress",
                     "--out", str(tmp_path), "--set", "subset_size=300", "test_size=100", "base_batch=100",
                     "eval_batch_size=100", "epochs=1"])
    assert code == 0
    (counter,) = counters
    outside = [e for e in counter.events if not any(f.endswith(" forward_and_backward") for f in e.stack)]
    assert not outside, counter.report()
    assert counter.count <= 3 * 2  # three steps, at most the check and the inverses' read each
