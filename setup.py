"""Package metadata. `install_requires` stays small: plotting, TensorBoard and progress bars are extras.

torch is deliberately unpinned here: the Makefile installs `torch==2.13.0` (CPU wheel) first on machines
without CUDA, and an already-installed torch satisfies this requirement, so pip never pulls CUDA wheels.
"""
from setuptools import find_packages, setup

setup(
    name="distill",
    version="0.1.0",
    description="Performance-focused LLM distillation trainer: MoE teacher -> Mistral-class student, then domain alignment",
    python_requires=">=3.10",
    # every subpackage (train.data, train.teachers, ...): a plain `pip install .` must not miss a new room
    packages=find_packages(include=["kernels", "kernels.*", "model", "model.*", "train", "train.*", "bench", "bench.*"]),
    install_requires=[
        "torch>=2.4",
        'triton>=3.2; platform_system == "Linux"',
        "transformers>=4.46",
        "safetensors>=0.4",
        "datasets>=2.19",
        "numpy>=1.24",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "progress": ["tqdm>=4.60"],
        "tensorboard": ["tensorboard>=2.14"],
        "test": ["pytest>=7.4", "matplotlib>=3.7", "tqdm>=4.60", "tensorboard>=2.14"],
    },
)
