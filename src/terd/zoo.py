"""A declarative zoo: benign and backdoored models that terd builds, caches and resumes.

A zoo file (YAML) lists entries; an entry with a ``matrix`` expands into the product of its values
(``id`` may use them as ``{name}``). Kinds:

* ``benign``: ``terd train`` from scratch (``preset``, ``seed``, ``epochs``; ``unet`` overrides the preset's
  UNet2DModel settings, e.g. ``{norm_num_groups: 8}``, to build a variant of its network);
* ``benign-finetune``: the base model fine-tuned on clean data with the attacks' schedule — the control
  that fine-tuning alone is not flagged;
* ``attack``: ``terd attack`` on a base model (``attack`` + ``args`` of :func:`terd.attacks.build_attack`);
  ``batch_size`` (fine-tunes: attacks and ``benign-finetune``) trains with more, smaller steps than the preset's
  batch, e.g. the 32 px recipes measured to fit the 5-minute budget (``terd attack --batch-size``);
* ``pretrained``: a benign model that already exists in a local directory (``path``), e.g. a downloaded
  google/ddpm-cifar10-32: never built, scanned as benign and usable as the ``base`` of other entries.

Training data: the preset's built-in dataset, or ``data`` (a local image folder, CIFAR-10 directory or .npz),
set for the whole zoo at the top of the file or per entry. Relative paths (``data``, ``path``) are relative
to the zoo file. Every built model lives in ``CACHE/<id>``; a finished one is skipped, an interrupted one
resumes. ``evaluate: false`` keeps an entry out of the bench's scans (a base only there for others to build on,
e.g. one whose scan another zoo records).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from terd.errors import TerdError

if TYPE_CHECKING:
    from terd.presets import Preset

KINDS = ("benign", "benign-finetune", "attack", "pretrained")


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
    path: str | None = None  # pretrained: the model's directory
    data: str | None = None  # training data (a local path) instead of the preset's built-in dataset
    unet: dict = field(default_factory=dict)  # benign: UNet2DModel settings that replace the preset's
    batch_size: int | None = None  # fine-tunes: the batch instead of the preset's (recorded in train.json)
    evaluate: bool = True  # False: a base the zoo builds for others but the bench does not scan (e.g. scanned elsewhere)

    def preset_spec(self) -> Preset:
        """The entry's preset with its ``unet`` overrides applied (what a from-scratch build trains)."""
        import dataclasses

        from terd.presets import get_preset

        preset = get_preset(self.preset)
        return dataclasses.replace(preset, unet={**preset.unet, **self.unet}) if self.unet else preset

    @property
    def backdoored(self) -> bool:
        return self.kind == "attack"

    @property
    def family(self) -> str:
        return self.attack if self.backdoored else "benign"

    @property
    def source(self) -> str:
        """What :func:`terd.data.load_dataset` reads: ``data``, else the preset's built-in dataset."""
        from terd.presets import get_preset

        return self.data or get_preset(self.preset).dataset

    @property
    def dataset(self) -> str:
        """The dataset's name in reports (thresholds are fitted per dataset)."""
        return Path(self.data).name if self.data else self.source


def cache_dir(zoo_file: str | Path, cache: str | Path | None = None) -> Path:
    """Where a zoo's models are built: ``cache`` (``--cache``) if given, else ``zoo-cache`` next to the zoo file."""
    return Path(cache) if cache is not None else Path(zoo_file).parent / "zoo-cache"


def model_dir(entry: ZooEntry, cache: str | Path) -> Path:
    """Where an entry's model is: its own directory for ``pretrained``, else ``CACHE/<id>``."""
    return Path(entry.path) if entry.kind == "pretrained" else Path(cache) / entry.id


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


