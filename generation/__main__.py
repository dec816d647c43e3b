"""Command line: `python -m generation "What is the capital of France?"` streams the reply to stdout.

It answers through the app's own chat engine (`ChatEngine`: the same prompt, sampling, stop
strings and fast decode as the Chat tab), its loop in the main thread as `python app.py` runs it,
so a reply here is the reply the app gives one user, at the same speed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the CLI's errors are one clear line (see --help for usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI's options (see --help)."""
    p = _OneLineParser(
        prog="python -m generation", description="Chat with a 4-bit (NF4) quantized causal LM, streaming the reply."
    )
    p.add_argument("message", nargs="?", help="the user message (omit with --info)")
    p.add_argument("--model", help="HF model id or local folder (default: MODEL_ID or the embedded Gemma 3 270m)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=0, help="the reply cannot end before this many tokens")
    p.add_argument("--system", default=None, help="system prompt (default: the built-in one for base models)")
    p.add_argument("--no-4bit", action="store_true", help="load full precision instead of NF4")
    p.add_argument("--info", action="store_true", help="print the model report (and then answer, if a message is given)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr after the reply")
    return p.parse_args(argv)


def answer(lm, message: str, *, system: str | None, params, fast: bool = True):
    """Stream the reply to `message` to stdout through a ChatEngine whose loop runs in this (the
    main) thread while another thread reads the reply; returns its ReplyStats. The engine's
    one-time set-up (the lean decode, the warm-up prompt) runs first, outside the reply's timing."""
    from .backends import ChatEngine, ReplyStats

    engine = ChatEngine(lm, max_batch=1, fast=fast, autostart=False)
    engine.run_here(until_idle=True)  # set-up and warm-up; returns once idle
    stats = ReplyStats()
    errors: list[BaseException] = []

    def read() -> None:
        shown = ""
        try:
            for text in engine.stream_reply(message, system=system, params=params, stats=stats):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        except BaseException as exc:  # raised in the main thread below
            errors.append(exc)
        finally:
            engine.close()  # ends run_here() below

    reader = threading.Thread(target=read, name="cli_reply", daemon=True)
    reader.start()
    try:
        engine.run_here()
    except RuntimeError:  # closed before the loop began: the reader's error says why
        reader.join()
        if not errors:
            raise
    reader.join()
    if errors:
        raise errors[0]
    return stats


def say_first_start(stage: str) -> None:
    """load_model's progress for the CLI: stderr stays quiet on a later start, while a first start
    (the conversion and the rounding, about a minute and a half) says on stderr where it is."""
    from .model import LOADING

    if stage != LOADING:
        print(stage, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 failure)."""
    args = parse_args(argv)
    try:
        import logging

        from transformers.utils import logging as hf_logging

        # stdout carries only the reply; keep stderr to one line on error (no progress bars/notices)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

        from .model import load_model
        from .sampling import SamplingParams
        from .settings import Settings

        if args.message is None and not args.info:
            raise ValueError("give a message to answer, or --info")
        if args.message is not None and not args.message.strip():
            raise ValueError("message must be a non-empty string")
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            min_new_tokens=args.min_new_tokens,
        )
        settings = Settings.from_env()
        lm = load_model(args.model, load_4bit=settings.load_4bit and not args.no_4bit, settings=settings,
                        progress=say_first_start)
        if args.info:
            print(lm.report(), flush=True)
        if args.message is None:
            return 0
        stats = answer(lm, args.message, system=args.system, params=params, fast=settings.fast_decode)
        sys.stdout.write("\n")
        if args.stats:
            print(stats, file=sys.stderr)
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line instead of a stack trace
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
