"""Make the compatibility venv (`make test-compat`): the OLDEST supported Ray and torch beside painter.

    python3 tests/compat/make_venv.py VENV WHEELHOUSE

Ray is `ray[data,train,default]==RAY` with its dependencies; torch is `torch==TORCH` with the minimal
set of packages `import torch` needs (the PyPI build loads the CUDA libraries even on a CPU), all
`--no-deps` (torch's full dependency list pulls several GB more); painter's other dependencies come from
pyproject.toml (torch and Ray left out), then painter itself with `--no-deps`. Every wheel is installed
offline from WHEELHOUSE; what is missing there is downloaded into it first, so a second run on the same
machine downloads nothing. A machine's pip configuration (constraints capping torch) is ignored.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY, TORCH = os.environ.get("COMPAT_RAY", "2.50.0"), os.environ.get("COMPAT_TORCH", "2.6.0")
# what `import torch` 2.6 needs (torch 2.6.0+cu124 from PyPI), nothing more
TORCH_SET = [f"torch=={TORCH}", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
             "markupsafe", "fsspec", "nvidia-cuda-runtime-cu12==12.4.127", "nvidia-cuda-cupti-cu12==12.4.127",
             "nvidia-nvjitlink-cu12==12.4.127", "nvidia-cudnn-cu12==9.1.0.70", "nvidia-cublas-cu12==12.4.5.8",
             "nvidia-cufft-cu12==11.2.1.3", "nvidia-curand-cu12==10.3.5.147", "nvidia-cusparse-cu12==12.3.1.170",
             "nvidia-cusparselt-cu12==0.6.2", "nvidia-nccl-cu12==2.21.5"]
SMOKE_TOOLS = ["pytest>=8", "moto[server]>=5", "pyyaml>=6"]  # what the smoke test itself uses
# what building painter needs offline (the venv's own setuptools 65 has no bdist_wheel)
BUILD_TOOLS = ["setuptools>=70.1", "wheel"]


def painter_requirements() -> list[str]:
    """pyproject's dependencies without torch and Ray (installed above at their oldest), the smoke's tools."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    name = lambda req: re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    return [r for r in declared if name(r) not in ("torch", "ray")] + [f"ray[data,train,default]=={RAY}"] + SMOKE_TOOLS


def pip(venv: Path, *args: str) -> int:
    env = dict(os.environ, PIP_CONFIG_FILE="/dev/null", PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], env=env).returncode


def install(venv: Path, wheelhouse: Path, requirements: list[str], *, deps: bool) -> None:
    """Install offline from the wheelhouse; on a miss, download what is missing into it and install again."""
    flags = [] if deps else ["--no-deps"]
    offline = ["install", "-q", "--no-index", "--find-links", str(wheelhouse), *flags, *requirements]
    if pip(venv, *offline) == 0:
        return
    print(f"make_venv: downloading into {wheelhouse}", flush=True)
    if pip(venv, "download", "-q", "--dest", str(wheelhouse), "--find-links", str(wheelhouse), *flags,
           *requirements) != 0 or pip(venv, *offline) != 0:
        sys.exit(f"make_venv: could not install {' '.join(requirements)}")


def main(venv: str, wheelhouse: str) -> None:
    start, venv_path, house = time.time(), Path(venv), Path(os.path.expanduser(wheelhouse))
    house.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv_path)], check=True)
    install(venv_path, house, BUILD_TOOLS, deps=True)
    install(venv_path, house, TORCH_SET, deps=False)
    install(venv_path, house, painter_requirements(), deps=True)
    if pip(venv_path, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)) != 0:
        sys.exit("make_venv: could not install painter")
    check = "import ray, torch; print(f'make_venv: Ray {ray.__version__}, torch {torch.__version__}')"
    subprocess.run([str(venv_path / "bin" / "python"), "-c", check], check=True)
    print(f"make_venv: {venv_path} ready in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
