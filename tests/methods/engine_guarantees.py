"""The engine's guarantees (issue 23 item 2) as checks a maker of the switch is run through: the same checks
for EKFAC and Shampoo, each test file saying which maker, options and configs."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import fop_asdl
from scaffold import (assert_close_steps, assert_equal_nested, assert_same_parameters, build, checkpoint, config,
                      failing_step, resumed_in_fresh_process, small_image_batch, spawn_ranks, step)

HERE = Path(__file__).resolve().parent


def train(name: str, net: Callable, cfg, steps: range, batches: Callable = small_image_batch,
          opt_lr: float = 0.05, dtype: torch.dtype = torch.float64, **options) -> tuple:
    """SGD-momentum training with ``name``'s maker from seed 0 in ``dtype``; ([(every step's p.grad, loss)],
    maker, model)."""
    model, maker, opt = build(name, net, cfg, opt_lr=opt_lr, dtype=dtype, **options)
    history = []
    for i in steps:
        x, t = batches(i)
        x = x.to(dtype)
        opt.zero_grad(set_to_none=True)
        _, loss = step(maker, model, x, t)
        history.append(([p.grad.detach().clone() for p in model.parameters()], loss.detach().clone()))
        opt.step()
    return history, maker, model


def assert_histories_close(actual, expected, rtol=1e-8, atol=1e-12) -> None:
    assert len(actual) == len(expected)
    for k, ((grads_a, loss_a), (grads_e, loss_e)) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(loss_a, loss_e, rtol=1e-10, atol=0)
        for a, e in zip(grads_a, grads_e):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"step {k}: {m}")


def micro_batch_check(name: str, net: Callable, cfg, micro_batch_size: int, steps: int = 5, samples: int = 11,
                      **options) -> None:
    """A step run as micro-batches equals the one-pass step (``samples`` per batch)."""
    def batches(i):
        return small_image_batch(i, samples)

    full = train(name, net, cfg, range(steps), batches, **options)[0]
    chunked = train(name, net, cfg, range(steps), batches, micro_batch_size=micro_batch_size, **options)[0]
    assert_histories_close(chunked, full)


def grad_scaler_check(name: str, net: Callable, cfg, steps: int = 4, **options) -> None:
    """With a power-of-two loss scale, the unscaled p.grad equals the run without a scaler."""
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = net().double()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=enabled)
        maker = fop_asdl.make_gradient_maker(name, model, cfg, grad_scaler=scaler, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        grads = []
        for i in range(steps):
            x, t = small_image_batch(i, 10)
            opt.zero_grad(set_to_none=True)
            step(maker, model, x, t)
            scaler.unscale_(opt)
            grads.append([p.grad.clone() for p in model.parameters()])
            scaler.step(opt)
            scaler.update()
        results.append(grads)
    for scaled_step, plain_step in zip(results[1], results[0]):
        for a, b in zip(scaled_step, plain_step):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def failed_step_check(maker, model, x, t, fault: str) -> None:
    """A step with ``fault`` raises and leaves parameters, p.grad (the very tensors) and state_dict() as they
    were, bit for bit."""
    grads = [p.grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    before = copy.deepcopy(maker.state_dict())
    failing_step(maker, model, x, t, fault)
    assert all(g is h for g, h in zip(grads, [p.grad for p in model.parameters()]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.requires_grad for p in model.parameters())
    assert_equal_nested(maker.state_dict(), before)


def resume_check(tmp_path: Path, name: str, options: Dict[str, Any]) -> None:
    """Three steps, a checkpoint, five more; a fresh process resumes from the checkpoint and ends with the
    same parameters, bit for bit."""
    import resume_worker as w

    model, maker, opt = w.build(name, options)
    w.train(model, maker, opt, range(3))
    torch.save(checkpoint(model, maker, opt), tmp_path / "ckpt.pt")
    w.train(model, maker, opt, range(3, 8))
    assert_same_parameters(model, resumed_in_fresh_process(HERE / "resume_worker.py", tmp_path, name,
                                                           json.dumps(options)))


def ranks_check(tmp_path: Path, name: str, options: Dict[str, Any], world_size: int, rtol: float = 1e-6) -> List:
    """``world_size`` gloo ranks with LOCAL samples each equal one process on their global batch: every rank
    ends every step with that process's p.grad; returns the ranks' results."""
    import rank_worker as w

    ranks = spawn_ranks(w.equivalence, world_size, tmp_path, name, json.dumps(options))
    expected, _ = w.run(name, options, world_size, rank=None)
    for result in ranks:
        assert_close_steps(result["grads"], expected, rtol)
    return ranks


__all__ = ["train", "assert_histories_close", "micro_batch_check", "grad_scaler_check", "failed_step_check",
           "resume_check", "ranks_check", "config"]
