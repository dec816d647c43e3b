"""Shared fixtures: the real default model (loaded once per session), a tiny chat-template model,
the running app with its `client` and browser `page`; and the markers that say what a test needs.

Everything runs offline: HF_HUB_OFFLINE is forced on, so nothing tries to reach a model hub.

Markers: a test that uses the real model or the real app (through the fixtures below) is marked
`slow`, one that drives chromium `browser`, here from its fixtures, so no test can forget its
marker; tests that start their own app or load the model themselves carry the marker explicitly.
`python -m pytest -m "not slow and not browser"` is the contributors' fast loop.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# pytest.ini runs two pytest-xdist workers. Each worker's torch, and the app processes its tests
# start, use one thread: two workers then fill two cores, where two threads each make the workers
# wait on each other (README.md, "Tests", has the times). A test of what threads do, or of the
# OpenMP kernels, asks for more with `@pytest.mark.torch_threads(n)`.
# A test that asks for two threads shares the cores with the other worker: OpenMP threads that spin
# while they wait for a descheduled partner then cost more than they compute, so they sleep instead
# (README.md, "Tests").
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCH_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["TORCH_NUM_THREADS"])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from apputil import app_page, app_server, browser  # noqa: E402,F401  (fixtures, shared by every module)

# Fixtures that load the real default model (here or in a `transformers serve` process) or start the real app.
SLOW_FIXTURES = frozenset({"lm4", "lm_full", "fast_model", "int8_head", "app_server", "remote_app", "openai_server"})
BROWSER_FIXTURES = frozenset({"browser"})


# What the default 4-bit model went through before this process loaded it: the controller's first
# start (below), handed to the workers through the environment they inherit.
_FIRST_START_ENV = "ATTN_LAB_TEST_FIRST_START"


def pytest_sessionstart(session):
    """On a machine without the default model's cached snapshots (a fresh clone, as in CI), build them
    here, in the xdist controller, before the workers start, on every core. Otherwise the first
    worker to need the model builds them on its one thread while every other test that needs the
    model, in the other worker or the app it starts, waits on the cache's lock with its core idle.
    Nothing is built for a run without the real model (`-m "not slow"`), a collection only, or one
    process (`-n 0`: its own first load builds them, on every core)."""
    config = session.config
    if (os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("numprocesses", default=None)
            or config.getoption("collectonly") or "not slow" in (config.getoption("markexpr") or "")):
        return
    from generation import Settings
    from generation.model import calibrated_snapshot, default_snapshot

    stages: list[str] = []
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(stage: str) -> None:
        stages.append(stage)
        if reporter is not None:
            reporter.write_line(f"the default model, {stage}")

    t0 = time.monotonic()
    try:
        settings = Settings.from_env()
        if settings.nf4_rounding == "calibrated":
            calibrated_snapshot(settings, progress=say)
        else:
            default_snapshot(settings, progress=say)
    except Exception as exc:  # the tests that need the model fail with the reason, each where it loads
        if reporter is not None:
            reporter.write_line(f"the default model's snapshots could not be built before the workers: {exc}")
        return
    if stages and reporter is not None:  # outside the session's own time, which starts after this hook
        reporter.write_line(f"the default model's snapshots built in {time.monotonic() - t0:.0f} s, before the workers")
    os.environ[_FIRST_START_ENV] = json.dumps(stages)


def pytest_collection_modifyitems(config, items):
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if needs & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if needs & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


# pytest.ini hands whole test files to the two workers (`--dist loadfile`), so a module's app, server
# or browser starts once. Files that share a costly session fixture go to one worker together, so
# that it starts there only.
SAME_WORKER = {"tests/test_remote.py": "openai_server", "tests/test_app_remote.py": "openai_server"}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SAME_WORKER.get(file, file)

    return FileScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _scratch_tmp(tmp_path_factory):
    """Temporary files of this session, and of the apps, servers and browser it starts (their logs,
    download folders, gradio's cache), under pytest's own temporary folder: pytest keeps the last
    three sessions' and removes older ones, so runs leave nothing behind in the system's."""
    import tempfile

    scratch = str(tmp_path_factory.mktemp("tmp", numbered=False))
    with pytest.MonkeyPatch.context() as mp:  # both put back at the end of the session
        mp.setenv("TMPDIR", scratch)
        mp.setattr(tempfile, "tempdir", scratch)
        yield scratch


@pytest.fixture(scope="session", autouse=True)
def _worker_threads():
    """A worker's torch on TORCH_NUM_THREADS (one, set above), however torch was imported first."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["TORCH_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _torch_threads(request, _worker_threads):
    """torch's threads for one test, as its `torch_threads(n)` marker asks; put back afterwards."""
    mark = request.node.get_closest_marker("torch_threads")
    if mark is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(mark.args[0])
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def client(app_server):  # noqa: F811
    """A gradio_client on the session's app (the real default model loaded)."""
    from gradio_client import Client

    return Client(app_server.url, verbose=False)


@pytest.fixture
def page(browser, app_server):  # noqa: F811
    """A fresh browser session on the app, once the model is loaded (the status line says 4-bit)."""
    with app_page(browser, app_server.url,
                  "document.querySelector('#status-line').innerText.includes('4-bit: on')") as pg:
        yield pg

# ChatML, as Qwen2.5-Instruct's template renders it (system message supported).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY_CORPUS = [
    "The capital of France is Paris.",
    "Attention weights are a softmax over scaled dot products of queries and keys.",
    "user assistant system: hello, how are you today? I am fine, thank you.",
    "Write a haiku about transformers. Explain self-attention in one paragraph.",
]


