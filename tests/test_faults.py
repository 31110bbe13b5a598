"""Bad input and faults: nothing of the user's is lost, and every mistake is one clear line, not a traceback."""

import collections
import fcntl
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from alphagan.checkpoint import list_checkpoints
from alphagan.cli import main
from alphagan.course import runner
from alphagan.data.cache import cache_root, load_cache, read_manifest
from alphagan.data.prepare import prepare
from alphagan.folders import claim

TRAIN = ["--profile", "smoke", "--iters", "2", "--device", "cpu", "--ckpt-every", "1"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, cohort_dir):
    return prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False).out


def _fails(capsys, argv, *phrases):
    """The command exits 1 with one line that names what went wrong, and no traceback."""
    capsys.readouterr()  # what earlier commands printed
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress bars may come first
    assert last.startswith(f"alphagan {argv[0]}: ") and "Traceback" not in err, err
    err = last
    for phrase in phrases:
        assert phrase in err, err
    return err


def _stopped(capsys, argv, *phrases):
    """The command, stopped by Ctrl-C, exits 130 (as the shell reports it) with one line that says what it keeps and
    what to run next, and no traceback."""
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith(f"alphagan {argv[0]}: stopped (Ctrl-C); ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in last, last
    return last


# ------------------------------------------------------------------------------------------------ data loss
def test_prepare_refuses_a_folder_holding_other_files_and_leaves_them_as_they_were(tmp_path, cohort_dir, capsys):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("three years of work")
    (out / "sub" / "notes.md").write_text("# notes")
    before = _snapshot(out)
    _fails(capsys, ["prepare", "--src", str(cohort_dir), "--out", str(out), "--size", "16"], "thesis.txt")
    assert _snapshot(out) == before


def test_prepare_with_other_settings_needs_overwrite_and_keeps_the_cache_until_then(cache, cohort_dir, capsys):
    before = _snapshot(cache)
    argv = ["prepare", "--src", str(cohort_dir), "--out", str(cache), "--size", "32"]
    _fails(capsys, argv, "other settings (size 16)", "--overwrite")
    assert _snapshot(cache) == before
    assert main([*argv, "--overwrite"]) == 0
    assert np.load(cache / "volumes.npy", mmap_mode="r").shape[1:] == (32, 32, 32)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_prepare_never_writes_over_its_inputs(tmp_path, cohort_dir, capsys, where):
    src = tmp_path / "data" / "raw"
    shutil.copytree(cohort_dir, src)
    before = _snapshot(src)
    out = src if where == "same" else src.parent
    _fails(capsys, ["prepare", "--src", str(src), "--out", str(out), "--size", "16"], "inputs")
    assert _snapshot(src) == before


def test_prepare_restores_a_cache_left_between_two_renames_and_cleans_partial_folders(tmp_path, cohort_dir, cache):
    before = (cache / "volumes.npy").read_bytes()
    cache.rename(tmp_path / ".cache.old-4242")  # killed after moving the old cache away
    (tmp_path / ".cache.partial-4343").mkdir()
    result = prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False)
    assert result.reused == 6 and (tmp_path / "cache" / "volumes.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.")) == [".cache.lock"]


def test_a_second_prepare_on_the_same_cache_is_refused_while_one_runs(tmp_path, cohort_dir):
    (tmp_path / "cache").mkdir()
    with open(tmp_path / ".cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another prepare is writing"):
            prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False)


def test_a_header_promising_a_huge_volume_is_rejected_before_its_data_are_read(tmp_path, cohort_dir, capsys):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    header = nib.Nifti1Header()
    header.set_data_shape((600, 600, 600))
    header.set_data_dtype(np.uint8)
    nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4), header).to_filename(src / "huge.nii")
    with open(src / "huge.nii", "r+b") as f:  # a header that claims 600³ with almost no data behind it
        f.seek(42)
        f.write(np.array([600, 600, 600], "<i2").tobytes())
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert len(result.rejected) == 1 and "above the limit" in result.rejected[0][1]
    assert result.written == 6


@pytest.mark.parametrize("size", ["0", "-4", "100000"])
def test_prepare_checks_its_size(tmp_path, cohort_dir, capsys, size):
    argv = ["prepare", "--src", str(cohort_dir), "--out", str(tmp_path / "c"), "--size", size]
    _refused_when_parsed(
        capsys, argv, f"argument --size: must be a power of two from 16 to 256 (16, 32, 64, 128, 256), got {size}"
    )
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ damaged caches
def test_a_truncated_array_a_disagreeing_size_and_a_damaged_manifest_are_named(tmp_path, cache, cohort_dir, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    data = (broken / "volumes.npy").read_bytes()
    (broken / "volumes.npy").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r1"), *TRAIN], "damaged cache")
    shutil.copy(cache / "volumes.npy", broken / "volumes.npy")
    settings = json.loads((broken / "settings.json").read_text())
    (broken / "settings.json").write_text(json.dumps({**settings, "size": 32}))
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r2"), *TRAIN], "settings.json says 32")
    for damaged in ("[16]", '{"size": "16"}', "{half"):  # the size train would take from it, or none
        (broken / "settings.json").write_text(damaged)
        argv = ["train", "--data", str(broken), "--out", str(tmp_path / "r2"), "--profile", "smoke"]
        _fails(capsys, argv, f"{broken / 'settings.json'}: damaged", "prepare the cache again")
    (broken / "settings.json").write_text(json.dumps(settings))
    header = (broken / "manifest.tsv").read_text().splitlines()[0]
    (broken / "manifest.tsv").write_text(header + "\n")
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r3"), *TRAIN], "0 rows for 6 volumes")
    assert not (tmp_path / "r3" / "config.json").exists()
    rows_text = (cache / "manifest.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in rows_text]
    without = ["\t".join(row[:5] + row[6:]) for row in rows]  # no sha256 column
    (broken / "manifest.tsv").write_text("\n".join(without) + "\n")
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r4"), *TRAIN], "has no sha256 column")
    (broken / "manifest.tsv").write_text("\n".join([*rows_text[:2], "\x00\tcut\t"]) + "\n")
    _fails(
        capsys,
        ["train", "--data", str(broken), "--out", str(tmp_path / "r5"), *TRAIN],
        "manifest.tsv: line 3 is damaged",
    )
    # prepare, given the same inputs, makes it again rather than stopping on what it cannot reuse
    assert prepare(str(cohort_dir), broken, size=16, progress=False).written == 6


def test_missing_or_empty_data_and_flags_that_would_do_nothing(tmp_path, cache, capsys):
    _fails(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TRAIN], "nowhere")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *TRAIN], "volumes.npy")
    argv = ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *TRAIN, "--n-subjects", "50"]
    _fails(capsys, argv, "--n-subjects sizes a synthetic cohort")  # a flag that would do nothing
    argv = ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN, "--model", "wgan-gp", "--lambda-rec", "5"]
    _fails(capsys, argv, "--lambda-rec weighs a reconstruction")


# ------------------------------------------------------------------------------------------------ runs
def test_train_refuses_a_folder_holding_a_run_unless_told_to_resume_or_overwrite(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(out), *TRAIN]) == 0
    (out / "notes.txt").write_text("mine")
    log = (out / "metrics.jsonl").read_bytes()
    _fails(capsys, ["train", "--data", str(cache), "--out", str(out), *TRAIN], "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_bytes() == log
    assert main(["train", "--data", str(cache), "--out", str(out), *TRAIN, "--overwrite"]) == 0
    records = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2] and (out / "notes.txt").read_text() == "mine"


def test_resume_names_what_differs(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(out), *TRAIN]) == 0
    config = (out / "config.json").read_bytes()
    _fails(capsys, ["train", "--data", "synth", "--out", str(out), *TRAIN, "--resume"], "trained on", str(cache))
    argv = ["train", "--data", str(cache), "--out", str(out), "--profile", "smoke", "--device", "cpu", "--resume"]
    _fails(capsys, [*argv, "--iters", "1"], "beyond --iters 1")
    _fails(capsys, [*argv, "--iters", "3", "--width", "8"], "width", "4 != 8")
    assert (out / "config.json").read_bytes() == config
    monkeypatch.chdir(tmp_path)  # a relative path names the same cache, and the run stores it resolved
    relative = ["train", "--data", "cache", "--out", "run", "--profile", "smoke", "--device", "cpu", "--resume"]
    assert main([*relative, "--iters", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(cache.resolve())


def test_resume_skips_a_truncated_newest_checkpoint_and_stale_temporary_files_go(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(out), *TRAIN]) == 0
    newest = list_checkpoints(out / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    (out / "checkpoints" / ".ckpt_00000009.pt.999.tmp").write_bytes(b"half")
    argv = ["train", "--data", str(cache), "--out", str(out), "--profile", "smoke", "--device", "cpu", "--resume"]
    assert main([*argv, "--iters", "3", "--ckpt-every", "1"]) == 0
    said = capsys.readouterr().err  # a warning is one line, as the commands say everything
    assert re.search(f"^alphagan train: {re.escape(str(newest))}: .*; using the newest older checkpoint", said, re.M)
    assert "weights_only" not in said and "UserWarning" not in said
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a folder")
    _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "file.txt" / "run"), *TRAIN], "file.txt")
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_a_cache_named_like_the_synthetic_source_is_read_as_a_cache(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache, tmp_path / "synth_mycache")
    assert main(["train", "--data", "synth_mycache", "--out", "run", *TRAIN]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "synth_mycache")


