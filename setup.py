"""opt-core: Triton kernels, a thin OPT model and a sharding layer for training OPT-style models.

One import package is installed, ``opt_core``.  The repository keeps the owner's folders at its top
and maps them into it: ``kernels/`` is ``opt_core.kernels``, ``dist/`` is ``opt_core.dist`` (the same
mapping serves regular and editable installs).  ``bench/`` and ``tests/`` run from a checkout and are
not installed.  Build wheels outside ``dist/`` (the sharding package): ``python -m build --outdir build/``.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# import package -> folder in this repository
PACKAGE_ROOTS = {"opt_core": "opt_core", "opt_core.kernels": "kernels", "opt_core.dist": "dist"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for package, folder in PACKAGE_ROOTS.items():
        packages.append(package)
        package_dir[package] = folder
        for sub in find_packages(where=folder):
            packages.append(f"{package}.{sub}")
            package_dir[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="opt-core",
    version="0.1.0",
    description="Hand-written Triton kernels, a thin OPT model and a sharding layer for OPT-style training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # The CUDA C++ sources travel with the package: the CuPy loader compiles them at run time.  The tuned
    # autotune choices per GPU model (kernels/tuned/<gpu>.json) too: an installed wheel starts from them.
    package_data={"opt_core.kernels": ["cuda/*.cu", "cuda/*.cuh", "tuned/*.json"]},
    # Lower bounds only: an upper pin would fight the CUDA build of torch a user already has.
    # torch.library.custom_op / register_autograd / opcheck need torch 2.4; the GPU machine runs
    # torch 2.11 with Triton 3.6, CI pins Triton 3.6.
    install_requires=["torch>=2.4", "triton>=3.6", "numpy"],
    extras_require={
        "train": ["tokenizers", "matplotlib"],
        "hf": ["transformers", "tokenizers", "safetensors", "accelerate"],
        "test": ["pytest>=8", "pytest-xdist", "filelock", "pytest-benchmark", "transformers", "tokenizers",
                 "safetensors", "accelerate", "matplotlib", "build"],
        "bench": ["pytest-benchmark", "matplotlib", "nvidia-ml-py"],
    },
    entry_points={
        "console_scripts": [
            "opt-core-compile-check=opt_core.kernels.compile_check:main",
            "opt-core-train=opt_core.train:main",
        ],
    },
)
