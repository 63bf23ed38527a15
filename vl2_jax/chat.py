"""Conversations as users type them: a prompt with or without `<image>` placeholders, and chat history."""

from __future__ import annotations

import dataclasses

from vl2_jax.errors import InputError
from vl2_jax.processor import IMAGE_TOKEN


def user_turn(prompt: str, num_images: int) -> dict:
    """A user turn for `prompt` and `num_images` images.

    Without placeholders, the images go first, one `<image>` per line; with placeholders, their count
    must equal the number of images.
    """
    if not prompt.strip() and not num_images:
        raise InputError("the prompt is empty; say something or give an image.")
    placeholders = prompt.count(IMAGE_TOKEN)
    if placeholders == 0:
        prompt = f"{IMAGE_TOKEN}\n" * num_images + prompt
    elif placeholders != num_images:
        raise InputError(
            f"the prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given; "
            f"use one placeholder per image, or none to put the images first."
        )
    return {"role": "user", "content": prompt}


@dataclasses.dataclass
class ChatSession:
    """Multi-turn history. Images belong to the turn that introduced them."""

    turns: list[dict] = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)

    def ask(self, prompt: str, images=()) -> list[dict]:
        self.turns.append(user_turn(prompt, len(images)))
        self.images.extend(images)
        return list(self.turns)

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})
