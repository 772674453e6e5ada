"""The CUDA paths, run by ``scripts/gpu_check.sh`` (``pytest -m cuda``); skipped, with the reason, without a
CUDA device: every method on CUDA tensors against the CPU, fp16 with a GradScaler and bf16 autocast
against the CPU float32 step, the host syncs with ``torch.cuda.set_sync_debug_mode`` as a second witness,
the runner's ``device: cuda``, and ``torchrun --nproc_per_node 1`` with NCCL.
"""
import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fop_asdl
import fop_asdl.cli.train as train_module
from fop_asdl.cli import main
from fop_asdl.data import load_fashion_mnist_subset
from fop_asdl.diagnostics.syncs import HostSyncCounter, cuda_sync_debug
from fop_asdl.engine.sub_batches import half_sums
from fop_asdl.models import SmallCNN

from scaffold import config, conv_bn_ln_net, small_image_batch, step, worker_env
from scaffold import max_relative_error as relative_error
from test_syncs import INTERVAL, ITERS_PER_EPOCH, heavy_steps, net, plain_steps

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
HERE = Path(__file__).resolve().parent

#: Every method of the switch, with options that make its steps deterministic (no Monte-Carlo draws, KID),
#: so that the CUDA step can be compared with the CPU step.
OPTIONS = {"sgd": {}, "kfac": {"fisher_type": "fisher_emp"}, "fop": {"fisher_type": "fisher_emp"},
           "fngd": {"iters_per_epoch": 2}, "hylo": {"switch_policy": "kid"}}


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) would put a 1e-3 error into every float32 comparison."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def grads_of_steps(name, device, steps=4, **options):
    """p.grad of each of ``steps`` steps (curvature on even steps) of ``name`` on conv_bn_ln_net in float64."""
    torch.manual_seed(0)
    model = conv_bn_ln_net().double().to(device)
    if name == "asdl_kfac":
        maker = fop_asdl.KfacGradientMaker(model, config(data_size=8), fisher_type="fisher_emp")
    else:
        maker = fop_asdl.make_gradient_maker(name, model, config(), **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = []
    for i in range(steps):
        x, t = small_image_batch(i)
        opt.zero_grad(set_to_none=True)
        step(maker, model, x.to(device), t.to(device))
        out.append([p.grad.detach().cpu() for p in model.parameters()])
        opt.step()
    return out


@pytest.mark.parametrize("name", [*OPTIONS, "asdl_kfac"])
def test_every_method_on_cuda_tensors_equals_its_cpu_step(name):
    """float64 both ways: the same steps up to rounding (rtol 1e-7)."""
    cpu = grads_of_steps(name, torch.device("cpu"), **OPTIONS.get(name, {}))
    gpu = grads_of_steps(name, CUDA, **OPTIONS.get(name, {}))
    for step_cpu, step_gpu in zip(cpu, gpu):
        for a, b in zip(step_gpu, step_cpu):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def half_precision_grads(name, reference, x, t, dtype):
    """p.grad (unscaled) after a curvature step and a plain step on CUDA under autocast ``dtype``; fp16
    with a GradScaler (init scale 2^10: no overflow on this batch), as a user runs it."""
    model = copy.deepcopy(reference).to(CUDA)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if dtype == torch.float16 else None
    options = {} if name == "sgd" else {"fisher_type": "fisher_emp"}
    maker = fop_asdl.make_gradient_maker(name, model, config(damping=1.0), grad_scaler=scaler, **options)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            step(maker, model, x.to(CUDA), t.to(CUDA))
        assert not getattr(maker, "last_step_skipped", False)
    scale = 1.0 if scaler is None else float(scaler.get_scale())
    return [p.grad.detach().cpu() / scale for p in model.parameters()]


def cpu_float32_grads(name, reference, x, t):
    model = copy.deepcopy(reference)
    options = {} if name == "sgd" else {"fisher_type": "fisher_emp"}
    maker = fop_asdl.make_gradient_maker(name, model, config(damping=1.0), **options)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        step(maker, model, x, t)
    return [p.grad.detach() for p in model.parameters()]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_batchnorm_half_sums_on_cuda_equal_the_cpu_ones(layout):
    """On CUDA a training BatchNorm's statistics come from ``torch.batch_norm_stats`` (the CPU has none): each
    half's (Σ δ·x̂, Σ δ) equals the CPU's (native forward and backward kernels) in float64."""
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(5).double()
    x = (torch.randn(9, 5, 4, 6, dtype=torch.float64) * 3 + 1).to(memory_format=layout)
    delta = torch.randn(9, 5, 4, 6, dtype=torch.float64)
    expected = half_sums(layer, x, delta, 5)
    got = half_sums(copy.deepcopy(layer).to(CUDA), x.to(CUDA), delta.to(CUDA), 5)
    for sums, ref_sums in zip(got, expected):
        for value, ref_value in zip(sums, ref_sums):
            torch.testing.assert_close(value.cpu(), ref_value, rtol=1e-12, atol=1e-12)


# Stated tolerance (as test_mixed_precision.py's on the CPU): the fp16 or bf16 step of FOP or K-FAC on CUDA
# may differ from the CPU float32 step by at most 1.5x the relative error that the same autocast puts into
# the plain SGD gradient of the same model and batch, plus 1e-4 for float32 CPU/GPU rounding (the
# curvature and its inverses stay float32 under autocast).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16_grad_scaler", "bf16"])
@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_half_precision_step_on_cuda_equals_the_cpu_float32_step(name, dtype):
    data = load_fashion_mnist_subset()
    x, t = data.x_train[:64], data.y_train[:64]
    torch.manual_seed(0)
    reference = SmallCNN()
    sgd_error = relative_error(half_precision_grads("sgd", reference, x, t, dtype),
                               cpu_float32_grads("sgd", reference, x, t))
    error = relative_error(half_precision_grads(name, reference, x, t, dtype), cpu_float32_grads(name, reference, x, t))
    assert error <= 1.5 * sgd_error + 1e-4, (error, sgd_error)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_syncs_on_cuda_with_the_sync_debug_mode_as_second_witness(name):
    """The CPU audit's bounds hold on CUDA, counted twice: by the operators (HostSyncCounter) and by CUDA
    itself (set_sync_debug_mode), which also sees what the operators hide (host-to-device copies of Python
    numbers, syncs inside a kernel)."""
    few, many = (counts_on_cuda(name, extra) for extra in (0, 4))
    for counts in (few, many):
        for counter, witnessed in plain_steps(name, counts):
            assert counter.count <= 1 and len(witnessed) <= 1, (counter.report(), witnessed)
    for (small, seen_small), (large, seen_large) in zip(heavy_steps(name, few), heavy_steps(name, many)):
        assert large.count == small.count <= 2, (small.report(), large.report())
        assert len(seen_large) == len(seen_small) <= 2, (seen_small, seen_large)


def counts_on_cuda(name, extra_blocks, steps=6):
    """(HostSyncCounter, the sync-debug warnings) of each step, as test_syncs.counts_per_step on the CPU."""
    torch.manual_seed(0)
    model = net(extra_blocks).to(CUDA)
    options = {"iters_per_epoch": ITERS_PER_EPOCH} if name in ("fngd", "hylo") else {}
    maker = fop_asdl.make_gradient_maker(name, model, config(curvature_upd_interval=INTERVAL,
                                                             preconditioner_upd_interval=INTERVAL), **options)
    batches = [tuple(v.to(CUDA) for v in small_image_batch(i)) for i in range(steps)]
    torch.cuda.synchronize()
    out = []
    for x, t in batches:
        with cuda_sync_debug() as witnessed, HostSyncCounter() as counter:
            step(maker, model, x, t)
        out.append((counter, witnessed))
    return out


def test_the_runner_trains_on_cuda_without_a_sync_outside_the_step(tmp_path, monkeypatch):
    seen = {}
    original = train_module.Trainer._train_epoch

    def counted(self, on_step):
        seen["device"] = next(self.model.parameters()).device
        with cuda_sync_debug() as witnessed, HostSyncCounter() as counter:
            out = original(self, on_step)
        seen["counter"], seen["witnessed"] = counter, witnessed
        return out

    monkeypatch.setattr(train_module.Trainer, "_train_epoch", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--method", "fop", "--batch-size", "100", "--lr", "0.05", "--no-progress",
                     "--out", str(tmp_path), "--set", "subset_size=600", "test_size=200", "base_batch=100",
                     "eval_batch_size=100", "epochs=1", "device=cuda"])
    assert code == 0 and seen["device"].type == "cuda"
    counter = seen["counter"]
    assert not [e for e in counter.events if not any(f.endswith(" forward_and_backward") for f in e.stack)], \
        counter.report()
    # CUDA sees the steps' syncs and the clock's torch.cuda.synchronize() at the epoch's end, nothing else
    assert len(seen["witnessed"]) <= counter.count + 1, (counter.report(), seen["witnessed"])
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["environment"]["device"].startswith("cuda") and summary["environment"]["gpu"]


