"""Which strings name something on the Hugging Face hub: a repository ("owner/name") or one file of it
("owner/name/lora.safetensors"). Model sources are local paths or hub ids; these tell the two apart without
touching the network, for the basis loader and the rewards alike."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>.+\.(?:safetensors|bin))$")


def is_hub_id(text: str) -> bool:
    """Whether a string that is not a local path reads as a Hugging Face hub repository id ("owner/name")."""
    return _reads_as(HUB_ID, text)


def is_hub_file(text: str) -> bool:
    """Whether a string that is not a local path reads as a file of a hub repository ("owner/name/lora.safetensors")."""
    return _reads_as(HUB_FILE, text)


def _reads_as(pattern: re.Pattern, text: str) -> bool:
    return bool(pattern.match(text)) and not text.startswith((".", "/", "~"))
