"""xpuserve: serve the DeepSeek-R1 model family on Ascend NPUs, NVIDIA GPUs and CPUs."""

__version__ = "0.1.0"
