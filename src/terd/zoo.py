"""A declarative zoo: benign and backdoored models that terd builds, caches and resumes.

A zoo file (YAML) lists entries; an entry with a ``matrix`` expands into the product of its values
(``id`` may use them as ``{name}``). Kinds:

* ``benign``: ``terd train`` from scratch (``preset``, ``seed``, ``epochs``);
* ``benign-finetune``: the base model fine-tuned on clean data with the attacks' schedule — the control
  that fine-tuning alone is not flagged;
* ``attack``: ``terd attack`` on a base model (``attack`` + ``args`` of :func:`terd.attacks.build_attack`).

Every model lives in ``CACHE/<id>``; a finished one is skipped, an interrupted one resumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from terd.errors import TerdError

KINDS = ("benign", "benign-finetune", "attack")


@dataclass(frozen=True)
class ZooEntry:
    id: str
    kind: str
    preset: str = "tiny-digits16"
    seed: int = 0
    epochs: int | None = None
    base: str | None = None
    attack: str | None = None
    args: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def backdoored(self) -> bool:
        return self.kind == "attack"

    @property
    def family(self) -> str:
        return self.attack if self.backdoored else "benign"

    @property
    def dataset(self) -> str:
        from terd.presets import get_preset

        return get_preset(self.preset).dataset


ENTRY_FIELDS = ("preset", "seed", "epochs", "base", "attack")


def _expand(raw: dict) -> list[dict]:
    """A ``matrix`` entry as its product: keys naming an entry field (seed, epochs, ...) set that field, any
    other key is an attack argument."""
    matrix = raw.pop("matrix", None)
    if not matrix:
        return [raw]
    keys = list(matrix)
    out = []
    for values in itertools.product(*(matrix[k] if isinstance(matrix[k], list) else [matrix[k]] for k in keys)):
        combo = dict(zip(keys, values, strict=True))
        fields = {k: v for k, v in combo.items() if k in ENTRY_FIELDS}  # seed, epochs, preset, base, ...
        args = {k: v for k, v in combo.items() if k not in ENTRY_FIELDS}  # the attack's own arguments
        entry = {**raw, **fields, "args": {**raw.get("args", {}), **args}}
        entry["id"] = raw["id"].format(**{k: str(v).replace(".", "p") for k, v in combo.items()})
        out.append(entry)
    return out


def load_zoo(path: str | Path) -> list[ZooEntry]:
    """Read and validate a zoo file; bases must be defined and ids unique."""
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such zoo file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TerdError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise TerdError(f"{path}: a zoo file needs a 'models:' list")
    entries: list[ZooEntry] = []
    for raw in data["models"]:
        if not isinstance(raw, dict) or "id" not in raw or raw.get("kind") not in KINDS:
            raise TerdError(f"{path}: each model needs an 'id' and a 'kind' in {KINDS}; got {raw!r}"[:300])
        for e in _expand(dict(raw)):
            try:
                entries.append(ZooEntry(**{**e, "tags": tuple(e.get("tags", ()))}))
            except TypeError as exc:
                raise TerdError(f"{path}: model {e.get('id')!r}: {exc}") from None
    ids = [e.id for e in entries]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise TerdError(f"{path}: duplicate model ids {dup}")
    for e in entries:
        if e.kind != "benign" and e.base not in ids:
            raise TerdError(f"{path}: model {e.id!r} needs a 'base' defined in the zoo (got {e.base!r})")
        if e.kind == "attack" and not e.attack:
            raise TerdError(f"{path}: attack model {e.id!r} needs 'attack: baddiffusion|trojdiff|villan'")
    return entries


def is_built(entry: ZooEntry, cache: Path) -> bool:
    """Finished and built with this entry's settings (a cached model built otherwise is refused, not reused)."""
    d = cache / entry.id
    done = (d / "model_index.json").is_file() and (d / "train.json").is_file()
    done = done and (not entry.backdoored or (d / "attack.json").is_file())
    if done:
        check_cached(entry, d)
    return done


def _expected_epochs(entry: ZooEntry) -> int:
    """The epochs an entry trains for (its own, else its kind's default): what builds use and the cache check."""
    from terd.attacks.build import DEFAULTS
    from terd.presets import get_preset

    if entry.epochs is not None:
        return entry.epochs
    if entry.kind == "benign":
        return get_preset(entry.preset).epochs
    return DEFAULTS.get(entry.attack or "baddiffusion", DEFAULTS["baddiffusion"]).epochs


