"""Tests of download.sh against a local HTTP server on 127.0.0.1 (no internet).

The served folder holds small but valid files with the real names; the script
is pointed at it through SEQNET_BASE_URL, SEQMATCHNET_BASE_URL and
DESC_BASE_URL.
"""
import hashlib
import http.server
import io
import os
import shutil
import signal
import subprocess
import threading
import time
import zlib
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")

pytestmark = [
    pytest.mark.skipif(BASH is None, reason="bash is not installed"),
    pytest.mark.skipif(shutil.which("curl") is None and shutil.which("wget") is None,
                       reason="neither curl nor wget is installed"),
]

OX = "2015-03-17-11-08-44_2014-12-16-18-44-24"
NORDLAND_OXV1 = [
    "nordland_train_d-40_d2-10.db",
    "nordland_val_d-1_d2-1.db",
    "nordland_test_d-1_d2-1.db",
    f"oxford-v1.0_{OX}_train_d-20_d2-5.db",
    f"oxford-v1.0_{OX}_test_d-10_d2-5.db",
    "oxford-v1.0_splitInds.npz",
]
PNV = [
    f"oxford-pnv_{OX}_train_d-20_d2-5.db",
    f"oxford-pnv_{OX}_test_d-25_d2-5.db",
    "oxford-pnv_splitInds.npz",
]
CITIES = ["amman", "austin", "melbourne"]
MSLS_DB = [f"msls_{c}_d-20_d2-5.db" for c in CITIES]
MSLS_BOUNDS = [f"seqBoundsFiles/msls_{c}_{p}_seqBounds.txt" for c in CITIES for p in ("database", "query")]
DESCS = [
    "nordland-clean-summer.npy",
    "nordland-clean-winter.npy",
    "nordland-clean-spring.npy",
    "nordland-clean-fall.npy",
    "oxford_2015-03-17-11-08-44_stereo_left.npy",
    "oxford_2014-12-16-18-44-24_stereo_left.npy",
]
STRUCTS = NORDLAND_OXV1 + PNV
SEQNET_ALL = STRUCTS + MSLS_DB + MSLS_BOUNDS


# ------------------------------------------------------------- file makers --
def make_db(tag: str) -> bytes:
    """A small MATLAB v5 struct file like the real ones (`tag` makes it unique)."""
    buf = io.BytesIO()
    db = {
        "whichSet": "test", "dataset": tag,
        "dbImageFns": np.array([["a.jpg"], ["b.jpg"]], dtype=object),
        "qImageFns": np.array([["c.jpg"]], dtype=object),
        "numImages": 2, "numQueries": 1,
        "posDistThr": 1, "posDistSqThr": 1, "nonTrivPosDistSqThr": 1,
        "utmDb": np.array([[0.0, 1.0]]), "utmQ": np.array([[0.0]]),
    }
    scipy.io.savemat(buf, {"dbStruct": db}, format="5")
    return buf.getvalue()


def make_npz(tag: str) -> bytes:
    buf = io.BytesIO()
    inds = np.empty(2, dtype=object)
    inds[0], inds[1] = np.arange(3), np.arange(2)
    np.savez(buf, trainInds=inds, valInds=inds, testInds=inds, tag=np.array(tag))
    return buf.getvalue()


def make_npy(tag: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    np.save(buf, rng.standard_normal((4, 8)).astype(np.float32))
    return buf.getvalue()


def make_file(rel: str, tag: str = "") -> bytes:
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".db"):
        return make_db(name + tag)
    if name.endswith(".npz"):
        return make_npz(name + tag)
    if name.endswith(".npy"):
        return make_npy(name + tag)
    return f"0 2\n0 2\n2 3\n# {name}{tag}\n".encode()


