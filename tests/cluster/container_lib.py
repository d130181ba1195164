"""A container engine on this host for the cluster tests: builds recap's image and serves the Docker API.

Docker is used when its daemon answers. Otherwise podman, installed with apt when missing (root), set
up the way these machines need (crun cannot set rlimits or run on hybrid cgroups: runc + cgroupfs,
nofile/nproc within the hard limits) through a harness-owned ``CONTAINERS_CONF``, not /etc.

Everything only this machine needs to build the image comes from here, at build time, and stays out of
``docker/Dockerfile`` and the image:

- the base: without a registry, a Debian bookworm with Python 3.11 in a venv on PATH (what the
  Dockerfile's default ``python:3.11-slim-bookworm`` gives), debootstrapped once and kept as
  ``localhost/recap-base:bookworm-py3.11``;
- pip's configuration (indexes, local wheel folders, constraints) and the CA bundle its proxy needs:
  the merged host config, its local paths re-rooted under ``/mnt`` and bind-mounted there read-only
  for the build (``/mnt`` exists in the base, so no mount point is left in a layer), handed to the
  build's pip through the Dockerfile's ``PIP_CONFIG_FILE`` build argument.

``python tests/cluster/container_lib.py`` builds the image by hand the same way. State:
``$RECAP_CONTAINERS_STATE`` (default /var/lib/recap-containers).
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STATE = Path(os.environ.get("RECAP_CONTAINERS_STATE", "/var/lib/recap-containers"))
BASE_IMAGE = "localhost/recap-base:bookworm-py3.11"
PACKAGES = ["podman", "runc", "debootstrap"]
MNT = "/mnt"  # where the build sees pip's config and local indexes
CONTAINERS_CONF = """\
# Written by tests/cluster/container_lib.py for the podman it runs (CONTAINERS_CONF), not for the host.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux; in Python's socket module from 3.12


class Unavailable(RuntimeError):
    """No container engine can be had on this host (the tests skip with this reason)."""


def image_tag(accel: str = "cpu") -> str:
    """The tag ``make image`` (cpu) / ``make image-cuda`` builds by default."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"recap:{version}-{accel}"


@dataclass
class Engine:
    tool: str  # "docker" or "podman"
    env: dict[str, str]  # the environment its commands (and `make image`) run with

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.tool, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{self.tool} {shlex.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
            )
        return proc

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def has_image(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0


def _docker_daemon() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _installed(package: str) -> bool:
    query = ["dpkg-query", "-W", "-f=${Status}", package]
    return "install ok installed" in subprocess.run(query, capture_output=True, text=True).stdout


def _apt_install(packages: list[str]) -> None:
    if not shutil.which("apt-get"):
        raise Unavailable(f"no Docker daemon, and no apt-get to install {' '.join(packages)}")
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise Unavailable(f"no Docker daemon, and `{shlex.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def engine() -> Engine:
    """Docker if its daemon answers, else podman as root (installed with apt when missing)."""
    if _docker_daemon():
        return Engine("docker", dict(os.environ))
    if os.geteuid() != 0:
        raise Unavailable("no Docker daemon, and podman is set up here as root only (installs, debootstrap)")
    _apt_install(PACKAGES)
    STATE.mkdir(parents=True, exist_ok=True)
    conf = STATE / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Engine("podman", dict(os.environ, CONTAINERS_CONF=str(conf)))


# ------------------------------------------------------------------------------------------ base image
def _debian_mirror() -> str:
    """The host's bookworm mirror (deb822 sources or sources.list), else Debian's CDN."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        if m := re.search(r"^deb\s+(\S+)\s+bookworm\s", listing.read_text(), re.MULTILINE):
            return m.group(1)
    return "http://deb.debian.org/debian"


