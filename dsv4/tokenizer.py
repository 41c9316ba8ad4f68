"""Text in and out: the checkpoint's `tokenizer.json`, and the DeepSeek-V4 chat layout.

The release ships a `tokenizers` BPE file and no chat template; prompts are laid out as
(checkpoint_format.md section 5)

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜></think>            (chat mode: the model answers directly)
    <｜User｜>{user}<｜Assistant｜><think>             (thinking mode: the model reasons first)

A finished assistant turn ends with <｜end▁of▁sentence｜>; the reasoning of earlier turns is dropped
(they are rendered `</think>{answer}`) unless `drop_thinking=False`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)
ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the directory."""


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizer.json` plus the bos/eos of `tokenizer_config.json`."""

    def __init__(self, directory):
        from tokenizers import Tokenizer as HFTokenizer

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{self.directory}: no tokenizer.json, so text prompts cannot be encoded; "
                "pass token ids (--prompt-ids 1,2,3) or a checkpoint directory with a tokenizer"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot be read by `tokenizers`: {err}") from None
        config = _read_tokenizer_config(self.directory)
        where = self.directory / "tokenizer_config.json"
        self.bos_token = _token_text(config.get("bos_token"), BOS, where, "bos_token")
        self.eos_token = _token_text(config.get("eos_token"), EOS, where, "eos_token")
        self.add_bos_token = config.get("add_bos_token") or False  # absent or null: no
        if not isinstance(self.add_bos_token, bool):
            raise TokenizerError(f"{where}: add_bos_token must be true or false, got {self.add_bos_token!r}")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One past the largest id, added tokens included: the vocabulary a model needs for this
        tokenizer (above `vocab_size` when the ids have gaps)."""
        return 1 + max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_id(self, token: str) -> int:
        """Id of one token string (special tokens included); TokenizerError if absent."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.directory}: tokenizer has no token {token!r}")
        return i

    @property
    def bos_id(self) -> int:
        """Id of `bos_token`; TokenizerError if the vocabulary lacks it."""
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        """Id of `eos_token`; TokenizerError if the vocabulary lacks it."""
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids.

        `add_bos` None follows tokenizer_config.json's `add_bos_token` (false in the release).
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos if add_bos is not None else self.add_bos_token:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder for generated ids (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns a growing list of ids into text pieces without splitting a UTF-8 character.

    Byte-level BPE tokens may end inside a multi-byte character; text is only emitted once it no
    longer ends in the replacement character U+FFFD (or at `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the new complete text (possibly empty)."""
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, self.skip)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever text is left, incomplete characters included."""
        return self._take(self.tokenizer.decode(self.ids, self.skip))

    def _take(self, text: str) -> str:
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def _read_tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


def _token_text(value, default: str, where: Path, key: str) -> str:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict {"content": ...};
    absent or null means `default` (null had become the text "None", a token of the vocabulary)."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{where}: {key} must be a token string or {{\"content\": ...}}, got {value!r}")
    return value


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer of a checkpoint directory; TokenizerError naming the directory if it has none."""
    return Tokenizer(directory)


# ------------------------------------------------------------------------------------- chat format


def _check_messages(messages: Sequence[Mapping]) -> None:
    """Roles: an optional first system message, then user and assistant alternating from a user."""
    if not messages:
        raise ValueError("format_chat: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"format_chat: message {i} must be a dict with role in {ROLES} and string content, got {m!r}"
            )
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * len(turns)
    roles = [m["role"] for m in turns]
    if roles != expected[: len(roles)]:
        raise ValueError(
            f"format_chat: after an optional system message, roles must alternate user, assistant, ... "
            f"starting with user; got {[m['role'] for m in messages]}"
        )


def _assistant_turn(message: Mapping, keep_reasoning: bool) -> str:
    reasoning = message.get("reasoning_content")
    if keep_reasoning and reasoning:
        return f"{THINK}{reasoning}{END_THINK}{message['content']}{EOS}"
    return f"{END_THINK}{message['content']}{EOS}"


def format_chat(messages: Sequence[Mapping], thinking: bool = False, drop_thinking: bool = True) -> str:
    """Lay a conversation out as DeepSeek-V4 prompt text (special tokens as text; see module doc).

    Args:
      messages: dicts {"role": "system" | "user" | "assistant", "content": str}, assistant ones
        optionally with "reasoning_content". An optional system message first, then user and
        assistant alternating, starting with user.
      thinking: end the prompt with <think> (thinking mode) instead of </think> (chat mode).
      drop_thinking: drop earlier assistant turns' reasoning (the release's default).
    Returns:
      The text, starting with BOS. When the last message is from the user it ends with
      <｜Assistant｜> and the mode token, ready for generation; when it is from the assistant,
      that turn is finished (ends with EOS).
    """
    _check_messages(messages)
    parts = [BOS]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"{USER}{m['content']}{ASSISTANT}")
        else:
            parts.append(_assistant_turn(m, keep_reasoning=thinking and not drop_thinking))
    if messages[-1]["role"] == "user":
        parts.append(THINK if thinking else END_THINK)
    return "".join(parts)
