"""An Embedding called on ids shared by the whole batch (nanoGPT's ``wpe(torch.arange(T))``): the methods that
precondition Embeddings give it the plain gradient, found on their first step, say so in a warning and in
``coverage()``, and otherwise step exactly as a maker told to ignore it from the start
(:mod:`fop_asdl.engine.shared_ids`)."""
import warnings

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from scaffold import LOCAL, init_gloo, local_rows, single_process_order, spawn_ranks, token_ce
from scaffold import step as scaffold_step

EMBEDDING_BLOCKS = ("kfac", "fop", "fngd", "hylo")
#: K-FAC's and FOP's Monte-Carlo Fisher seeded: the tests step two makers that would share the global RNG.
OPTIONS = {"kfac": dict(seed=0), "fop": dict(seed=0), "fngd": dict(iters_per_epoch=2),
           "hylo": dict(switch_policy="kis")}
V, T, D, N = 11, 6, 8, 5


class NanoGPT(nn.Module):
    """Token and position embeddings, the positions shared by the batch as in nanoGPT's forward (the position
    embedding's attribute name ``position``)."""

    def __init__(self, position="wpe"):
        super().__init__()
        self.position = position
        self.wte = nn.Embedding(V, D)
        setattr(self, position, nn.Embedding(T, D))
        self.mix, self.head = nn.Linear(D, D), nn.Linear(D, V)

    def forward(self, idx):
        x = self.wte(idx) + getattr(self, self.position)(torch.arange(idx.shape[1]))
        return self.head(torch.tanh(self.mix(x)))


def make(name, model, ignore=(), micro_batch_size=None):
    config = asdl.PreconditioningConfig(damping=0.5, curvature_upd_interval=2, preconditioner_upd_interval=2,
                                        ignore_modules=list(ignore))
    return fop_asdl.make_gradient_maker(name, model, config, micro_batch_size=micro_batch_size,
                                        **OPTIONS.get(name, {}))


def batches(steps):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (N, T), generator=gen), torch.randint(0, V, (N, T), generator=gen))
            for _ in range(steps)]


def step(gm, model, x, t):
    """The scaffold's step on the token loss; every parameter's gradient after it."""
    scaffold_step(gm, model, x, t, token_ce)
    return [p.grad.clone() for p in model.parameters()]


def pair(position="wpe"):
    torch.manual_seed(0)
    model = NanoGPT(position).double()
    twin = NanoGPT(position).double()
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("micro_batch_size", [None, 2])
@pytest.mark.parametrize("name", EMBEDDING_BLOCKS)
def test_shared_position_ids_step_as_if_ignored_from_the_start(name, micro_batch_size):
    model, twin = pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = make(name, model, micro_batch_size=micro_batch_size)
        reference = make(name, twin, ignore=[twin.wpe], micro_batch_size=micro_batch_size)
        found = []
        for x, t in batches(3):  # curvature, plain, curvature step (interval 2)
            got, want = step(gm, model, x, t), step(reference, twin, x, t)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
            found.append([str(w.message) for w in caught if "shared by the whole batch" in str(w.message)])
            caught.clear()
    assert len(found[0]) == 1 and "wpe (Embedding)" in found[0][0] and "positions.expand" in found[0][0]
    assert found[1:] == [[], []]  # one warning, on the step that found it
    assert gm.state["step"] == 3


@pytest.mark.parametrize("name", EMBEDDING_BLOCKS)
def test_shared_position_ids_get_autograd_gradient_and_coverage_says_why(name):
    model, _ = pair()
    x, t = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = make(name, model)
        grads = step(gm, model, x, t)
    want = torch.autograd.grad(token_ce(model(x), t), model.wpe.weight)[0]
    torch.testing.assert_close(grads[1], want, rtol=1e-12, atol=1e-14)
    report = {p.name: p for p in gm.coverage().parameters}
    use = report["wpe.weight"].uses[0]
    assert use.treatment == "plain gradient" and "shared by the whole batch" in use.detail and f"({T},)" in use.detail
    assert report["wte.weight"].treatment == "preconditioned"
    assert gm._user_ignore_modules == []  # the user ignored nothing