# ------------------------------------------------------------------------------------------------ other commands
def test_sample_and_evaluate_name_their_bad_input(tmp_path, capsys):
    out = ["--out", str(tmp_path / "s")]
    _fails(capsys, ["sample", "--checkpoint", str(tmp_path / "missing.pt"), *out], "missing.pt")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["sample", "--checkpoint", str(tmp_path / "empty"), *out], "no checkpoint")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("x", "not a checkpoint")
    _fails(capsys, ["sample", "--checkpoint", str(tmp_path / "other.pt"), *out], "other.pt")
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(tmp_path / "other.pt"), "--n", "0", *out])
    argv = ["evaluate", "--real", "synth:nothing", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path)]
    _fails(capsys, argv, "synth[:kind[:contrast]]")


def test_a_cohort_smaller_than_one_batch_is_refused_before_it_is_made(tmp_path, capsys):
    argv = ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN, "--n-subjects", "1"]
    _fails(capsys, argv, "1 volumes, fewer than one batch (--batch 2); give --n-subjects 2 or more")
    assert not list(cache_root().glob("synth-*-n1-*"))
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_a_cache_smaller_than_one_batch_names_the_batch_not_a_cohort_size(tmp_path, capsys, cohort_dir):
    cache = tmp_path / "cache"
    assert main(["prepare", "--src", str(cohort_dir), "--out", str(cache), "--size", "16", "--workers", "1"]) == 0
    argv = ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *TRAIN, "--batch", "8"]
    _fails(capsys, argv, f"{cache}: 6 volumes, fewer than one batch (--batch 8); give --batch 6 or less")
    _fails(capsys, [*argv[:-2], "--size", "32"], "holds 16^3 volumes but the run asks for 32^3")
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_one_model_given_twice(tmp_path, capsys):
    """A folder and its newest checkpoint are one model: two rows of it would read as two models that agree."""
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    newest = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    argv = ["evaluate", "--real", "synth", "--checkpoint", str(run / "checkpoints"), "--checkpoint", str(newest)]
    _fails(capsys, [*argv, "--out", str(tmp_path / "e"), "--n", "4"], newest.name, "given twice")
    assert not (tmp_path / "e").exists()


def test_course_refuses_a_folder_it_may_not_write_before_timing_anything(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    monkeypatch.setattr(runner, "plan_course", lambda *a, **k: pytest.fail("timed models first"))
    _fails(capsys, ["course", "--profile", "smoke", "--only", "02", "--out", str(run)], "alphagan train")


def test_course_checks_its_selection_before_creating_anything(tmp_path, capsys):
    for only in ("99", ","):
        _fails(capsys, ["course", "--profile", "smoke", "--only", only, "--out", str(tmp_path / "c")], "--only")
    assert not (tmp_path / "c").exists()


def test_course_refuses_at_once_notebooks_that_need_a_model_it_lacks(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["course", "--profile", "smoke", "--only", "6,5", "--out", str(out)]
    _fails(capsys, argv, "notebooks 05 and 06 start from notebook 03's model", "add 03 (--only 03,05,06)")
    assert not out.exists()
    (out / "03_training" / "run" / "checkpoints").mkdir(parents=True)
    (out / "03_training" / "run" / "checkpoints" / "ckpt_00000004.pt").write_bytes(b"")  # an earlier call's 03
    runner.check_needs(runner.notebooks("05,06"), out, "smoke")
    runner.check_needs(runner.notebooks("03,05"), tmp_path / "new", "smoke")


@pytest.mark.parametrize("init", ["checkpoints", ".", "checkpoints/ckpt_00000002.pt"])
def test_overwrite_never_deletes_the_checkpoint_init_starts_from(tmp_path, capsys, init):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    before = _snapshot(run)
    argv = ["train", "--data", "synth", "--out", str(run), *TRAIN, "--overwrite", "--init", str(run / init)]
    _fails(capsys, argv, "--overwrite would delete", "where --init points")
    assert _snapshot(run) == before  # byte for byte


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN[:4], "--device", "cuda"],
           "--device cuda: no CUDA GPU here", "use --device cpu or auto")  # fmt: skip


# ------------------------------------------------------------------------------------------------ who owns a folder
SYNTH = ["synth", "--n", "2", "--size", "16"]


def test_synth_refuses_a_folder_of_the_users_files_byte_for_byte(tmp_path, cohort_dir, capsys):
    mine = tmp_path / "mine"
    shutil.copytree(cohort_dir, mine, ignore=shutil.ignore_patterns(".alphagan*"))  # the user's own files
    before = _snapshot(mine)
    _fails(capsys, [*SYNTH, "--out", str(mine)], "files that `alphagan synth` did not write", "participants.tsv")
    _fails(capsys, [*SYNTH, "--out", str(mine), "--overwrite"], "files that `alphagan synth` did not write")
    assert _snapshot(mine) == before


def test_a_cache_never_loses_subjects_without_overwrite_and_reuses_the_same_bytes_by_any_path(
    tmp_path, cohort_dir, capsys, monkeypatch
):
    """`prepare` into its own cache adds subjects; one that would drop some (another --src, or files removed from
    it) is refused, untouched, until --overwrite. A subject is known by its bytes, not by how its path is spelled."""
    first, second = tmp_path / "first", tmp_path / "second"
    files = sorted(cohort_dir.glob("*.nii.gz"))
    for folder, chosen in ((first, files[:3]), (second, files[3:])):
        folder.mkdir()
        for path in chosen:
            shutil.copy(path, folder / path.name)
    out = tmp_path / "cache"
    assert main(["prepare", "--src", str(first), "--out", str(out), "--size", "16"]) == 0
    before = _snapshot(out)
    _fails(capsys, ["prepare", "--src", str(second), "--out", str(out), "--size", "16"], "holds 3 subject(s) that")
    assert _snapshot(out) == before
    monkeypatch.chdir(tmp_path)  # the same files by a relative path: reused, not prepared again
    assert main(["prepare", "--src", "first", "--out", "cache", "--size", "16"]) == 0
    assert "0 volumes written, 3 unchanged" in capsys.readouterr().out
    assert main(["prepare", "--src", str(second), "--out", str(out), "--size", "16", "--overwrite"]) == 0
    assert sorted(Path(row["source"]).name for row in read_manifest(out)) == [p.name for p in files[3:]]


