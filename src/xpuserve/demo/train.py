"""Train the bundled demo model with xpuserve's own model code, deterministically, on a CPU.

    python -m xpuserve.demo.train --out src/xpuserve/demo/xpuserve-r1-demo

Each step packs a batch of conversations into one forward pass over a fresh KV cache, exactly
as the engine runs a prefill (autograd flows through the cache writes and reads), and takes the
loss on the assistant's tokens only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from xpuserve.config import ModelConfig
from xpuserve.demo import data
from xpuserve.demo.model import RouterBalancer, config_json, init_weights
from xpuserve.demo.tokenizer import CHAT_TEMPLATE, EOS, build_tokenizer, save_tokenizer, tokenizer_config
from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.generate import generate
from xpuserve.models import build_model
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.models.decoder import CausalLM
from xpuserve.tokenizer import Tokenizer
from xpuserve.weights.loader import expected_tensors


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    balance_gamma: float = 1e-3
    seed: int = 0
    log_every: int = 100


def demo_tokenizer() -> Tokenizer:
    return Tokenizer(build_tokenizer(), tokenizer_config())


def prompt_ids(tokenizer: Tokenizer, message: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_example(tokenizer: Tokenizer, problem: data.Problem, message: str) -> tuple[list[int], int]:
    """Token ids of the whole conversation and the length of its prompt."""
    prompt = prompt_ids(tokenizer, message)
    answer = tokenizer.encode(data.completion(problem), add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


def batch_loss(model: CausalLM, examples: list[tuple[list[int], int]]) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of a packed batch."""
    lengths = [len(ids) for ids, _ in examples]
    block = max(lengths)  # a contiguous cache: one block per sequence
    allocate_kv_cache(model, block * len(examples))
    ctx = ForwardContext.build([SequenceSlice(0, n, [i]) for i, n in enumerate(lengths)], block)
    ids = torch.tensor([t for seq, _ in examples for t in seq])
    # Position j predicts token j + 1; keep the positions whose next token belongs to the answer.
    predict, targets, offset = [], [], 0
    for seq, prompt_len in examples:
        predict.extend(range(offset + prompt_len - 1, offset + len(seq) - 1))
        targets.extend(seq[prompt_len:])
        offset += len(seq)
    hidden = model(ids, ctx)[torch.tensor(predict)]
    return F.cross_entropy(model.compute_logits(hidden), torch.tensor(targets))


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(settings: TrainSettings, log=print) -> tuple[CausalLM, float]:
    """Returns the trained model and the mean loss of the last logging window."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(settings, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(settings: TrainSettings, log) -> tuple[CausalLM, float]:
    torch.manual_seed(settings.seed)
    config = ModelConfig.from_dict(config_json())
    model = build_model(config, torch.float32, "cpu").train()
    init_weights(model, torch.Generator().manual_seed(settings.seed))
    balancer = RouterBalancer(model, settings.balance_gamma)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    tokenizer = demo_tokenizer()
    stream = data.training_stream(data.SEED + settings.seed)
    start, window = time.monotonic(), []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        examples = [encode_example(tokenizer, p, m) for p, m in islice(stream, settings.batch_size)]
        loss = batch_loss(model, examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        imbalance = balancer.update()
        window.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            log(
                f"step {step + 1}/{settings.steps}  loss {sum(window) / len(window):.2e}  "
                f"max/mean expert load {max(imbalance):.2f}  {time.monotonic() - start:.0f}s"
            )
            final_loss, window = sum(window) / len(window), []
    return model.eval(), final_loss


def parse_answer(text: str) -> str:
    """The answer is whatever follows the thought."""
    return text.rpartition("</think>")[2].strip()


@torch.no_grad()
def accuracy(model: CausalLM, problems: list[data.Problem], batch_size: int = 200) -> float:
    """Greedy exact-answer accuracy on `problems`, typed without spaces."""
    tokenizer, correct = demo_tokenizer(), 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [prompt_ids(tokenizer, f"{p.a}{p.op}{p.b}") for p in chunk]
        outputs = generate(model, prompts, max_new_tokens=64, stop_token_ids=[tokenizer.eos_token_id])
        correct += sum(parse_answer(tokenizer.decode(o)) == str(p.answer) for o, p in zip(outputs, chunk))
    return correct / len(problems)


def save(model: CausalLM, out_dir: Path) -> None:
    """A Hugging Face checkpoint folder: tensor names as DeepSeek's checkpoints spell them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: view.detach().contiguous().clone() for name, view in expected_tensors(model).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train xpuserve's bundled demo model (3-digit arithmetic).")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint to")
    defaults = TrainSettings()
    for field in ("steps", "batch_size", "lr", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(getattr(defaults, field)), default=getattr(defaults, field))
    parser.add_argument("--eval", type=int, default=500, help="held-out problems to measure accuracy on (0: skip)")
    args = parser.parse_args(argv)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    start = time.monotonic()
    model, loss = train(settings)
    print(f"trained in {time.monotonic() - start:.0f}s, final loss {loss:.2e}")
    save(model, args.out)
    print(f"wrote {args.out}")
    if args.eval:
        print(f"held-out accuracy: {accuracy(model, data.held_out()[: args.eval]):.3f} on {args.eval} problems")


if __name__ == "__main__":
    main()
