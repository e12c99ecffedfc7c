from xpuserve.weights.checkpoint import Checkpoint, CheckpointError
from xpuserve.weights.loader import load_model, load_weights

__all__ = ["Checkpoint", "CheckpointError", "load_model", "load_weights"]
