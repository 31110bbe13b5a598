"""The update table, the data sources, the cached synthetic batches and the course settings."""

import json

import numpy as np
import pytest
import torch

from alphagan.config import MODELS, PROFILES, make_config
from alphagan.course import settings as course_module
from alphagan.course.settings import COURSE, class_config, course_settings, train_or_reuse
from alphagan.data import cache
from alphagan.data.cache import synthetic_cache
from alphagan.data.dataset import Batches, Source, synthetic_volumes
from alphagan.data.prepare import normalise, to_cube
from alphagan.data.synth import make_subject
from alphagan.device import choose_profile, pick_dtype
from alphagan.models import build_networks
from alphagan.steps import UPDATES, TrainingDiverged, draw, optimisers, run_update
from alphagan.train import train

SMOKE = dict(iters=4, ckpt_every=2, sample_every=2, log_every=1, device="cpu")


@pytest.mark.parametrize("model", MODELS)
def test_each_update_changes_exactly_the_networks_it_trains(model):
    cfg = make_config("smoke", model)
    torch.manual_seed(0)
    nets = build_networks(model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden)
    batches = Batches(np.random.default_rng(0).uniform(-1, 1, (6, 16, 16, 16)).astype(np.float32),
                    torch.device("cpu"), torch.Generator().manual_seed(0))  # fmt: skip
    opts, inputs = optimisers(nets, UPDATES[model], cfg), {}
    for update in UPDATES[model]:
        before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
        grads = {k: [None if p.grad is None else p.grad.clone() for p in net.parameters()] for k, net in nets.items()}
        draw(update.draws, inputs, batches, cfg)
        terms = run_update(update, nets, opts[update.name], inputs, cfg)
        assert terms and all(torch.isfinite(t) for t in terms.values())
        for name, net in nets.items():
            changed = any(not torch.equal(a, p) for a, p in zip(before[name], net.parameters()))
            assert changed == (name in update.learns), (update.name, name)
            if name not in update.learns:  # no gradient reached a frozen network
                now = [p.grad for p in net.parameters()]
                assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads[name], now))


def test_the_table_covers_every_model_in_the_papers_order():
    assert set(UPDATES) == set(MODELS)
    assert [u.name for u in UPDATES["alpha-wgan-gp"]] == ["EG", "D", "C"]
    cfg = make_config("smoke", "wgan-gp")
    assert [u.times(cfg) for u in UPDATES["wgan-gp"]] == [1, 5]


def test_sources_parse_once_and_an_existing_folder_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Source.parse("synth").synthetic and Source.parse("synth") == Source(None, "normal", "t1")
    assert Source.parse("synth:tumor:flair") == Source(None, "tumor", "flair")
    (tmp_path / "synth_mycache").mkdir()
    assert Source.parse("synth_mycache").cache == tmp_path / "synth_mycache"
    (tmp_path / "synth").mkdir()
    assert Source.parse("synth").cache == tmp_path / "synth"
    for bad in ("synth:flu", "synth:tumor:pet", "synth:tumor:t1:x"):
        with pytest.raises(ValueError, match="synth\\[:kind\\[:contrast\\]\\]"):
            Source.parse(bad)


def test_synthetic_cohort_is_made_once_in_parallel_and_equals_direct_synthesis(monkeypatch):
    serial = synthetic_cache(3, 16, seed=7, kind="tumor", contrast="t2", workers=1)
    calls = []
    monkeypatch.setattr(cache, "_synth_one", lambda job: calls.append(job))
    assert synthetic_cache(3, 16, seed=7, kind="tumor", contrast="t2") == serial and not calls  # cached
    monkeypatch.undo()
    parallel = synthetic_cache(3, 16, seed=8, kind="tumor", contrast="t2", workers=2)
    volumes, _ = synthetic_volumes(3, 16, seed=8, kind="tumor", contrast="t2")
    assert parallel != serial and volumes.shape == (3, 16, 16, 16)
    # An independent path: the subject synthesised and preprocessed directly.
    subject = make_subject(2, seed=8, size=32, kind="tumor", contrast="t2")
    cube, _ = to_cube(subject.volume, np.abs(np.diag(subject.affine)[:3]), 16)
    np.testing.assert_array_equal(volumes[2], normalise(cube))


