"""Loading: the real default model in 4-bit, the tiny chat-template model, the CUDA kwargs, the cache."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from generation import DEFAULT_MODEL_ID, SamplingParams, Settings, load_model
from generation.backends import ChatEngine


def test_default_model_is_nf4(lm4):
    linears = [m for m in lm4.model.modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))]
    four_bit = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    # every linear layer of the decoder is 4-bit; only the tied lm_head (= the embedding) stays bf16
    assert len(four_bit) == lm4.n_4bit_layers == 18 * 7
    assert {type(m) for m in linears if not isinstance(m, bnb.nn.Linear4bit)} <= {torch.nn.Linear}
    assert [n for n, m in lm4.model.named_modules() if type(m) is torch.nn.Linear] == ["lm_head"]
    w = four_bit[0].weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
    # Double quantization as loaded. bitsandbytes' CPU kernels repack a layer on its first forward
    # (absmax back to bf16, `nested` off, `packing_format_for_cpu` on), and the session's model may
    # already have run in an earlier test: then the load-time config is what says it.
    assert w.quant_state.nested or getattr(w.quant_state, "packing_format_for_cpu", False)
    assert lm4.model.config.quantization_config.bnb_4bit_use_double_quant
    assert lm4.quantization == "nf4" and lm4.device == "cpu" and lm4.model_id == DEFAULT_MODEL_ID
    assert not lm4.has_chat_template


def test_weight_bytes_well_below_bf16(lm4):
    cfg = lm4.model.config
    n_params = 0
    # the same model in bf16: every original parameter (packed 4-bit weights count 2 per byte)
    for name, p in lm4.model.named_parameters():
        n_params += p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1)
    assert n_params == pytest.approx(268e6, rel=0.01)  # Gemma 3 270m
    bf16_bytes = 2 * n_params
    assert lm4.weight_bytes < 0.75 * bf16_bytes
    # the 4-bit part alone: ~0.5 byte/weight + quantisation state (absmax, code books)
    q_elems = sum(2 * m.weight.numel() for m in lm4.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    q_bytes = lm4.weight_bytes - (n_params - q_elems) * 2
    assert 0.5 * q_elems < q_bytes < 0.6 * q_elems
    assert cfg.hidden_size == 640


def test_report_and_summary(lm4):
    text = lm4.report()
    for needle in (DEFAULT_MODEL_ID, "cpu", "nf4", str(lm4.n_4bit_layers), "MiB", "load time"):
        assert needle in text
    assert "\n" not in lm4.summary() and "NF4" in lm4.summary()
    assert 0 < lm4.load_seconds < 600


def test_tiny_qwen_local_folder_in_4bit(tiny_qwen_dir, tmp_path):
    settings = Settings.from_env({"MODEL_ID": str(tiny_qwen_dir), "ATTN_LAB_CACHE": str(tmp_path)})
    lm = load_model(settings=settings)
    assert lm.model_id == str(tiny_qwen_dir)
    assert lm.has_chat_template and lm.quantization == "nf4"
    assert lm.n_4bit_layers == 2 * 7
    assert lm.model.config.model_type == "qwen2"
    with ChatEngine(lm, warmup=False) as engine:
        reply = list(engine.stream_reply("hello", system="be brief", params=SamplingParams(temperature=0, max_new_tokens=8),
                                         max_input_tokens=256))
    assert reply and all("<|im_" not in r for r in reply)  # tokens came, and no template markers among them
    assert not list(tmp_path.iterdir())  # a local folder is used in place, nothing converted


def test_cuda_path_kwargs(monkeypatch, tiny_qwen_dir):
    """CUDA cannot exist here: fake only its presence and capture what from_pretrained is asked for."""
    import transformers

    captured = {}

    def capture(source, **kwargs):
        captured.update(kwargs, source=source)
        raise RuntimeError("captured")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="captured"):
        load_model(str(tiny_qwen_dir))
    q = captured["quantization_config"]
    assert captured["device_map"] == "auto" and captured["source"] == str(tiny_qwen_dir)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert captured["trust_remote_code"] is False

    for bf16_ok, full_dtype in ((True, torch.bfloat16), (False, torch.float16)):  # Ampere+ / e.g. a T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, ok=bf16_ok, **k: ok)
        captured.clear()
        with pytest.raises(RuntimeError, match="captured"):
            load_model(str(tiny_qwen_dir), load_4bit=False)
        assert captured["device_map"] == "auto" and captured["dtype"] == full_dtype
        assert "quantization_config" not in captured
    assert Settings.from_env({}).chat_concurrency == 64


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_model("no-such-org/no-such-model", settings=Settings(cache_dir=tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_precision_dtype(tiny_qwen_dir, dtype):
    lm = load_model(str(tiny_qwen_dir), load_4bit=False, dtype=dtype)
    assert lm.quantization == "none" and lm.n_4bit_layers == 0
    assert lm.dtype == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in lm.model.parameters()} == {dtype}
    n = sum(p.numel() for p in lm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in lm.model.buffers())  # rotary inv_freq
    assert lm.weight_bytes == n * dtype.itemsize + buffers


def test_dtype_with_4bit_is_an_error(tiny_qwen_dir):
    with pytest.raises(ValueError, match="full precision only"):
        load_model(str(tiny_qwen_dir), dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(str(tiny_qwen_dir), load_4bit=False, dtype=torch.int8)


def _tiny_gguf(path):
    """A small GGUF file of every kind of field the real one has (strings, arrays of strings,
    numbers and flags, tensors of two dtypes), written by gguf-py itself."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(1000)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(1000)])
    w.add_array("tokenizer.ggml.token_type", [1] * 1000)
    w.add_bool("general.flag", True)
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("b", np.full((4, 16), 0.5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_conversions_gguf_reader_reads_what_ggufs_own_reads(tmp_path):
    """The conversion reads the GGUF through a plain view of its memmap (faster); every metadata
    field and every tensor must be the same as through gguf's own reader."""
    import gguf
    import numpy as np

    from generation.model import _plain_array_reader

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    own, plain = gguf.GGUFReader(path), _plain_array_reader(gguf)(path)
    assert type(plain.data) is np.ndarray and isinstance(own.data, np.memmap)
    assert list(plain.fields) == list(own.fields) and len(own.fields) > 8
    for name, field in own.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.name, other.types, other.data) == (field.offset, field.name, field.types, field.data)
        assert len(other.parts) == len(field.parts)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(other.parts, field.parts)), name
        assert other.contents() == field.contents(), name
    assert plain.fields["tokenizer.ggml.tokens"].contents()[999] == "tok999"
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in plain.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in own.tensors] and len(own.tensors) == 2
    assert all(np.array_equal(a.data, b.data) for a, b in zip(plain.tensors, own.tensors))
