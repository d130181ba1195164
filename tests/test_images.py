"""The image tags the README's commands name are the ones `make image` / `make image-cuda` build.

tests/cluster/test_local_docker.py builds the CPU image and runs it; this reads the Makefile's recipe
(`make -n`) and the README, and runs the README's Kubernetes --dryrun, so a renamed tag or a version
bump cannot leave the docs behind."""

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
# Each `torchx run -s kubernetes ...` command of the README, with its `\`-continued lines.
KUBERNETES_COMMANDS = re.findall(r"torchx run -s kubernetes(?:[^\n]*\\\n)*[^\n]*", README)


def make_tag(target: str, *variables: str) -> str:
    """The `-t` tag of `make TARGET VARIABLES...`'s build command (printed, not run)."""
    cmd = ["make", "-s", "-n", target, "CONTAINER_TOOL=docker", *variables]
    recipe = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    (tag,) = re.findall(r" -t (\S+) ", recipe)
    return tag


def test_make_image_tags_follow_the_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert make_tag("image") == f"recap:{version}-cpu"
    assert make_tag("image-cuda") == f"recap:{version}-cuda"
    assert make_tag("image", "IMAGE_REPO=ghcr.io/x/recap") == f"ghcr.io/x/recap:{version}-cpu"


def test_kubernetes_commands_name_tags_make_builds():
    """Each `torchx run -s kubernetes ... --image X` (the --dryrun one too) names what `make image[-cuda]
    IMAGE_REPO=R` builds, with that make command in the README; an image submitted for real is pushed."""
    assert any("--dryrun" in c for c in KUBERNETES_COMMANDS), KUBERNETES_COMMANDS
    for command in KUBERNETES_COMMANDS:
        image = re.search(r"--image (\S+)", command).group(1)
        repo = image.rpartition(":")[0]
        assert re.search(rf"make image(-cuda)? +IMAGE_REPO={re.escape(repo)} ", README), repo
        assert image in {make_tag(t, f"IMAGE_REPO={repo}") for t in ("image", "image-cuda")}, command
        assert "--dryrun" in command or f"push {image}" in README, command


def test_readme_images_are_built_by_make():
    """No `--image` in the README (Kubernetes, local_docker) names a tag that make does not build."""
    built = {make_tag("image"), make_tag("image-cuda")}
    for repo in set(re.findall(r"make image(?:-cuda)? +IMAGE_REPO=(\S+)", README)):
        built |= {make_tag("image", f"IMAGE_REPO={repo}"), make_tag("image-cuda", f"IMAGE_REPO={repo}")}
    images = set(re.findall(r"--image (\S+)", README))
    assert images and images <= built, images - built
    assert make_tag("image") in images  # the local_docker example runs `make image`'s own tag


def test_readme_dryrun_prints_a_job_running_the_make_image_tag(tmp_path):
    """The README's `torchx run -s kubernetes --dryrun ...`, run as written (no cluster needed)."""
    (command,) = [c for c in KUBERNETES_COMMANDS if "--dryrun" in c]
    args = shlex.split(command.replace("\\\n", " "))
    (tmp_path / "empty").write_text("")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TORCHXCONFIG": str(tmp_path / "empty")}
    torchx = str(Path(sys.executable).with_name("torchx"))
    out = subprocess.run(
        [torchx, *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    repo = re.search(r"--image (\S+):", command).group(1)
    images = re.findall(r"^\s+image: (\S+)$", out.stdout, re.MULTILINE)  # one per Volcano task
    assert images and set(images) == {make_tag("image", f"IMAGE_REPO={repo}")}, out.stdout[-3000:]
