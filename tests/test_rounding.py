"""Calibrated NF4 rounding (generation/rounding/): the bytes are bitsandbytes' own format, GPTQ and the
scale refit lower the layer's output error, and the result loads back as standard Linear4bit layers."""

from __future__ import annotations

import pytest
import torch

from generation.rounding import (
    BLOCK,
    GptqConfig,
    block_absmax,
    dequantize,
    double_quantize,
    gptq_nf4,
    install,
    quant_state,
    refit_scales,
)
from generation.rounding.nf4grid import round_to_nearest


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions, as a language model's activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(1, -1, d)
    return (torch.randn(n, d, generator=g) * scale) @ mix  # (n, d)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Sum over rows of (w - q)^T H (w - q): the squared output error per calibration input."""
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("shape", [(8, 64), (96, 256), (33, 192)])
def test_plain_choice_packs_to_the_bytes_bitsandbytes_writes(shape):
    import bitsandbytes.functional as F

    w = (torch.randn(*shape) * 0.05).to(torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    s = block_absmax(w.float())
    mine, my_state = quant_state(round_to_nearest(w.float(), s), s)
    assert torch.equal(mine, packed)
    assert torch.equal(my_state.absmax, state.absmax) and torch.equal(my_state.offset, state.offset)
    assert torch.equal(F.dequantize_4bit(mine, my_state), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(16, 128), (40, 320)])
def test_dequantize_is_what_bitsandbytes_computes(shape):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 16, shape, generator=g)
    scales = torch.rand(shape[0], shape[1] // BLOCK, generator=g) * 0.1
    packed, state = quant_state(index, scales)
    ours = dequantize(index, double_quantize(scales)[0]).to(torch.bfloat16)
    assert torch.equal(F.dequantize_4bit(packed, state), ours)


@pytest.mark.parametrize("out,d", [(32, 128), (64, 256)])
def test_gptq_lowers_the_output_error_of_round_to_nearest(out, d):
    x = correlated_inputs(4 * d, d)
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, d) * 0.05
    s = double_quantize(block_absmax(w))[0]
    rtn = dequantize(round_to_nearest(w, s), s)
    gptq = dequantize(gptq_nf4(w, h, s, GptqConfig(damp=0.01)), s)
    # GPTQ is greedy, not optimal; on correlated inputs its error feedback wins by a wide margin
    assert output_error(w, gptq, h) < 0.8 * output_error(w, rtn, h)


