"""Download scripts against a local HTTP server on 127.0.0.1 (with Range support), on archives built here."""

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alphagan.data.download import Archive, DownloadError, fetch, get_dataset, safe_extract

ROOT = Path(__file__).resolve().parent.parent


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves files, honouring 'Range: bytes=N-' like the real servers do; counts bytes sent."""

    sent: list[int] = []
    cut: int | None = None  # send only this many bytes of the body, then close: a dropped connection

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            start = int(header[len("bytes=") :].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data) if RangeHandler.cut is None else start + RangeHandler.cut
        RangeHandler.sent.append(end - start)  # before sending: the client may finish before this thread resumes
        self.wfile.write(data[start:end])
        self.close_connection = True


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.sent, RangeHandler.cut = [], None
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _nifti_bytes(seed):
    rng = np.random.default_rng(seed)
    grid = np.indices((40, 48, 40)).astype(float)
    brain = (((grid[0] - 20) / 17) ** 2 + ((grid[1] - 24) / 21) ** 2 + ((grid[2] - 20) / 17) ** 2) <= 1
    data = (brain * rng.uniform(50, 100, brain.shape)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]))
    return img.to_bytes()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_download_extract_and_prepare_an_ixi_like_archive(server, tmp_path):
    www, url = server
    import gzip

    members = {f"IXI{100 + i:03d}-Guys-{1000 + i}-T1.nii.gz": gzip.compress(_nifti_bytes(i)) for i in range(3)}
    archive = _tar(www / "IXI-T1.tar", members)
    source = Archive(f"{url}/IXI-T1.tar", _md5(archive), "ixi", ".")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_scripts" / "download.py"),
            "ixi-t1",
            "--root",
            str(tmp_path / "data"),
            "--url",
            source.url,
            "--size",
            "16",
        ],
        capture_output=True,
        text=True,
    )
    # The real checksum does not match our small archive: refused, nothing extracted.
    assert run.returncode == 1 and "checksum mismatch" in run.stderr
    assert not (tmp_path / "data" / "ixi-t1").exists()
    folder, layout = get_dataset("ixi-t1", tmp_path / "data", source, progress=False)
    assert layout == "ixi" and sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(members)
    from alphagan.data.prepare import prepare

    result = prepare(str(folder), tmp_path / "cache", size=16, layout=layout, modality="t1", progress=False)
    assert result.written == 3 and not result.rejected


def test_an_interrupted_download_resumes(server, tmp_path):
    www, url = server
    blob = np.random.default_rng(0).bytes(300_000)
    (www / "big.tar").write_bytes(blob)
    dest = tmp_path / "big.tar"
    (tmp_path / "big.tar.part").write_bytes(blob[:100_000])  # what an interrupted run left
    fetch(f"{url}/big.tar", dest, hashlib.md5(blob).hexdigest(), progress=False)
    assert dest.read_bytes() == blob
    assert RangeHandler.sent == [200_000]  # only the missing part travelled
    assert not (tmp_path / "big.tar.part").exists()
    fetch(f"{url}/big.tar", dest, hashlib.md5(blob).hexdigest(), progress=False)
    assert RangeHandler.sent == [200_000]  # already complete and verified: nothing downloaded


def test_a_dropped_connection_keeps_the_partial_file_and_the_next_run_resumes(server, tmp_path):
    www, url = server
    blob = np.random.default_rng(1).bytes(300_000)
    (www / "big.tar").write_bytes(blob)
    dest = tmp_path / "big.tar"
    RangeHandler.cut = 120_000
    with pytest.raises(DownloadError, match=r"interrupted; the partial file is kept, run again to resume"):
        fetch(f"{url}/big.tar", dest, hashlib.md5(blob).hexdigest(), progress=False)
    assert (tmp_path / "big.tar.part").read_bytes() == blob[:120_000] and not dest.exists()
    RangeHandler.cut = None
    fetch(f"{url}/big.tar", dest, hashlib.md5(blob).hexdigest(), progress=False)
    assert dest.read_bytes() == blob and RangeHandler.sent == [120_000, 180_000]


def test_a_tampered_archive_is_refused(server, tmp_path):
    www, url = server
    archive = _tar(www / "Task01_BrainTumour.tar", {"Task01_BrainTumour/dataset.json": b"{}"})
    good_md5 = _md5(archive)
    _tar(www / "Task01_BrainTumour.tar", {"Task01_BrainTumour/dataset.json": b'{"evil": 1}'})
    source = Archive(f"{url}/Task01_BrainTumour.tar", good_md5, "decathlon", "Task01_BrainTumour")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        get_dataset("decathlon-brain", tmp_path, source, progress=False)
    assert not (tmp_path / "decathlon-brain").exists()
    assert not list((tmp_path / "archives").iterdir())  # the bad bytes are not kept


def test_members_that_escape_the_target_are_refused(server, tmp_path):
    www, url = server
    archive = _tar(www / "evil.tar", {"ok.txt": b"fine", "../escaped.txt": b"gotcha"})
    source = Archive(f"{url}/evil.tar", _md5(archive), "flat", ".")
    with pytest.raises(DownloadError, match="outside"):
        get_dataset("evil", tmp_path / "root", source, progress=False)
    assert not (tmp_path / "root" / "escaped.txt").exists()
    assert not (tmp_path / "root" / "evil" / "ok.txt").exists()  # nothing at all was extracted

    absolute = _tar(tmp_path / "abs.tar", {"/tmp/alphagan-absolute-member.txt": b"x"})
    with pytest.raises(DownloadError, match="outside"):
        safe_extract(absolute, tmp_path / "out")

    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DownloadError, match="link"):
        safe_extract(link, tmp_path / "out2")


def test_a_missing_file_is_a_clear_error(server, tmp_path):
    _, url = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{url}/nothing.tar", tmp_path / "x.tar", progress=False)
