"""Training pieces of the fresh-process resume check (engine_guarantees.resume_check), and the fresh process
itself when run as a script: resume from argv[3], train steps 3..7, save the parameters to argv[4]."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict

import asdl
import torch

import scaffold
from scaffold import conv_bn_ln_net, restore, small_image_batch


def build(name: str, options: Dict[str, Any]):
    """A BatchNorm/LayerNorm CNN (float64, seed 0), ``name``'s maker with options["config"] as the
    PreconditioningConfig and options["maker"] as its keyword arguments, SGD with momentum."""
    return scaffold.build(name, conv_bn_ln_net, asdl.PreconditioningConfig(**options["config"]),
                          **options.get("maker", {}))


def train(model, maker, opt, steps: range) -> None:
    scaffold.train(model, maker, opt, steps, lambda i: small_image_batch(i, 10))


if __name__ == "__main__":
    name, options, ckpt_path, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    model, maker, opt = restore(torch.load(ckpt_path, weights_only=False), *build(name, options))
    train(model, maker, opt, range(3, 8))
    torch.save([p.detach() for p in model.parameters()], out_path)