def test_a_second_synth_with_other_settings_needs_overwrite_which_deletes_only_its_own(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main([*SYNTH, "--out", str(out), "--seed", "1"]) == 0
    first = _snapshot(out)
    assert main([*SYNTH, "--out", str(out), "--seed", "1"]) == 0  # the same settings: the same files again
    assert _snapshot(out) == first
    argv = [*SYNTH, "--out", str(out), "--seed", "2", "--n", "3"]
    _fails(capsys, argv, "other settings (n 2, seed 1)", "--overwrite")
    assert _snapshot(out) == first
    (out / "notes.txt").write_text("mine")
    assert main([*SYNTH, "--out", str(out), "--seed", "2", "--n", "1", "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["notes.txt", "participants.tsv", "sub-normal0000_t1.nii.gz"]  # one cohort, not two
    assert len((out / "participants.tsv").read_text().splitlines()) == 2


def test_train_overwrite_refuses_the_users_own_config_and_samples(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "samples" / "figure.png").write_bytes(b"\x89PNG mine")
    before = _snapshot(out)
    _fails(capsys, ["train", "--data", "synth", "--out", str(out), *TRAIN, "--overwrite"], "did not write")
    assert _snapshot(out) == before


def test_one_command_never_writes_into_anothers_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    before = _snapshot(run)
    _fails(capsys, [*SYNTH, "--out", str(run), "--overwrite"], "output of `alphagan train`")
    _fails(capsys, ["sample", "--checkpoint", str(run / "checkpoints"), "--out", str(run)], "alphagan train")
    _fails(capsys, ["sample", "--checkpoint", str(run / "checkpoints"), "--out", str(run / "checkpoints")], "ckpt_")
    assert _snapshot(run) == before


def test_sample_replaces_earlier_samples_only_when_told_and_then_only_its_own(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "samples"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    assert main(["sample", "--checkpoint", str(run / "checkpoints"), "--n", "3", "--out", str(out)]) == 0
    before = _snapshot(out)
    argv = ["sample", "--checkpoint", str(run / "checkpoints"), "--n", "2", "--out", str(out)]
    _fails(capsys, argv, "other settings (n 3)", "--overwrite")
    assert _snapshot(out) == before
    (out / "keep.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("sample_*")) == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    assert (out / "keep.txt").read_text() == "mine"


def test_a_sample_stopped_midway_leaves_no_set_that_looks_finished(tmp_path, monkeypatch, capsys):
    from alphagan import sampling

    run, out = tmp_path / "run", tmp_path / "samples"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    real_save, saved = sampling.save_nifti, []

    def stopped_after_three(volume, path, fov_mm):
        if len(saved) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or a kill: nothing after this runs
        saved.append(path)
        return real_save(volume, path, fov_mm)

    monkeypatch.setattr(sampling, "save_nifti", stopped_after_three)
    _stopped(capsys, ["sample", "--checkpoint", str(run), "--n", "20", "--out", str(out)], "run the same command again")
    assert not out.exists()  # it made the folder, and wrote nothing that stays
    monkeypatch.setattr(sampling, "save_nifti", real_save)
    assert main(["sample", "--checkpoint", str(run), "--n", "20", "--out", str(out)]) == 0
    stale = out / ".samples.partial-999999"  # what a run killed while writing them again leaves
    stale.mkdir()
    (stale / "sample_0000.nii.gz").write_bytes(b"half")
    assert main(["sample", "--checkpoint", str(run), "--n", "20", "--out", str(out)]) == 0
    assert len(list(out.glob("sample_*.nii.gz"))) == 20 and (out / "samples.png").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".alphagan.json", ".alphagan.lock"]


def test_a_staged_set_of_files_appears_whole_or_not_at_all(tmp_path):
    """What `sample` and `evaluate` write goes through `folders.staged`."""
    from alphagan.folders import staged

    names = ["results.json", "table.md", "pca.png"]
    with pytest.raises(RuntimeError), staged(tmp_path, names) as staging:
        (staging / "results.json").write_text("{}")
        raise RuntimeError("stopped before table.md")
    assert list(tmp_path.iterdir()) == []
    with staged(tmp_path, names) as staging:
        for name in names[:2]:  # pca.png not made this time: nothing is moved for it
            (staging / name).write_text(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.md"]


def test_course_refuses_a_folder_holding_the_users_summary(tmp_path, capsys, monkeypatch):
    from alphagan.course import plan

    monkeypatch.setattr(plan, "seconds_per_iteration", lambda profile, model, latent, as_written=False: 0.5)
    out = tmp_path / "course"
    out.mkdir()
    (out / "summary.md").write_text("my summary")
    _fails(capsys, ["course", "--profile", "smoke", "--only", "02", "--out", str(out)], "summary.md")
    assert (out / "summary.md").read_text() == "my summary"


def test_a_second_writer_on_a_folder_is_refused_while_the_first_holds_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    log = (run / "metrics.jsonl").read_bytes()
    with claim(run, "train", {}, [], resume=True):  # a first `train --resume` still running
        argv = ["train", "--data", "synth", "--out", str(run), *TRAIN[:2], "--iters", "4", "--resume"]
        _fails(capsys, argv, "another command is writing here")
    assert (run / "metrics.jsonl").read_bytes() == log
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN[:2], "--iters", "3", "--resume"]) == 0


def test_a_command_that_fails_before_writing_leaves_the_folder_as_it_found_it(tmp_path):
    new, empty, kept = tmp_path / "a" / "new", tmp_path / "empty", tmp_path / "kept"
    empty.mkdir()
    for folder in (new, empty, kept):
        with pytest.raises(KeyboardInterrupt), claim(folder, "sample", {}, ["x.nii.gz"]) as owned:
            if folder == kept:
                (folder / "x.nii.gz").write_text("written")
            raise KeyboardInterrupt
        assert owned.lock is None
    assert not new.exists() and (tmp_path / "a").exists()  # the folder goes; the parents made for it stay
    assert empty.is_dir() and not list(empty.iterdir())
    assert sorted(p.name for p in kept.iterdir()) == [".alphagan.json", ".alphagan.lock", "x.nii.gz"]
    with claim(new, "sample", {}, ["x.nii.gz"]):  # and the same command claims it again
        pass


def test_resume_refuses_a_cache_prepared_again_from_other_subjects(tmp_path, cohort_dir, capsys):
    cache = prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False).out
    run = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(run), *TRAIN]) == 0
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for path in sorted(cohort_dir.glob("*.nii.gz"))[:5]:
        shutil.copy(path, fewer)
    shutil.rmtree(cache)
    prepare(str(fewer), cache, size=16, progress=False)
    argv = ["train", "--data", str(cache), "--out", str(run), "--profile", "smoke", "--device", "cpu", "--resume"]
    _fails(capsys, [*argv, "--iters", "3"], "prepared again", "manifest.tsv")


def test_resume_follows_its_cache_to_a_new_place_and_refuses_another(tmp_path, cohort_dir, capsys):
    cache, moved, run = tmp_path / "cache", tmp_path / "moved", tmp_path / "run"
    prepare(str(cohort_dir), cache, size=16, progress=False)
    assert main(["train", "--data", str(cache), "--out", str(run), *TRAIN]) == 0
    cache.rename(moved)
    resume = ["train", "--out", str(run), "--resume", "--iters", "3"]
    _fails(capsys, resume, f"{cache}: no such folder, and this run trained on it", "give its new place with --data")
    other = prepare(str(cohort_dir), tmp_path / "other", size=16, stretch=True, progress=False).out
    _fails(capsys, [*resume, "--data", str(other)], f"trained on {cache}, not {other}; give --data where that cache")
    assert main([*resume, "--data", str(moved)]) == 0  # the same manifest: the same data
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)


# ------------------------------------------------------------------------------------------------ atomic writes
def test_a_failed_write_leaves_neither_half_a_file_nor_a_temporary_one(tmp_path):
    from alphagan.folders import DiskFull, atomic

    (tmp_path / "table.tsv").write_text("the old table")
    with pytest.raises(RuntimeError), atomic(tmp_path / "table.tsv") as tmp:
        tmp.write_text("half a ta")
        raise RuntimeError("killed")
    with pytest.raises(DiskFull, match=f"{tmp_path}: no space left on its disk"), atomic(tmp_path / "x.nii.gz") as tmp:
        tmp.write_bytes(b"...")
        raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]
    assert (tmp_path / "table.tsv").read_text() == "the old table"


def test_a_full_disk_is_found_before_a_memory_mapped_write_not_by_sigbus(tmp_path, monkeypatch):
    import errno
    import os

    from alphagan.folders import DiskFull, reserved_array

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFull, match=r"needs 64\.0 MB"):
        reserved_array(tmp_path / "volumes.npy", (64, 64, 64, 64))
    assert not (tmp_path / "volumes.npy").exists()


def test_a_cohort_or_samples_too_large_for_the_disk_are_refused_before_they_fill_it(tmp_path, monkeypatch, capsys):
    import collections

    from alphagan import folders

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    out = tmp_path / "cohort"
    _fails(capsys, ["synth", "--n", "5000", "--size", "16", "--out", str(out)], f"{out}: 5000 subjects (the", "--n")
    assert not list(out.rglob("*.nii.gz"))
    # `sample` counts before it generates anything: 5000 volumes of 16 kB (16³ float32).
    run = tmp_path / "run"
    monkeypatch.undo()
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    argv = ["sample", "--checkpoint", str(run), "--n", "5000", "--out", str(tmp_path / "s")]
    _fails(capsys, argv, "5000 samples of 16³ need about 80.8 MB, 1.0 MB are free", "smaller --n")
    assert not (tmp_path / "s").exists()
    # `evaluate` keeps its generated sets on disk, memory-mapped, and counts them before it makes the real side.
    argv = ["evaluate", "--real", "synth", "--checkpoint", str(run), "--n", "500", "--out", str(tmp_path / "e")]
    _fails(
        capsys, argv, "generated volumes (1 set of 500 at 16³, on disk while evaluate runs) need about 23.8 MB", "--n"
    )
    assert not (tmp_path / "e").exists()


def test_a_write_that_fails_stops_the_cohort_at_once(tmp_path, monkeypatch, capsys):
    from alphagan.data import synth

    written, write = [], synth.write_nifti

    def full(volume, affine, path, *description):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        write(volume, affine, path, *description)

    monkeypatch.setattr(synth, "write_nifti", full)
    _fails(capsys, ["synth", "--n", "200", "--size", "16", "--out", str(tmp_path / "c")], "No space left")
    assert len(written) <= 6  # not all 200 made first


def test_a_partial_synthetic_cache_of_a_dead_process_is_removed(tmp_path, monkeypatch):
    from alphagan.data import cache as dataset

    monkeypatch.setenv("ALPHAGAN_CACHE", str(tmp_path))
    folder = dataset.synthetic_cache(2, 16, seed=5, workers=1)
    dead = folder.with_name(f".{folder.name}.partial-999999999")  # no such process
    dead.mkdir()
    shutil.rmtree(folder)
    dataset.synthetic_cache(2, 16, seed=5, workers=1)
    assert not dead.exists() and (folder / "settings.json").exists()


def test_a_damaged_synthetic_cohort_is_made_again_saying_so(tmp_path, monkeypatch):
    from alphagan.data.dataset import synthetic_volumes

    monkeypatch.setenv("ALPHAGAN_CACHE", str(tmp_path))
    first = np.array(synthetic_volumes(2, 16, seed=5)[0])
    path = next(tmp_path.glob("synth-*")) / "volumes.npy"
    path.write_bytes(path.read_bytes()[:-1000])  # a disk that filled, or a kill, while it was written
    with pytest.warns(UserWarning, match="damaged cache .*; making it again"):
        again = np.array(synthetic_volumes(2, 16, seed=5)[0])
    assert np.array_equal(first, again)


# ------------------------------------------------------------------------------------------------ what is read
def _write_cache(folder, volumes):
    from alphagan.data.cache import Entry, write_cache_tables

    folder.mkdir()
    np.save(folder / "volumes.npy", volumes.astype(np.float32))
    entries = [Entry(f"s{i}.nii.gz", f"s{i}", -1, fov_mm=180.0) for i in range(len(volumes))]
    write_cache_tables(folder, {"size": volumes.shape[1]}, entries, [])
    return folder