def test_cohort_batches_are_augmented_volumes_of_the_cohort():
    volumes = np.linspace(-1, 1, 4 * 16**3, dtype=np.float32).reshape(4, 16, 16, 16)
    batches = Batches(volumes, torch.device("cpu"), torch.Generator().manual_seed(0), flip=False, intensity=(1, 1))
    x = batches.batch(8)
    assert x.shape == (8, 1, 16, 16, 16)
    assert all(any(np.array_equal(v[0].numpy(), ref) for ref in volumes) for v in x)
    state = batches.state()
    again = batches.batch(8)
    batches.set_state(state)
    assert torch.equal(batches.batch(8), again)


def test_precision_auto_is_fp32_on_the_cpu_and_every_choice_maps():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert [pick_dtype(p, cpu) for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]


def test_fp16_trains_from_python_and_the_command_line(tmp_path):
    from alphagan.cli import main

    train(make_config("smoke", **{**SMOKE, "precision": "fp16"}), "synth", tmp_path / "py", progress=False)
    last = json.loads((tmp_path / "py" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(v) for v in last.values())
    args = ["train", "--data", "synth", "--out", str(tmp_path / "cli"), "--profile", "smoke", "--iters", "2"]
    assert main([*args, "--precision", "fp16", "--device", "cpu"]) == 0


def test_a_nan_read_late_still_names_its_iteration_and_no_checkpoint_follows(tmp_path, monkeypatch):
    from alphagan import losses

    real_c = losses.alpha_wgan_gp_c
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms = real_c(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["gp_c"] = terms["gp_c"] * float("inf")
        return loss, terms

    monkeypatch.setattr(losses, "alpha_wgan_gp_c", poisoned)
    cfg = make_config("smoke", **{**SMOKE, "iters": 8, "log_every": 4, "ckpt_every": 2})
    with pytest.raises(TrainingDiverged, match=r"gp_c = inf at iteration 3; .*ckpt_00000002.pt, is intact"):
        train(cfg, "synth", tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["ckpt_00000002.pt"]


@pytest.mark.parametrize("name", ["iters", "log_every", "ckpt_every", "sample_every", "n_subjects"])
def test_counts_below_one_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        make_config("smoke", **{name: 0})


def test_every_profile_has_course_settings_and_the_gpu_profile_is_the_papers_network():
    assert set(COURSE) == set(PROFILES)
    for profile in PROFILES:
        assert course_settings(profile).n_eval > 0
    assert course_settings("cpu", n_eval=7).n_eval == 7
    gpu, paper = make_config("gpu"), make_config("paper")
    assert (gpu.size, gpu.width, gpu.latent, gpu.batch) == (paper.size, paper.width, paper.latent, paper.batch)
    assert gpu.iters < paper.iters
    assert choose_profile()[0] == ("gpu" if torch.cuda.is_available() else "cpu")
    assert choose_profile("smoke") == ("smoke", "as asked")


def test_what_only_a_notebook_set_is_the_courses():
    """Notebook 03 resumes for a fiftieth of its run; notebook 06 trains each class in batches no larger than
    its subjects."""
    course = course_settings("cpu")
    assert (course.resume_iters(1000), course.resume_iters(10)) == (20, 1)
    few = class_config("cpu", n_real=3, iters=5, seed=1)
    assert (few.batch, few.n_subjects, few.iters, few.seed) == (3, 3, 5, 1)
    assert class_config("cpu", n_real=30, iters=None, seed=0).batch == make_config("cpu").batch


def test_a_finished_run_is_reused_and_a_stopped_one_resumed(tmp_path, monkeypatch):
    cfg = make_config("smoke", **SMOKE)
    first = train(cfg, "synth", tmp_path / "03", progress=False)
    monkeypatch.setattr(course_module, "train", lambda *a, **k: pytest.fail("trained again"))
    reused = train_or_reuse(cfg, "synth", tmp_path / "04", reuse=(tmp_path / "03",))
    assert reused.out == tmp_path / "03"
    for k, net in first.nets.items():
        for a, b in zip(net.state_dict().values(), reused.nets[k].state_dict().values()):
            assert torch.equal(a, b)
    monkeypatch.undo()
    seen = {}
    monkeypatch.setattr(course_module, "train", lambda *args, resume, overwrite, init: seen.update(resume=resume))
    train_or_reuse(cfg.replace(iters=6), "synth", tmp_path / "03")
    assert seen == {"resume": True}  # iteration 6 not there yet: continue from 4
    train_or_reuse(cfg, "synth:tumor:t1", tmp_path / "other", reuse=(tmp_path / "03",))
    assert seen == {"resume": False}  # other data: not reused


def test_a_run_starts_from_the_weights_of_another(tmp_path):
    cfg = make_config("smoke", **SMOKE)
    first = train(cfg, "synth:tumor:t2", tmp_path / "03", progress=False)
    start = tmp_path / "03" / "checkpoints"
    # With the smallest learning rate allowed, 1e-7, one iteration (Adam's first steps move a weight by lr each)
    # leaves the weights within 1e-6 of where they started: the other run's, not random ones.
    still = cfg.replace(lr=1e-7, iters=1)
    tuned = train(still, "synth", tmp_path / "05", progress=False, init=start)
    fresh = train(still, "synth", tmp_path / "fresh", progress=False)
    for k, net in first.nets.items():
        for (name, a), b in zip(net.named_parameters(), tuned.nets[k].parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{k}.{name}"
        assert not all(torch.equal(a, c) for a, c in zip(net.parameters(), fresh.nets[k].parameters())), k
    recorded = json.loads((tmp_path / "05" / "config.json").read_text())["init"]
    assert recorded == str((start / "ckpt_00000004.pt").resolve())
    # A finished run is reused only with the same starting point.
    assert train_or_reuse(still, "synth", tmp_path / "x", reuse=(tmp_path / "05",), init=start).out == tmp_path / "05"
    assert train_or_reuse(still, "synth", tmp_path / "y", reuse=(tmp_path / "05",)).out == tmp_path / "y"
    with pytest.raises(ValueError, match="ckpt_00000004.pt: its networks differ from this run's \\(width 4 != 8"):
        train(cfg.replace(width=8), "synth", tmp_path / "wide", progress=False, init=start)


@pytest.mark.parametrize("model", MODELS)
def test_train_runs_the_update_notebook_03_teaches(tmp_path, model):
    # Two iterations written out as notebook 03 writes them (draw, then run_update, in the table's order) end
    # with the same weights, bit for bit, as train() on the same seed: the loop runs this function, no copy.
    cfg = make_config("smoke", model, **{**SMOKE, "iters": 2})
    trained = train(cfg, "synth", tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)
    volumes, _ = synthetic_volumes(cfg.n_subjects, cfg.size, seed=cfg.seed)
    nets = build_networks(model, cfg.size, cfg.width, cfg.latent, cfg.code_hidden, cfg.critic_norm)
    batches = Batches(volumes, torch.device("cpu"), torch.Generator().manual_seed(cfg.seed * 1000), cfg.flip,
                    cfg.intensity)  # fmt: skip
    opts, inputs = optimisers(nets, UPDATES[model], cfg, fused=True), {}
    for _ in range(cfg.iters):
        for update in UPDATES[model]:
            for _ in range(update.times(cfg)):
                draw(update.draws, inputs, batches, cfg)
                run_update(update, nets, opts[update.name], inputs, cfg)
    for k, net in nets.items():
        for (name, a), b in zip(net.state_dict().items(), trained.nets[k].state_dict().values()):
            assert torch.equal(a, b), f"{model}: {k}.{name}"