def make_base_image(eng: Engine) -> None:
    """Debootstrap ``localhost/recap-base:bookworm-py3.11`` (~70 s; kept for later builds)."""
    rootfs = STATE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    include = "--include=python3,python3-venv,ca-certificates"
    cmd = ["debootstrap", "--variant=minbase", include, "bookworm", str(rootfs), _debian_mirror()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}")
    # A venv first on PATH plays python:3.11-slim's /usr/local python: `python` and `pip` work and pip
    # may install (Debian's own python3 refuses: PEP 668).
    subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv"], check=True, timeout=120)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / cache).glob("*"):
            if p.is_file():
                p.unlink()
    path = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    eng.run("import", "--change", f"ENV PATH={path}", "-", BASE_IMAGE, stdin=tar.stdout, timeout=300)
    tar.stdout.close()
    tar.wait()
    shutil.rmtree(rootfs)


# -------------------------------------------------------------------------------- pip, at build time
def host_pip_config(pip: str = str(Path(sys.executable).with_name("pip"))) -> dict[str, dict[str, str]]:
    """pip's merged configuration here (files and PIP_* variables), as {section: {key: value}}."""
    out = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    config: dict[str, dict[str, str]] = {}
    # PIP_* variables (":env:.key") override the files, whichever order pip lists them in.
    for line in sorted(out.splitlines(), key=lambda line: line.startswith(":env:.")):
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        section = "global" if section == ":env:" else section
        config.setdefault(section, {})[key] = ast.literal_eval(value)
    return config


def _local_path(word: str) -> Path | None:
    """The local file or folder a config word names (a path or a file:// URL), else None."""
    path = urllib.parse.urlparse(word).path if word.startswith("file://") else word
    return Path(path) if path.startswith("/") and Path(path).exists() else None


def pip_build_flags(config: dict[str, dict[str, str]], staging: Path) -> list[str]:
    """Build flags that give the image build's pip this host's configuration, nothing left behind.

    Every local path in ``config`` is re-rooted under /mnt: files are copied into ``staging`` (mounted
    at /mnt), folders bind-mounted below it (a PEP 503 ``.../simple`` index with its parent, where its
    files live). Without a ``cert``, the host's CA bundle is used: extra CAs (a TLS proxy) included."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = {section: dict(values) for section, values in config.items()}
    if CA_BUNDLE.exists():
        config.setdefault("global", {}).setdefault("cert", str(CA_BUNDLE))
    folders: set[Path] = set()

    def reroot(word: str) -> str:
        path = _local_path(word)
        if path is None:
            return word
        if path.is_dir():
            folders.add(path.parent if path.name == "simple" else path)
        else:
            (staging / path.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / path.relative_to("/"))
        return word.replace(str(path), f"{MNT}{path}", 1)

    parser = configparser.ConfigParser(interpolation=None)
    for section, values in config.items():
        parser[section] = {key: " ".join(map(reroot, value.split())) for key, value in values.items()}
    with open(staging / "pip.conf", "w") as f:
        parser.write(f)
    flags = ["--build-arg", f"PIP_CONFIG_FILE={MNT}/pip.conf", "--volume", f"{staging}:{MNT}:ro"]
    for folder in sorted(folders):
        (staging / folder.relative_to("/")).mkdir(parents=True, exist_ok=True)  # its mount point
        flags += ["--volume", f"{folder}:{MNT}{folder}:ro"]
    # Torch from pip's configured sources (the ones `make install` used here), not the Dockerfile's
    # default download.pytorch.org, which a machine with its own index may not reach.
    return flags + ["--build-arg", "TORCH_INDEX_URL="]


@dataclass
class Build:
    image: str
    seconds: float  # `make image`
    base_seconds: float  # making the local base image, 0 when it was there
    size: int  # bytes, as the engine reports it
    log: str


def build_image(eng: Engine) -> Build:
    """``make image`` with this engine: on podman from the local base with the host's pip config."""
    flags: list[str] = []
    base_seconds = 0.0
    if eng.tool == "podman":
        if not eng.has_image(BASE_IMAGE):
            t0 = time.monotonic()
            make_base_image(eng)
            base_seconds = time.monotonic() - t0
        flags = ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
        flags += pip_build_flags(host_pip_config(), STATE / "pip-build")
    return _make(eng, "image", image_tag("cpu"), flags, base_seconds)


