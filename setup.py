"""opt-core: Triton kernels, a thin OPT model and a sharding layer for training OPT-style models."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="opt-core",
    version="0.1.0",
    description="Hand-written Triton kernels, a thin OPT model and a sharding layer for OPT-style training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "opt_core", "opt_core.*", "dist", "dist.*",
                                    "bench", "bench.*"]),
    # Lower bounds only: an upper pin would fight the CUDA build of torch a user already has.
    # torch.library.custom_op / register_autograd / opcheck need torch 2.4; the GPU machine runs
    # torch 2.11 with Triton 3.6, CI pins Triton 3.6.
    install_requires=["torch>=2.4", "triton>=3.6", "numpy"],
    extras_require={
        "train": ["tokenizers", "matplotlib"],
        "hf": ["transformers", "tokenizers", "safetensors"],
        "test": ["pytest>=8", "pytest-benchmark", "transformers", "tokenizers", "safetensors", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "nvidia-ml-py"],
    },
    entry_points={
        "console_scripts": [
            "opt-core-bench=bench.__main__:main",
            "opt-core-compile-check=kernels.compile_check:main",
            "opt-core-train=opt_core.train:main",
        ],
    },
)
