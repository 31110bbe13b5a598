"""Bad input and faults: nothing of the user's is lost, and every mistake is one clear line, not a traceback."""

import fcntl
import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest

from alphagan.checkpoint import list_checkpoints
from alphagan.cli import main
from alphagan.data.prepare import prepare

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


# ------------------------------------------------------------------------------------------------ data loss
def test_prepare_refuses_a_folder_holding_other_files_and_leaves_them_as_they_were(tmp_path, cohort_dir, capsys):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("three years of work")
    (out / "sub" / "notes.md").write_text("# notes")
    before = _snapshot(out)
    _fails(capsys, ["prepare", "--src", str(cohort_dir), "--out", str(out), "--size", "16"], "thesis.txt")
    assert _snapshot(out) == before


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
    _fails(capsys, ["prepare", "--src", str(cohort_dir), "--out", str(tmp_path / "c"), "--size", size], "--size")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ damaged caches
def test_a_truncated_array_a_disagreeing_size_and_an_empty_manifest_are_named(tmp_path, cache, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    data = (broken / "volumes.npy").read_bytes()
    (broken / "volumes.npy").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r1"), *TRAIN], "damaged cache")
    shutil.copy(cache / "volumes.npy", broken / "volumes.npy")
    settings = json.loads((broken / "settings.json").read_text())
    (broken / "settings.json").write_text(json.dumps({**settings, "size": 32}))
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r2"), *TRAIN], "settings.json says 32")
    (broken / "settings.json").write_text(json.dumps(settings))
    header = (broken / "manifest.tsv").read_text().splitlines()[0]
    (broken / "manifest.tsv").write_text(header + "\n")
    _fails(capsys, ["train", "--data", str(broken), "--out", str(tmp_path / "r3"), *TRAIN], "0 rows for 6 volumes")
    assert not (tmp_path / "r3" / "config.json").exists()


def test_missing_or_empty_data_and_a_batch_larger_than_the_cohort(tmp_path, cache, capsys):
    _fails(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TRAIN], "nowhere")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *TRAIN], "volumes.npy")
    _fails(capsys, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), *TRAIN, "--batch", "7"], "batch of 7")


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
    with pytest.warns(UserWarning, match=f"{newest.name}.*older checkpoint") as seen:
        assert main([*argv, "--iters", "3", "--ckpt-every", "1"]) == 0
    assert all("weights_only" not in str(w.message) for w in seen)
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


@pytest.mark.parametrize("flag", ["--iters", "--log-every", "--ckpt-every", "--sample-every"])
def test_counts_of_zero_are_refused_before_anything_runs(tmp_path, capsys, flag):
    _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN, flag, "0"], "must be >= 1")
    assert not (tmp_path / "r").exists()


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


def test_course_checks_its_selection_before_creating_anything(tmp_path, capsys):
    for only in ("99", ","):
        _fails(capsys, ["course", "--profile", "smoke", "--only", only, "--out", str(tmp_path / "c")], "--only")
    assert not (tmp_path / "c").exists()


def test_overwrite_never_deletes_the_checkpoint_init_starts_from(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synth", "--out", str(run), *TRAIN]) == 0
    before = _snapshot(run)
    argv = ["train", "--data", "synth", "--out", str(run), *TRAIN, "--overwrite", "--init", str(run / "checkpoints")]
    _fails(capsys, argv, "--overwrite would delete", "the checkpoint --init starts from")
    assert _snapshot(run) == before  # byte for byte


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["synth", "--out", "x", "--n", "0"], "--n: must be at least 1, got 0"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--n", "-4"], "--n: must be at least 2"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--pairs", "0"], "--pairs: must be at"),
        (["evaluate", "--real", "synth", "--checkpoint", "c", "--out", "x", "--n-anatomy", "-1"], "--n-anatomy: must"),
    ],
)
def test_counts_are_refused_when_the_arguments_are_parsed(tmp_path, capsys, argv, phrase):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and phrase in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    _fails(capsys, ["train", "--data", "synth", "--out", str(tmp_path / "r"), *TRAIN[:4], "--device", "cuda"],
           "--device cuda: no CUDA GPU here", "use --device cpu or auto")  # fmt: skip
