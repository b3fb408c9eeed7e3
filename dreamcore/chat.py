"""Chat templates: how a conversation (instruction data, stage III) is laid out as one sequence.

DreamLLM's SFT follows Vicuna v1 (its LLM is Vicuna): a system sentence, then `USER: ...
ASSISTANT: ...</s>` turns. Only assistant turns are targets: their text, the `<dream_start>` of
each image the assistant draws, and the EOS that ends the turn (so the model learns to stop).
Everything else (system, user turns, role markers, images the user gives) is context.

`chat_segments` is the one place the template is applied; the tokenizer's `encode_conversation`
turns its segments into input_ids/labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

Part = str | int  # a text chunk, or the index of an image in the conversation's image list
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    system: str  # the default system sentence (a "system" turn replaces it)
    user: str  # text before a user turn
    assistant: str  # text before an assistant turn
    sep: str  # after the system sentence and after each user turn


TEMPLATES = {
    # FastChat's vicuna_v1 (sep " ", sep2 "</s>"), which DreamLLM's SFT uses. Each piece is
    # tokenized on its own (as SentencePiece/BPE tokenizers start a word), so the spaces between
    # pieces are the tokenizer's word starts, not part of the markers.
    "vicuna_v1": ChatTemplate(
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user="USER:", assistant="ASSISTANT:", sep="",
    ),
}


class Segment(NamedTuple):
    """One piece of the laid-out conversation. kind: "context" / "target" (text), "image" (read,
    comprehension block), "draw" (an assistant image: dream block as target, then comprehension),
    "eos" (the end of an assistant turn, a target)."""

    kind: str
    value: Part | None = None


def template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"chat template {name!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class EndOfTurn:
    """A prompt part (serving): the EOS that closed an earlier assistant turn, as in training.
    The engine lays it out as the tokenizer's EOS id; text cannot spell it."""


def chat_segments(name: str, turns: Sequence[tuple[str, Part]], generation_prompt: bool = False) -> list[Segment]:
    """`turns`: (role, part) in order, consecutive parts of one role forming one turn.

    `generation_prompt` (serving): the conversation is a prompt the assistant answers, so it ends
    with the assistant marker, or, when the last turn is the assistant's, leaves that turn open."""
    tpl = template(name)
    bad = [r for r, _ in turns if r not in ROLES]
    if bad:
        raise ValueError(f"role {bad[0]!r} is not one of {', '.join(ROLES)}")
    system = [p for r, p in turns if r == "system" and isinstance(p, str)]
    out = [Segment("context", (" ".join(system) if system else tpl.system) + tpl.sep)]
    turns = [(r, p) for r, p in turns if r != "system"]
    for i, (role, part) in enumerate(turns):
        opens = i == 0 or turns[i - 1][0] != role
        closes = i == len(turns) - 1 or turns[i + 1][0] != role
        if opens:
            out.append(Segment("context", tpl.user if role == "user" else tpl.assistant))
        if isinstance(part, str):
            if part:
                out.append(Segment("target" if role == "assistant" else "context", part))
        else:
            out.append(Segment("draw" if role == "assistant" else "image", part))
        if closes and not (generation_prompt and i == len(turns) - 1 and role == "assistant"):
            if role == "assistant":
                out.append(Segment("eos"))
            elif tpl.sep:
                out.append(Segment("context", tpl.sep))
    if generation_prompt and (not turns or turns[-1][0] != "assistant"):
        out.append(Segment("context", tpl.assistant))
    return out


__all__ = ["TEMPLATES", "ChatTemplate", "EndOfTurn", "Segment", "chat_segments", "template"]
