"""The training loop: every model runs, runs are reproducible, resume is exact, failures are clean."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nilearn import datasets, image

from alphagan import losses
from alphagan.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint
from alphagan.cli import main
from alphagan.config import MODELS, make_config
from alphagan.models import Generator
from alphagan.sampling import calibrated_generator, generate
from alphagan.steps import TrainingDiverged
from alphagan.train import train

SMOKE = dict(iters=4, ckpt_every=2, sample_every=2, log_every=1, device="cpu")


def _weights(nets):
    return {f"{k}.{n}": t.clone() for k, net in nets.items() for n, t in net.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_and_writes_its_run(tmp_path, model):
    result = train(make_config("smoke", model, **SMOKE), "synth", tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    expected = {
        "alpha-wgan-gp": {"loss_eg", "loss_d", "loss_c", "gp_d", "gp_c", "w_dist", "w_dist_code", "l1"},
        "alpha-gan": {"loss_eg", "loss_d", "loss_c", "l1"},
        "wgan-gp": {"loss_g", "loss_d", "gp_d", "w_dist"},
        "vae-gan": {"loss_eg", "loss_d", "kl", "l1"},
    }[model]
    assert expected <= set(records[-1]) and "it_per_s" in records[-1]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    assert (tmp_path / "samples" / "iter_000004.png").stat().st_size > 1000
    assert set(result.nets) == (
        {"G", "D"} if model == "wgan-gp" else {"E", "G", "D"} | ({"C"} if "alpha" in model else set())
    )


def test_generated_nifti_overlays_the_mni_template(tmp_path):
    train(make_config("smoke", **SMOKE), "synth", tmp_path, progress=False)
    img = nib.load(tmp_path / "samples" / "sample_0000.nii.gz")
    assert img.shape == (16, 16, 16) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # nilearn resamples it onto the MNI template's grid; the cube covers the template's brain.
    template = datasets.load_mni152_brain_mask(resolution=2)
    on_mni = image.resample_to_img(img, template, force_resample=True, copy_header=True)
    covered = np.isfinite(on_mni.get_fdata()) & (on_mni.get_fdata() != 0)
    assert covered[template.get_fdata() > 0].mean() > 0.95
    centre = img.affine @ np.array([7.5, 7.5, 7.5, 1.0])
    np.testing.assert_allclose(centre[:3], [0.0, -17.0, 5.0], atol=1e-6)


def test_same_seed_same_run_bit_for_bit(tmp_path):
    cfg = make_config("smoke", **SMOKE)
    a = train(cfg, "synth", tmp_path / "a", progress=False)
    b = train(cfg, "synth", tmp_path / "b", progress=False)
    _assert_same(_weights(a.nets), _weights(b.nets))
    c = train(cfg.replace(seed=1), "synth", tmp_path / "c", progress=False)
    assert not torch.equal(_weights(a.nets)["G.net.0.weight"], _weights(c.nets)["G.net.0.weight"])


@pytest.mark.parametrize("model", ["alpha-wgan-gp", "wgan-gp"])
def test_resume_two_plus_two_equals_four(tmp_path, model):
    cfg = make_config("smoke", model, **{**SMOKE, "ckpt_every": 100})
    straight = train(cfg, "synth", tmp_path / "straight", progress=False)
    train(cfg.replace(iters=2), "synth", tmp_path / "resumed", progress=False)
    resumed = train(cfg, "synth", tmp_path / "resumed", resume=True, progress=False)
    _assert_same(_weights(straight.nets), _weights(resumed.nets))
    s, r = (load_checkpoint(p / "checkpoints") for p in (tmp_path / "straight", tmp_path / "resumed"))
    for k in s["optimisers"]:
        for pid, state in s["optimisers"][k]["state"].items():
            assert torch.equal(state["exp_avg_sq"], r["optimisers"][k]["state"][pid]["exp_avg_sq"])
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4]
    assert [x.get("loss_d") for x in lines] == [x.get("loss_d") for x in straight_lines]


def test_resume_refuses_changed_settings(tmp_path):
    cfg = make_config("smoke", **SMOKE)
    train(cfg.replace(iters=2), "synth", tmp_path, progress=False)
    with pytest.raises(ValueError, match="width"):
        train(cfg.replace(width=8), "synth", tmp_path, resume=True, progress=False)


def test_checkpoints_load_without_unpickling_code(tmp_path):
    cfg = make_config("smoke", **{**SMOKE, "iters": 6, "keep_ckpts": 2})
    train(cfg, "synth", tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    state = load_checkpoint(tmp_path / "checkpoints")  # a folder: its newest checkpoint
    assert state["iter"] == 6 and state["config"]["model"] == "alpha-wgan-gp" and len(state["rng"]) == 1

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil" / "ckpt_00000001.pt"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({"nets": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="not a loadable alphagan checkpoint"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


def test_nan_stops_the_run_naming_term_and_iteration(tmp_path, monkeypatch):
    cfg = make_config("smoke", **{**SMOKE, "iters": 6})
    real_d = losses.alpha_wgan_gp_d
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms = real_d(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * cfg.d_steps + 1:  # the first discriminator step of iteration 3
            terms["gp_d"] = torch.tensor(float("nan"))
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(losses, "alpha_wgan_gp_d", poisoned)
    with pytest.raises(TrainingDiverged, match=r"gp_d = nan at iteration 3"):
        train(cfg, "synth", tmp_path, progress=False)
    ckpt = find_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "ckpt_00000002.pt"
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(t).all() for net in state["nets"].values() for t in net.values() if t.is_floating_point())


def test_two_processes_hold_identical_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            str(worker),
            str(tmp_path),
            "alpha-wgan-gp",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    single = train(make_config("smoke", iters=3, device="cpu"), "synth", tmp_path / "single", progress=False)
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    # The two ranks saw different batches: the result is not what one process alone gives.
    assert not torch.equal(a["G"]["net.0.weight"], single.nets["G"].state_dict()["net.0.weight"])


def test_recalibrated_generator_does_not_collapse_where_stale_statistics_do():
    """docs/method.md, section 6: G's running statistics learned from encoder codes (std ~4.3) are wrong for N(0, I)."""
    torch.manual_seed(0)
    G = Generator(16, 8, 64)
    with torch.no_grad():  # running statistics from encoder-like codes, as during alpha-GAN training
        for _ in range(50):
            G.train()(torch.randn(4, 64) * 4.3 + 2.0)
    stale = generate(G.eval(), 8, 64, seed=1)
    fixed = generate(calibrated_generator(G, 64, batch=4), 8, 64, seed=1)
    batch_stats = G.train()(torch.randn(64, 64, generator=torch.Generator().manual_seed(1))).detach()
    spread = fixed.flatten(1).std(1).mean()
    assert abs(spread - batch_stats.flatten(1).std(1).mean()) < 0.25 * spread
    assert spread > 2 * stale.flatten(1).std(1).mean()


