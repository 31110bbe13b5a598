"""The GPU path without a GPU: each update that `train()` captures as a CUDA graph stays on its device.

A CUDA graph replays only work on the device. An update that copies from host memory (a constant tensor made on
the CPU, a Python list turned into a tensor) fails at capture on a GPU ("Cannot copy between CPU and CUDA tensors
during CUDA graph capture"), and one that reads a value back to the host (`.item()`, `bool(t)`) cannot be
captured either. Here the networks, optimisers and inputs are moved, as `train()` moves them, to PyTorch's `meta`
device, which computes shapes and no values: a value read there raises, and a dispatch mode raises on any operation
that is given a tensor from anywhere else.
"""

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import alphagan.runs
import alphagan.train
from alphagan.config import MODELS, make_config
from alphagan.device import use_graphs
from alphagan.models import build_networks
from alphagan.sampling import calibrated_generator, generate, reconstruct
from alphagan.steps import UPDATES, FiniteWatch, optimisers, update_steps
from alphagan.train import train

DEVICE = torch.device("meta")  # stands for the GPU


class OnlyOnDevice(TorchDispatchMode):
    """Raises when an operation is given a tensor that is not on `DEVICE`: a host copy or a host read."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device != DEVICE:
                raise AssertionError(f"{func} was given a {t.device} tensor of shape {tuple(t.shape)}")
        return func(*args, **kwargs)


def _steps_on_device(model: str):
    """The updates of a `gpu`-profile run at smoke sizes, built as `train()` builds them (fused, capturable Adam:
    the graphed optimiser; the NaN watch), with every network, optimiser, input and statistic on `DEVICE`."""
    cfg = make_config("gpu", model, size=16, width=4, latent=16, code_hidden=32, batch=2)
    assert use_graphs(cfg, torch.device("cuda", 0), distributed=False, amp_dtype=torch.bfloat16)
    nets = {k: net.to(DEVICE) for k, net in build_networks(model, 16, 4, 16, 32).items()}
    opts = optimisers(nets, UPDATES[model], cfg, fused=True, capturable=True)
    shapes = {"x": (2, 1, 16, 16, 16), "z": (2, 16), "eps": (2, 16), "alpha": (2,), "alpha2": (2,)}
    inputs = {k: torch.empty(shape, device=DEVICE) for k, shape in shapes.items()}
    watch = FiniteWatch(DEVICE, sum(u.times(cfg) for u in UPDATES[model]), 0)
    return update_steps(nets, opts, inputs, cfg, torch.float32, watch=watch)


@pytest.mark.parametrize("model", MODELS)
def test_every_graphed_update_stays_on_the_device(model, monkeypatch):
    # Fused Adam's kernel has a meta implementation; only the list of devices it may be asked for lacks `meta`.
    supported = torch_optimizer._get_fused_kernels_supported_devices
    monkeypatch.setattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: [*supported(), "meta"])
    steps = _steps_on_device(model)
    with OnlyOnDevice():
        for _ in range(2):  # the second run also steps Adam from its state
            for update in UPDATES[model]:
                terms = steps[update.name]()
                assert terms and all(t.device == DEVICE for t in terms.values()), update.name


def test_the_check_sees_a_host_copy_and_a_host_read():
    """The check itself fails on the two kinds of mistake: a host constant copied in, a value read out."""
    x, host = torch.ones(3, device=DEVICE), torch.ones(3)
    with OnlyOnDevice(), pytest.raises(AssertionError, match="cpu tensor"):
        _ = x * host.to(x)
    with OnlyOnDevice(), pytest.raises(RuntimeError, match="meta"):
        float(x.sum())


class DeviceStandIn(TorchDispatchMode):
    """`DEVICE` as a GPU that the host can read: a copy from it to the CPU gives the values it was `given` (zeros
    of the same shape for others), a value read gives 1, and an operation given tensors of both devices raises,
    as on a GPU (0-dimensional host tensors allowed, as there)."""

    def __init__(self, given: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.given = {} if given is None else given  # id of a tensor on DEVICE: its values (filled later)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            source = args[0]
            return self.given.get(id(source), torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype))
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        if {t.device for t in tensors if t.dim() > 0} == {DEVICE, torch.device("cpu")}:
            raise AssertionError(f"{func} was given tensors on both the host and the device")
        return func(*args, **kwargs)


def test_what_the_notebooks_ask_of_a_trained_model_takes_host_inputs():
    """Reconstructions and samples of networks on the device, from volumes on the host, come back to the host:
    notebook 03 passes host volumes to a model that `train()` left on the GPU."""
    nets = {k: net.to(DEVICE) for k, net in build_networks("alpha-wgan-gp", 16, 4, 16, 32).items()}
    x = torch.zeros(2, 1, 16, 16, 16)
    with DeviceStandIn():
        rec = reconstruct(nets["E"], nets["G"], x)
        samples = generate(calibrated_generator(nets["G"], 16, batch=2), 3, 16)
    assert rec.device.type == samples.device.type == "cpu"
    assert rec.shape == x.shape and samples.shape == (3, 1, 16, 16, 16)


def test_resume_takes_random_states_that_were_loaded_onto_the_device(tmp_path, monkeypatch):
    """`train(resume=True)` loads its checkpoint onto the GPU it trains on, random states too, while PyTorch's
    generators take theirs from host memory only ("RNG state must be a torch.ByteTensor" on an H200)."""
    cfg = make_config("smoke", iters=2, ckpt_every=1, sample_every=1, device="cpu")
    train(cfg.replace(iters=1), "synth", tmp_path, progress=False)
    loaded, restore, host = alphagan.train.load_newest, alphagan.runs.restore, {}

    def onto_the_device(*args, **kwargs):
        path, state = loaded(*args, **kwargs)
        for rng in state["rng"]:
            for k, values in rng.items():
                rng[k] = values.to(DEVICE)
                host[id(rng[k])] = values
        return path, state

    def restore_beside_the_device(*args, **kwargs):
        with DeviceStandIn(host):
            return restore(*args, **kwargs)

    monkeypatch.setattr(alphagan.train, "load_newest", onto_the_device)
    monkeypatch.setattr(alphagan.runs, "restore", restore_beside_the_device)
    assert train(cfg, "synth", tmp_path, resume=True, progress=False).config.iters == 2
