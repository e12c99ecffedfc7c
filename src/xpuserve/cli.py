"""Command line: `xpuserve <subcommand> ...`. Every subcommand is registered the same way, by an
`add_..._command(sub)` that sets `func`: this module's for the engine's, bench/cli.py's and planner/cli.py's.

The engine's commands import what they run inside `func`: the engine brings torch, and
`xpuserve bench`, `xpuserve plan` and every `--help` should not wait for it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from xpuserve.bench import cli as bench_cli
from xpuserve.bench.client import EndpointError
from xpuserve.config import CONVERT_TARGETS
from xpuserve.demo import MODEL_DIR
from xpuserve.engine_args import add_engine_args, engine_kwargs, positive_int
from xpuserve.planner import cli as planner_cli
from xpuserve.sampling_params import SamplingParams

# Errors that mean "this model folder (or endpoint) cannot be used": reported in one line, exit code 2.
# ConfigError, CheckpointError and ChatTemplateError are ValueErrors; DeviceError: see device_error().
USER_ERRORS = (EndpointError, FileNotFoundError, FileExistsError, ValueError)
DEFAULT_MAX_SHARD_SIZE = "5GB"


def device_error() -> type[Exception]:
    from xpuserve.platforms import DeviceError  # torch: asked for only once a command has raised

    return DeviceError


def add_train_demo_command(sub) -> None:
    sub.add_parser("train-demo", help="retrain the bundled demo model (python -m xpuserve.demo.train --help)")


def cmd_generate(args: argparse.Namespace) -> None:
    from xpuserve.llm import LLM

    llm = LLM(args.model_dir, **engine_kwargs(args))
    print(f"xpuserve: {llm.engine.info.serving_format}", file=sys.stderr, flush=True)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for i, (prompt, output) in enumerate(zip(args.prompt, llm.generate(args.prompt, params))):
        if i:
            print()
        print(prompt + output.outputs[0].text, flush=True)


def add_generate_command(sub) -> None:
    gen = sub.add_parser("generate", help="complete prompts offline and print the text")
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    gen.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per prompt (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)


def cmd_chat(args: argparse.Namespace) -> None:
    from xpuserve.chat import chat_loop
    from xpuserve.llm import LLM

    llm = LLM(args.model_dir or MODEL_DIR, **engine_kwargs(args))  # under torchrun, only rank 0 returns
    chat_loop(llm.engine, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed))


def add_chat_command(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a model in the terminal (thought dimmed, answer plain)")
    chat.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="Hugging Face checkpoint folder (default: the demo model)")
    chat.add_argument("--max-tokens", type=positive_int, default=1024, help="longest reply in tokens (default 1024)")
    chat.add_argument("--temperature", type=float, default=0.6, help="0 means greedy (default 0.6, as DeepSeek recommends for R1)")
    chat.add_argument("--seed", type=int, default=None)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)


def cmd_serve(args: argparse.Namespace) -> None:
    from xpuserve.server.launch import serve

    serve(args.model_dir or str(MODEL_DIR), args)


def add_serve_command(sub) -> None:
    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    srv.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="Hugging Face checkpoint folder (default: the demo model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="model name clients use (default: the folder name)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize")
    srv.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead of the model's")
    srv.add_argument("--reasoning-parser", choices=("auto", "deepseek_r1", "none"), default="auto",
                     help="split <think>...</think> into reasoning_content; auto: on when the tokenizer has the think tokens")
    srv.add_argument("--max-waiting-requests", type=int, default=1024, help="beyond this many waiting, answer 429")
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)


def cmd_convert(args: argparse.Namespace) -> None:
    from xpuserve.weights.convert import convert_checkpoint, parse_size

    stats = convert_checkpoint(args.src, args.dst, args.to, parse_size(args.max_shard_size))
    print(f"wrote {stats.tensors} tensors ({stats.int8_tensors} as int8), {stats.nbytes / 1e9:.2f} GB "
          f"in {len(stats.shards)} shard(s) to {args.dst}")
    if stats.mtp_skipped:
        print(f"left out {stats.mtp_skipped} tensors of multi-token-prediction layers (xpuserve does not run MTP)")
    if stats.copied:
        print(f"copied {', '.join(stats.copied)}")


def add_convert_command(sub) -> None:
    conv = sub.add_parser("convert", help="rewrite a checkpoint once, offline, as bf16 or int8")
    conv.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (bf16, float32 or DeepSeek's FP8)")
    conv.add_argument("dst", metavar="DST", help="new or empty folder for the converted checkpoint")
    conv.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="bf16, or int8 weights with per-row scales")
    conv.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help=f"largest shard file (default {DEFAULT_MAX_SHARD_SIZE})")
    conv.set_defaults(func=cmd_convert)


def cmd_env(args: argparse.Namespace) -> None:
    from xpuserve.env import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))


def add_env_command(sub) -> None:
    env = sub.add_parser("env", help="print versions, devices and the formats auto would choose (for bug reports)")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(func=cmd_env)


COMMANDS = (add_train_demo_command, add_generate_command, add_chat_command, add_serve_command,
            planner_cli.add_planner_commands, bench_cli.add_bench_command, add_convert_command, add_env_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xpuserve", description="Serve the DeepSeek-R1 model family.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
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
    except KeyboardInterrupt:
        print("xpuserve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xpuserve plan ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no flush error at exit
    except USER_ERRORS as e:
        return user_error(e)
    except device_error() as e:  # an except clause is evaluated only when reached
        return user_error(e)
    return 0


def user_error(e: Exception) -> int:
    print(f"xpuserve: error: {e}", file=sys.stderr)
    return 2
