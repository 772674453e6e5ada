"""The sharded path equals single-process training on the corresponding global batch (gloo, CPU)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

import dist_worker as w
from fop_asdl.distributed import assign_owners, destroy_process_group, resolve_sub_batches

from scaffold import assert_close_steps, checkpoint, spawn_ranks


@pytest.fixture(scope="module", params=[2, 3, 4])
def sharded_runs(request, tmp_path_factory):
    world_size = request.param
    return world_size, spawn_ranks(w.equivalence, world_size, tmp_path_factory.mktemp(f"world{world_size}"))


def test_sharded_fop_and_kfac_equal_single_process_training(sharded_runs):
    world_size, ranks = sharded_runs
    for key, result in ranks[0].items():
        name, mode = key.split("/")
        expected, model, maker, _ = w.run_single(name, mode if name == "fop" else "halves", world_size,
                                                 **({"sub_batches": "auto"} if name == "fop" else {}),
                                                 **w.clip_options(name, mode))
        for rank in ranks:  # every rank ends each step with the same p.grad, equal to one process's
            assert_close_steps(rank[key]["grads"], expected, rtol=1e-5)
        if w.clip_options(name, mode):  # the same ν on every rank, bit for bit, and it did clip
            assert float(ranks[0][key]["nu"]) < 1
            torch.testing.assert_close(ranks[0][key]["nu"], maker.last_nu, rtol=1e-5, atol=0)
            assert all(torch.equal(rank[key]["nu"], ranks[0][key]["nu"]) for rank in ranks)
        if name == "fop":
            for block, stats in maker.last_stats.items():
                for rank in ranks:
                    for stat, value in stats.items():
                        torch.testing.assert_close(rank[key]["stats"][block][stat], value, rtol=1e-5, atol=1e-12)


@pytest.mark.filterwarnings("ignore:fop_asdl")
def test_tied_weights_on_ranks_equal_single_process_training(tmp_path):
    """A weight shared by a block (the head) and a plain use (the embedding): every maker on 2 ranks."""
    ranks = spawn_ranks(w.tied_equivalence, 2, tmp_path)
    for name, options in w.TIED_MAKERS.items():
        expected, _, _, _ = w.run_single(name, "halves", 2, net="tied", **options)
        for rank in ranks:
            assert_close_steps(rank[name], expected, rtol=1e-5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_attention_blocks_equal_single_process_training(tmp_path, world_size):
    """A torch TransformerEncoderLayer's q/k/v/out projections as sharded FOP and K-FAC blocks."""
    ranks = spawn_ranks(w.attention_equivalence, world_size, tmp_path)
    for name in ("fop", "kfac"):
        expected, _, _, _ = w.run_single(name, "halves", world_size, net="tokens")
        for rank in ranks:
            assert_close_steps(rank[name], expected, rtol=1e-5)


def test_every_block_has_one_owner_and_ranks_agree(sharded_runs):
    world_size, ranks = sharded_runs
    assignment = ranks[0]["fop/halves"]["assignment"]
    assert all(r["fop/halves"]["assignment"] == assignment for r in ranks)
    assert set(assignment.values()) <= set(range(world_size))
    assert len(set(assignment.values())) == min(world_size, len(assignment))  # no idle rank while blocks remain


def test_gathered_state_resumes_a_single_process_run(sharded_runs):
    """state_dict() of a sharded run holds every block; a single process continues from it exactly."""
    world_size, ranks = sharded_runs
    state = ranks[0]["fop/halves"]["state"]
    _, model, maker, _ = w.run_single("fop", "halves", world_size, sub_batches="auto",
                                      **w.clip_options("fop", "halves"))
    reference = maker.state_dict()
    assert state["step"] == reference["step"] and state["curvature"].keys() == reference["curvature"].keys()
    for block, tensors in reference["curvature"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(state["curvature"][block][key], value, rtol=1e-5, atol=1e-10)
    for rank in ranks[1:]:  # the same on every rank
        for block, tensors in state["curvature"].items():
            for key, value in tensors.items():
                assert torch.equal(rank["fop/halves"]["state"]["curvature"][block][key], value)


def test_single_process_checkpoint_resumes_a_sharded_run(tmp_path):
    world_size = 2
    _, model, maker, opt = w.run_single("fop", "halves", world_size, steps=range(3), sub_batches="halves")
    torch.save(checkpoint(model, maker, opt), tmp_path / "ckpt.pt")
    resumed = spawn_ranks(w.resume_sharded, world_size, tmp_path, str(tmp_path / "ckpt.pt"))
    order = w.single_process_order("halves", world_size)

    def batches(i):
        x, t = w.global_batch(i, world_size)
        return x[order], t[order]

    w.train(model, maker, opt, range(3, w.STEPS + 2), batches)
    for parameters in resumed:
        for p, q in zip(model.parameters(), parameters):
            torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-8)


def test_a_rank_that_raises_makes_the_others_fail_in_bounded_time(tmp_path):
    start = time.monotonic()
    waiting, failed = spawn_ranks(w.failing_rank, 2, tmp_path)  # each rank records its error
    assert failed["outcome"][0] == "ValueError" and "at least 2 samples" in failed["outcome"][1]
    assert waiting["outcome"][0] == "CollectiveError", waiting
    assert "another rank did not join" in waiting["outcome"][1]
    assert waiting["seconds"] < 30 and time.monotonic() - start < 90


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_leaving_the_group_stops_every_gloo_thread_while_python_runs(tmp_path):
    """A gloo thread alive at the interpreter's exit can abort the rank (fop_asdl.distributed.group)."""
    for result in spawn_ranks(w.teardown, 2, tmp_path):
        assert "gloo_tcp_loop" in result["before"] and "pt_gloo_runloop" in result["before"]
        assert result["after"] == [] and result["warnings"] == []


def test_leaving_a_group_something_still_holds_warns(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    held = dist.group.WORLD
    with pytest.warns(RuntimeWarning, match="still referenced after destroy_process_group"):
        destroy_process_group()
    assert not dist.is_initialized()
    del held  # frees it here, while Python runs


def test_owners_balance_cost_deterministically():
    costs = [("a", 8.0), ("b", 1.0), ("c", 5.0), ("d", 4.0), ("e", 3.0)]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for n, c in costs if owners[n] == r) for r in range(2)]
    assert sorted(load) == [10.0, 11.0]  # LPT: a→0, c→1, d→1, e→0, b→1: the best split of 21
    assert assign_owners(costs, 8) == {"a": 0, "b": 4, "c": 1, "d": 2, "e": 3}  # more ranks than blocks
    with pytest.raises(ValueError):
        assign_owners(costs, 0)


def test_sub_batch_modes():
    assert resolve_sub_batches("auto", 4) == "ranks" and resolve_sub_batches("auto", 3) == "halves"
    with pytest.raises(ValueError, match="even world size"):
        resolve_sub_batches("ranks", 3)