@pytest.mark.parametrize("kind, phrase", [("raw", "not [-1, 1]"), ("nan", "NaN"), ("no background", "background")])
def test_a_cache_of_wrong_values_is_refused_before_training(tmp_path, capsys, kind, phrase):
    volumes = np.full((4, 16, 16, 16), -1.0)
    volumes[:, 4:12, 4:12, 4:12] = 0.5
    if kind == "raw":
        volumes = (volumes + 1) * 500  # 0 to 750: intensities that were never normalised
    elif kind == "nan":
        volumes[2, 8, 8, 8] = np.nan
    else:
        volumes[1] = 0.2
    cache = _write_cache(tmp_path / "cache", volumes)
    err = _fails(capsys, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *TRAIN], phrase)
    assert "volumes.npy" in err
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_folder_named_like_a_glob_pattern_is_read_literally(tmp_path, cohort_dir):
    literal = tmp_path / "study[1]"
    shutil.copytree(cohort_dir, literal)
    decoy = tmp_path / "study1"
    decoy.mkdir()
    shutil.copy(sorted(cohort_dir.glob("*.nii.gz"))[0], decoy)
    result = prepare(str(literal), tmp_path / "cache", size=16, progress=False)
    assert result.written == 6


@pytest.mark.parametrize("what, phrase", [("zip", "unpack it"), ("dicom", "dcm2niix"), ("nrrd", "NRRD")])
def test_a_format_prepare_does_not_read_is_named_with_the_fix(tmp_path, cohort_dir, capsys, what, phrase):
    src = tmp_path / "src"
    src.mkdir()
    if what == "zip":
        with zipfile.ZipFile(src / "scans.zip", "w") as z:
            z.write(sorted(cohort_dir.glob("*.nii.gz"))[0], "a.nii.gz")
    elif what == "dicom":
        (src / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # DICOM without a suffix
    else:
        (src / "brain.nrrd").write_bytes(b"NRRD0004\n")
    _fails(capsys, ["prepare", "--src", str(src), "--out", str(tmp_path / "c")], phrase)
    if what == "zip":
        _fails(capsys, ["prepare", "--src", str(src / "scans.zip"), "--out", str(tmp_path / "c")], "unpack it")


def test_files_of_a_format_prepare_does_not_read_beside_images_are_said_not_dropped_silently(
    tmp_path, cohort_dir, capsys
):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    image = nib.load(sorted(src.glob("*.nii.gz"))[0])
    nib.save(nib.Nifti1Pair(np.asarray(image.dataobj), image.affine), src / "old_scan.img")  # .img and .hdr
    (src / "on_a_disk_not_mounted.nii.gz").symlink_to("/mnt/unmounted/sub-99_t1.nii.gz")
    assert main(["prepare", "--src", str(src), "--out", str(tmp_path / "c"), "--size", "16"]) == 0
    said = capsys.readouterr()
    assert "left out 2 file(s) in formats prepare does not read (Analyze; e.g." in said.err
    assert (
        f"left out 1 link(s) to files that are not there (e.g. {src / 'on_a_disk_not_mounted.nii.gz'} -> " in said.err
    )
    assert "convert them to NIfTI (.nii.gz)" in said.err and "6 volumes written" in said.out


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--layout", "brats"], "it holds 6 NIfTI/MGH file(s) (e.g. sub-normal0000_t1.nii.gz), none of which --layout"),
        (["--modality", "pd"], "none of which --layout auto and --modality pd select; check them, or leave them out"),
    ],
)
def test_inputs_that_the_layout_or_modality_leave_out_are_named(tmp_path, cohort_dir, capsys, flags, phrase):
    _fails(capsys, ["prepare", "--src", str(cohort_dir), "--out", str(tmp_path / "c"), *flags], phrase)
    _fails(capsys, ["prepare", "--src", f"{cohort_dir}/*.mgz", "--out", str(tmp_path / "c")], "no file matches")
    assert not (tmp_path / "c").exists()


def test_scans_of_several_contrasts_never_share_a_cache(tmp_path, cohort_dir, capsys):
    """T1 and T2 scans of the same subjects in one folder (IXI, BIDS): one cache of both trained one model on a
    mixture, each subject counted twice. Their names say the contrast; `--modality` picks one, as a word ("t1"
    is not part of "t1ce")."""
    src = tmp_path / "scans"
    src.mkdir()
    files = sorted(cohort_dir.glob("*.nii.gz"))  # six subjects: two images of each contrast (each file differs)
    for k, contrast in enumerate(("t1", "T2w", "t1ce")):  # a BIDS folder of *_T1w files is read as ATLAS: T1w alone
        for subject in range(2):
            shutil.copy(files[2 * k + subject], src / f"sub-{subject}_{contrast}.nii.gz")
    out = str(tmp_path / "c")
    for given in ([src], [f"{src}/*.nii.gz"]):
        said = "holds scans of 3 contrasts by their names (2 t1, 2 t1ce, 2 t2); a cache holds one"
        _fails(capsys, ["prepare", "--src", str(given[0]), "--out", out], said, "give --modality t1 or --modality t1ce")
        assert not (tmp_path / "c").exists()
    assert main(["prepare", "--src", str(src), "--out", out, "--modality", "t1", "--size", "16"]) == 0
    rows = read_manifest(tmp_path / "c")
    assert sorted(Path(row["source"]).name for row in rows) == ["sub-0_t1.nii.gz", "sub-1_t1.nii.gz"]
    # A cache of several contrasts, as prepare made them before it refused them, is refused by train.
    manifest = tmp_path / "c" / "manifest.tsv"
    manifest.write_text(manifest.read_text().replace("sub-1_t1.nii.gz", "sub-1_T2w.nii.gz"))
    argv = ["train", "--data", out, "--out", str(tmp_path / "run"), *TRAIN]
    _fails(capsys, argv, "holds scans of 2 contrasts by their names (1 t1, 1 t2), and a model learns one; prepare")
    assert not (tmp_path / "run").exists()


def test_features_that_are_not_torch_weights_are_one_line(tmp_path, capsys):
    from alphagan.features import load_feature_network

    (tmp_path / "weights.pth").write_text("not weights")
    with pytest.raises(ValueError, match="weights.pth: not a file of PyTorch weights") as info:
        load_feature_network(str(tmp_path / "weights.pth"))
    assert "weights_only" not in str(info.value)


def test_sizes_that_cannot_fit_are_refused_saying_what_they_need(tmp_path, capsys, monkeypatch):
    from alphagan import device, evaluate

    with pytest.raises(SystemExit):
        main([*SYNTH[:3], "--size", "1000", "--out", str(tmp_path / "x")])
    assert "must be from 8 to 256" in capsys.readouterr().err
    monkeypatch.setattr(device.psutil, "virtual_memory", lambda: collections.namedtuple("m", "available")(2**30))
    # The volumes stay on disk: 0.25 GiB of workspace, two float64 blocks of 128 MiB, and 32 bytes per 100 000²
    # pair (298.02 GiB)
    with pytest.raises(MemoryError, match=r"--n 100000: .* need 298\.52 GiB, 1\.00 GiB are available"):
        evaluate._check_memory(100_000, 16)
    evaluate._check_memory(1_000, 16)  # 256 MiB, two blocks of 31 MiB and 31 MB of pairwise distances
    # Networks counted before they are made: PyTorch's own words were "DefaultCPUAllocator: can't allocate memory".
    train = ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN]
    _fails(capsys, [*train, "--width", "100000"], "--width 100000", "GiB, and 1.0 GiB are free", "smaller --width")
    assert not (tmp_path / "r").exists()


def test_running_out_of_memory_while_training_is_one_line_with_the_fix(tmp_path, capsys, monkeypatch):
    from alphagan import train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(train, "iteration", out_of_memory)
    argv = ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN]
    _fails(capsys, argv, "out of memory on CPU", "(asked for 2.00 GiB more)", "give a smaller --batch")


def test_sample_streams_its_volumes_so_memory_stays_flat_in_n():
    import torch

    from alphagan.sampling import generate, generate_batches

    G = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Unflatten(1, (1, 2, 2, 2)))
    batches = generate_batches(G, 20, 4, seed=3, batch=8)
    assert [len(b) for b in batches] == [8, 8, 4]  # one batch at a time, never all 20
    assert torch.equal(torch.cat(list(generate_batches(G, 20, 4, seed=3))), generate(G, 20, 4, seed=3))


def test_a_checkpoint_from_a_newer_version_names_the_settings_it_ignores(tmp_path):
    import torch

    from alphagan.checkpoint import load_checkpoint

    assert main(["train", "--data", "synth", "--out", str(tmp_path / "run"), *TRAIN]) == 0
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state = torch.load(path, weights_only=True)
    state["config"]["warp_drive"] = 9
    torch.save(state, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match="newer.pt: settings this version does not know, ignored: warp_drive"):
        assert "warp_drive" not in load_checkpoint(tmp_path / "newer.pt")["config"]


