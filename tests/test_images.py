"""The image tags the README's commands name are the ones `make image` / `make image-cuda` build.

tests/cluster/test_local_docker.py builds the CPU image and runs it; this only reads the Makefile's
recipe (`make -n`) and the README, so a renamed tag or a version bump cannot leave the docs behind."""

import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


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


def test_kubernetes_command_runs_a_tag_make_builds_and_the_readme_pushes():
    """`torchx run -s kubernetes ... --image X` (and its --dryrun): X is what `make image[-cuda]` builds."""
    image = re.search(r"torchx run -s kubernetes .*?--image (\S+)", README, re.DOTALL).group(1)
    repo = image.rpartition(":")[0]
    assert re.search(rf"make image(-cuda)? +IMAGE_REPO={re.escape(repo)} ", README), repo
    assert image in {make_tag(t, f"IMAGE_REPO={repo}") for t in ("image", "image-cuda")}
    assert f"push {image}" in README


def test_readme_images_are_built_by_make():
    """No `--image` in the README (Kubernetes, local_docker) names a tag that make does not build."""
    built = {make_tag("image"), make_tag("image-cuda")}
    for repo in set(re.findall(r"make image(?:-cuda)? +IMAGE_REPO=(\S+)", README)):
        built |= {make_tag("image", f"IMAGE_REPO={repo}"), make_tag("image-cuda", f"IMAGE_REPO={repo}")}
    images = set(re.findall(r"--image (\S+)", README))
    assert images and images <= built, images - built
    assert make_tag("image") in images  # the local_docker example runs `make image`'s own tag
