"""Run under torchrun by the distributed tests: every rank builds the engine for each case in a
spec file; rank 0 serves the prompts greedily, the others follow its steps. Each rank writes what
it computed and what it holds (parameter bytes, expert load) to <out>/<case>.rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from xpuserve.config import EngineConfig
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.sampling_params import SamplingParams


def parameters(engine: LLMEngine) -> dict[str, list]:
    """name -> [bytes, shape] of every parameter this rank holds."""
    return {name: [p.nbytes, list(p.shape)] for name, p in engine.model.named_parameters()}


def serve_prompts(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [outputs[str(i)] for i in range(len(prompts))]


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    for case in spec["cases"]:
        engine = LLMEngine(EngineConfig(model=spec["model"], dtype="float32", device="cpu", **case["engine_args"]))
        result = {"parameters": parameters(engine)}
        if engine.parallel.is_driver:
            result["outputs"] = serve_prompts(engine, spec["prompts"], spec["max_tokens"])
            result["tokens_computed"] = engine.runner.num_tokens_computed
            engine.shutdown()
        else:
            engine.run_worker()
        load = engine.expert_load()
        if load is not None:
            result["tokens_per_expert"], result["tokens_per_rank"] = load.tokens_per_expert, load.tokens_per_rank
        out = Path(spec["out"]) / f"{case['name']}.rank{engine.parallel.rank}.json"
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