# ------------------------------------------------------------------------------------------------ settings
def _refused_when_parsed(capsys, argv, phrase):
    """The command line is refused before anything runs: argparse's one line and status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and phrase in err and "Traceback" not in err, err


def test_one_definition_of_a_size_for_prepare_and_train(tmp_path, cohort_dir, capsys):
    out = tmp_path / "c"
    rule = "argument --size: must be a power of two from 16 to 256 (16, 32, 64, 128, 256), got 48"
    _refused_when_parsed(capsys, ["prepare", "--src", str(cohort_dir), "--out", str(out), "--size", "48"], rule)
    _refused_when_parsed(
        capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN, "--size", "48"], rule
    )
    assert not out.exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--resume", "--overwrite"], "--resume continues the run"),
        (["--resume", "--init", "elsewhere"], "--init starts another"),
        (["--device", "tpu"], "--device tpu: not a device alphagan trains on; use auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"], "--device cuda:7: "),
    ],
)
def test_flags_that_contradict_or_name_no_device_are_refused_by_name(tmp_path, capsys, flags, phrase):
    _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN, *flags], phrase)
    assert not (tmp_path / "r").exists()


TRAIN_ARGV = ["train", "--data", "synth", "--out", "x"]


@pytest.mark.parametrize(
    "argv, phrase",
    [
        # Settings that cannot learn.
        ([*TRAIN_ARGV, "--lr", "0"], "--lr: must be from 1e-07 to 1 (the paper: 2e-4), got 0.0"),
        ([*TRAIN_ARGV, "--lr", "inf"], "--lr: must be from 1e-07 to 1 (the paper: 2e-4), got inf"),
        ([*TRAIN_ARGV, "--lr", "nan"], "--lr: must be from 1e-07 to 1"),
        ([*TRAIN_ARGV, "--lr", "10"], "--lr: must be from 1e-07 to 1"),
        ([*TRAIN_ARGV, "--lr", "1e-30"], "--lr: must be from 1e-07 to 1"),
        ([*TRAIN_ARGV, "--d-steps", "100000"], "--d-steps: must be from 1 to 100, got 100000"),
        ([*TRAIN_ARGV, "--lambda-rec", "-1000"], "--lambda-rec: must be a finite number of at least 0"),
        ([*TRAIN_ARGV, "--batch", "1"], "--batch: must be >= 2 (BatchNorm needs two volumes in a batch), got 1"),
        ([*TRAIN_ARGV, "--critic-norm", "bn"], "--critic-norm: must be one of batch, layer, none, got 'bn'"),
        # Not numbers, or not whole ones: named in words, not by a parsing function's name.
        ([*TRAIN_ARGV, "--width", "1.5"], "--width: must be a whole number, got '1.5'"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--n", "nan"], "--n: must be a whole"),
        (["prepare", "--src", "s", "--out", "x", "--workers", "1e400"], "--workers: must be a whole number"),
        (["course", "--minutes", "abc"], "--minutes: must be a number, got 'abc'"),
        # Out of range.
        *[
            ([*TRAIN_ARGV, flag, "0"], f"{flag}: must be >= 1, got 0")
            for flag in ("--iters", "--log-every", "--ckpt-every")
        ],
        (["synth", "--out", "x", "--n", "0"], "--n: must be at least 1, got 0"),
        # Two volumes give one pair, and one pair no spread of MS-SSIM: results.json held NaN.
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--n", "2"], "--n: must be at least 3"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--pairs", "1"], "--pairs: must be at"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--n-anatomy", "-1"], "--n-anatomy: must"),
        (["course", "--minutes", "inf"], "--minutes: must be a finite number above 0"),
        ([*TRAIN_ARGV, "--seed", "-1"], "--seed: must be a whole number from 0"),
        (["sample", "--checkpoint", "c", "--out", "x", "--seed", "-1"], "--seed: must be a whole number from 0"),
        (["prepare", "--src", "s", "--out", "x", "--workers", "100000"], "--workers: must be from 1"),  # processes
    ],
)
def test_numbers_are_checked_where_they_are_parsed(tmp_path, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(tmp_path)
    _refused_when_parsed(capsys, argv, f"argument {phrase}")
    assert not (tmp_path / "x").exists()


def test_an_output_where_nothing_can_be_written_is_refused_by_every_command(tmp_path, cohort_dir, capsys):
    """A path through a file stands for any folder this process cannot write (as root, permissions do not)."""
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    (tmp_path / "course").mkdir()
    (tmp_path / "course" / "summary.md").write_text("# a course run\n")
    for argv in (
        ["synth", "--n", "2", "--size", "16", "--out", out],
        ["prepare", "--src", str(cohort_dir), "--size", "16", "--out", out],
        ["train", "--data", "synth", *TRAIN, "--out", out],
        ["sample", "--checkpoint", str(run), "--n", "2", "--out", out],
        ["evaluate", "--real", "synth", "--checkpoint", str(run), "--n", "4", "--out", out],
        ["results", str(tmp_path / "course"), "--out", out + "/page.md"],
        ["course", "--profile", "smoke", "--only", "02", "--out", out],  # before it times the models
    ):
        _fails(capsys, argv, f"nothing can be written in {tmp_path / 'afile'} (Not a directory); choose another")


def test_an_error_no_check_foresaw_is_one_line_and_debug_shows_its_traceback(tmp_path, capsys, monkeypatch):
    from alphagan import sampling

    def broken(*args, **kwargs):
        raise KeyError("fov")

    monkeypatch.setattr(sampling, "write_samples", broken)
    argv = ["sample", "--checkpoint", "c", "--out", str(tmp_path / "s")]
    _fails(capsys, argv, "unexpected KeyError ('fov'), a bug of alphagan", "--debug")
    with pytest.raises(KeyError):
        main(["--debug", *argv])


def test_a_pattern_the_shell_expanded_is_named(tmp_path, cohort_dir, capsys):
    files = sorted(map(str, cohort_dir.glob("*.nii.gz")))  # what `--src scans/*.nii.gz`, unquoted, passes
    _refused_when_parsed(capsys, ["prepare", "--src", *files, "--out", str(tmp_path / "c")], "and 1 more; --src takes")
    assert not (tmp_path / "c").exists()
    argv = ["evaluate", "--real", "synth", "--checkpoint", *files[:2], "--out", str(tmp_path / "e")]
    _refused_when_parsed(capsys, argv, "give --checkpoint once for each model")


def test_an_empty_selection_of_notebooks_is_refused_at_once(tmp_path, capsys):
    _fails(capsys, ["course", "--profile", "smoke", "--only", "", "--out", str(tmp_path / "c")], "--only", "01,03")
    assert not (tmp_path / "c").exists()


def test_results_never_replaces_a_page_it_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.md").write_text("# Course run\n")
    mine = tmp_path / "results.md"
    mine.write_text("# my own results\n")
    _fails(capsys, ["results", str(run), "--out", str(mine)], str(mine), "did not write", "another --out")
    assert mine.read_text() == "# my own results\n"
    assert main(["results", str(run), "--out", str(tmp_path / "page.md")]) == 0
    assert main(["results", str(run), "--out", str(tmp_path / "page.md")]) == 0  # its own page: written again
    (tmp_path / "link.md").symlink_to(tmp_path / "page.md")  # a link to it is followed, and kept
    assert main(["results", str(run), "--out", str(tmp_path / "link.md")]) == 0
    assert (tmp_path / "link.md").is_symlink() and (tmp_path / "page.md").read_text().startswith("<!-- written by")
    _fails(capsys, ["results", str(run), "--out", str(tmp_path)], "a folder; give the page's file name, e.g. --out")
    # Its figures' folder: the user's, beside no page of results, is kept; its own holds one run's figures only.
    (run / "summary.md").write_text("# Course run\n\n![a figure](03/a.png)\n")
    (run / "03").mkdir()
    (run / "03" / "a.png").write_bytes(b"png")
    (tmp_path / "other_files").mkdir()
    (tmp_path / "other_files" / "mine.txt").write_text("mine")
    _fails(
        capsys,
        ["results", str(run), "--out", str(tmp_path / "other.md")],
        "other_files: there already, though other.md is not",
        "kept",
    )
    assert (tmp_path / "other_files" / "mine.txt").read_text() == "mine"
    (tmp_path / "page_files" / "stale.png").write_bytes(b"an earlier run's")
    assert main(["results", str(run), "--out", str(tmp_path / "page.md")]) == 0
    assert sorted(p.name for p in (tmp_path / "page_files").rglob("*")) == ["03", "a.png"]
    assert "![a figure](page_files/03/a.png)" in (tmp_path / "page.md").read_text()


def test_a_cache_variable_pointing_where_no_folder_can_be_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "notafolder").write_text("x")
    argv = ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN]
    monkeypatch.setenv("ALPHAGAN_CACHE", str(tmp_path / "notafolder"))
    _fails(capsys, argv, "ALPHAGAN_CACHE=", "is a file", "unset it")
    monkeypatch.setenv("ALPHAGAN_CACHE", str(tmp_path / "notafolder" / "below"))
    _fails(capsys, argv, f"ALPHAGAN_CACHE={tmp_path}/notafolder/below: ", "cannot be made", "point ALPHAGAN_CACHE")
    assert not (tmp_path / "r").exists()


def test_a_cache_of_another_size_advises_a_command_that_exists(tmp_path, cache, capsys):
    err = _fails(capsys, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *TRAIN, "--size", "32"], "16^3")
    assert "prepare ... --size 32" in err and "pass --size" not in err


# ------------------------------------------------------------------------------------------------ what inputs are
def _nifti(path, data, affine=None):
    nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) * 2 if affine is None else affine).to_filename(path)
    return path


def test_symlink_loops_are_walked_once_and_each_subject_counted_once(tmp_path, cohort_dir):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    (src / "loop").symlink_to(src)  # a link back to the folder itself, twice: never walked in a loop
    (src / "again").symlink_to(src)
    for source in (str(src), f"{src}/**/*.nii.gz"):
        result = prepare(source, tmp_path / "cache", size=16, progress=False, overwrite=True)
        assert result.written + result.reused == 6
        assert all("the same" not in reason for _, reason in result.rejected)


def test_the_same_subject_twice_is_reported_and_counted_once(tmp_path, cohort_dir):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    first = sorted(src.glob("*.nii.gz"))[0]
    shutil.copy(first, src / "zz_copy_of_first.nii.gz")  # the same bytes under another name (sorted after it)
    (src / "zz_link_to_first.nii.gz").symlink_to(first)  # one file reached by two paths
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert result.written == 6
    reasons = sorted(reason.split(" ")[2] for _, reason in result.rejected)
    assert reasons == ["bytes", "file"], result.rejected
    assert all(str(first) in reason for _, reason in result.rejected)


def test_the_same_image_in_another_file_is_counted_once(tmp_path, cohort_dir):
    """A scan saved again, uncompressed or with another header text, has other bytes but the same voxels."""
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    first = sorted(src.glob("*.nii.gz"))[0]
    img = nib.load(first)
    nib.save(img, src / first.name.replace(".nii.gz", ".nii"))
    again = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine)
    again.header["descrip"] = b"exported again"
    again.to_filename(src / "zz_exported_again.nii.gz")
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert result.written == 6 and len(result.rejected) == 2, result.rejected
    assert all("(identical voxels): one subject counted once" in reason for _, reason in result.rejected)
    # Scaled, or stored as integers: the same image to within rounding, which the other subjects are not.
    data = img.get_fdata(dtype=np.float32)
    nib.Nifti1Image(data * 1.5, img.affine).to_filename(src / "zz_scaled.nii.gz")
    nib.Nifti1Image(np.round(data / data.max() * 30000).astype(np.int16), img.affine).to_filename(src / "zz_int.nii.gz")
    result = prepare(str(src), tmp_path / "cache2", size=16, progress=False)
    assert result.written == 6 and len(result.rejected) == 4, result.rejected
    near = {Path(source).name: reason for source, reason in result.rejected if "identical" not in reason}
    assert sorted(near) == ["zz_int.nii.gz", "zz_scaled.nii.gz"], result.rejected
    kept = src / first.name.replace(".nii.gz", ".nii")  # the earliest of the copies, as the walk sorts them
    assert all(f"the same image as {kept} (its voxels within" in reason for reason in near.values()), near


def test_generated_volumes_are_refused_unless_asked_for(tmp_path, cohort_dir, capsys):
    from alphagan.sampling import save_nifti

    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    volume = nib.load(sorted(src.glob("*.nii.gz"))[0]).get_fdata()
    # A model's output as `sample` writes it (in [-1, 1], background -1), not a copy of a subject, dropped in.
    save_nifti(volume[::-1] / volume.max() * 2 - 1, src / "sample_0000.nii.gz")
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert result.written == 6 and "generated by a model" in result.rejected[0][1], result.rejected
    assert "--allow-generated" in result.rejected[0][1]
    argv = ["prepare", "--src", str(src), "--out", str(tmp_path / "all"), "--size", "16", "--allow-generated"]
    assert main(argv) == 0 and "7 volumes written" in capsys.readouterr().out


@pytest.mark.parametrize(
    "transform, phrase",
    [
        (lambda v: (v - v.mean()) / v.std(), "z-scored or shifted"),
        (lambda v: v / v.max() * 2 - 1, "already in [-1, 1]"),
        (lambda v: v.max() - v, "its background is not dark: the image's edge is at 100%"),  # inverted
        (lambda v: v + 0.05 * v.max(), "no voxel of zero background (the darkest is at 5%"),  # never removed
    ],
)
def test_intensity_conventions_that_normalisation_would_get_wrong_are_refused(tmp_path, cohort_dir, transform, phrase):
    """Each one alone among good scans is refused with its reason, and the cache of the rest loads."""
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    path = sorted(src.glob("*.nii.gz"))[0]
    img = nib.load(path)
    _nifti(path, transform(img.get_fdata()), img.affine)
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert result.written == 5 and phrase in result.rejected[0][1], result.rejected
    assert len(load_cache(result.out)[0]) == 5


def test_voxel_sizes_follow_the_sform_where_pixdim_disagrees_and_a_nan_affine_is_named(tmp_path):
    from alphagan.data.prepare import InputError, load_ras

    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_zooms((1.0, 1.0, 1.0))  # pixdim says 1 mm; the sform (code 2), which the standard prefers, 2 mm
    img.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    img.to_filename(tmp_path / "a.nii.gz")
    assert load_ras(tmp_path / "a.nii.gz")[1].tolist() == [2.0, 2.0, 2.0]
    bad = np.diag([2.0, 2.0, 2.0, 1.0])
    bad[0, 3] = np.nan
    nib.Nifti1Image(np.ones((8, 8, 8), np.float32), bad).to_filename(tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="affine .* NaN"):
        load_ras(tmp_path / "nan.nii.gz")


def _headed(path, data, affine, **fields):
    """A NIfTI file whose header holds `fields` exactly as given (nibabel rewrites them from `affine` otherwise)."""
    header = nib.Nifti1Image(np.asarray(data), affine).header
    for key, value in fields.items():
        header[key] = value
    nib.Nifti1Image(np.asarray(data), None, header=header).to_filename(path)
    return path


def test_spatial_units_are_read_as_the_header_states_them(tmp_path, cohort_dir):
    """A brain stored in metres or microns (NIfTI's xyzt_units) is the same brain: the same cube as in mm."""
    from alphagan.data.cache import Settings
    from alphagan.data.prepare import UNIT_MM, load_ras, preprocess

    img = nib.load(sorted(cohort_dir.glob("*.nii.gz"))[0])
    data, mm = img.get_fdata(dtype=np.float32), img.affine
    cubes = {}
    for unit, code in (("mm", 2), ("meter", 1), ("micron", 3)):
        affine = mm.copy()
        affine[:3] /= UNIT_MM[unit]
        path = _headed(tmp_path / f"{unit}.nii.gz", data, affine, xyzt_units=code, sform_code=1, qform_code=1)
        header = nib.load(path).header
        assert header.get_xyzt_units()[0] == unit and header["pixdim"][1] == pytest.approx(mm[0, 0] / UNIT_MM[unit])
        np.testing.assert_allclose(load_ras(path)[1], np.abs(np.diag(mm)[:3]), rtol=1e-5)
        cubes[unit] = preprocess(path, Settings(size=32))[0]
    np.testing.assert_allclose(cubes["meter"], cubes["mm"], atol=1e-5)
    np.testing.assert_allclose(cubes["micron"], cubes["mm"], atol=1e-5)


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda d, a: _nifti_any(d * 100, a), "too large to be a head: the non-zero region measures"),
        (lambda d, a: _nifti_any((d > d.mean()).astype(np.uint8), a / 1), "only 2 distinct values (0, 1): a label map"),
        (lambda d, a: _nifti_any(np.round(d / d.max() * 4).astype(np.int16), a / 1), "distinct values (0, 1, 2, 3, 4)"),
        (lambda d, a: _nifti_any(d.astype(np.complex64), a / 1), "complex-valued voxels"),
        (
            lambda d, a: _zero_pixdim(d),
            "no sform or qform, and a voxel size of 0 in its pixdim; fix the header (pixdim[1:4]",
        ),
    ],
    ids=["metres-as-mm", "mask", "labels", "complex", "zero-pixdim"],
)
def test_files_that_are_not_a_head_scan_are_refused_with_the_reason(tmp_path, cohort_dir, capsys, make, phrase):
    """Voxel sizes a head cannot have, segmentations beside the scans, complex data and a header nibabel must
    repair are reported and skipped, in one line each; nibabel's own repair messages are not printed."""
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    path = sorted(src.glob("*.nii.gz"))[0]
    img = nib.load(path)
    affine = img.affine * np.array([[100.0], [100.0], [100.0], [1.0]]) if "large" in phrase else img.affine
    make(img.get_fdata(dtype=np.float32), affine).to_filename(path)
    assert main(["prepare", "--src", str(src), "--out", str(tmp_path / "cache"), "--size", "16"]) == 0
    said = capsys.readouterr()
    assert re.search(f"rejected .*{path.name}: .*{re.escape(phrase)}", said.out + said.err), said
    assert "should be non-zero" not in said.err.split("rejected")[0]  # no line of nibabel's before the reasons
    assert len(read_manifest(tmp_path / "cache")) == 5


