"""Run under torchrun by the distributed tests: every rank builds the engine for each case in a
spec file; rank 0 serves the prompts greedily, the others follow its steps. Each rank writes what
it computed and what it holds (parameter bytes, expert load) to <out>/<case>.rank<r>.json."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import weakref
from pathlib import Path

from xpuserve.config import EngineConfig
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.sampling_params import SamplingParams


def parameters(engine: LLMEngine) -> dict[str, list]:
    """name -> [bytes, shape] of every parameter this rank holds."""
    return {name: [p.nbytes, list(p.shape)] for name, p in engine.model.named_parameters()}


def sampling_params(i: int, max_tokens: int) -> SamplingParams:
    """Greedy; every third request also scores its prompt (more logit rows on every rank)."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=2 if i % 3 == 0 else None)


def prompt_scores(output) -> list[list[float]] | None:
    """[token id, logprob] of each scored prompt token."""
    return None if output.prompt_logprobs is None else [[e.token_id, e.logprob] for e in output.prompt_logprobs[1:]]


def serve_prompts(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list, list]:
    """The greedy outputs and prompt scores of every request."""
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt, sampling_params(i, n))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    outputs = [finished[str(i)] for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in outputs], [prompt_scores(o) for o in outputs]


def stop_during_long_step(engine: LLMEngine, seconds: float) -> None:
    """Shut down while another thread is inside a step that lasts `seconds` (it holds the step lock,
    as a long forward pass does): STOP goes out once the step ends."""
    inside = threading.Event()

    def long_step():
        with engine.worker.channel.lock:
            inside.set()
            time.sleep(seconds)

    threading.Thread(target=long_step).start()
    inside.wait()
    engine.shutdown()


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    for case in spec["cases"]:
        engine = LLMEngine(EngineConfig(model=spec["model"], dtype="float32", device="cpu", **case["engine_args"]))
        result = {"parameters": parameters(engine)}
        if engine.parallel.is_driver:
            result["outputs"], result["prompt_scores"] = serve_prompts(engine, spec["prompts"], spec["max_tokens"])
            result["tokens_computed"] = engine.worker.runner.num_tokens_computed
            if "last_step_s" in case:
                stop_during_long_step(engine, case["last_step_s"])
            else:
                engine.shutdown()
        else:
            engine.worker.run_follower()
        load = engine.worker.expert_load()
        if load is not None:
            result["tokens_per_expert"], result["tokens_per_rank"] = load.tokens_per_expert, load.tokens_per_rank
        rank, alive = engine.parallel.rank, weakref.ref(engine)
        del engine
        gc.collect()
        result["engine_freed"] = alive() is None  # its model and KV cache with it
        (Path(spec["out"]) / f"{case['name']}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
