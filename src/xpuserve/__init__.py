"""xpuserve: serve the DeepSeek-R1 model family on Ascend NPUs, NVIDIA GPUs and CPUs."""

from xpuserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # PEP 562: `LLM` brings in torch and the engine, so it loads on first use; `import xpuserve.bench`
    # and `import xpuserve.planner` stay light.
    if name == "LLM":
        from xpuserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'xpuserve' has no attribute {name!r}")
