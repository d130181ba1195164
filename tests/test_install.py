"""`make install`'s torch source and `make train ARGS=...`, read from make's printed recipes (`make -n`).

The real install is what `make test` itself ran first; this checks the choice a fresh CPU machine gets."""

import os
import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PIN = next(
    d
    for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if "torch==" in d
)


def install_recipe(env: dict[str, str], *variables: str) -> str:
    # -B: as if nothing were installed yet; -n: print the recipe, run nothing.
    cmd = ["make", "-s", "-n", "-B", "install", *variables]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout


def test_cpu_machine_with_only_the_default_index_asks_the_cpu_index(tmp_path):
    """No pip configuration, no NVIDIA GPU: torch comes from PyTorch's CPU index first, then the rest."""
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    bare.update(PIP_CONFIG_FILE=os.devnull, PATH="/usr/bin:/bin", HOME=str(tmp_path))
    recipe = install_recipe(bare)
    torch_line = f"pip install --extra-index-url {CPU_INDEX} '{PIN}'"
    assert torch_line in recipe, recipe
    assert recipe.index(torch_line) < recipe.index("pip install --upgrade-strategy only-if-needed -e")
    assert re.search(r"pip check\n", recipe)
    # Empty: pip's configured indexes alone.
    assert CPU_INDEX not in install_recipe(bare, "TORCH_INDEX_URL=")


def test_configured_indexes_are_used_alone(tmp_path):
    """pip configured with its own wheel folder (as this project's CI machines are): no CPU index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    (tmp_path / "pip.conf").write_text(f"[global]\nfind-links = {tmp_path}\n")
    env.update(PIP_CONFIG_FILE=str(tmp_path / "pip.conf"), PATH="/usr/bin:/bin")
    recipe = install_recipe(env)
    assert CPU_INDEX not in recipe and f"{PIN} from pip's configured indexes" in recipe, recipe
    assert CPU_INDEX not in install_recipe({**env, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "/w"})


def test_make_train_passes_args_as_overrides():
    cmd = ["make", "-s", "-n", "train", "ARGS=training.num_train_steps=400 checkpoint.every_n=100"]
    recipe = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert (
        "recap.train -j 1x2 --output runs/recap-local -- training.num_train_steps=400 checkpoint.every_n=100"
        in (recipe)
    )
    plain = subprocess.run(cmd[:4], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert re.search(r"--output runs/recap-local\n", plain), plain