@pytest.mark.parametrize("damp", [0.0, 0.1])
@pytest.mark.parametrize("out,d", [(16, 128), (24, 192)])
def test_refit_scales_are_the_least_squares_scales_for_the_codes(out, d, damp):
    x = correlated_inputs(4 * d, d, seed=2)
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, d) * 0.05
    s = block_absmax(w)
    index = round_to_nearest(w, s)
    fitted = refit_scales(w, h, index, damp=damp)
    h = h + damp * h.diagonal().mean() * torch.eye(d)  # the objective the scales were fitted for
    best = output_error(w, dequantize(index, fitted), h)
    assert best <= output_error(w, dequantize(index, s), h) * (1 + 1e-5)
    # optimal: no nudge of any one block's scale lowers the error (up to the solver's tiny ridge)
    for r, g in [(0, 0), (out - 1, d // BLOCK - 1)]:
        for f in (0.99, 1.01):
            nudged = fitted.clone()
            nudged[r, g] *= f
            assert output_error(w, dequantize(index, nudged), h) >= best * (1 - 1e-6)


@pytest.mark.parametrize("outs,d", [((16, 8), 128), ((24, 8, 40), 192)])
def test_linears_sharing_an_input_round_together_as_each_alone(outs, d):
    """Rows are independent problems, so rounding q/k/v (or gate/up) in one pass gives each weight what
    it gets alone; double quantization stays per weight, as bitsandbytes stores it."""
    from generation.rounding.calibrate import round_linears

    x = correlated_inputs(4 * d, d, seed=3)
    h = x.T @ x / x.shape[0]
    ws = [torch.randn(o, d) * 0.05 * (i + 1) for i, o in enumerate(outs)]
    cfg = GptqConfig(damp=0.1, rounds=2)
    together = round_linears(ws, h, cfg)
    for w, got in zip(ws, together):
        (alone,) = round_linears([w], h, cfg)
        assert got.index.shape == w.shape and got.scales.shape == (w.shape[0], d // BLOCK)
        # the same sums in another order (matrix products of other sizes) may flip a rare tie
        assert (got.index != alone.index).float().mean() < 0.01
        err_got = output_error(w, dequantize(got.index, double_quantize(got.scales)[0]), h)
        err_alone = output_error(w, dequantize(alone.index, double_quantize(alone.scales)[0]), h)
        assert err_got == pytest.approx(err_alone, rel=0.02)


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_each_round_ends_with_the_least_squares_scales_of_its_codes(rounds):
    from generation.rounding.calibrate import round_linears

    d = 128
    x = correlated_inputs(4 * d, d, seed=4)
    h = x.T @ x / x.shape[0]
    w = torch.randn(32, d) * 0.05
    (r,) = round_linears([w], h, GptqConfig(damp=0.1, rounds=rounds))
    torch.testing.assert_close(r.scales, refit_scales(w, h, r.index, damp=0.1))
    plain = dequantize(round_to_nearest(w, block_absmax(w)), block_absmax(w))
    assert output_error(w, dequantize(r.index, r.scales), h) < output_error(w, plain, h)


@pytest.mark.parametrize("damp", [0.01, 0.3])
@pytest.mark.parametrize("out,d", [(8, 64), (16, 128)])
def test_the_full_output_target_is_the_least_squares_weight_for_the_full_output(out, d, damp):
    """W* = w (C + lam I)(H + lam I)^-1 minimises |X w - X~ q|^2 / n + lam |w - q|^2 over q, and that
    objective is GPTQ's damped one around W* plus a constant: so rounding W* rounds for the full output."""
    from generation.rounding import toward_full_output

    x = correlated_inputs(4 * d, d, seed=5).double()
    drift = correlated_inputs(4 * d, d, seed=6).double() * 0.3
    xt = x + drift  # the rounded model's input: the full model's, moved by earlier layers' rounding
    n = x.shape[0]
    h, cross = xt.T @ xt / n, x.T @ xt / n
    w = torch.randn(out, d, dtype=torch.float64) * 0.05
    lam = damp * float(h.diagonal().mean())
    target = toward_full_output(w, h, cross, damp=damp, toward=1.0).double()

    def objective(q: torch.Tensor) -> float:  # summed over rows
        return float(((x @ w.T - xt @ q.T) ** 2).sum() / n + lam * ((w - q) ** 2).sum())

    a = h + lam * torch.eye(d, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    gaps = []
    for _ in range(3):
        q = w + torch.randn(out, d, generator=g, dtype=torch.float64) * 0.02
        assert objective(target) <= objective(q)
        gaps.append(objective(q) - output_error(target, q, a))
    # the gap is the same constant for every q (fp32 precision of the returned target)
    assert max(gaps) - min(gaps) <= 1e-4 * objective(w)
    # no drift (the same input in both models): the target is the weight itself, whatever `toward`;
    # up to an fp32 solve's error, which grows with the damped Hessian's condition number
    atol = 10 * float(torch.linalg.cond(a)) * torch.finfo(torch.float32).eps * float(w.abs().max())
    same = toward_full_output(w.float(), h.float(), h.float(), damp=damp, toward=0.7)
    torch.testing.assert_close(same, w.float(), rtol=0, atol=atol)
    half = toward_full_output(w.float(), h.float(), cross.float(), damp=damp, toward=0.5)
    torch.testing.assert_close(half, (w.float() + target.float()) / 2, rtol=0, atol=atol)


def test_calibration_toward_the_full_output_changes_only_layers_whose_input_drifted(tmp_path):
    """In the first decoder layer both models see the same input, so moving the target towards the
    full model's output changes nothing there; after it, the rounded model's input has drifted and
    the codes of the linears that read the (normalised) residual stream follow the full model's
    output instead; o_proj and down_proj keep their targets."""
    from conftest import save_tiny_lm
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from generation.rounding import calibrate

    save_tiny_lm(tmp_path, Gemma3TextConfig, Gemma3ForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 query_pre_attn_scalar=32)
    ids = torch.randint(3, 60, (8, 32), generator=torch.Generator().manual_seed(0))

    heard: list[str] = []

    def rounded(toward: float):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        return calibrate(model, ids, GptqConfig(damp=0.1, rounds=2, toward_full=toward), progress=heard.append)

    plain, full = rounded(0.0), rounded(1.0)
    assert [h.split(" (")[0] for h in heard] == ["layer 1/2 rounded", "layer 2/2 rounded"] * 2  # the first start's progress
    assert plain.keys() == full.keys() and len(plain) == 14
    for name in plain:
        changed = float((plain[name].index != full[name].index).float().mean())
        reads_the_residual_stream = name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        if name.startswith("model.layers.0.") or not reads_the_residual_stream:
            assert changed == 0, name  # the same problem, the same inputs
        else:
            assert changed > 0.02, name


@pytest.mark.parametrize("n,d", [(7, 64), (300, 96), (50, 2048)])
def test_the_calibrations_gram_matrix_is_x_transposed_x(n, d):
    """Built band by band and mirrored: symmetric to the bit, and x^T x within what summing n
    products in another order can move it (2 gamma_n times the sums of magnitudes)."""
    from generation.rounding.calibrate import _gram

    x = correlated_inputs(n, d).bfloat16().float()  # (n, d), as the calibration's bf16 activations
    h = _gram(x)
    assert torch.equal(h, h.T)
    exact = x.double().T @ x.double()
    u = torch.finfo(torch.float32).eps / 2
    bound = 2 * (n * u / (1 - n * u)) * (x.abs().double().T @ x.abs().double())
    assert bool(((h.double() - exact).abs() <= bound).all())


def test_the_calibration_runs_its_norms_natively_and_rounds_the_same(tmp_path, monkeypatch):
    """While the calibration runs, the layers' bf16 RMSNorms (4 per Gemma 3 layer and the q/k norms)
    run as the decode step's C kernel, which gives their own bits: the model's logits are the same
    to the bit, and with torch's norms (no norm kernel to be had) the calibration chooses the same
    codes and scales."""
    import importlib

    calibrate_module = importlib.import_module("generation.rounding.calibrate")  # the package's name is the function
    from conftest import save_tiny_lm
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from generation.rounding import calibrate
    from generation.rounding.calibrate import _native_norms, decoder_layers

    save_tiny_lm(tmp_path, Gemma3TextConfig, Gemma3ForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 query_pre_attn_scalar=32)
    ids = torch.randint(3, 60, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = GptqConfig(damp=0.1, rounds=2, toward_full=0.5)

    def load():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        with torch.no_grad():  # norm weights of a trained model, not the zeros of a fresh one
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
        return model

    def native_count() -> int:
        model = load()
        with torch.no_grad():
            want = model(ids).logits
            with _native_norms(decoder_layers(model)) as n:
                assert torch.equal(model(ids).logits, want)
        return n

    monkeypatch.setenv("ATTN_LAB_NATIVE", "1")
    kern, status = calibrate_module.norm_kernels(64, 1, 64, 1e-6)
    if kern is None:
        pytest.skip(f"no native norm kernel here: {status.detail}")
    assert native_count() == 2 * 6
    native = calibrate(load(), ids, cfg)
    kernels = calibrate_module.norm_kernels
    monkeypatch.setattr(calibrate_module, "norm_kernels", lambda *a, **k: (None, kernels(*a, **k)[1]))
    assert native_count() == 0
    torch_ops = calibrate(load(), ids, cfg)
    assert native.keys() == torch_ops.keys() and len(native) == 14
    for name in native:
        assert torch.equal(native[name].index, torch_ops[name].index), name
        assert torch.equal(native[name].scales, torch_ops[name].scales), name


def test_installed_codes_make_a_standard_linear4bit():
    import bitsandbytes as bnb

    w = (torch.randn(48, 128) * 0.05).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(128, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin = lin.to("cpu")  # bitsandbytes quantizes when the layer is moved to its device
    x = correlated_inputs(256, 128)
    h = x.T @ x / 256
    index = gptq_nf4(w.float(), h, double_quantize(block_absmax(w.float()))[0])
    scales = refit_scales(w.float(), h, index)
    install(lin, index, scales)
    assert isinstance(lin, bnb.nn.Linear4bit) and lin.weight.quant_state.nested
    want = dequantize(index, double_quantize(scales)[0]).to(torch.bfloat16)
    xb = x[:4].to(torch.bfloat16)
    torch.testing.assert_close(lin(xb), xb @ want.T, rtol=2e-2, atol=1e-3)


def test_refuses_shapes_the_format_cannot_hold():
    with pytest.raises(ValueError, match=f"multiple of {BLOCK}"):
        quant_state(torch.zeros(4, 100, dtype=torch.long), torch.ones(4, 1))
    with pytest.raises(ValueError, match="scales must have shape"):
        quant_state(torch.zeros(4, 128, dtype=torch.long), torch.ones(4, 3))
    with pytest.raises(ValueError, match="damp"):
        GptqConfig(damp=0)
    with pytest.raises(ValueError, match="rounds"):
        GptqConfig(rounds=0)
    with pytest.raises(ValueError, match="toward_full"):
        GptqConfig(toward_full=1.5)


# --- the norm weights tuned end to end after the rounding (bench/norm_tuning.py) --------------------


@pytest.mark.parametrize("v,d,p", [(40, 8, 1), (97, 16, 3)])
def test_fisher_metric_is_the_kl_s_second_derivative(v, d, p):
    """With every token kept, the metric is the Hessian of KL(p(h) || p(h')) in h' at h' = h."""
    from generation.rounding import fisher_metric

    g = torch.Generator().manual_seed(v)
    e = torch.randn(v, d, generator=g, dtype=torch.float64)
    hidden = torch.randn(p, d, generator=g, dtype=torch.float64)

    def kl(h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        ref = (e @ h0).log_softmax(-1)
        return (ref.exp() * (ref - (e @ h1).log_softmax(-1))).sum()

    want = sum(torch.autograd.functional.hessian(lambda h1, h0=h0: kl(h0, h1), h0) for h0 in hidden) / p
    torch.testing.assert_close(fisher_metric(e, hidden, top_k=v).double(), want, rtol=1e-4, atol=1e-5)


def tiny_gemma(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              max_position_embeddings=64)
    return Gemma3ForCausalLM(config).eval()


def next_token_kl(full, other, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ref = full(input_ids=ids).logits.double().log_softmax(-1)
        got = other(input_ids=ids).logits.double().log_softmax(-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_tuned_norms_take_back_what_wrong_norms_cost(seed):
    """Where only the norms are off, tuning them on some rows brings the next-token distributions of
    other rows most of the way back, and nothing but the norm weights changes."""
    import copy

    from generation.rounding import NormTuning, final_hidden, norm_modules, tune_norms

    full = tiny_gemma(seed)
    off = copy.deepcopy(full)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in norm_modules(off).values():
            mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.3)
    before = {k: v.clone() for k, v in off.state_dict().items()}
    ids = torch.randint(0, 96, (16, 24), generator=g)
    train, held_out = ids[:8], ids[8:]
    kl_before = next_token_kl(full, off, held_out)
    tuned = tune_norms(off, train, final_hidden(full, train),
                       NormTuning(steps=40, rows=4, lr=2e-2, metric_positions=64, top_k=96, seed=seed))
    assert next_token_kl(full, off, held_out) < 0.5 * kl_before
    assert sorted(tuned) == sorted(norm_modules(off)) and len(tuned) == 2 * 6  # pre, post, q/k norms
    after = off.state_dict()
    for k, v in before.items():
        is_norm = k.removesuffix(".weight") in tuned
        assert after[k].dtype == v.dtype and torch.equal(after[k], v) != is_norm, k
    assert all(p.requires_grad for p in off.parameters())  # as the caller left them


def test_norm_tuning_refuses_what_it_cannot_do():
    from generation.rounding import NormTuning, tune_norms

    with pytest.raises(ValueError, match="steps"):
        NormTuning(steps=0)
    with pytest.raises(ValueError, match="lr"):
        NormTuning(lr=0)
    model = tiny_gemma()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match"):
        tune_norms(model, ids, torch.zeros(2, 7, 64))
    with pytest.raises(ValueError, match="no RMSNorm"):
        tune_norms(torch.nn.Sequential(torch.nn.Linear(4, 4)), ids, torch.zeros(2, 8, 4))


# --- the real default model -----------------------------------------------------------------------

PROMPTS = ["What is the capital of Italy?", "How many legs does a spider have?", "Why is the sky blue?",
           "Write a haiku about transformers.", "The cat sat on the mat because it was tired."]


def test_the_default_model_loads_as_calibrated_linear4bit_layers(lm4):
    import json
    from pathlib import Path

    import bitsandbytes as bnb

    assert lm4.rounding == "calibrated" and lm4.quantization == "nf4" and "calibrated" in lm4.summary()
    layers = [m for m in lm4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == lm4.n_4bit_layers == 126
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    config = json.loads((Path(lm4.model.config._name_or_path) / "config.json").read_text())
    q = config["quantization_config"]  # a standard pre-quantized checkpoint, the app's NF4 settings
    assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"] and q["load_in_4bit"]


@pytest.mark.slow
def test_calibrated_rounding_moves_the_next_token_distribution_less_than_plain(lm4, lm_full):
    """The method's point, on prompts it was not calibrated on: KL(full || 4-bit) of the next token
    is lower than plain NF4's (measured about half or less: bench/chat_quality.py)."""
    import dataclasses

    from generation import Settings, build_prompt, load_model

    plain = load_model(settings=dataclasses.replace(Settings.from_env(), nf4_rounding="plain"))
    assert plain.rounding == "plain"

    def next_token(lm, ids) -> torch.Tensor:
        with torch.inference_mode():
            return lm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].double().log_softmax(-1)

    prompts = [build_prompt(lm4.tokenizer, p).input_ids for p in PROMPTS]
    refs = [next_token(lm_full, ids) for ids in prompts]

    def kl(lm) -> float:
        return sum(float((ref.exp() * (ref - next_token(lm, ids))).sum()) for ids, ref in zip(prompts, refs)) / len(refs)

    assert kl(lm4) < 0.8 * kl(plain)


def test_the_calibration_text_is_the_models_own_and_never_a_question_the_quality_bench_asks():
    """The rounding is calibrated on text the full-precision model wrote (each part of
    calibration.json says how), never on evaluation text: no question of bench/'s sets is in it."""
    import json

    from conftest import bench_questions

    from generation.rounding import calibration_texts
    from generation.rounding.snapshot import CALIBRATION_TEXT

    parts = json.loads(CALIBRATION_TEXT.read_text(encoding="utf-8"))["parts"]
    assert parts and all("full-precision default model" in p["notes"] and p["texts"] for p in parts)
    assert calibration_texts() == [t for p in parts for t in p["texts"]]
    asked = [q.rstrip("?") for q in bench_questions()]
    text = "\n".join(calibration_texts()).lower()
    assert len(asked) >= 170
    assert [q for q in asked if q in text] == []
