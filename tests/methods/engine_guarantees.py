"""The engine's guarantees (issue 23 item 2) as checks a maker of the switch is run through: the same checks
for EKFAC and Shampoo, each test file saying which maker, options and configs."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import fop_asdl
from scaffold import config, small_image_batch, step, worker_env

HERE = Path(__file__).resolve().parent


def train(name: str, net: Callable, cfg, steps: range, batches: Callable = small_image_batch,
          opt_lr: float = 0.05, dtype: torch.dtype = torch.float64, **options) -> tuple:
    """SGD-momentum training with ``name``'s maker from seed 0 in ``dtype``; ([(every step's p.grad, loss)],
    maker, model)."""
    torch.manual_seed(0)
    model = net().to(dtype)
    maker = fop_asdl.make_gradient_maker(name, model, cfg, **options)
    opt = torch.optim.SGD(model.parameters(), lr=opt_lr, momentum=0.9)
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


def flat_state(state: Any, prefix: str = "") -> Dict[str, Any]:
    """Every leaf of a nested state_dict by its path, tensors cloned."""
    if isinstance(state, dict):
        out: Dict[str, Any] = {}
        for key, value in state.items():
            out.update(flat_state(value, f"{prefix}/{key}"))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, value in enumerate(state):
            out.update(flat_state(value, f"{prefix}[{i}]"))
        return out
    return {prefix: state.detach().clone() if isinstance(state, torch.Tensor) else copy.deepcopy(state)}


def assert_same_state(after: Dict[str, Any], before: Dict[str, Any]) -> None:
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


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


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class UserError(Exception):
    pass


def _failing_loss(y, t, reduction="mean"):
    raise UserError("the user's loss failed")


def failed_step_check(maker, model, x, t, fault: str) -> None:
    """A step with ``fault`` raises and leaves parameters, p.grad (the very tensors) and state_dict() as they
    were, bit for bit."""
    grads = [p.grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    before = flat_state(maker.state_dict())
    call, loss_fn = model, F.cross_entropy
    expected = pytest.raises(FloatingPointError, match="Nothing was updated")
    if fault == "nan_input":
        x = x.clone()
        x[3] = float("nan")
    elif fault == "inf_gradient":
        def call(inp):
            return InfGradient.apply(model(inp))
    else:
        loss_fn, expected = _failing_loss, pytest.raises(UserError)
    dummy = maker.setup_model_call(call, x)
    maker.setup_loss_call(loss_fn, dummy, t)
    with expected:
        maker.forward_and_backward()
    assert all(g is h for g, h in zip(grads, [p.grad for p in model.parameters()]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.requires_grad for p in model.parameters())
    assert_same_state(flat_state(maker.state_dict()), before)


def resume_check(tmp_path: Path, name: str, options: Dict[str, Any]) -> None:
    """Three steps, a checkpoint, five more; a fresh process resumes from the checkpoint and ends with the
    same parameters, bit for bit."""
    import resume_worker as w

    model, maker, opt = w.build(name, options)
    w.train(model, maker, opt, range(3))
    torch.save(w.checkpoint(model, maker, opt), tmp_path / "ckpt.pt")
    w.train(model, maker, opt, range(3, 8))
    subprocess.run([sys.executable, str(HERE / "resume_worker.py"), name, json.dumps(options),
                    str(tmp_path / "ckpt.pt"), str(tmp_path / "params.pt")], check=True, cwd=HERE, env=worker_env())
    resumed = torch.load(tmp_path / "params.pt")
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), resumed))


def ranks_check(tmp_path: Path, name: str, options: Dict[str, Any], world_size: int, rtol: float = 1e-6) -> List:
    """``world_size`` gloo ranks with LOCAL samples each equal one process on their global batch: every rank
    ends every step with that process's p.grad; returns the ranks' results."""
    import rank_worker as w

    mp.start_processes(w.equivalence, args=(world_size, str(tmp_path / "store"), str(tmp_path / "out"), name,
                                            json.dumps(options)), nprocs=world_size, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(world_size)]
    expected, _ = w.run(name, options, world_size, rank=None)
    for result in ranks:
        for k, (grads, want) in enumerate(zip(result["grads"], expected)):
            scale = max(float(g.abs().max()) for g in want)
            for a, e in zip(grads, want):
                torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"step {k}: {m}")
    return ranks


__all__ = ["train", "assert_histories_close", "flat_state", "assert_same_state", "micro_batch_check",
           "grad_scaler_check", "failed_step_check", "resume_check", "ranks_check", "config"]