def build_cuda_image(eng: Engine) -> Build:
    """``make image-cuda`` on the Dockerfile's own bases (a CUDA base cannot be made locally) and with
    pip's defaults: this host's pip config may prefer a local CPU torch."""
    return _make(eng, "image-cuda", image_tag("cuda"), [], 0.0)


def _make(eng: Engine, target: str, image: str, flags: list[str], base_seconds: float) -> Build:
    previous = _image_id(eng, image)
    cmd = ["make", target, f"CONTAINER_TOOL={eng.tool}", f"IMAGE_BUILD_FLAGS={shlex.join(flags)}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=eng.env, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: exit {proc.returncode}\n{log[-5000:]}")
    if previous and previous != _image_id(eng, image):  # the last build's image, now untagged
        eng.run("image", "rm", previous, check=False)
    return Build(image, seconds, base_seconds, eng.image_size(image), log)


def _image_id(eng: Engine, image: str) -> str | None:
    proc = eng.run("image", "inspect", "--format", "{{.Id}}", image, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ------------------------------------------------------------------------------- the Docker API socket
@dataclass
class HostSnapshot:
    """What podman may leave on the host, as it was before the tests (so only new leftovers go)."""

    netns_mounted: bool
    networks: set[str]
    cgroup_parents: set[Path]


def _mounted(path: str) -> bool:
    return subprocess.run(["mountpoint", "-q", path]).returncode == 0


def _networks(eng: Engine) -> set[str]:
    return set(eng.run("network", "ls", "--format", "{{.Name}}").stdout.split())


@contextlib.contextmanager
def docker_api(eng: Engine) -> Iterator[str]:
    """A Docker-API endpoint (for ``DOCKER_HOST``): Docker's own, or ``podman system service`` on a
    socket of its own, stopped afterwards along with what podman leaves on the host."""
    if eng.tool == "docker":
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    before = HostSnapshot(_mounted("/run/netns"), _networks(eng), _cgroup_parents())
    sock = STATE / "podman.sock"
    sock.unlink(missing_ok=True)
    log = open(STATE / "podman-service.log", "ab")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=eng.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not answer on {sock}: see {log.name}")
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()
        sock.unlink(missing_ok=True)
        tidy_host(eng, before)


def _answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(64)
    except OSError:
        return False


def _cgroup_parents() -> set[Path]:
    return set(Path("/sys/fs/cgroup").glob("*/libpod_parent"))


def tidy_host(eng: Engine, before: HostSnapshot) -> None:
    """Remove podman's leftovers that were not there before: networks (with their bridge and DNS
    server), the /run/netns bind mount, empty cgroups under libpod_parent (rmdir refuses busy ones)."""
    for network in _networks(eng) - before.networks:
        eng.run("network", "rm", "-f", network, check=False)
    if not before.netns_mounted and _mounted("/run/netns") and not any(Path("/run/netns").iterdir()):
        subprocess.run(["umount", "/run/netns"], check=False)
    for parent in _cgroup_parents():
        dirs = [p for p in parent.rglob("*") if p.is_dir()]
        if parent not in before.cgroup_parents:
            dirs.append(parent)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):  # children first
            with contextlib.suppress(OSError):
                d.rmdir()


# ------------------------------------------------------------------ host services reached by containers
@contextlib.contextmanager
def tcp_relay(listen_host: str, target: tuple[str, int]) -> Iterator[int]:
    """Forward ``listen_host:<port>`` (yielded) to ``target``: lets containers on a bridge network reach a
    server that listens on the host's 127.0.0.1 only, through the bridge's gateway address. The socket is
    bound with IP_FREEBIND, so the address may appear later (podman brings a bridge up with its first
    container and down with its last)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    server.bind((listen_host, 0))
    server.listen(64)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # the listening socket was shut down: done
                return
            try:
                upstream = socket.create_connection(target)
            except OSError:  # the server is down: so is the relayed connection
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        server.close()


if __name__ == "__main__":
    build = build_image(engine())
    print(f"{build.image}: {build.size / 1e9:.2f} GB, built in {build.seconds:.0f} s")
