"""Trigger and target names, without torch: the command line's help and checks read them before any model loads.

The pictures behind the names are built in :mod:`terd.attacks.triggers` (its registries carry exactly these
names; a test holds them together). A TrojDiff patch is named by a grammar, so a patch of any size and place can
be built and judged without adding a name: ``patch``, ``patch-N``, ``patch-PLACE``, ``patch-N-PLACE``.
"""

from __future__ import annotations

import re

BOX_SIZES = (18, 14, 11, 8, 4)  # box-N: a box of N px at 32 px, scaled
BADDIFFUSION_TRIGGERS = ("box", "box-white", *(f"box-{n}" for n in BOX_SIZES), "stop-sign", "glasses")
PATCH_PLACES = ("bottom-right", "top-left", "centre")
NAMED_PATCHES = ("patch", "patch-6", "patch-top-left", "patch-centre")
TROJDIFF_TRIGGERS = ("blend", *NAMED_PATCHES)
TARGETS = ("corner", "hat", "shoe", "cat", "mickey")
PATCH_GRAMMAR = f"patch[-N][-PLACE] (N: 1-32 px at 32 px, scaled; PLACE: {', '.join(PATCH_PLACES)})"
TRIGGER_HELP = (f"Trigger name: {', '.join(BADDIFFUSION_TRIGGERS)} (BadDiffusion/Villan); blend or "
                f"{PATCH_GRAMMAR}, e.g. {', '.join(NAMED_PATCHES)}, patch-5-top-left (TrojDiff).")
TARGET_HELP = f"Target name: {', '.join(TARGETS)}."
_PATCH_NAME = re.compile(rf"patch(?:-(\d+))?(?:-({'|'.join(PATCH_PLACES)}))?")


def parse_patch(name: str) -> tuple[int, str] | None:
    """(px32, place) of a patch trigger name, or None when ``name`` is not one (TrojDiff's own: (3, bottom-right))."""
    match = _PATCH_NAME.fullmatch(name)
    if match is None or (match[1] is not None and not 1 <= int(match[1]) <= 32):
        return None
    return int(match[1] or 3), match[2] or "bottom-right"


def is_patch_trigger(name: str | None) -> bool:
    return name is not None and parse_patch(name) is not None


def is_trojdiff_trigger(name: str | None) -> bool:
    return name == "blend" or is_patch_trigger(name)
