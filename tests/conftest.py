import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Engines decode eagerly unless a test asks for the compiled step (enforce_eager=False, or this set to 0
# for a server): compiling every one of the suite's engines would take most of CI's time.
os.environ.setdefault("XPUSERVE_ENFORCE_EAGER", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny R1-shaped checkpoint with think tags that the server, CLI and bench tests share (read only)."""
    from server_fixture import build_reasoning_checkpoint

    path = tmp_path_factory.mktemp("tiny_r1")
    build_reasoning_checkpoint(path)
    return path
