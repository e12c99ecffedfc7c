"""Checks every generating endpoint makes before it touches the engine."""

from __future__ import annotations

from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.sampling_params import SamplingParams
from xpuserve.server.errors import APIError


def check_model(name: str | None, config) -> None:
    if name is not None and name != config.served_model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{config.served_model_name}'", "model", "model_not_found")


def sampling_params(body) -> SamplingParams:
    try:
        return body.to_sampling_params()
    except ValueError as e:
        raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None


def check_queue(engine: AsyncEngine, prompts: int, n: int) -> None:
    """A request of more sequences than the server queues would be refused with 429 however long
    the client waited: a 400 instead."""
    sequences, most = prompts * n, engine.max_waiting
    if sequences <= max(most, 1):
        return
    if prompts == 1:
        raise APIError(400, f"n={n} is more sequences than this server queues ({most})", "n")
    raise APIError(400, f"{prompts} prompt(s) with n={n} are {sequences} sequences, more than this server "
                        f"queues ({most}); send smaller batches", "prompt" if n == 1 else "n")
