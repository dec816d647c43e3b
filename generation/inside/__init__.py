"""Inside the chat model: its own attention maps, its next-token table, what 4-bit costs, and the
teaching views (every layer at once, heads switched off, what a reply looked at).

* `capture`: routes the model's attention through the project's code, per thread (`install` once
  after loading; `capture.capture(...)` / `ablate(...)` blocks for one request).
* `introspect`: one layer's map, the next-token table (through `generation.sampling`, as the chat
  samples), the 4-bit model beside the full-precision one.
* `lens`: the logit lens after every layer, the same lens on the 4-bit and full-precision models,
  and each head's role (previous-token, first-token, induction).
* `teaching`: the model view, head ablation and a reply's attention.
* `reply_tokens`: how sure the model was of each token of a reply, and its alternatives.
* `lessons`: short lessons whose every answer is what the live model does (predict, then see).

No gradio here: the UI imports these names from `generation.inside`.
"""

from __future__ import annotations

from .capture import CaptureUnsupported, ablate, attention_modules, delegate_name, install, is_installed
from .introspect import (
    DEFAULT_MAX_TOKENS,
    MAX_CANDIDATES,
    Candidate,
    FullPrecisionCache,
    ModelAttention,
    NextToken,
    QuantComparison,
    QuantRow,
    QuantSide,
    compare_quantization,
    model_attention,
    model_layers,
    next_token_candidates,
    token_label,
)
from .lessons import LESSONS, Lesson, Reveal, Step, get_lesson, run_step
from .reply_tokens import REPLY_TOKENS_LIMIT, Alternative, ReplyToken, ReplyTokens, reply_token_probs
from .lens import (
    LENS_MAX_TOKENS,
    LENS_TOP,
    ROLES,
    HeadRoles,
    LensToken,
    LogitLens,
    QuantLens,
    QuantLensLayer,
    head_roles,
    induction_tokens,
    logit_lens,
    quant_lens,
)
from .teaching import (
    ABLATION_MAX_NEW_TOKENS,
    MODEL_VIEW_MAX_TOKENS,
    REPLY_MAX_TOKENS,
    Ablation,
    AblationRow,
    Head,
    ModelView,
    ReplyAttention,
    ablate_heads,
    check_heads,
    format_heads,
    head_in_every_layer,
    heads_of_layer,
    model_view,
    parse_heads,
    reply_attention,
)

__all__ = [
    "ABLATION_MAX_NEW_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "LENS_MAX_TOKENS",
    "LESSONS",
    "LENS_TOP",
    "ROLES",
    "MAX_CANDIDATES",
    "MODEL_VIEW_MAX_TOKENS",
    "REPLY_MAX_TOKENS",
    "REPLY_TOKENS_LIMIT",
    "Alternative",
    "Ablation",
    "AblationRow",
    "Candidate",
    "CaptureUnsupported",
    "FullPrecisionCache",
    "Head",
    "HeadRoles",
    "LensToken",
    "Lesson",
    "LogitLens",
    "ModelAttention",
    "ModelView",
    "NextToken",
    "QuantComparison",
    "QuantLens",
    "QuantLensLayer",
    "QuantRow",
    "QuantSide",
    "ReplyAttention",
    "Reveal",
    "Step",
    "ReplyToken",
    "ReplyTokens",
    "ablate",
    "ablate_heads",
    "attention_modules",
    "check_heads",
    "compare_quantization",
    "delegate_name",
    "format_heads",
    "get_lesson",
    "head_in_every_layer",
    "head_roles",
    "heads_of_layer",
    "induction_tokens",
    "install",
    "is_installed",
    "logit_lens",
    "model_attention",
    "model_layers",
    "model_view",
    "next_token_candidates",
    "parse_heads",
    "run_step",
    "quant_lens",
    "reply_attention",
    "reply_token_probs",
    "token_label",
]
