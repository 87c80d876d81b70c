"""compodistill: fused visual-attention distillation for vision-language models."""
from setuptools import find_packages, setup

# The Triton kernels live in compodistill/kernels/, never in a top-level `kernels` folder:
# that name belongs to Hugging Face's `kernels` package (a transformers dependency), which a
# folder of ours at the repository root would shadow whenever the root is on sys.path.
setup(
    name="compodistill",
    version="0.1.0",
    description="Fused Triton kernels and trainers for visual-attention distillation of VLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["compodistill", "compodistill.*"]),
    # The demo's tiny pretrained teacher (1.2 MB; demo_teacher/provenance.json says how it
    # was trained, by `compodistill demo --teacher-steps 3000`).
    package_data={"compodistill.apps": ["demo_teacher/*"]},
    # torch 2.11 (GPU image) .. 2.13 (CPU machines); triton 3.6 .. 3.9 ship with them.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        # The tests run the TRL integration and the ZeRO-2/3 chain (tests/test_zero.py).
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "trl==1.16.0",
                "deepspeed==0.19.8"],
        # compodistill.integrations.trl overrides a private hook of TRL's DistillationTrainer
        # (its per-micro-batch loss), so the version is pinned; 1.16.0 runs on transformers 5.25.
        "trl": ["trl==1.16.0"],
        # ZeRO-2/3 (docs/distributed.md#deepspeed); tested with 0.19.8, which installs in
        # seconds (an sdist; no ops are built at install, DeepSpeed compiles its small CPU op
        # once on first use).
        "deepspeed": ["deepspeed==0.19.8"],
        "train": [
            "transformers>=5.0,<6",  # AttentionInterface per sub-config, set_attn_implementation
            "accelerate>=1.0",
            "peft>=0.13",
            "safetensors>=0.4",
            "pillow>=10",
            "tqdm>=4.66",
            "matplotlib>=3.8",
        ],
    },
    entry_points={"console_scripts": ["compodistill=compodistill.cli:main"]},
)
