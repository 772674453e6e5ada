"""Training pieces of the fresh-process resume check (engine_guarantees.resume_check), and the fresh process
itself when run as a script: resume from argv[3], train steps 3..7, save the parameters to argv[4]."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict

import asdl
import torch

import fop_asdl
import scaffold
from scaffold import conv_bn_ln_net, small_image_batch


def build(name: str, options: Dict[str, Any]):
    """A BatchNorm/LayerNorm CNN (float64, seed 0), ``name``'s maker with options["config"] as the
    PreconditioningConfig and options["maker"] as its keyword arguments, SGD with momentum."""
    torch.manual_seed(0)
    model = conv_bn_ln_net().double()
    maker = fop_asdl.make_gradient_maker(name, model, asdl.PreconditioningConfig(**options["config"]),
                                         **options.get("maker", {}))
    return model, maker, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model, maker, opt, steps: range) -> None:
    scaffold.train(model, maker, opt, steps, lambda i: small_image_batch(i, 10))


def checkpoint(model, maker, opt) -> dict:
    return {"model": model.state_dict(), "maker": maker.state_dict(), "opt": opt.state_dict()}


if __name__ == "__main__":
    name, options, ckpt_path, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    model, maker, opt = build(name, options)
    state = torch.load(ckpt_path, weights_only=False)
    model.load_state_dict(state["model"])
    maker.load_state_dict(state["maker"])
    opt.load_state_dict(state["opt"])
    train(model, maker, opt, range(3, 8))
    torch.save([p.detach() for p in model.parameters()], out_path)
