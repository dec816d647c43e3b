"""Compatibility alias: the dispatcher lives in `generation.inside.capture`.

Only `engine.py` still imports from here (its `_delegate`); once it imports
`generation.inside.delegate_name`, this file goes.
"""

from __future__ import annotations

from .inside.capture import delegate_name as _delegate_name  # noqa: F401
