"""`moeray` command line. Bad arguments exit with code 2 and a one-line message."""

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float32")  # torch dtype names; torch is imported only once arguments are good


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeray", description="Serve Mixture-of-Experts LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate text from a prompt, in-process",
                         description="Generate text from a prompt. Streams to the terminal; --json prints one object.")
    gen.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in model)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids, e.g. 1,2,3")
    gen.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    gen.add_argument("--json", action="store_true", help='print one JSON object: {"token_ids", "text", ...}')
    gen.set_defaults(func=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from moeray.actors.engine import Engine
    from moeray.actors.sequence import SamplingParams
    from moeray.models import DEFAULT_MODEL_DIR, load_model
    from moeray.models.tokenizer import Tokenizer

    path = args.model or DEFAULT_MODEL_DIR
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r}: no such checkpoint folder")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() or args.prompt is not None else None
    prompt_ids = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
    model = load_model(path, getattr(torch, args.dtype), progress=None if args.json else _progress)
    engine = Engine(model, tokenizer)
    seq_id = engine.add_request(prompt_ids, params)
    if not args.json and args.prompt is not None:
        print(args.prompt, end="", flush=True)
    token_ids, text, reason = [], "", None
    while engine.has_unfinished:
        for out in engine.step():
            if out.seq_id != seq_id:
                continue
            token_ids += out.new_token_ids
            text += out.new_text
            reason = out.finish_reason
            if not args.json:
                print(out.new_text, end="", flush=True)
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": text, "prompt_ids": prompt_ids, "finish_reason": reason}))
    else:
        print()
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rloading weights: layer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad checkpoint, config or request values: the user's to fix
        print(f"moeray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