# ------------------------------------------------------------------ server --
class Server:
    def __init__(self, root: Path):
        self.root = root
        self.gets = Counter()
        self.release = threading.Event()
        counter, release = self.gets, self.release

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                counter[self.path] += 1
                if self.path.startswith("/hang/") and not self.path.endswith("/SHA256SUMS"):
                    # Send the start of a file, then stall (an interrupted download).
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**6))
                    self.end_headers()
                    self.wfile.write(b"MATLAB 5.0 MAT-file" + b"\0" * 4096)
                    self.wfile.flush()
                    release.wait(20)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def source(self, name: str, files: dict) -> str:
        """Serve `files` ({relative path: bytes}) under /name; return its base URL."""
        for rel, data in files.items():
            p = self.root / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return f"{self.url}/{name}"

    def data_gets(self, prefix: str = "") -> Counter:
        return Counter({p: n for p, n in self.gets.items()
                        if p.startswith(prefix) and not p.endswith("/SHA256SUMS")})

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("served"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def files():
    """The good files, by relative path, for the SeqNet, SeqMatchNet and descriptor sources."""
    return {
        "seqnet": {rel: make_file(rel) for rel in SEQNET_ALL},
        "seqmatchnet": {rel: make_file(rel, "-smn") for rel in NORDLAND_OXV1},
        "desc": {rel: make_file(rel) for rel in DESCS},
    }


@pytest.fixture(scope="module")
def good(server, files):
    return {k: server.source(k, v) for k, v in files.items()}


def run(target, *args, seqnet, seqmatchnet, desc=None, extra_env=None, path=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DESC_BASE_URL", "CHECKSUMS_FILE", "MSLS_CITIES")}
    env.update(SEQNET_BASE_URL=seqnet, SEQMATCHNET_BASE_URL=seqmatchnet,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if desc is not None:
        env["DESC_BASE_URL"] = desc
    if path is not None:
        env["PATH"] = path
    env.update(extra_env or {})
    return subprocess.run([BASH, str(SCRIPT), *args, str(target)], env=env,
                          capture_output=True, text=True, timeout=60)


def leftovers(target: Path):
    """Temporary/partial files anywhere under target."""
    return [p for p in target.rglob("*") if p.is_file() and ".part" in p.name]


def fetcher_running(pid: int) -> bool:
    """Whether a curl or wget child of process ``pid`` is running (Linux /proc; True elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and name in ("curl", "wget"):
            return True
    return False


def dest(target: Path, rel: str) -> Path:
    if rel.endswith(".npy"):
        return target / "data" / "descData" / "netvlad-pytorch" / rel
    return target / "structFiles" / rel


# ------------------------------------------------------------------- tests --
def test_syntax_and_help():
    assert subprocess.run([BASH, "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run([BASH, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage" in r.stdout and "DESC_BASE_URL" in r.stdout
    r = subprocess.run([BASH, str(SCRIPT), "--what", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2


@pytest.mark.slow
def test_all_files_land_where_loaders_look_and_rerun_fetches_nothing(tmp_path, server, files, good):
    target = tmp_path / "data_root"
    urls = dict(seqnet=good["seqnet"], seqmatchnet=good["seqmatchnet"], desc=good["desc"])
    r = run(target, "--what", "all", **urls)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for rel, data in files["seqnet"].items():
        assert dest(target, rel).read_bytes() == data, rel
    for rel, data in files["desc"].items():
        assert dest(target, rel).read_bytes() == data, rel
    assert (target / "structFiles" / "seqBoundsFiles" / "msls_austin_query_seqBounds.txt").is_file()
    n = len(SEQNET_ALL) + len(DESCS)
    assert f"{n} downloaded, 0 present, 0 failed" in out
    assert "python main.py --mode test" in out
    assert not leftovers(target)

    # Second run: nothing is downloaded again (SHA256SUMS look-ups are allowed).
    before = server.data_gets()
    r2 = run(target, "--what", "all", **urls)
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 0, out2
    assert server.data_gets() == before
    assert f"0 downloaded, {n} present, 0 failed" in out2
    assert "exists" in out2


def test_missing_file_is_reported_and_leaves_nothing(tmp_path, server, files, good):
    missing = "oxford-pnv_splitInds.npz"  # SeqNet only: no fallback
    src = server.source("no_pnv_split", {k: v for k, v in files["seqnet"].items() if k != missing})
    target = tmp_path / "t"
    r = run(target, "--what", "structs", seqnet=src, seqmatchnet=good["seqmatchnet"])
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert missing in out and f"{src}/{missing}" in out
    assert f"{len(STRUCTS) - 1} downloaded, 0 present, 1 failed" in out
    assert not (target / "structFiles" / missing).exists()
    assert not leftovers(target)
    # The other files were still fetched.
    assert (target / "structFiles" / PNV[0]).read_bytes() == files["seqnet"][PNV[0]]


@pytest.mark.parametrize("sig,group", [
    (signal.SIGINT, True), (signal.SIGTERM, True),
    pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow)],
    ids=["SIGINT-group", "SIGTERM-group", "SIGTERM-script"])
def test_interrupted_download_leaves_no_partial_file(tmp_path, server, good, sig, group):
    """Ctrl-C in a terminal (SIGINT to the process group), ``timeout``/a service manager (SIGTERM to the
    group) or a plain ``kill PID`` (SIGTERM to the script alone): it ends within seconds, leaving nothing."""
    target = tmp_path / "t"
    env = {**os.environ, "SEQNET_BASE_URL": f"{server.url}/hang",
           "SEQMATCHNET_BASE_URL": good["seqmatchnet"], "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen([BASH, str(SCRIPT), "--what", "structs", str(target)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not leftovers(target) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(target), "the download never started"
        while not fetcher_running(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)        # the transfer itself is under way, not the fork that starts it
        if group:
            os.killpg(proc.pid, sig)        # the whole group: the script and its curl/wget
        else:
            os.kill(proc.pid, sig)          # the script alone; its curl/wget is still running
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert proc.returncode != 0
    assert not leftovers(target)
    assert not list((target / "structFiles").glob("*.db"))


def test_corrupt_db_is_rejected_and_leaves_nothing(tmp_path, server, files):
    bad = "nordland_test_d-1_d2-1.db"
    junk = os.urandom(512)
    src = server.source("corrupt", {**files["seqnet"], bad: junk})
    mirror = server.source("corrupt_mirror", {bad: b"<html>not found</html>"})
    target = tmp_path / "t"
    r = run(target, "--what", "structs", seqnet=src, seqmatchnet=mirror)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert bad in out and "MATLAB" in out
    assert "1 failed" in out
    assert not (target / "structFiles" / bad).exists()
    assert not leftovers(target)


def test_checksum_manifest_mismatch_is_rejected(tmp_path, server, files, good):
    good_rel, bad_rel = "msls_amman_d-20_d2-5.db", "seqBoundsFiles/msls_amman_query_seqBounds.txt"
    sums = {rel: hashlib.sha256(data).hexdigest() for rel, data in files["seqnet"].items()}
    sums[bad_rel] = "0" * 64
    manifest = "".join(f"{h}  {rel}\n" for rel, h in sums.items()).encode()
    src = server.source("with_sums", {**files["seqnet"], "SHA256SUMS": manifest})
    target = tmp_path / "t"
    r = run(target, "--what", "msls", seqnet=src, seqmatchnet=good["seqmatchnet"],
            extra_env={"MSLS_CITIES": "amman"})
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "msls_amman_query_seqBounds.txt" in out and "sha256" in out
    assert "2 downloaded, 0 present, 1 failed" in out
    assert dest(target, good_rel).read_bytes() == files["seqnet"][good_rel]
    assert not dest(target, bad_rel).exists()
    assert not leftovers(target)

    # A local CHECKSUMS_FILE is checked too, also for files already present.
    local = tmp_path / "local.sha256"
    local.write_text(f"{'f' * 64}  {good_rel}\n")
    r = run(target, "--what", "msls", seqnet=good["seqnet"], seqmatchnet=good["seqmatchnet"],
            extra_env={"MSLS_CITIES": "amman", "CHECKSUMS_FILE": str(local)})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and good_rel in out and "sha256" in out
    # The present file failed, so did the new download: the old file is left untouched.
    assert dest(target, good_rel).read_bytes() == files["seqnet"][good_rel]
    assert not leftovers(target)


def test_invalid_present_file_is_downloaded_again(tmp_path, good, files):
    target = tmp_path / "t"
    name = "oxford-v1.0_splitInds.npz"
    dest(target, name).parent.mkdir(parents=True)
    dest(target, name).write_bytes(b"truncated")
    r = run(target, "--what", "structs", seqnet=good["seqnet"], seqmatchnet=good["seqmatchnet"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert dest(target, name).read_bytes() == files["seqnet"][name]


def test_fallback_mirror_is_used_when_first_source_404s(tmp_path, server, files, good):
    gone = "nordland_train_d-40_d2-10.db"
    src = server.source("no_nordland_train", {k: v for k, v in files["seqnet"].items() if k != gone})
    target = tmp_path / "t"
    r = run(target, "--what", "structs", seqnet=src, seqmatchnet=good["seqmatchnet"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # The SeqMatchNet copy (distinct bytes) was installed.
    assert dest(target, gone).read_bytes() == files["seqmatchnet"][gone]
    assert server.gets[f"/seqmatchnet/{gone}"] >= 1
    assert f"{len(STRUCTS)} downloaded, 0 present, 0 failed" in out


def test_manual_descriptor_instructions_without_desc_base_url(tmp_path, good, files):
    target = tmp_path / "t"
    have = dest(target, DESCS[0])
    have.parent.mkdir(parents=True)
    have.write_bytes(files["desc"][DESCS[0]])
    r = run(target, seqnet=good["seqnet"], seqmatchnet=good["seqmatchnet"])  # default selection
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "https://universityofadelaide.box.com/s/p8uh5yncsaxk7g8lwr8pihnwkqbc2pkf" in out
    for link in ("zkfk1akpbo5318fzqmtvlpp7030ex4up", "mp45yapl0j0by6aijf5kj8obt8ky0swk",
                 "pitts_WPCA4096.pth.tar", "cloudstor"):
        assert link in out
    for rel in DESCS:
        assert str(dest(target.resolve(), rel)) in out
    assert f"[present] {have.resolve()}" in out
    assert f"[missing] {dest(target.resolve(), DESCS[1])}" in out
    assert "5 to fetch manually" in out
    # The structs were fetched by the default selection as well; nothing else was created.
    assert all(dest(target, rel).is_file() for rel in STRUCTS)
    assert sorted(p.name for p in have.parent.iterdir()) == [DESCS[0]]


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_wget_is_used_when_curl_is_missing(tmp_path, good, files):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "wget", "mktemp", "od", "tr", "cut", "awk", "cksum", "sha256sum",
                 "mv", "rm", "mkdir", "cat", "env", "tail", "sed"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    target = tmp_path / "t"
    r = run(target, "--what", "descriptors", seqnet=good["seqnet"], seqmatchnet=good["seqmatchnet"],
            desc=good["desc"], path=str(bindir))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "wget" in out
    for rel in DESCS:
        assert dest(target, rel).read_bytes() == files["desc"][rel]


def test_no_network_is_said_once_and_quickly(tmp_path):
    """Unreachable sources (a closed local port): one 'no network' line per source, no per-file
    retries, the failed files listed and what to do, exit 1, within seconds."""
    import time

    started = time.perf_counter()
    r = run(tmp_path / "t", "--what", "structs", seqnet="http://127.0.0.1:9/seqnet",
            seqmatchnet="http://127.0.0.1:9/seqmatchnet")
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert time.perf_counter() - started < 20
    assert out.count("no network: cannot reach") == 1                # both sources share one host and port
    assert "ERROR" not in out and f"{len(STRUCTS)} failed" in out
    assert "SEQNET_BASE_URL" in out and "by hand" in out
    assert not leftovers(tmp_path / "t")
