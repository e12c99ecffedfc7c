"""The bundled demo model: a tiny DeepSeek-V3 that thinks through 3-digit arithmetic, trained by `train.py`."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "xpuserve-r1-demo"

__all__ = ["MODEL_DIR"]