def test_a_scan_much_coarser_than_the_cube_is_refused_naming_a_size_that_works(tmp_path, cohort_dir, capsys):
    """Thick slices resized up to the cube would put blur into the training set: refused, and the largest size at
    which the scan is fine enough is named."""
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    path = sorted(src.glob("*.nii.gz"))[0]
    img = nib.load(path)  # 6 mm voxels; a 32³ cube of the brain has voxels of about 4.7 mm
    _nifti_any(img.get_fdata(dtype=np.float32)[:, :, ::2], img.affine @ np.diag([1, 1, 2, 1])).to_filename(path)
    assert main(["prepare", "--src", str(src), "--out", str(tmp_path / "cache"), "--size", "32"]) == 0
    said = capsys.readouterr().err
    reason = rf"{path.name}: voxels of 6 x 6 x 12 mm, 2\.\dx as coarse as a 32³ cube's on axis z \(at most 2x\)"
    assert re.search(reason, said) and "prepare at --size 16 or leave it out" in said, said
    assert len(read_manifest(tmp_path / "cache")) == 5


def _nifti_any(data, affine):
    return nib.Nifti1Image(data, affine)


def _zero_pixdim(data):
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    img.header["pixdim"][1:4] = [0.0, 12.0, 12.0]
    return img


def test_a_symlinked_out_is_followed_and_kept(tmp_path, cohort_dir):
    target = prepare(str(cohort_dir), tmp_path / "real", size=16, progress=False).out
    (tmp_path / "link").symlink_to(target)
    result = prepare(str(cohort_dir), tmp_path / "link", size=32, progress=False, overwrite=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == target.resolve()
    assert np.load(target / "volumes.npy", mmap_mode="r").shape[1:] == (32, 32, 32) and result.written == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [".real.lock", "link", "real"]
    # Every command's --out: a link to a folder not made yet is followed too (it said "File exists").
    (tmp_path / "cohort").symlink_to(tmp_path / "elsewhere" / "cohort")
    assert main(["synth", "--n", "2", "--size", "16", "--out", str(tmp_path / "cohort")]) == 0
    assert (tmp_path / "cohort").is_symlink() and len(list((tmp_path / "elsewhere" / "cohort").glob("*.nii.gz"))) == 2


def test_a_writers_temporary_file_and_a_name_that_is_not_utf8_do_not_stop_the_rest(tmp_path, cohort_dir):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    first = sorted(src.glob("*.nii.gz"))[0]
    shutil.copy(first, src / f".{first.name}.4242.tmp.nii.gz")  # what synth leaves while it writes
    shutil.copy(first, src / "sub-\udcff.nii.gz")  # a byte that is not UTF-8 in its name
    (src / "sub-\udcff.nii.gz").write_bytes((src / "sub-\udcff.nii.gz").read_bytes())
    result = prepare(str(src), tmp_path / "cache", size=16, progress=False)
    assert result.written == 6 and len(result.rejected) == 1 and "not valid UTF-8" in result.rejected[0][1]
    assert "not valid UTF-8" in (tmp_path / "cache" / "rejected.tsv").read_text()


# ------------------------------------------------------------------------------------------------ interrupted work
def test_a_run_killed_before_its_final_samples_writes_them_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    samples = sorted((run / "samples").glob("sample_*.nii.gz"))
    assert samples
    for path in samples:  # as if killed after the last checkpoint, before the samples
        path.unlink()
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN, "--resume"]) == 0
    assert sorted((run / "samples").glob("sample_*.nii.gz")) == samples


