"""Prompts to token ids with the served model's (Hugging Face, fast) tokenizer; no vLLM import.

The server calls these from worker threads (a 2 MB prompt takes seconds to tokenize, and the event
loop must not wait for it). That is safe: a fast tokenizer encodes in Rust without the GIL, and
neither function changes the tokenizer's settings (padding, truncation), which is what makes
concurrent use of one tokenizer fail. Text a tokenizer cannot take is the client's mistake:
:class:`EngineRequestError`.
"""

from __future__ import annotations

from typing import Any

from kivi_serve.engine.types import EngineRequestError


def encode_text(tok: Any, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    """``text``'s token ids; ``param`` names the request field in the error."""
    try:
        return list(tok.encode(text, add_special_tokens=add_special_tokens))
    except (TypeError, ValueError) as exc:  # e.g. a string the Rust side cannot take
        raise EngineRequestError(f"the {param} cannot be tokenized: {exc}", param=param) from None


def render_chat(
    tok: Any, messages: list[dict], model_name: str, add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """Apply the model's chat template to ``messages``; returns the prompt text and its token ids."""
    if not getattr(tok, "chat_template", None):
        raise EngineRequestError(
            f"model {model_name} has no chat template; use /v1/completions", param="messages"
        )
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError and friends: the messages do not fit
        raise EngineRequestError(f"chat template failed: {exc}", param="messages") from None
    return text, encode_text(tok, text, False, "messages")
