"""Per-step live memory: FOP's plain and curvature steps hold no more tensor bytes than K-FAC's.

Counted with :class:`fop_asdl.diagnostics.memory.LiveTensorBytes` (tensor by tensor, no allocator in between), on
the CIFAR ResNet-32 (BatchNorm, residual adds) at batch 32: 1.11x K-FAC's plain-step peak when the capture
kept every block input (and the per-half sums) alive to the end of the step, 1.005x since.
"""
import torch
from fop_asdl import make_gradient_maker
from fop_asdl.diagnostics.memory import LiveTensorBytes
from fop_asdl.models import resnet32_cifar

from scaffold import config, step

#: FOP's extra tensors (a second gradient per block, the two preconditioned vectors) are small next to
#: the activations at this batch.
MARGIN = 1.05


def step_peaks(name: str) -> list:
    torch.manual_seed(0)
    model = resnet32_cifar()
    maker = make_gradient_maker(name, model, config(curvature_upd_interval=2, preconditioner_upd_interval=2))
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    step(maker, model, x, t)  # warm-up: the curvature and inverses exist before the measured steps
    peaks = []
    for _ in range(2):  # a plain step, then a curvature step
        for p in model.parameters():
            p.grad = None
        with LiveTensorBytes() as counter:
            y, loss = step(maker, model, x, t)
            del y, loss
        peaks.append(counter.peak)
    return peaks


def test_live_tensor_bytes_counts_what_is_referenced():
    a = torch.randn(256, 256)
    with LiveTensorBytes() as counter:
        b = a @ a
        c = b.relu()
        view = c[:10]
        del b
        assert counter.live == c.numel() * 4
        del c
        assert counter.live == 256 * 256 * 4  # the view keeps its storage alive
        del view
    assert counter.live == 0 and counter.peak == 2 * 256 * 256 * 4


def test_fop_step_memory_within_margin_of_kfac():
    fop, kfac = step_peaks("fop"), step_peaks("kfac")
    for kind, f, k in zip(("plain", "curvature"), fop, kfac):
        assert f <= MARGIN * k, f"FOP's {kind} step peaks at {f / k:.3f}x K-FAC's live tensor bytes"