def test_a_log_line_cut_short_by_a_stop_does_not_block_resume(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN, "--iters", "1"]) == 0
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"iter": 2, "loss_d"')  # a full disk stopped the write mid-line
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN, "--resume"]) == 0
    iters = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_advises_what_works(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint
    for flags in ([], ["--resume"]):
        _fails(
            capsys, ["train", "--data", "synth", "--out", str(run), *TRAIN, *flags], "nothing to resume", "--overwrite"
        )
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN, "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------------ checkpoints are data
@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda s: s["nets"].pop("G"), "no weights of network G"),
        (lambda s: s.update(config="alpha"), "its config is a str"),
        (lambda s: s["config"].update(latent=8_000_000), "do not match its config"),
        (lambda s: s["config"].update(size=48), "its config is not one alphagan trains"),
        (lambda s: s.update(iter="ten"), "its iteration is 'ten'"),
        (lambda s: next(iter(s["nets"]["G"].values())).fill_(float("nan")), "network G holds NaN or infinite weights"),
        (lambda s: s.pop("fov_mm"), "not an alphagan checkpoint (no fov_mm)"),
        (lambda s: s.update(fov_mm=float("nan")), "its field of view is nan"),
    ],
)
def test_a_checkpoint_whose_contents_are_wrong_is_refused_in_one_line(tmp_path, capsys, damage, phrase):
    import torch

    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    state = torch.load(list_checkpoints(run / "checkpoints")[-1], weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    _fails(capsys, ["sample", "--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s")], "bad.pt", phrase)


@pytest.mark.parametrize("damage", [lambda s: s.pop("optimisers"), lambda s: s.update(rng=5)])
def test_a_checkpoint_that_cannot_be_continued_names_what_can(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    newest = list_checkpoints(run / "checkpoints")[-1]
    state = torch.load(newest, weights_only=True)
    damage(state)
    torch.save(state, newest)
    resume = ["train", "--out", str(run), "--resume", "--iters", "3"]
    _fails(capsys, resume, f"{newest}: its optimiser or random state is missing or damaged", f"--init {newest}")
    assert main(["sample", "--checkpoint", str(run), "--n", "2", "--out", str(tmp_path / "s")]) == 0  # weights: fine
    newest.rename(tmp_path / newest.name)  # "move it out": the one before continues
    assert main(resume) == 0


@pytest.mark.parametrize("text", ["{half a fi", "[1, 2]", '{"data": 5}', '{"data": "synth", "lr": "fast"}'])
def test_a_damaged_config_json_is_named_with_what_still_works(tmp_path, capsys, text):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    (run / "config.json").write_text(text)
    resume = ["train", "--out", str(run), "--resume", "--iters", "3"]
    _fails(capsys, resume, f"{run / 'config.json'}: damaged", "delete it")
    if "lr" not in text:  # evaluate reads only the data from it (the settings from the checkpoint)
        argv = ["evaluate", "--real", "synth", "--checkpoint", str(run), "--out", str(tmp_path / "e"), "--n", "4"]
        _fails(capsys, argv, "config.json: damaged")
    (run / "config.json").unlink()  # as the message says: the checkpoint's settings, and the data given
    assert main([*resume, "--data", "synth"]) == 0


def test_a_damaged_line_of_the_log_is_said_when_resuming_drops_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN[:-2], "--ckpt-every", "2", "--iters", "3"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"iter": 2, "lo', *lines[2:]]) + "\n")
    assert main(["train", "--out", str(run), "--resume", "--iters", "4"]) == 0
    assert f"{run / 'metrics.jsonl'}: line 2 damaged (not a record), dropped" in capsys.readouterr().err
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 3, 4]


def test_a_run_recorded_before_settings_json_was_digested_still_resumes(tmp_path, cohort_dir):
    cache, run = prepare(str(cohort_dir), tmp_path / "cache", size=16, progress=False).out, tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(run), *TRAIN]) == 0
    config = json.loads((run / "config.json").read_text())
    config["data_digest"] = hashlib.sha256((cache / "manifest.tsv").read_bytes()).hexdigest()  # the old definition
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(run), "--resume", "--iters", "3"]) == 0


def test_the_newest_good_checkpoint_is_used_when_the_newest_is_damaged(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    newest = list_checkpoints(run / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["sample", "--checkpoint", str(run), "--n", "2", "--out", str(tmp_path / "s")]) == 0  # a run folder
    assert "; using the newest older checkpoint that loads\n" in capsys.readouterr().err


def test_a_course_run_again_with_other_notebooks_keeps_the_earlier_ones_in_its_summary(tmp_path, monkeypatch):
    import papermill

    from alphagan.course import plan

    monkeypatch.setattr(plan, "seconds_per_iteration", lambda profile, model, latent, as_written=False: 0.5)
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, **kw: None)
    for only in ("02", "01,03"):
        assert main(["course", "--profile", "smoke", "--only", only, "--out", str(tmp_path / "c")]) == 0
    summary = (tmp_path / "c" / "summary.md").read_text()
    rows = [line.split(" | ")[0] for line in summary.splitlines() if line.startswith("| 0")]
    assert rows == ["| 01_data.ipynb", "| 02_architecture.ipynb", "| 03_training.ipynb"]


