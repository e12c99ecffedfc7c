"""`xpuserve env` as a real subprocess: versions, each platform available or why not, auto choices."""

import json
import subprocess
import sys

import pytest
import torch

from xpuserve.platforms import PLATFORMS


def run_env(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "xpuserve", "env", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def env_json() -> dict:
    return json.loads(run_env("--json").stdout)


def test_env_text_names_versions_and_platforms():
    out = run_env().stdout
    assert f"torch: {torch.__version__}" in out
    assert "cpu: available, 1 device(s)" in out
    for name, cls in PLATFORMS.items():
        assert f"{name}: available" in out or f"{name}: not available: {cls.unavailable_reason()}" in out
    assert "--device auto: " in out
    for kind in ("bf16", "fp8", "int8"):
        assert f"--dtype auto, {kind} checkpoint: weights " in out


def test_env_json(env_json):
    assert {"xpuserve", "python", "os", "torch", "torch_build", "torch_npu", "cann", "platforms", "auto"} <= set(env_json)
    assert env_json["torch"] == torch.__version__
    assert set(env_json["platforms"]) == set(PLATFORMS)
    cpu = env_json["platforms"]["cpu"]
    assert cpu["available"] and cpu["devices"][0]["name"] and cpu["devices"][0]["total_bytes"] is None
    assert {"supported_dtypes", "matmul_kinds", "int8_activations", "dist_backend"} <= set(cpu)
    for name in ("cuda", "npu"):
        info = env_json["platforms"][name]
        assert info["available"] == PLATFORMS[name].is_available()
        if not info["available"]:
            assert info["reason"] == PLATFORMS[name].unavailable_reason()
    if env_json["torch_npu"] == "not installed":
        assert "torch_npu" in env_json["platforms"]["npu"]["reason"]
    assert env_json["auto"]["device"] == next(k for k, cls in PLATFORMS.items() if cls.is_available())
    assert env_json["auto"]["formats"]["int8"].startswith("weights int8")
