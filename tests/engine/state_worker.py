"""Training pieces shared by test_state.py and the fresh process it starts (run as a script)."""
from __future__ import annotations

import sys

import torch

import fop_asdl

import scaffold
from scaffold import config, conv_bn_ln_net, small_image_batch


def build(name: str):
    torch.manual_seed(0)
    model = conv_bn_ln_net().double()
    maker = fop_asdl.make_gradient_maker(name, model, config(ema_decay=0.2), fisher_type="fisher_emp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, maker, opt


def batch(i: int):
    return small_image_batch(i, 10)


def train(model, maker, opt, steps: range) -> None:
    scaffold.train(model, maker, opt, steps, batch)


def checkpoint(model, maker, opt) -> dict:
    return {"model": model.state_dict(), "maker": maker.state_dict(), "opt": opt.state_dict()}


def resume(name: str, state: dict):
    model, maker, opt = build(name)
    model.load_state_dict(state["model"])
    maker.load_state_dict(state["maker"])
    opt.load_state_dict(state["opt"])
    return model, maker, opt


if __name__ == "__main__":  # resume from argv[2], train steps 3..7, save the parameters to argv[3]
    maker_name, ckpt_path, out_path = sys.argv[1:4]
    model, maker, opt = resume(maker_name, torch.load(ckpt_path, weights_only=False))
    train(model, maker, opt, range(3, 8))
    torch.save([p.detach() for p in model.parameters()], out_path)