def check_cached(entry: ZooEntry, model_dir: Path) -> None:
    """Refuse a cached model whose recorded preset, seed, epochs or attack (config and true trigger) differ from
    its zoo entry: editing an entry must not silently reuse a model built with the old settings."""
    import json

    import torch

    try:
        rec = json.loads((model_dir / "train.json").read_text())
    except (OSError, ValueError) as exc:
        raise TerdError(f"{model_dir}/train.json is unreadable ({exc}); delete {model_dir} to rebuild it") from None
    want = {"preset": entry.preset, "seed": entry.seed, "epochs": _expected_epochs(entry)}
    diff = {k: (rec.get(k), v) for k, v in want.items() if rec.get(k) != v}
    if entry.backdoored:
        from terd.attacks import build_attack
        from terd.attacks.base import load_attack

        cached = load_attack(model_dir)
        wanted = build_attack(entry.attack, cached.image_shape, data_name=entry.dataset, **entry.args)
        a, b = cached.config(), wanted.config()
        diff |= {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        if not diff and not all(torch.equal(x, y) for x, y in zip(cached.true_trigger(), wanted.true_trigger(),
                                                                   strict=True)):
            diff["true_trigger"] = ("cached", "entry's")
    if diff:
        shown = ", ".join(f"{k} {have!r} (entry: {need!r})" for k, (have, need) in list(diff.items())[:4])
        raise TerdError(f"{model_dir} was built with other settings than zoo entry {entry.id!r}: {shown}; "
                        "delete it to rebuild, or give the entry a new id")


def build_entry(entry: ZooEntry, cache: str | Path, *, device: str = "cpu", progress: bool = False,
                threads: int | None = None) -> Path:
    """Build one model (resuming an interrupted build); its base must already be built.

    ``threads``: torch threads for this build (parallel builds share the cores; oversubscribed, each runs
    several times slower)."""
    import torch

    from terd.attacks import attack_model, build_attack
    from terd.data import load_dataset
    from terd.models import load_denoiser
    from terd.presets import get_preset
    from terd.train import train

    cache = Path(cache)
    out = cache / entry.id
    if is_built(entry, cache):
        return out
    if threads:
        torch.set_num_threads(threads)
    preset = get_preset(entry.preset)
    if entry.kind == "benign":
        ds = load_dataset(preset.dataset, channels=preset.channels, size=preset.size)
        train(preset, ds, out, epochs=_expected_epochs(entry), seed=entry.seed, device=device, progress=progress)
        return out
    base_dir = cache / entry.base
    base = load_denoiser(base_dir, device=device)
    if entry.kind == "benign-finetune":
        ds = load_dataset(preset.dataset, channels=preset.channels, size=preset.size)
        train(preset, ds, out, epochs=_expected_epochs(entry), seed=entry.seed, base=base, device=device, progress=progress,
              grid_size=16)  # the preview the attacks save (a 64-image DDPM grid costs ~10 min at 32 px)
        return out
    attack = build_attack(entry.attack, base.image_shape, data_name=preset.dataset, **entry.args)
    attack_model(attack, base_dir, out, epochs=_expected_epochs(entry), seed=entry.seed, device=device, progress=progress)
    return out


def build_order(entries: list[ZooEntry]) -> list[list[ZooEntry]]:
    """Layers that can be built in parallel: models without a base, then models on built bases, ..."""
    done: set[str] = set()
    layers, left = [], list(entries)
    while left:
        layer = [e for e in left if e.base is None or e.base in done]
        if not layer:
            raise TerdError(f"zoo has a cycle among {[e.id for e in left]}")
        layers.append(layer)
        done |= {e.id for e in layer}
        left = [e for e in left if e.id not in done]
    return layers


def build_zoo(entries: list[ZooEntry], cache: str | Path, *, workers: int = 1, device: str = "cpu",
              echo: Callable[[str], None] = print) -> list[Path]:
    """Build every missing model, layer by layer, ``workers`` at a time (a local process pool)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for layer in build_order(entries):
        todo = [e for e in layer if not is_built(e, cache)]
        if not todo:
            continue
        echo(f"building {len(todo)} model(s): {', '.join(e.id for e in todo)}")
        if workers <= 1:
            for e in todo:
                build_entry(e, cache, device=device)
                echo(f"  built {e.id}")
        else:
            build = partial(build_entry, cache=cache, device=device, threads=max(1, (os.cpu_count() or 1) // workers))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for e, _ in zip(todo, pool.map(build, todo), strict=True):
                    echo(f"  built {e.id}")
    return [cache / e.id for e in entries]