def _local(path: Path, value: object, what: str) -> str:
    """A path from the zoo file, relative to the file, that must exist (checked before any work starts)."""
    if not isinstance(value, str) or not value:
        raise TerdError(f"{path}: {what} must be a path, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else path.parent / p
    if not p.exists():
        raise TerdError(f"{path}: {what} {str(p)!r} does not exist")
    return str(p.resolve())


def _unet_defaults() -> dict:
    """UNet2DModel's settings with their defaults (a setting with no default maps to ``inspect.Parameter.empty``)."""
    import inspect

    from diffusers import UNet2DModel

    return {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}


def _check_unet_overrides(path: Path, raw: dict) -> None:
    """``unet`` is for models trained from scratch (the others take their base's network) and must make a
    UNet2DModel with the preset's other settings (checked on the meta device: nothing is allocated)."""
    import torch
    from diffusers import UNet2DModel

    from terd.presets import get_preset

    if raw["kind"] != "benign":
        raise TerdError(f"{path}: model {raw['id']!r}: 'unet' is for kind benign (a {raw['kind']} model takes "
                        "its base's network)")
    unet = raw["unet"]
    if not isinstance(unet, dict):
        raise TerdError(f"{path}: model {raw['id']!r}: 'unet' must be a mapping of UNet2DModel settings")
    if bad := sorted(set(unet) - set(_unet_defaults())):
        raise TerdError(f"{path}: model {raw['id']!r}: unknown UNet2DModel settings {bad}")
    try:
        with torch.device("meta"):
            UNet2DModel(**{**get_preset(raw.get("preset", ZooEntry.preset)).unet_config(), **unet})
    except (ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TerdError(f"{path}: model {raw['id']!r}: the 'unet' settings make no network ({first})") from None


def _check_batch_size(path: Path, raw: dict) -> None:
    if raw["kind"] not in ("attack", "benign-finetune"):
        raise TerdError(f"{path}: model {raw['id']!r}: 'batch_size' is for fine-tunes (kinds attack, benign-finetune)")
    b = raw["batch_size"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise TerdError(f"{path}: model {raw['id']!r}: 'batch_size' must be a positive integer, got {b!r}")


def load_zoo(path: str | Path, *, data: str | Path | None = None) -> list[ZooEntry]:
    """Read and validate a zoo file; bases must be defined and ids unique.

    ``data`` (e.g. ``terd bench --data``) replaces the file's top-level ``data`` (entries' own ``data`` win)."""
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such zoo file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TerdError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise TerdError(f"{path}: a zoo file needs a 'models:' list")
    if data is not None:  # relative to where the user is, not to the zoo file
        if not Path(data).expanduser().exists():
            raise TerdError(f"--data {str(data)!r} does not exist")
        default_data = str(Path(data).expanduser().resolve())
    else:
        default_data = _local(path, doc["data"], "data") if "data" in doc else None
    entries: list[ZooEntry] = []
    for raw in doc["models"]:
        if not isinstance(raw, dict) or "id" not in raw or raw.get("kind") not in KINDS:
            raise TerdError(f"{path}: each model needs an 'id' and a 'kind' in {KINDS}; got {raw!r}"[:300])
        raw = dict(raw)
        raw["data"] = _local(path, raw["data"], f"model {raw['id']!r}: data") if "data" in raw else default_data
        if raw["kind"] == "pretrained":
            if "path" not in raw or "base" in raw or "attack" in raw:
                raise TerdError(f"{path}: pretrained model {raw['id']!r} needs a 'path' (and no base or attack)")
            raw["path"] = _local(path, raw["path"], f"model {raw['id']!r}: path")
        elif "path" in raw:
            raise TerdError(f"{path}: model {raw['id']!r}: 'path' is for kind pretrained (this one is built)")
        if "unet" in raw:
            _check_unet_overrides(path, raw)
        if "batch_size" in raw:
            _check_batch_size(path, raw)
        if not isinstance(raw.get("evaluate", True), bool):
            raise TerdError(f"{path}: model {raw['id']!r}: 'evaluate' must be true or false")
        for e in _expand(raw):
            try:
                entries.append(ZooEntry(**{**e, "tags": tuple(e.get("tags", ()))}))
            except TypeError as exc:
                raise TerdError(f"{path}: model {e.get('id')!r}: {exc}") from None
    ids = [e.id for e in entries]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise TerdError(f"{path}: duplicate model ids {dup}")
    for e in entries:
        if e.kind not in ("benign", "pretrained") and e.base not in ids:
            raise TerdError(f"{path}: model {e.id!r} needs a 'base' defined in the zoo (got {e.base!r})")
        if e.kind == "attack" and not e.attack:
            raise TerdError(f"{path}: attack model {e.id!r} needs 'attack: baddiffusion|trojdiff|villan'")
    return entries


def populations(entries: list[ZooEntry]) -> dict[str, str]:
    """Per entry id, the group of models whose benign ones fit its thresholds: its dataset, split by network
    (preset + ``unet`` overrides; a fine-tune has its base's) where one dataset holds several, because benign KL
    features differ by architecture (threshold_scope.md: benign tiny-photos32 models sit over tiny-photos32-dc's
    thresholds). A pretrained model's network is the preset its entry names."""
    by_id = {e.id: e for e in entries}

    def network(e: ZooEntry) -> str:
        if e.base in by_id:
            return network(by_id[e.base])
        return e.preset + (" " + json.dumps(e.unet, sort_keys=True) if e.unet else "")

    nets = {e.id: network(e) for e in entries}
    split = {e.dataset for e in entries if len({nets[o.id] for o in entries if o.dataset == e.dataset}) > 1}
    return {e.id: f"{e.dataset} [{nets[e.id]}]" if e.dataset in split else e.dataset for e in entries}


def is_built(entry: ZooEntry, cache: Path) -> bool:
    """Finished and built with this entry's settings (a cached model built otherwise is refused, not reused)."""
    if entry.kind == "pretrained":
        return True  # exists (checked by load_zoo); never built
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


SCHEDULE_IDENTITY = ("_class_name", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                     "sigma_min", "sigma_max", "sigma_data", "sigma_schedule")


def _architecture_diff(entry: ZooEntry, model_dir: Path) -> dict:
    """Network settings where a from-scratch model differs from its entry's preset (+ ``unet``): a preset's
    architecture may change between releases, and a cached model of the old one must not pass for the new."""
    import inspect
    import json

    try:
        have = json.loads((model_dir / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # no network config to compare (loading the model reports a broken one)
    defaults = {k: v for k, v in _unet_defaults().items() if v is not inspect.Parameter.empty}
    want = json.loads(json.dumps(defaults | entry.preset_spec().unet_config()))  # tuples as lists, like the file
    diff = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
    try:  # the noise schedule too: the same network trained as a VP and as a VE model are different models
        have = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return diff
    want = entry.preset_spec().noise_schedule().config
    return diff | {k: (have.get(k), want[k]) for k in SCHEDULE_IDENTITY if k in want and have.get(k) != want[k]}


def _schedule_kind(model_dir: Path) -> str:
    """"vp" or "ve" from a built model's scheduler config (without loading its weights)."""
    from terd.models.loading import schedule_from_file

    return schedule_from_file(model_dir / "scheduler" / "scheduler_config.json").kind


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
    if entry.batch_size is not None:
        want["batch_size"] = entry.batch_size
    diff = {k: (rec.get(k), v) for k, v in want.items() if rec.get(k) != v}
    if entry.kind == "benign":
        diff |= _architecture_diff(entry, model_dir)
    if entry.backdoored:
        from terd.attacks import build_attack
        from terd.attacks.base import load_attack

        cached = load_attack(model_dir)
        kind_matters = entry.attack == "villan" and "psi" not in entry.args  # psi's default is per model kind
        wanted = build_attack(entry.attack, cached.image_shape, data_name=entry.source,
                              model_kind=_schedule_kind(model_dir) if kind_matters else "vp", preset=entry.preset,
                              **entry.args)
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
                threads: int | None = None, base_dir: str | Path | None = None) -> Path:
    """Build one model (resuming an interrupted build); its base must already be built.

    ``base_dir``: where the base model is (default ``CACHE/<base>``; a ``pretrained`` base lives elsewhere).

    ``threads``: torch threads for this build (parallel builds share the cores; oversubscribed, each runs
    several times slower).

    Two runs that share a cache (two zoos with a common base) build a model once: the build holds
    ``CACHE/.<id>.lock``, and a run that finds it held waits, then takes the finished model."""
    from filelock import FileLock

    cache = Path(cache)
    out = model_dir(entry, cache)
    if is_built(entry, cache):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{entry.id}.lock")):
        if not is_built(entry, cache):  # another run may have finished it while this one waited
            _build(entry, cache, out, device=device, progress=progress, threads=threads, base_dir=base_dir)
    return out


def _build(entry: ZooEntry, cache: Path, out: Path, *, device: str, progress: bool, threads: int | None,
           base_dir: str | Path | None) -> None:
    import dataclasses

    import torch

    from terd.attacks import attack_model, build_attack
    from terd.data import load_dataset
    from terd.models import load_denoiser
    from terd.train import train

    if threads:
        torch.set_num_threads(threads)
    preset = entry.preset_spec()
    if entry.kind == "benign":
        ds = load_dataset(entry.source, channels=preset.channels, size=preset.size)
        train(preset, ds, out, epochs=_expected_epochs(entry), seed=entry.seed, device=device, progress=progress)
        return
    base_dir = Path(base_dir) if base_dir is not None else cache / entry.base
    base = load_denoiser(base_dir, device=device)
    if entry.kind == "benign-finetune":
        ds = load_dataset(entry.source, channels=preset.channels, size=preset.size)
        if entry.batch_size is not None:
            preset = dataclasses.replace(preset, batch_size=entry.batch_size)
        train(preset, ds, out, epochs=_expected_epochs(entry), seed=entry.seed, base=base, device=device, progress=progress,
              grid_size=16)  # the preview the attacks save (a 64-image DDPM grid costs ~10 min at 32 px)
        return
    attack = build_attack(entry.attack, base.image_shape, data_name=entry.source, model_kind=base.schedule.kind,
                          preset=entry.preset, **entry.args)
    ds = load_dataset(entry.data, channels=preset.channels, size=preset.size) if entry.data else None
    attack_model(attack, base_dir, out, dataset=ds, epochs=_expected_epochs(entry), seed=entry.seed, device=device,
                 progress=progress, batch_size=entry.batch_size)


def select_entries(entries: list[ZooEntry], patterns: tuple[str, ...]) -> list[ZooEntry]:
    """The entries whose id matches one of ``patterns`` (shell-style: ``d16-*``; none: every entry), with the
    bases they are built on, which are built but not evaluated unless they match too: one zoo file serves a part
    of a run (``terd bench --only``), with the same rows a full run makes and reuses."""
    import dataclasses
    from fnmatch import fnmatchcase

    if not patterns:
        return entries
    chosen = {e.id for e in entries if any(fnmatchcase(e.id, p) for p in patterns)}
    if not chosen:
        raise TerdError(f"--only {','.join(patterns)} matches no model of the zoo")
    by_id = {e.id: e for e in entries}
    needed = set(chosen)
    for e_id in chosen:
        while (base := by_id[e_id].base) is not None:
            needed.add(base)
            e_id = base
    return [e if e.id in chosen else dataclasses.replace(e, evaluate=False) for e in entries if e.id in needed]


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


def check_pretrained(entries: list[ZooEntry]) -> None:
    """Load every ``pretrained`` model once before any work, so a broken one fails the run at the start, not
    after hours of builds that come before its first use."""
    from terd.models import load_denoiser

    for e in entries:
        if e.kind == "pretrained":
            try:
                load_denoiser(e.path)
            except TerdError as exc:
                raise TerdError(f"zoo model {e.id!r}: {exc}") from None


def how_far(done: int, total: int, start: float) -> str:
    """"(3/56, 0:41:07)": how far a multi-hour build or evaluation is, for its log lines."""
    import time
    from datetime import timedelta

    return f"({done}/{total}, {timedelta(seconds=round(time.perf_counter() - start))})"


def build_zoo(entries: list[ZooEntry], cache: str | Path, *, workers: int = 1, device: str = "cpu",
              echo: Callable[[str], None] = print) -> list[Path]:
    """Build every missing model, ``workers`` at a time (a local process pool). A model starts as soon as its
    base is built, not when the whole layer of :func:`build_order` before it is: a slow base (a 20-epoch 32 px
    model, ~24 minutes at foundation.md's 72 s per epoch) would otherwise leave a worker idle while the fine-tunes of built bases wait."""
    import os
    import time
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    start = time.perf_counter()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    by_id = {e.id: e for e in entries}
    check_pretrained(entries)

    def base_of(e: ZooEntry) -> Path | None:
        return model_dir(by_id[e.base], cache) if e.base else None

    queue = [e for layer in build_order(entries) for e in layer if not is_built(e, cache)]
    total = len(queue)
    if queue:
        echo(f"building {total} model(s): {', '.join(e.id for e in queue)}")
    if workers <= 1:
        for i, e in enumerate(queue, 1):
            build_entry(e, cache, device=device, base_dir=base_of(e))
            echo(f"  built {e.id} {how_far(i, total, start)}")
    elif queue:
        cores = os.cpu_count() or 1
        unbuilt = {e.id for e in queue}
        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(device)) as pool:
            running: dict = {}
            while queue or running:
                ready = [e for e in queue if e.base not in unbuilt][:workers - len(running)]
                # a build that starts alone, with nothing else ready, gets every core: no other can start before
                # it ends (only its end makes another ready), so the cores are never oversubscribed
                threads = cores if len(ready) == 1 and not running else max(1, cores // workers)
                for e in ready:
                    queue.remove(e)
                    running[pool.submit(build_entry, e, cache, device=device, threads=threads,
                                        base_dir=base_of(e))] = e
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for job in done:
                    e = running.pop(job)
                    job.result()
                    unbuilt.discard(e.id)
                    echo(f"  built {e.id} {how_far(total - len(unbuilt), total, start)}")
    return [model_dir(e, cache) for e in entries]


def pool_context(device: str):  # noqa: ANN201
    """Worker processes for ``device``: forked on CPU (cheap), spawned for a GPU (CUDA cannot be forked)."""
    import multiprocessing

    return None if device == "cpu" else multiprocessing.get_context("spawn")
