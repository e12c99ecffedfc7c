"""xpuserve: serve the DeepSeek-R1 model family on Ascend NPUs, NVIDIA GPUs and CPUs."""

__version__ = "0.1.0"

from xpuserve.llm import LLM  # noqa: E402
from xpuserve.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]
