"""The per-half (weight, bias) sums of the normalisation layers FOP and K-FAC precondition, against autograd:
each half's sum is the gradient of ⟨δ, y⟩ over that half's rows, y the layer's output on the whole call
(so BatchNorm's x̂ uses the statistics of the whole call, as in the step) and δ held fixed."""
import pytest
import torch
from torch import nn

from fop_asdl.engine.sub_batches import half_sums

N, SPLIT = 7, 4


def _layers():
    """(name, layer, input shape): training and eval BatchNorm, BatchNorm without running stats, LayerNorm over
    one and over two trailing dimensions, GroupNorm on images and on (n, C) rows."""
    eval_bn = nn.BatchNorm2d(3)
    eval_bn.running_mean.uniform_(-1, 1)
    eval_bn.running_var.uniform_(0.5, 2)
    return [
        ("batchnorm2d", nn.BatchNorm2d(3), (N, 3, 4, 5)),
        ("batchnorm1d_tokens", nn.BatchNorm1d(3), (N, 3, 6)),
        ("batchnorm2d_eval", eval_bn.eval(), (N, 3, 4, 5)),
        ("batchnorm1d_no_running_stats", nn.BatchNorm1d(5, track_running_stats=False).eval(), (N, 5)),
        ("layernorm", nn.LayerNorm(6), (N, 4, 6)),
        ("layernorm_2d", nn.LayerNorm((4, 6)), (N, 4, 6)),
        ("groupnorm", nn.GroupNorm(2, 4), (N, 4, 3, 3)),
        ("groupnorm_rows", nn.GroupNorm(3, 6), (N, 6)),
    ]


@pytest.mark.parametrize("index", range(len(_layers())), ids=[name for name, _, _ in _layers()])
@pytest.mark.parametrize("split", [SPLIT, 0, N])
def test_norm_half_sums_equal_autograd_of_each_half(index, split):
    torch.manual_seed(index)
    _, layer, shape = _layers()[index]
    layer = layer.double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    delta = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    expected = []
    for rows in (slice(0, split), slice(split, N)):
        if rows.stop > rows.start:
            expected.append(torch.autograd.grad((y[rows] * delta[rows]).sum(), (layer.weight, layer.bias),
                                                retain_graph=True))
        else:
            expected.append(None)
    got = half_sums(layer, x.detach(), delta, split)
    for sums, reference in zip(got, expected):
        if reference is None:
            assert sums is None
        else:
            torch.testing.assert_close(sums[0], reference[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(sums[1], reference[1], rtol=1e-12, atol=1e-12)


def _eval_batchnorm():
    layer = nn.BatchNorm1d(3).eval()
    layer.running_mean.fill_(0.25)
    layer.running_var.fill_(1.5)
    return layer


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(3), _eval_batchnorm, lambda: nn.LayerNorm(5),
                                  lambda: nn.GroupNorm(3, 3)],
                         ids=["batchnorm1d", "batchnorm1d_eval", "layernorm", "groupnorm"])
def test_norm_half_sums_of_bf16_weights_in_float32(make):
    """bf16 weights and buffers (values exact in bf16), float32 input and output gradient (the capture's
    compute dtype): float32 sums equal to the float64 layer's."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(N, 3, 5, dtype=torch.float64)
    delta = torch.randn_like(x)
    expected = half_sums(layer.double(), x, delta, SPLIT)
    got = half_sums(layer.to(torch.bfloat16), x.float(), delta.float(), SPLIT)
    for sums, ref_sums in zip(got, expected):
        for value, ref_value in zip(sums, ref_sums):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(5)],
                         ids=["batchnorm2d", "groupnorm", "layernorm"])
def test_norm_half_sums_of_channels_last_input_and_strided_gradient(layer):
    """A channels_last input and an output gradient with permuted strides (the layouts a model hands the
    capture) give the contiguous tensors' sums (the native kernels read raw memory: no crash, no mix-up)."""
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    delta = torch.randn(5, 3, 4, 6, dtype=torch.float64).permute(3, 2, 1, 0)
    expected = half_sums(layer, x, delta.contiguous(), 3)
    got = half_sums(layer, x.to(memory_format=torch.channels_last), delta, 3)
    for sums, ref_sums in zip(got, expected):
        for value, ref_value in zip(sums, ref_sums):
            torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
