from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron_most",
    version="0.1.0",
    description="MoST (speech+text LLM with a Modality-Aware MoE) on Megatron-Core: TP/EP/PP/SP, CPU and GPU",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_most", "megatron_most.*"]),
    install_requires=[
        "torch>=2.6",  # CI: the CPU build 2.13.0 (constraints.txt); GPU users keep their CUDA build
        "megatron-core==0.16.1",  # pinned: megatron_most.platform.version refuses any other
        "psutil",  # megatron-core's checkpoint saves import it without declaring it
        "numpy",
        "safetensors",
        "transformers>=5.15,<6",  # DeepseekV2 before 5.15 computes other logits; remote code tested 5.15-5.24
        "matplotlib",
        "nvidia-dali-cuda120",  # audio decoding/resampling; CPU pipelines run without a GPU
        "soundfile",  # header probing and mp3 decoding (DALI's decoder lacks mp3)
        "sentencepiece",
        "scikit-learn",  # MiniBatchKMeans for the HuBERT unit codebook
        "jiwer",
        "whisper-normalizer>=0.1,<0.2",  # only its english.json: the Whisper normaliser's spelling table (eval/normalize.py)
        "tqdm",
        "pyyaml",  # --config FILE.yaml of tools/pretrain_most.py
        "tensorboard",  # TensorBoard event files (training/metrics.py, torch.utils.tensorboard)
        "wandb",  # offline without WANDB_API_KEY (training/metrics.py)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff"],
    },
)
