"""Conversations as users type them: a prompt with or without `<image>` placeholders, and chat history."""

from __future__ import annotations

import dataclasses

from vl2_jax.errors import InputError, check_text
from vl2_jax.processor import IMAGE_TOKEN


def user_turn(prompt: str, num_images: int) -> dict:
    """A user turn for `prompt` and `num_images` images.

    Without placeholders, the images go first, one `<image>` per line; with placeholders, their count
    must equal the number of images.
    """
    if not prompt.strip() and not num_images:
        raise InputError("the prompt is empty; say something or give an image.")
    check_text(prompt, "the prompt")
    placeholders = prompt.count(IMAGE_TOKEN)
    if placeholders == 0:
        prompt = f"{IMAGE_TOKEN}\n" * num_images + prompt
    elif placeholders != num_images:
        raise InputError(
            f"the prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given; "
            f"use one placeholder per image, or none to put the images first."
        )
    return {"role": "user", "content": prompt}


def check_system(system, name: str = "system") -> None:
    """A system prompt is None (none) or a string with some text and no <image> placeholder; anything
    else raises InputError, naming it as `name` (the flag, the key)."""
    if system is None:
        return
    if not isinstance(system, str):
        raise InputError(f"{name} must be a string (got {system!r}).")
    if not system.strip() or "<image>" in system:
        raise InputError(f"{name} needs some text and no <image> placeholder (images go in the user's turns).")
    check_text(system, name)


@dataclasses.dataclass
class ChatSession:
    """Multi-turn history, after an optional system prompt. Images belong to the turn that introduced them.

    `ask` returns the conversation with the new turn without keeping it; `answer` keeps the turn and its
    answer together, so a turn that fails (a bad prompt, an image that does not open) leaves the history
    as it was.
    """

    turns: list[dict] = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)
    system: str | None = None
    _asked: tuple = ()

    def __post_init__(self):
        check_system(self.system)

    def ask(self, prompt: str, images=()) -> tuple[list[dict], list]:
        """(conversation, every image) for the history plus `prompt` with `images`; kept by `answer`."""
        turn, images = user_turn(prompt, len(images)), list(images)
        self._asked = (turn, images)
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*head, *self.turns, turn], [*self.images, *images]

    def answer(self, text: str) -> None:
        """Keeps the last asked turn, its images and `text`, the answer to it."""
        if not self._asked:
            raise InputError("answer() needs a turn asked first.")
        turn, images = self._asked
        self.turns += [turn, {"role": "assistant", "content": text}]
        self.images += images
        self._asked = ()