@pytest.mark.parametrize("change, said", [("move", "no longer there"), ("stretch", "was prepared again since")])
def test_evaluate_skips_only_the_memorisation_check_when_the_training_cache_has_gone(
    tmp_path, cache, cohort_dir, capsys, change, said
):
    run = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(run), *TRAIN]) == 0
    if change == "move":
        cache.rename(tmp_path / "moved")
    else:  # the same path, other volumes: not the set the model saw
        prepare(str(cohort_dir), cache, size=16, stretch=True, overwrite=True, progress=False)
    argv = ["evaluate", "--real", "synth", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "e")]
    assert main([*argv, "--n", "8", "--pairs", "10", "--n-anatomy", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(f"^alphagan evaluate: .*{said}.*; the memorisation check is skipped", err, re.M), err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "memorisation" not in next(iter(results["models"].values()))


def test_a_moved_training_cache_is_still_not_held_out_and_a_lone_checkpoint_says_what_it_cannot_check(
    tmp_path, cache, capsys
):
    run = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(run), *TRAIN]) == 0
    cache.rename(tmp_path / "moved")
    argv = ["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "e"), "--n", "8", "--pairs", "10"]
    _fails(capsys, [*argv, "--real", str(tmp_path / "moved")], "moved: the training set of a model, not held out")
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(list_checkpoints(run / "checkpoints")[-1], lone)
    argv = ["evaluate", "--checkpoint", str(lone), "--real", "synth", "--out", str(tmp_path / "e2"), "--n", "8"]
    assert main([*argv, "--pairs", "10", "--n-anatomy", "2"]) == 0
    assert "model.pt: no config.json of its run beside it, so what it trained on is unknown" in capsys.readouterr().err


def test_partial_cohorts_of_interrupted_runs_are_cleaned_by_the_next(tmp_path, monkeypatch):
    from alphagan.data.cache import synthetic_cache

    monkeypatch.setenv("ALPHAGAN_CACHE", str(tmp_path))
    dead = 2**22 + 12345  # above Linux's largest process id: no such process
    for name in (f".synth-normal-t1-16-n900-seed0-x.partial-{dead}", f".synth-tumor-t2-16-n50-seed0-x.partial-{dead}"):
        (tmp_path / name).mkdir()
    synthetic_cache(2, 16)
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_full_disk_says_the_space_free_on_the_disk_of_a_folder_not_made_yet(tmp_path):
    from alphagan.folders import disk_full

    said = str(disk_full(tmp_path / "partial" / "cohort", 3 * 2**30))
    free = float(re.search(r"\(([\d.]+) GiB free; it needs 3\.00 GiB\)", said).group(1))
    assert free > 0 and abs(free - shutil.disk_usage(tmp_path).free / 2**30) < 0.5, said


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_folder(tmp_path, capsys, monkeypatch):
    import torch

    from alphagan import checkpoint

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 173312 vs 173200")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    err = _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN], "no space left")
    assert "enforce fail" not in err and str(tmp_path / "r" / "checkpoints") in err


# ------------------------------------------------------------------------------------------------ stopped by hand
def _interrupted_after(calls: int, real):
    """`real`, until its call number `calls` (from 0), which is a Ctrl-C."""
    count = itertools.count()

    def call(*args, **kwargs):
        if next(count) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return call


def test_a_run_stopped_by_ctrl_c_names_its_checkpoint_and_resumes_with_its_own_settings(tmp_path, capsys, monkeypatch):
    from alphagan import train

    run, early = tmp_path / "run", tmp_path / "early"
    argv = ["train", "--data", "synth", *TRAIN[:-2], "--iters", "6", "--ckpt-every", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(train, "iteration", _interrupted_after(3, train.iteration))
        _stopped(capsys, [*argv, "--out", str(run)], "keeps iteration 2", f"train --out {run} --resume`")
        patch.setattr(train, "iteration", _interrupted_after(0, train.iteration))
        _stopped(capsys, [*argv, "--out", str(early)], "nothing to resume", "--overwrite")
    # No --data, --profile or --iters: the run's own (on this CPU the default profile would be `cpu`, refused).
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    (run / "config.json").unlink()  # the settings are the newest checkpoint's; the data must be given
    _fails(capsys, ["train", "--out", str(run), "--resume", "--iters", "7"], "config.json is gone", "give --data")
    assert main(["train", "--out", str(run), "--resume", "--iters", "7", "--data", "synth"]) == 0
    none = ["train", "--out", str(tmp_path / "none")]
    _fails(capsys, [*none, "--resume"], "no run to resume here", "leave out --resume")
    _fails(capsys, none, "--data is needed")
    _fails(capsys, ["train", "--out", str(run), "--resume", "--model", "vae-gan"], "saved with different model")
    assert not (tmp_path / "none").exists()
    # Refused before any work: a synthetic cohort at the other size was made first (seconds to minutes).
    from alphagan.data import dataset

    monkeypatch.setattr(dataset, "synthetic_cache", lambda *a, **k: pytest.fail("a cohort made for a refused run"))
    argv = ["train", "--out", str(run), "--resume", "--data", "synth", "--size", "32"]
    _fails(capsys, argv, f"{run / 'config.json'}: saved with different size (16 != 32)")


def test_other_commands_stopped_by_ctrl_c_keep_what_they_had_finished(tmp_path, cohort_dir, cache, capsys, monkeypatch):
    from alphagan.data import prepare as prepare_module
    from alphagan.data import synth

    before = _snapshot(cache)
    again = ["prepare", "--src", str(cohort_dir), "--out", str(cache), "--size", "16", "--workers", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "preprocess", _interrupted_after(0, prepare_module.preprocess))
        _stopped(capsys, [*again, "--stretch", "--overwrite"], "nothing half-written is left")
    assert _snapshot(cache) == before and sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache"]
    with monkeypatch.context() as patch:
        patch.setattr(synth, "make_subject", _interrupted_after(1, synth.make_subject))
        _stopped(capsys, ["synth", "--n", "3", "--size", "16", "--out", str(tmp_path / "c")], "run the same command")
    assert not list((tmp_path / "c").glob("sub-*"))  # no cohort that looks finished, or smaller than asked
    assert main(["synth", "--n", "3", "--size", "16", "--out", str(tmp_path / "c")]) == 0


def test_a_course_stopped_by_ctrl_c_says_which_notebooks_are_left(tmp_path, capsys, monkeypatch):
    import papermill

    from alphagan.course import plan

    monkeypatch.setattr(plan, "seconds_per_iteration", lambda profile, model, latent, as_written=False: 0.5)
    monkeypatch.setattr(papermill, "execute_notebook", _interrupted_after(1, lambda src, dst, **kw: None))
    out = tmp_path / "c"
    _stopped(capsys, ["course", "--profile", "smoke", "--only", "01,02,03", "--out", str(out)],
             "02_architecture.ipynb was running", "--only 02,03")  # fmt: skip


def _sleep_and_say_how_sigint_is_handled(seconds: float):
    time.sleep(seconds)
    return signal.getsignal(signal.SIGINT)


def test_worker_processes_leave_ctrl_c_to_their_parent_which_stops_at_once():
    """A terminal's Ctrl-C reaches every process of the command: the workers ignore it and the parent, stopping,
    cancels the work not yet started instead of waiting for it (before, `prepare` hung)."""
    from alphagan.workers import worker_pool

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), worker_pool(2) as pool:
        for handler in pool.map(_sleep_and_say_how_sigint_is_handled, [0.5] * 40):
            assert handler == signal.SIG_IGN
            raise KeyboardInterrupt
    assert time.perf_counter() - start < 10  # all 40 jobs on 2 workers: 10 s


def test_a_file_nibabel_cannot_open_is_rejected_in_our_words_with_the_fix(tmp_path, cohort_dir, capsys):
    src = tmp_path / "src"
    shutil.copytree(cohort_dir, src)
    first, second, third = sorted(src.glob("*.nii.gz"))[:3]
    first.write_bytes(gzip.decompress(first.read_bytes()))  # a plain .nii under a .nii.gz name
    second.write_bytes(b"")
    third.rename(src / "compressed.nii")  # and the reverse
    assert main(["prepare", "--src", str(src), "--out", str(tmp_path / "cache"), "--size", "16"]) == 0
    said = capsys.readouterr().err
    assert f"{first.name}: named .gz but not gzip-compressed; rename it without the .gz" in said, said
    assert f"{second.name}: an empty file (0 bytes)" in said and "Error" not in said, said
    assert "compressed.nii: gzip-compressed but named .nii; rename it compressed.nii.gz" in said, said
    assert len(read_manifest(tmp_path / "cache")) == 3


def test_a_cache_holding_other_files_is_not_replaced_with_them(tmp_path, cohort_dir, cache, capsys):
    """A cache is swapped whole when prepared again: samples saved inside it would go with it, so it is refused."""
    (cache / "mine").mkdir()
    (cache / "mine" / "notes.txt").write_text("kept")
    argv = ["prepare", "--src", str(cohort_dir), "--out", str(cache), "--size", "16", "--stretch", "--overwrite"]
    _fails(capsys, argv, "a cache that also holds mine, which `alphagan prepare` did not write; move them out")
    assert (cache / "mine" / "notes.txt").read_text() == "kept"


def test_an_oblique_scan_is_resampled_onto_the_world_axes(tmp_path, monkeypatch):
    """A scan stored on a tilted grid (its affine says so) is the same brain: prepared, it matches the straight
    scan's cube, where trimming and resizing its array as stored would keep the tilt."""
    import nibabel.processing

    from alphagan.data import prepare as prepare_module
    from alphagan.data.cache import Settings
    from alphagan.data.synth import make_subject

    subject = make_subject(0, seed=3, size=64)  # 3 mm voxels
    straight = nib.Nifti1Image(subject.volume, subject.affine)
    straight.to_filename(tmp_path / "straight.nii.gz")
    turn = np.radians(30)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    shape = (90, 90, 64)
    tilted = rotation @ subject.affine
    tilted[:3, 3] = (subject.affine @ [32, 32, 32, 1])[:3] - tilted[:3, :3] @ [45, 45, 32]  # the same centre
    nibabel.processing.resample_from_to(straight, (shape, tilted), order=1).to_filename(tmp_path / "tilted.nii.gz")
    assert prepare_module.obliquity(nib.load(tmp_path / "tilted.nii.gz").affine) == pytest.approx(30)

    def correlation() -> float:
        paths = [tmp_path / "straight.nii.gz", tmp_path / "tilted.nii.gz"]
        cubes = [prepare_module.preprocess(path, Settings(size=32))[0] for path in paths]
        return float(np.corrcoef(cubes[0].ravel(), cubes[1].ravel())[0, 1])

    resampled = correlation()
    monkeypatch.setattr(prepare_module, "OBLIQUE_DEGREES", 90.0)
    as_stored = correlation()
    assert resampled > 0.92 and resampled > as_stored + 0.05, (resampled, as_stored)


def test_a_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """Slurm's preemption, `timeout` or a closed session send SIGTERM: the same one line, the shell's status 143."""
    from alphagan import train

    before = signal.getsignal(signal.SIGTERM)
    real, calls = train.iteration, itertools.count()

    def terminated_at_the_fourth(*args, **kwargs):
        if next(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "iteration", terminated_at_the_fourth)
    argv = ["train", "--data", "synth", "--out", str(tmp_path / "run"), *TRAIN[:-2], "--iters", "6"]
    assert main([*argv, "--ckpt-every", "2"]) == 128 + signal.SIGTERM
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("alphagan train: stopped (SIGTERM); ") and "keeps iteration" in line, line
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler goes with it