def test_the_runners_batches_with_augmentation_do_not_sync():
    """An epoch's batches of CIFAR-like data with random crops and flips: nothing waits on the device."""
    from fop_asdl.cli.batches import CROP_PADDING
    from fop_asdl.data.augment import crop_flip, sample_crop_flip
    x = torch.randn(64, 3, 32, 32, device=CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    torch.cuda.synchronize()
    with cuda_sync_debug() as witnessed, HostSyncCounter() as counter:
        for _ in range(3):
            crop_flip(x, sample_crop_flip(64, CROP_PADDING, generator), CROP_PADDING, [-1.9, -1.9, -1.7])
    assert counter.count == 0 and not witnessed, (counter.report(), witnessed)


def test_torchrun_one_process_with_nccl(tmp_path):
    """One rank under torchrun on NCCL: the package's collectives, and K-FAC's and FOP's sharded path on
    them equal to the one-process step; then the runner under torchrun with device cuda."""
    env = worker_env(OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    out = tmp_path / "nccl.json"
    done = subprocess.run(launch + [str(HERE / "cuda_worker.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "nccl" and report["collectives"] == "ok", report
    assert report["sharded_equals_local"] == {"kfac": True, "fop": True}, report
    done = subprocess.run(launch + ["-m", "fop_asdl", "train", "--no-progress", "--method", "kfac", "--out",
                                    str(tmp_path / "run"), "--set", "subset_size=300", "test_size=100",
                                    "base_batch=100", "eval_batch_size=100", "epochs=1", "batch_sizes=[100]",
                                    "device=cuda"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"best_accuracy"') == 1