@pytest.mark.parametrize("position", ["wpe", "step", "g"])  # also named as a key of the makers' state
@pytest.mark.parametrize("name", EMBEDDING_BLOCKS)
def test_a_resumed_maker_finds_the_shared_ids_again_and_keeps_the_saved_state(name, position):
    model, twin = pair(position)
    data = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = make(name, model)
        for x, t in data[:2]:
            step(gm, model, x, t)
        resumed = make(name, twin)
        resumed.load_state_dict(gm.state_dict())
        twin.load_state_dict(model.state_dict())
        for x, t in data[2:]:
            for g, w in zip(step(resumed, twin, x, t), step(gm, model, x, t)):
                assert torch.equal(g, w)
    assert resumed.state["step"] == gm.state["step"] == 4


def test_a_failing_step_that_found_shared_ids_leaves_parameters_and_gradients_as_they_were():
    model, _ = pair()
    x, t = batches(1)[0]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = make("kfac", model)
        gm.setup_loss_call(lambda y, t, reduction="mean": token_ce(y, t, reduction) * float("nan"),
                           gm.setup_model_call(model, x), t)
        with pytest.raises(FloatingPointError):
            gm.forward_and_backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert gm.state["step"] == 0 and [m for m, _ in gm._shared_ids] == [model.wpe]


def test_a_linear_block_seeing_rows_other_than_the_batch_still_raises_the_clear_error():
    class SharedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.head = nn.Linear(3, D), nn.Linear(D, V)

        def forward(self, x):
            return self.head(x.unsqueeze(1) + self.table(torch.eye(3)).sum(0))

    model = SharedLinear()
    gm = make("kfac", model)
    gm.setup_loss_call(F.cross_entropy, gm.setup_model_call(model, torch.randn(N, D)), torch.randint(0, V, (N,)))
    with pytest.raises(ValueError, match="leading dimension 3, but the batch has 5"):
        gm.forward_and_backward()


#: Options with which two gloo ranks equal one process (as tests/methods/layer_worker.py's).
RANK_MAKERS = {"kfac": dict(fisher_type="fisher_emp"), "fop": dict(fisher_type="fisher_emp", sub_batches="halves"),
               "fngd": dict(iters_per_epoch=2, coefficient_scope="global"),
               "hylo": dict(switch_policy="kis", compression_ratio=1.0)}


def gradients_on_rows(name, rows):
    """Three steps' gradients (no parameter update) on ``rows`` of each global batch of 2·LOCAL."""
    model, _ = pair()
    config = asdl.PreconditioningConfig(damping=0.5, curvature_upd_interval=2, preconditioner_upd_interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fop_asdl.make_gradient_maker(name, model, config, **RANK_MAKERS[name])
        gen = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            x, t = (torch.randint(0, V, (2 * LOCAL, T), generator=gen) for _ in range(2))
            out.append(step(gm, model, x[rows], t[rows]))
    return out, [m for m, _ in gm._shared_ids] == [model.wpe]


def shared_ids_ranks(rank, world_size, store, out):
    from fop_asdl.distributed import destroy_process_group

    init_gloo(rank, world_size, store)
    results = {name: gradients_on_rows(name, local_rows(rank, world_size)) for name in RANK_MAKERS}
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()


def test_two_gloo_ranks_find_the_shared_ids_together_and_equal_one_process(tmp_path):
    """Every rank finds the shared ids on the same step and rebuilds its maker (the state_dict round trip is a
    collective); the sharded steps then equal one process's on the whole batch."""
    results = spawn_ranks(shared_ids_ranks, 2, tmp_path)
    for name in RANK_MAKERS:
        order = single_process_order("halves", 2) if name == "fop" else torch.arange(2 * LOCAL)
        expected, found = gradients_on_rows(name, order)
        assert found
        for rank in results:
            got_steps, rank_found = rank[name]
            assert rank_found
            for got, want in zip(got_steps, expected):
                for g, e in zip(got, want):
                    torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
