"""Training pieces shared by test_state.py and the fresh process it starts (run as a script)."""
from __future__ import annotations

import sys

import torch

import scaffold
from scaffold import config, conv_bn_ln_net, restore, small_image_batch


def build(name: str):
    return scaffold.build(name, conv_bn_ln_net, config(ema_decay=0.2), fisher_type="fisher_emp")


def batch(i: int):
    return small_image_batch(i, 10)


def train(model, maker, opt, steps: range) -> None:
    scaffold.train(model, maker, opt, steps, batch)


def resume(name: str, state: dict):
    return restore(state, *build(name))


if __name__ == "__main__":  # resume from argv[2], train steps 3..7, save the parameters to argv[3]
    maker_name, ckpt_path, out_path = sys.argv[1:4]
    model, maker, opt = resume(maker_name, torch.load(ckpt_path, weights_only=False))
    train(model, maker, opt, range(3, 8))
    torch.save([p.detach() for p in model.parameters()], out_path)