@pytest.mark.slow
def test_sampling_mode_produces_real_volumes_after_training(tmp_path):
    """A real (tiny) training run: the samples of `python -m alphagan sample` are not near-constant."""
    cfg = make_config(
        "smoke",
        size=16,
        width=8,
        latent=256,
        code_hidden=256,
        batch=4,
        iters=60,
        n_subjects=24,
        ckpt_every=60,
        sample_every=60,
        log_every=10,
        device="cpu",
    )
    train(cfg, "synth", tmp_path / "run", progress=False)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "run" / "checkpoints"),
                "--n",
                "6",
                "--out",
                str(tmp_path / "samples"),
            ]
        )
        == 0
    )
    volumes = np.stack([nib.load(p).get_fdata() for p in sorted((tmp_path / "samples").glob("*.nii.gz"))])
    assert volumes.shape == (6, 16, 16, 16)
    assert volumes.reshape(6, -1).std(1).min() > 0.1  # not a constant background
    assert np.abs(volumes[0] - volumes[1]).mean() > 0.01  # and not one volume repeated
    assert (tmp_path / "samples" / "samples.png").exists()


def test_train_command_and_resume(tmp_path):
    args = [
        "train",
        "--data",
        "synth",
        "--out",
        str(tmp_path),
        "--profile",
        "smoke",
        "--model",
        "vae-gan",
        "--iters",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert main(args[:-4] + ["--iters", "3", "--device", "cpu", "--resume"]) == 0
    assert load_checkpoint(tmp_path / "checkpoints")["iter"] == 3


def test_bf16_autocast_keeps_every_term_finite(tmp_path):
    """The mixed-precision path (CUDA's default) on the CPU: the penalty is computed through bf16 layers."""
    train(make_config("smoke", **{**SMOKE, "precision": "bf16"}), "synth", tmp_path, progress=False)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(v) for v in last.values()) and last["gp_d"] > 0


def test_recalibrated_statistics_are_the_average_over_code_batches():
    # Computed by hand for G's first BatchNorm: the mean over 32 batches of N(0, I) codes of each batch's
    # per-channel mean and unbiased variance of the stem's output.
    torch.manual_seed(0)
    G = Generator(16, 4, 8)
    G.net[1].running_mean.fill_(5.0)  # stale statistics, to be replaced
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        stems = [G.net[0](torch.randn(4, 8, generator=gen).view(4, 8, 1, 1, 1)) for _ in range(32)]
    means = torch.stack([h.mean((0, 2, 3, 4)) for h in stems]).mean(0)
    variances = torch.stack([h.transpose(0, 1).flatten(1).var(1) for h in stems]).mean(0)
    calibrated = calibrated_generator(G, 8, batch=4, batches=32, seed=3)
    assert torch.allclose(calibrated.net[1].running_mean, means, atol=1e-6)
    assert torch.allclose(calibrated.net[1].running_var, variances, atol=1e-5)
    assert not calibrated.training and G.net[1].running_mean[0] == 5.0  # a copy, in eval mode


def test_one_fixed_volume_trains_to_the_end_without_a_spread_to_log(tmp_path):
    cfg = make_config("smoke", iters=2, n_fixed=1, device="cpu")
    train(cfg, "synth", tmp_path, progress=False)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["iter"] == 2 and "sample_spread" not in last