def native_kernel(load, name: str, detail: str):
    """The native kernel `load()` gives (a kernels module's loader), asserting that it runs natively
    with status `detail`; the test is skipped where no C compiler exists."""
    import shutil

    from generation.kernels import KernelStatus

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    kernel, status = load()
    assert status == KernelStatus(name, True, detail), str(status)
    return kernel


BENCH_QUESTION_SETS = ("questions.tsv", "questions_heldout.tsv", "questions_arithmetic.tsv")


def bench_questions() -> list[str]:
    """Every question bench/chat_quality.py asks (its three sets), lowercased: what neither the
    system text's examples nor the calibration text may contain."""
    bench = Path(__file__).parents[1] / "bench"
    return [
        line.split("\t")[0].strip().lower()
        for name in BENCH_QUESTION_SETS
        for line in (bench / name).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


def build_tiny_tokenizer():
    """A byte-level BPE (~300 tokens) trained offline on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def save_tiny_lm(folder: Path, config_cls=None, model_cls=None, **overrides) -> Path:
    """Save a random tiny causal LM + the tiny tokenizer into `folder` (default: Qwen2, hidden 64,
    2 layers, 4 heads, 2 KV heads); pass e.g. Gemma3TextConfig/Gemma3ForCausalLM and config overrides
    for another architecture."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = (config_cls or Qwen2Config)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = (model_cls or Qwen2ForCausalLM)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_qwen(folder: Path) -> Path:
    """Save a random tiny Qwen2 (hidden 64, 2 layers, 4 heads, 2 KV heads) + tokenizer into `folder`."""
    return save_tiny_lm(folder)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Qwen2 causal LM and a ChatML-template tokenizer (built in ~1 s)."""
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


# The stages this session's first load of the default 4-bit model went through: the controller's
# first start where it built the snapshots (pytest_sessionstart), then this worker's own load.
LM4_STAGES: list[str] = json.loads(os.environ.get(_FIRST_START_ENV, "[]"))


@pytest.fixture(scope="session")
def lm4():
    """The default model (embedded Gemma 3 270m) in 4-bit NF4, loaded once per session.

    Uses the real cache (ATTN_LAB_CACHE or ~/.cache/attention-lab): the first run ever converts the
    GGUF and rounds it (~1.5 min), later sessions load in seconds (LM4_STAGES: what it went
    through). Shared: treat as read-only.
    """
    from generation import DEFAULT_MODEL_ID, Settings, load_model

    return load_model(DEFAULT_MODEL_ID, load_4bit=True, settings=Settings.from_env(), progress=LM4_STAGES.append)


@pytest.fixture(scope="session")
def lm_full():
    """The default model in full precision as fp32 (the exact upcast of the cached bf16 snapshot: the
    highest-precision reference for 4-bit comparisons), loaded once per session on first use.
    Note: load_model(load_4bit=False) on CPU gives bf16 (faster here); this fixture asks for fp32."""
    import torch

    from generation import DEFAULT_MODEL_ID, Settings, load_model

    return load_model(DEFAULT_MODEL_ID, load_4bit=False, settings=Settings.from_env(), dtype=torch.float32)


@pytest.fixture(scope="session")
def fast_model(lm4):
    """The default NF4 model, where the lean decode (generation/decode/) can run it here; skips
    otherwise (it needs bitsandbytes' AVX512-BF16 CPU kernel)."""
    from generation.decode import fast_path_supported

    why = fast_path_supported(lm4.model)
    if why is not None:
        pytest.skip(why)
    return lm4.model


@pytest.fixture(scope="session")
def int8_head(fast_model):
    """The int8 copy of the default model's LM head (the layout the native kernel wants, if built)."""
    from generation.decode import quantize_lm_head

    return quantize_lm_head(fast_model)


def hf_kept_mask(scores, top_k: int, top_p: float):
    """(V,) bool: the tokens transformers' TopKLogitsWarper then TopPLogitsWarper leave finite in one
    row of scaled scores (V,): the reference kept set of the sampler tests."""
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    s = scores.unsqueeze(0)
    if top_k > 0:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(None, s)
    return torch.isfinite(s[0])


def prefilled_cache(step, prompts):
    """Each prompt (P,) prefilled alone by `step` (a generation.decode ModelStep) into one row of a
    shared SlotKVCache: (cache, lengths, greedy first tokens). For the fast-path tests, which then
    decode the rows through the model path and the lean step side by side."""
    import torch

    from generation.decode import SlotKVCache

    cache = SlotKVCache(step.n_layers, len(prompts), 64)
    lens, first, done = [], [], {}  # done: a prompt's ids -> (its row, its first token); a prefill is deterministic
    for b, ids in enumerate(prompts):
        n = ids.numel()
        key = tuple(ids.tolist())
        if key not in done:
            one = SlotKVCache(step.n_layers, 1, n + 64)
            pos = torch.arange(n)[None]
            with torch.inference_mode():
                logits = step.prefill(one, ids[None], pos, pos, n, [n], [n])
            cache.copy_row(b, one, 0, n)
            done[key] = b, int(logits[0].argmax())
        else:
            cache.copy_row(b, cache, done[key][0], n)
        lens.append(n)
        first.append(done[key][1])
    return cache, lens, first


def copy_cache(cache, lens):
    """A copy of the rows of a SlotKVCache (row b's first lens[b] positions)."""
    from generation.decode import SlotKVCache

    other = SlotKVCache(cache.n_layers, cache.rows, cache.capacity)
    for b, n in enumerate(lens):
        other.copy_row(b, cache, b, n)
    return other


def decode_side_by_side(slow, exact, packed, prompts, steps: int, weight):
    """Each prompt prefilled alone by the model path (`slow`, a ModelStep), then `steps` greedy
    steps of the batch through the model path, the lean step with transformers' attention call
    (`exact`) and with the packed call (`packed`), each on its own copy of the cache. Asserts, every
    step, the same logits (the lean step's hidden through the bf16 head `weight`) and the same
    keys/values written by `exact` as by the model path. -> (the packed step's worst KL divergence
    of the next-token distributions, nats; the rows' final lengths)."""
    import torch
    import torch.nn.functional as F

    ref, lens, nxt = prefilled_cache(slow, prompts)
    fast, approx = copy_cache(ref, lens), copy_cache(ref, lens)
    n, worst = len(prompts), 0.0
    for _ in range(steps):
        span = max(lens) + 1
        for c in (ref, fast, approx):
            c.ensure(span)
        ids, pos = torch.tensor(nxt), torch.tensor(lens)
        with torch.inference_mode():
            want = slow.step(ref, ids, pos)
            got = F.linear(exact(ids, pos, fast), weight)
            near = F.linear(packed(ids, pos, approx), weight)
        assert torch.equal(got, want)
        lp, lq = want.float().log_softmax(-1), near.float().log_softmax(-1)
        worst = max(worst, float((lp.exp() * (lp - lq)).sum(-1).max()))
        for layer in range(ref.n_layers):
            assert torch.equal(ref.keys[layer][:n, :, :span], fast.keys[layer][:n, :, :span])
            assert torch.equal(ref.values[layer][:n, :, :span], fast.values[layer][:n, :, :span])
        nxt = want.argmax(-1).tolist()
        lens = [x + 1 for x in lens]
    return worst, lens


def assert_flip_is_a_tie(lm, prompt_ids, got: list[int], want: list[int]) -> bool:
    """Two greedy token lists of the real bf16 model, from computations that sum in another order
    (the fast step, a prefix cached from another chunking): equal, or they part where the model's
    own bf16 logits tie, the two tokens no further apart than twice bf16's rounding at that
    magnitude. True if equal as far as both go, False if they part at a tie; AssertionError otherwise."""
    import torch

    i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), None)
    if i is None:
        return True
    with torch.inference_mode():
        ids = torch.cat([prompt_ids.reshape(-1), torch.tensor(want[:i], dtype=torch.long)])[None]
        logits = lm.model(input_ids=ids).logits[0, -1]  # (V,) bf16
    top = float(logits[want[i]])
    ulp = 2.0 ** (torch.tensor(abs(top)).log2().floor().item() - 7)  # bf16 spacing at that magnitude
    gap = float(logits[want[i]]) - float(logits[got[i]])
    assert gap <= 2 * ulp, (i, gap, ulp, lm.tokenizer.decode(got), lm.tokenizer.decode(want))
    return False
