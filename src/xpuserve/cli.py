"""Command line: `xpuserve <subcommand> ...`, one small function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from xpuserve.bench.client import EndpointError
from xpuserve.config import ConfigError
from xpuserve.generate import generate
from xpuserve.platforms import DeviceError
from xpuserve.tokenizer import ChatTemplateError, Tokenizer
from xpuserve.weights import CheckpointError, load_model
from xpuserve.weights.format import QUANTIZATIONS

# Errors that mean "this model folder (or endpoint) cannot be used": reported in one line, exit code 2.
USER_ERRORS = (ConfigError, CheckpointError, ChatTemplateError, DeviceError, EndpointError, FileNotFoundError, FileExistsError,
               ValueError)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def completion_text(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """Text the output adds after the prompt; decoding the output alone would lose a leading space."""
    prefix = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + output_ids)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(output_ids)


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_model(args.model_dir, dtype=args.dtype, device=args.device, quantization=args.quantization)
    print(f"xpuserve: {model.serving_format.describe()}", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_pretrained(args.model_dir)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    outputs = generate(model, prompts, args.max_tokens, args.temperature, stop_token_ids=stop, seed=args.seed)
    for i, (text, ids, out) in enumerate(zip(args.prompt, prompts, outputs)):
        if i:
            print()
        print(text + completion_text(tokenizer, ids, out), flush=True)


def default_model() -> str:
    """The bundled demo model, when the package has one."""
    try:
        from xpuserve.demo import MODEL_DIR
    except ImportError:
        raise FileNotFoundError("no MODEL_DIR given and this xpuserve has no bundled demo model") from None
    return str(MODEL_DIR)


def cmd_serve(args: argparse.Namespace) -> None:
    from xpuserve.server.launch import serve

    serve(args.model_dir or default_model(), args)


def cmd_chat(args: argparse.Namespace) -> None:
    from xpuserve.chat import chat_loop
    from xpuserve.engine.llm_engine import LLMEngine
    from xpuserve.sampling_params import SamplingParams
    from xpuserve.server.launch import engine_config

    engine = LLMEngine(engine_config(args.model_dir or default_model(), args))
    if not engine.parallel.is_driver:  # under torchrun: rank 0 talks, the others follow its steps
        engine.worker.run_follower()
        return
    chat_loop(engine, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed))


def cmd_convert(args: argparse.Namespace) -> None:
    from xpuserve.weights.convert import convert_checkpoint, parse_size

    stats = convert_checkpoint(args.src, args.dst, args.to, parse_size(args.max_shard_size))
    print(f"wrote {stats.tensors} tensors ({stats.int8_tensors} as int8), {stats.nbytes / 1e9:.2f} GB "
          f"in {len(stats.shards)} shard(s) to {args.dst}")
    if stats.mtp_skipped:
        print(f"left out {stats.mtp_skipped} tensors of multi-token-prediction layers (xpuserve does not run MTP)")
    if stats.copied:
        print(f"copied {', '.join(stats.copied)}")


def cmd_env(args: argparse.Namespace) -> None:
    import json

    from xpuserve.env import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xpuserve", description="Serve the DeepSeek-R1 model family.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train-demo", help="retrain the bundled demo model (python -m xpuserve.demo.train --help)")

    gen = sub.add_parser("generate", help="complete prompts offline and print the text")
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    gen.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per prompt (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or npu[:N]")
    gen.add_argument("--dtype", default="auto", choices=DTYPES)
    gen.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None)
    gen.set_defaults(func=cmd_generate)

    from xpuserve.server.launch import add_engine_args, add_serve_args

    chat = sub.add_parser("chat", help="talk to a model in the terminal (thought dimmed, answer plain)")
    chat.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="Hugging Face checkpoint folder (default: the demo model)")
    chat.add_argument("--max-tokens", type=positive_int, default=1024, help="longest reply in tokens (default 1024)")
    chat.add_argument("--temperature", type=float, default=0.6, help="0 means greedy (default 0.6, as DeepSeek recommends for R1)")
    chat.add_argument("--seed", type=int, default=None)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    srv.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="Hugging Face checkpoint folder (default: the demo model)")
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)

    from xpuserve.planner.cli import add_planner_commands

    add_planner_commands(sub)  # plan, calibrate

    from xpuserve.bench.cli import add_bench_command

    add_bench_command(sub)

    from xpuserve.weights.convert import DEFAULT_MAX_SHARD_SIZE, TARGETS

    conv = sub.add_parser("convert", help="rewrite a checkpoint once, offline, as bf16 or int8")
    conv.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (bf16, float32 or DeepSeek's FP8)")
    conv.add_argument("dst", metavar="DST", help="new or empty folder for the converted checkpoint")
    conv.add_argument("--to", required=True, choices=TARGETS, help="bf16, or int8 weights with per-row scales")
    conv.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help=f"largest shard file (default {DEFAULT_MAX_SHARD_SIZE})")
    conv.set_defaults(func=cmd_convert)

    env = sub.add_parser("env", help="print versions, devices and the formats auto would choose (for bug reports)")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-demo"]:  # its own flags live with the training code
        from xpuserve.demo.train import main as train_demo

        train_demo(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except USER_ERRORS as e:
        print(f"xpuserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xpuserve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xpuserve plan ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no flush error at exit
    return 0
