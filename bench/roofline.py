"""How close the training step comes to the hardware's own matrix rate, and where its time goes.

    python bench/roofline.py                          # every model at the smoke and cpu profiles, here
    python bench/roofline.py --profiles gpu --iters 20   # on a GPU: the paper's networks at 64^3

Per model and profile, in one run:
  - FLOPs per iteration: every ATen call of one training iteration (`steps.update_steps`, the penalty's double
    backward included) summed with `torch.utils.flop_counter.flop_registry` under a dispatch mode
    (`FlopCounterMode` itself fails on the penalty's `autograd.grad`);
  - the matrix rate of this device, measured in the same run (fp32 on a CPU, the step's autocast dtype on a GPU);
  - the loop's rate (FLOPs x it/s, after a warm-up that includes graph capture), and its fraction of that rate;
  - where the time goes: the profiler's self time of each operator (of each kernel on a GPU), in classes, and the
    gradient penalty (both its passes), timed as the difference from the same iteration without it.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import cache

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from alphagan import losses
from alphagan.config import MODELS, make_config
from alphagan.course.plan import TimedStep
from alphagan.device import machine, synchronise

# Operator (CPU) or kernel (GPU) names, first match wins. cuDNN names its input-gradient kernels dgrad and its
# weight-gradient kernels wgrad; on a CPU oneDNN computes both in one convolution_backward.
CLASSES = [
    ("convolution, input gradient", r"dgrad|convolution_backward_input"),
    ("convolution, weight gradient", r"wgrad|convolution_backward_weight"),
    ("convolution backward (input and weight)", r"convolution_backward"),
    ("convolution forward", r"conv|fprop|implicit_gemm|winograd"),
    ("matrix products (linear layers, heads)", r"addmm|\bmm\b|bmm|gemm|matmul|linear"),
    ("normalisation", r"batch_norm|bn_|group_norm|welford"),
    ("optimiser (fused Adam)", r"adam|multi_tensor"),
    ("layout copies", r"copy|contiguous|clone|permute|transpose|cat\b"),
    ("element-wise and reductions", r"."),
]


class FlopCount(TorchDispatchMode):
    """Sums the FLOPs of every ATen call that `flop_registry` knows, double backward included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def no_penalty():
    """The gradient penalty replaced by zero (the rest of the iteration unchanged), to time it by difference."""
    original = losses.gradient_penalty
    losses.gradient_penalty = lambda critic, real, fake, alpha=None: real.new_zeros(())
    try:
        yield
    finally:
        losses.gradient_penalty = original


def matrix_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix product in `dtype` on `device` (2048^2 on a CPU, 8192^2 on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    synchronise(device)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ a
        repeats += 1
        synchronise(device)
    return repeats * 2 * n**3 / (time.perf_counter() - start)


class Step(TimedStep):
    """`course.plan.TimedStep` of a model at a profile, with its FLOPs and where its time goes."""

    def __init__(self, profile: str, model: str):
        super().__init__(make_config(profile, model))

    def flops(self) -> int:
        counter = FlopCount()
        with counter:
            self.run(1, graphed=False)
        return counter.flops

    def breakdown(self, n: int) -> tuple[float, dict[str, float]]:
        """Seconds per profiled iteration, and by class of operator (eager: the profiler sees no kernel inside a
        graph replay); the classes add up to the profiled iteration, which the profiler makes slower."""
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            wall = self.run(n, graphed=False)
        seconds: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            own = event.self_device_time_total if cuda else event.self_cpu_time_total
            if own <= 0 or (cuda and event.device_type != torch.autograd.DeviceType.CUDA):
                continue
            name = next(label for label, pattern in CLASSES if re.search(pattern, event.key, re.IGNORECASE))
            seconds[name] += own / 1e6 / n
        busy = sum(seconds.values())
        seconds["launch gaps and Python (wall minus the time above)" if cuda else "Python and dispatch"] = wall - busy
        return wall, dict(seconds)


PENALISED = ("alpha-wgan-gp", "wgan-gp")
PENALTY = "of which the gradient penalty, both passes (by difference)"


@cache
def _matrix_rate(device: torch.device, dtype: torch.dtype) -> float:
    return matrix_rate(device, dtype)


def measure(profile: str, model: str, iters: int) -> dict:
    """One model at one profile: its FLOPs, speed, the matrix rate beside it, and where its time goes."""
    step = Step(profile, model)
    step.warm_up()
    seconds = step.run(iters)
    flops = step.flops()
    peak = _matrix_rate(step.device, step.dtype if step.device.type == "cuda" else torch.float32)
    eager = step.run(iters, graphed=False)
    profiled, parts = step.breakdown(max(1, iters // 2))
    if model in PENALISED:  # its share of the unprofiled eager iteration, scaled to the profiled one
        with no_penalty():
            step.run(1, graphed=False)
            parts[PENALTY] = (eager - step.run(iters, graphed=False)) * profiled / eager
    return dict(
        profile=profile, model=model, dtype=str(step.dtype).removeprefix("torch."), graphs=step.graphs,
        gflop=flops / 1e9, it_per_s=1 / seconds, achieved=flops / seconds, peak=peak, profiled_s=profiled,
        parts=parts,
    )  # fmt: skip


def print_tables(rows: list[dict]) -> None:
    print(f"{machine()}\n")
    print("| profile | model | dtype | graphs | GFLOP/iter | it/s | achieved TFLOP/s | matrix TFLOP/s | fraction |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['profile']} | {r['model']} | {r['dtype']} | {r['graphs']} | {r['gflop']:.2f} | {r['it_per_s']:.2f} "
            f"| {r['achieved'] / 1e12:.4f} | {r['peak'] / 1e12:.3f} | {r['achieved'] / r['peak']:.3f} |"
        )
    for r in rows:
        ms = 1000 * r["profiled_s"]
        print(f"\n{r['profile']}, {r['model']}: where an eager, profiled iteration's {ms:.1f} ms go\n")
        print("| part | ms per iteration | share |")
        print("|---|---:|---:|")
        for part, s in sorted(r["parts"].items(), key=lambda kv: (kv[0] == PENALTY, -kv[1])):
            print(f"| {part} | {1000 * s:.2f} | {s / r['profiled_s']:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="smoke,cpu", help="comma-separated profiles")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    args = parser.parse_args()
    rows = [measure(p, m, args.iters) for p in args.profiles.split(",") for m in args.models.split(",")]
    print_tables(rows)


if __name__ == "__main__":
    main()
