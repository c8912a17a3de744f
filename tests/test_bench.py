"""Zoo files and the bench's decision protocol (thresholds never see the model they judge)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from terd.attacks.build import quick_recipe
from terd.bench import decide, model_seconds, model_seconds_line, summarise, time_left, write_report
from terd.errors import TerdError
from terd.trigger_names import is_patch_trigger
from terd.zoo import build_order, load_zoo, populations

ZOO = Path(__file__).resolve().parents[1] / "benchmarks/zoo-tiny.yaml"
ASSET = Path(__file__).resolve().parents[1] / "src/terd/assets/models/digits-benign"


def test_shipped_zoo_expands_and_orders():
    entries = load_zoo(ZOO)
    ids = [e.id for e in entries]
    assert "d16-bd-stop-sign-shoe" in ids and "d16-troj-out-d2d-patch" in ids and "p32dc-villan-ode" in ids
    assert sum(e.kind != "attack" and e.dataset == "digits16" for e in entries) >= 5
    assert sum(e.kind != "attack" and e.dataset == "photos32" for e in entries) >= 5
    for e in entries:  # every 32 px fine-tune takes `terd attack`'s five-minute recipe for it (clean ones: batch 16)
        if e.dataset == "photos32" and e.kind != "benign":
            trigger = "patch" if is_patch_trigger(e.args.get("trigger")) else "blend"
            recipe = quick_recipe(e.preset, e.attack, e.args.get("setting"), trigger) if e.attack else None
            assert e.preset == "tiny-photos32-dc" and e.epochs == 3
            assert e.batch_size == (recipe.batch_size if recipe else 16), e.id
    layers = build_order(entries)
    assert all(e.base is None for e in layers[0])
    assert {e.family for e in entries if e.backdoored} == {"baddiffusion", "trojdiff", "villan"}


@pytest.mark.parametrize("text, message", [
    ("models: 3", "needs a 'models:' list"),
    ("models:\n  - {id: a, kind: attack, base: nope, attack: trojdiff}", "needs a 'base'"),
    ("models:\n  - {id: a, kind: benign}\n  - {id: a, kind: benign}", "duplicate"),
    ("models:\n  - {id: a, kind: weird}", "kind"),
    ("models: [", "invalid YAML"),
    ("models:\n  - {id: a, kind: benign, unet: {norm_groups: 8}}", r"unknown UNet2DModel settings \['norm_groups'\]"),
    ("models:\n  - {id: a, kind: benign, unet: 8}", "'unet' must be a mapping"),
    ("models:\n  - {id: a, kind: benign, unet: {norm_num_groups: 7}}", "the 'unet' settings make no network"),
    ("models:\n  - {id: a, kind: benign}\n  - {id: b, kind: benign-finetune, base: a, unet: {norm_num_groups: 8}}",
     "'unet' is for kind benign"),
    ("models:\n  - {id: a, kind: benign, batch_size: 16}", "'batch_size' is for fine-tunes"),
    ("models:\n  - {id: a, kind: benign}\n  - {id: b, kind: benign-finetune, base: a, batch_size: 0}",
     "'batch_size' must be a positive integer, got 0"),
    ("models:\n  - {id: a, kind: benign}\n  - {id: b, kind: attack, attack: villan, base: a, batch_size: x}",
     "'batch_size' must be a positive integer, got 'x'"),
])
def test_bad_zoo_files(tmp_path, text, message):
    f = tmp_path / "z.yaml"
    f.write_text(text)
    with pytest.raises(TerdError, match=message):
        load_zoo(f)


def _row(i: str, backdoored: bool, m: float, v: float, spread: float = 0.5, dataset: str = "digits16") -> dict:
    return {"id": i, "backdoored": backdoored, "dataset": dataset, "family": "trojdiff" if backdoored else "benign",
            "tags": [], "asr": 1.0 if backdoored else None, "peak_rss_mb": 1.0,
            "defenses": {"terd-fast": {"M_r": m, "V_r": v, "network_evaluations": 10, "seconds": 1.0,
                                       "trigger_l2": 1.0},
                         "elijah": {"spread": spread, "network_evaluations": 5, "seconds": 1.0, "trigger_l2": 2.0}}}


def test_leave_one_out_thresholds_and_rates():
    rows = [_row("b1", False, 0.010, 1e-4), _row("b2", False, 0.012, 1.2e-4), _row("b3", False, 0.011, 1.1e-4),
            _row("b4", False, 0.013, 0.9e-4), _row("x", True, 0.3, 1e-2, spread=0.1),
            _row("weak", True, 0.0115, 1e-4)]
    rows[-1]["asr"] = 0.2  # its backdoor does not fire: excluded
    for d in ("terd-fast", "elijah"):
        decide(rows, d)
    for r in rows:
        fitted = r["defenses"]["terd-fast"]["decision"]["fitted_on"]
        assert r["id"] not in fitted and all(not x.startswith(("x", "weak")) for x in fitted)
    assert rows[4]["defenses"]["terd-fast"]["decision"]["flagged"] is True
    assert rows[4]["defenses"]["terd-fast"]["decision"]["flagged_by"] == ["M_r", "V_r"]
    assert rows[0]["defenses"]["terd-fast"]["decision"]["flagged_by"] == []
    summary = summarise(rows, ("terd-fast", "elijah"), min_asr=0.9)
    assert summary["excluded_attacks_that_do_not_fire"] == ["weak"]
    row = next(t for t in summary["table"] if t["defense"] == "terd-fast")
    assert row["TPR"] == 1.0 and row["TNR"] == 1.0 and row["AUC"] == 1.0 and row["models"] == 1


def test_a_zoo_of_benign_models_only_reports_its_tnr():
    """A held-out benign check (no backdoored model in the zoo) still gets a summary row: its TNR is the result."""
    rows = [_row(f"b{i}", False, m, 1e-4) for i, m in enumerate((0.010, 0.012, 0.011, 0.013, 0.5))]
    decide(rows, "terd-fast")
    (row,) = summarise(rows, ("terd-fast",), min_asr=0.9)["table"]
    assert row["family"] == "(benign models only)" and row["benign_models"] == 5 and row["TNR"] == 0.8
    assert row["TPR"] is None and row["models"] == 0 and row["evals"] is not None



def test_per_model_cost_adds_the_defenses_and_the_attack_check_per_population():
    """What one model's evaluation costs a worker (benign: its scans; backdoored: its scans and the ASR check),
    medians and ranges per population: the figures a run's length is forecast from."""
    rows = [_row("b0", False, 0.01, 1e-4), _row("b1", False, 0.01, 1e-4), _row("b2", False, 0.01, 1e-4),
            _row("x0", True, 0.3, 1e-2), _row("x1", True, 0.3, 1e-2), _row("p", False, 0.01, 1e-4, dataset="photos32")]
    rows[2]["defenses"]["elijah"]["seconds"] = 9.0   # b: 2, 2, 10 s
    rows[3]["asr_seconds"], rows[4]["asr_seconds"] = 100.0, 300.0  # x: 102, 302 s
    costs = model_seconds(rows)
    assert costs["digits16"]["benign"] == {"models": 3, "median": 2.0, "min": 2.0, "max": 10.0}
    assert costs["digits16"]["backdoored"] == {"models": 2, "median": 202.0, "min": 102.0, "max": 302.0,
                                               "asr_check_median": 200.0}
    assert set(costs["photos32"]) == {"benign"}
    assert model_seconds_line(costs) == ("digits16: benign 2 s (median of 3, 2-10), backdoored 202 s (median of 2, "
                                         "102-302; its ASR check 200 s); photos32: benign 2 s (median of 1, 2-2)")
    assert summarise(rows, ("terd-fast",), min_asr=0.9)["model_seconds"] == costs


def test_time_left_prices_each_pending_model_at_its_kinds_median():
    """A multi-hour bench's log says how long is left: each pending model at the median cost of recorded models of
    its population (a network's own cost) and kind, shared by the workers; nothing until every pending kind has been
    measured."""
    from types import SimpleNamespace

    rows = [_row("b0", False, 0.01, 1e-4), _row("x0", True, 0.3, 1e-2), _row("x1", True, 0.3, 1e-2),
            _row("dc0", False, 0.01, 1e-4, dataset="photos32")]
    rows[1]["asr_seconds"], rows[2]["asr_seconds"] = 598.0, 1198.0  # x: 600, 1200 s; b0, dc0: 2 s

    def entry(i: str, dataset: str = "digits16", backdoored: bool = False) -> SimpleNamespace:
        return SimpleNamespace(id=i, dataset=dataset, backdoored=backdoored)

    pending = [entry(f"x{i}", backdoored=True) for i in range(2, 5)] + [entry("b1")]
    assert time_left(rows, pending, 2, {}) == ", about 0:22:31 left at the per-model medians so far"  # (3*900+2)/2
    assert time_left(rows, [*pending, entry("dc1", "photos32")], 2, {"dc0": "photos32 [dc]", "dc1": "photos32 [dc]"}
                     ) == ", about 0:22:32 left at the per-model medians so far"
    assert time_left(rows, [entry("p1", "photos32")], 2, {"dc0": "photos32 [dc]", "p1": "photos32 [p]"}) == ""
    assert time_left(rows, [], 2, {}) == ""


def test_thresholds_are_fitted_per_network_where_a_dataset_holds_several(tmp_path):
    """Benign tiny-photos32 and tiny-photos32-dc models' KL features differ (threshold_scope.md): where one dataset
    holds several networks, each model is judged against benign models of its own network only."""
    pops = populations(load_zoo(ZOO))  # one network per dataset: the dataset's name, as before
    assert pops["d16-benign-s0"] == "digits16" and pops["p32dc-villan-ode"] == "photos32"
    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: p, kind: benign, preset: tiny-photos32}\n"
                 "  - {id: dc, kind: benign, preset: tiny-photos32-dc}\n"
                 "  - {id: v, kind: attack, attack: villan, preset: tiny-photos32-dc, base: dc}\n"
                 "  - {id: g, kind: benign, unet: {norm_num_groups: 8}}\n  - {id: d, kind: benign}\n")
    assert populations(load_zoo(f)) == {
        "p": "photos32 [tiny-photos32]", "dc": "photos32 [tiny-photos32-dc]", "v": "photos32 [tiny-photos32-dc]",
        "g": 'digits16 [tiny-digits16 {"norm_num_groups": 8}]', "d": "digits16 [tiny-digits16]"}
    rows = [_row(f"a{i}", False, 0.010 + 0.001 * i, 1e-4) for i in range(3)]
    rows += [_row(f"b{i}", False, 0.110 + 0.001 * i, 1e-4) for i in range(3)]
    rows.append(_row("x", True, 0.05, 1e-4))  # a backdoor of network a: far over the a's, under the b's
    for r in rows:
        r["population"] = "b" if r["id"].startswith("b") else "a"
    decide(rows, "terd-fast")
    assert rows[0]["defenses"]["terd-fast"]["decision"]["fitted_on"] == ["a1", "a2"]
    assert not any(r["defenses"]["terd-fast"]["decision"]["flagged"] for r in rows[:6])
    assert rows[-1]["defenses"]["terd-fast"]["decision"]["flagged"] is True  # judged among the a's
    assert {(t["dataset"], t["TPR"]) for t in summarise(rows, ("terd-fast",), 0.9)["table"]} == {("a", 1.0), ("b", None)}
    pooled = [{k: v for k, v in r.items() if k != "population"} for r in rows]
    decide(pooled, "terd-fast")  # pooled (one dataset), the spread of both networks hides the backdoor
    assert pooled[-1]["defenses"]["terd-fast"]["decision"]["flagged"] is False
    assert len(pooled[0]["defenses"]["terd-fast"]["decision"]["fitted_on"]) == 5


def test_only_selects_models_and_builds_the_bases_they_need():
    """terd bench --only: the matching entries are evaluated; the bases under them are built, not evaluated."""
    from terd.zoo import select_entries

    entries = load_zoo(ZOO)
    picked = {e.id: e.evaluate for e in select_entries(entries, ("p32dc-troj-d2i-*", "d16-benign-s1"))}
    assert picked == {"d16-benign-s1": True, "p32dc-benign-s0": False, "p32dc-troj-d2i-blend": True,
                      "p32dc-troj-d2i-patch": True}
    assert [e.id for e in select_entries(entries, ("d16-benign-ft-s1",))] == ["d16-benign-s1", "d16-benign-ft-s1"]
    with pytest.raises(TerdError, match="matches no model"):
        select_entries(entries, ("d32-*",))
    assert select_entries(entries, ()) == entries  # no --only: the whole zoo, each entry's own evaluate flag


def test_report_files(tmp_path):
    rows = [_row(f"b{i}", False, 0.01 + 0.001 * i, 1e-4 * (1 + 0.1 * i)) for i in range(4)]
    rows.append(_row("x", True, 0.3, 1e-2, spread=0.1))
    meta = {"zoo": "z", "defenses": ["terd-fast", "elijah"], "workers": 1, "seconds": 1.0, "machine": "test"}
    write_report(rows, ("terd-fast", "elijah"), tmp_path, meta, 0.9, tmp_path)
    for f in ("results.json", "results.csv", "report.md", "roc_digits16.png", "scatter_terd-fast_digits16.png"):
        assert (tmp_path / f).is_file(), f
    report = (tmp_path / "report.md").read_text()
    assert "leave-one-out" in report
    # per model: its features, verdict and the features that flagged it (x: M_r and V_r, far over the b's)
    assert "| x | backdoored | 1.0 | terd-fast | 0.3 | 0.01 |" in report
    section = report.split("## Verdicts per model")[1].split("## Attack success")[0]
    assert sum(" | terd-fast | " in ln for ln in section.splitlines()) == 5  # one line per model, Elijah's apart
    line = next(ln for ln in report.splitlines() if ln.startswith("| x |"))
    assert line.endswith("| backdoored | M_r, V_r |")
    assert next(ln for ln in report.splitlines() if ln.startswith("| b0 |")).endswith("| benign |  |")


def _fake_evaluate(entry, cache, defenses, out, n_inputs, attack_n, seed, threads, input_fpr, device):  # noqa: ANN001
    """Stands in for a model's evaluation (in the worker process) and leaves a mark per call."""
    calls = Path(out) / "calls.txt"
    with calls.open("a") as fh:
        fh.write(entry.id + "\n")
    m = 0.01 + 0.001 * int(entry.id[-1])
    return _row(entry.id, False, m, 1e-4 * (1 + 0.1 * int(entry.id[-1])))


def test_bench_resumes_from_saved_rows(tmp_path, monkeypatch):
    import multiprocessing

    import terd.bench as bench

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fake evaluator reaches the worker only through fork")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n" + "".join(f"  - {{id: b{i}, kind: benign, seed: {i}}}\n" for i in range(3)))
    cache = tmp_path / "cache"
    for i in range(3):  # a built model: the bench must not train it
        (cache / f"b{i}").mkdir(parents=True)
        (cache / f"b{i}" / "model_index.json").write_text("{}")
        (cache / f"b{i}" / "train.json").write_text(json.dumps({"preset": "tiny-digits16", "seed": i, "epochs": 40}))
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    out = tmp_path / "out"
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, only=("b1",), echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["b1"]  # a part of the zoo (terd bench --only)
    assert "only the models matching b1" in (out / "report.md").read_text()
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert sorted((out / "calls.txt").read_text().split()) == ["b0", "b1", "b2"]  # the full run reuses b1's row
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert len((out / "calls.txt").read_text().split()) == 3  # every row reused
    report = (out / "report.md").read_text()
    assert "3 model(s) reused from an earlier run" in report and "only the models matching" not in report
    runs = json.loads((out / "results.json").read_text())["meta"]["runs"]  # the earlier runs' cost is kept
    assert [sorted(r["evaluated"]) for r in runs] == [["b1"], ["b0", "b2"], []]
    assert all(0 <= r["build_seconds"] <= r["seconds"] for r in runs)  # nothing built: a share of the run
    assert "Runs that evaluated models here: " in report and "2 model(s)." in report
    assert " s building) with 1 worker(s), 2 model(s)" in report
    (cache / "b1" / "train.json").write_text(json.dumps({"preset": "tiny-digits16", "seed": 1, "epochs": 40,
                                                         "rebuilt": True}))
    summary = bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert (out / "calls.txt").read_text().split()[3:] == ["b1"]  # only the rebuilt model again
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, input_fpr=1e-3, echo=lambda s: None)
    assert len((out / "calls.txt").read_text().split()) == 7  # other settings: all evaluated anew
    assert [t["family"] for t in summary["table"]] == ["(benign models only)"]  # three benign models: their TNR
    assert json.loads((out / "results.json").read_text())["meta"]["input_fpr"] == 1e-3
    from dataclasses import replace

    import terd.defense.reversion as rev

    monkeypatch.setitem(rev.PRESETS, "fast", replace(rev.PRESETS["fast"], descent_iters=0))  # another `fast`
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, input_fpr=1e-3, echo=lambda s: None)
    assert len((out / "calls.txt").read_text().split()) == 10  # rows made by another preset version: not reused


def test_matrix_over_entry_fields_sets_the_field_not_an_attack_argument(tmp_path):
    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: b, kind: benign}\n"
                 "  - {id: 'ft-{seed}', kind: benign-finetune, base: b, matrix: {seed: [10, 11]}}\n"
                 "  - {id: 'bd-{epochs}-{trigger}', kind: attack, attack: baddiffusion, base: b,\n"
                 "     matrix: {epochs: [2, 4], trigger: [box]}}\n")
    entries = {e.id: e for e in load_zoo(f)}
    assert entries["ft-10"].seed == 10 and entries["ft-11"].seed == 11 and entries["ft-10"].args == {}
    assert entries["bd-4-box"].epochs == 4 and entries["bd-4-box"].args == {"trigger": "box"}


def test_bench_cli_resumes_into_its_own_out_dir_but_refuses_a_foreign_one(tmp_path):
    from typer.testing import CliRunner

    from terd.cli import app

    missing = tmp_path / "no-zoo.yaml"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["bench", "--zoo", str(missing), "--out", str(foreign)])
    assert res.exit_code == 2 and "holds no earlier bench run" in res.output
    assert (foreign / "notes.txt").read_text() == "mine"
    interrupted = tmp_path / "interrupted"
    (interrupted / "rows").mkdir(parents=True)  # what a bench leaves before its report
    res = CliRunner().invoke(app, ["bench", "--zoo", str(missing), "--out", str(interrupted)])
    assert res.exit_code == 2 and "no such zoo file" in res.output  # past the out-dir check
    for only, said in ((",", "needs at least one id pattern"), ("d32-*", "matches no model")):
        fresh = tmp_path / f"fresh{len(said)}"
        res = CliRunner().invoke(app, ["bench", "--zoo", str(ZOO), "--out", str(fresh), "--only", only])
        assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1
        assert not fresh.exists()  # refused before anything is written


def test_a_cached_model_built_with_other_settings_is_refused_not_reused(tmp_path):
    from terd.attacks import build_attack
    from terd.attacks.base import save_attack
    from terd.zoo import is_built

    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: b, kind: benign, epochs: 3}\n"
                 "  - {id: bd, kind: attack, attack: baddiffusion, base: b, epochs: 2, args: {trigger: box, target: hat}}\n")
    benign, bd = load_zoo(f)
    cache = tmp_path / "cache"
    assert not is_built(benign, cache)  # nothing there yet
    for e, epochs in ((benign, 3), (bd, 2)):
        (cache / e.id).mkdir(parents=True)
        (cache / e.id / "model_index.json").write_text("{}")
        (cache / e.id / "train.json").write_text(json.dumps({"preset": e.preset, "seed": 0, "epochs": epochs}))
    save_attack(build_attack("baddiffusion", (1, 16, 16), trigger="box", target="hat"), cache / "bd")
    assert is_built(benign, cache) and is_built(bd, cache)  # the recorded settings are the entry's

    (cache / "b" / "train.json").write_text(json.dumps({"preset": benign.preset, "seed": 0, "epochs": 40}))
    with pytest.raises(TerdError, match=r"other settings than zoo entry 'b': epochs 40 \(entry: 3\)"):
        is_built(benign, cache)
    save_attack(build_attack("baddiffusion", (1, 16, 16), trigger="stop-sign", target="hat"), cache / "bd")
    with pytest.raises(TerdError, match="other settings than zoo entry 'bd': trigger 'stop-sign' \\(entry: 'box'\\)"):
        is_built(bd, cache)


def test_a_zoo_fine_tune_trains_at_its_batch_size_and_a_cache_at_another_is_refused(tmp_path, monkeypatch):
    """``batch_size`` reaches the fine-tune (the 32 px five-minute recipes use 16) and is part of the cache check."""
    from types import SimpleNamespace

    import terd.attacks
    import terd.models
    import terd.train
    from terd.zoo import build_entry, is_built

    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: b, kind: benign, epochs: 3}\n"
                 "  - {id: ft, kind: benign-finetune, base: b, epochs: 2, batch_size: 16}\n"
                 "  - {id: bd, kind: attack, attack: villan, base: b, epochs: 3, batch_size: 8}\n")
    _, ft, bd = load_zoo(f)
    assert (ft.batch_size, bd.batch_size) == (16, 8)
    seen = {}
    monkeypatch.setattr(terd.models, "load_denoiser", lambda *a, **k: SimpleNamespace(image_shape=(1, 16, 16),
                                                                           schedule=SimpleNamespace(kind="vp")))
    monkeypatch.setattr(terd.train, "train", lambda preset, *a, **k: seen.setdefault("ft", preset.batch_size))
    monkeypatch.setattr(terd.attacks, "attack_model", lambda *a, **k: seen.setdefault("bd", k["batch_size"]))
    build_entry(ft, tmp_path / "cache")
    build_entry(bd, tmp_path / "cache", base_dir=tmp_path)
    assert seen == {"ft": 16, "bd": 8}

    d = tmp_path / "cache" / "ft"
    d.mkdir(parents=True)
    (d / "model_index.json").write_text("{}")
    (d / "train.json").write_text(json.dumps({"preset": ft.preset, "seed": 0, "epochs": 2, "batch_size": 16}))
    assert is_built(ft, tmp_path / "cache")
    (d / "train.json").write_text(json.dumps({"preset": ft.preset, "seed": 0, "epochs": 2, "batch_size": 64}))
    with pytest.raises(TerdError, match=r"other settings than zoo entry 'ft': batch_size 64 \(entry: 16\)"):
        is_built(ft, tmp_path / "cache")


def test_two_runs_sharing_a_cache_build_a_model_once(tmp_path, monkeypatch):
    """A build that finds the model's lock held (another run building it) waits and then takes the finished model
    instead of training it a second time into the same directory."""
    import threading

    from filelock import FileLock

    import terd.train
    from terd.zoo import build_entry

    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: b, kind: benign, epochs: 3}\n")
    (entry,) = load_zoo(f)
    cache = tmp_path / "cache"
    cache.mkdir()
    trained = []
    monkeypatch.setattr(terd.train, "train", lambda *a, **k: trained.append(a))
    other_run = FileLock(str(cache / ".b.lock"))
    other_run.acquire()
    waiting = threading.Thread(target=build_entry, args=(entry, cache))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # blocked on the other run's lock
    (cache / "b").mkdir()  # the other run finishes the model, then lets go
    (cache / "b" / "model_index.json").write_text("{}")
    (cache / "b" / "train.json").write_text(json.dumps({"preset": entry.preset, "seed": 0, "epochs": 3}))
    other_run.release()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and trained == []

    f.write_text("models:\n  - {id: c, kind: benign, epochs: 3}\n")
    (unclaimed,) = load_zoo(f)
    build_entry(unclaimed, cache)  # nobody else building it: this run trains it
    assert len(trained) == 1


def test_a_cached_model_of_another_architecture_is_refused_and_unet_overrides_build_variants(tmp_path):
    """A preset's network may change between releases: a model cached under another one is refused, not
    reused; a benign entry's ``unet`` builds (and pins) a variant of the preset's network."""
    from diffusers import UNet2DModel

    from terd.presets import get_preset
    from terd.zoo import is_built

    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: plain, kind: benign, epochs: 3}\n"
                 "  - {id: groups8, kind: benign, epochs: 3, unet: {norm_num_groups: 8}}\n")
    plain, groups8 = load_zoo(f)
    assert plain.preset_spec() is get_preset(plain.preset)
    assert groups8.preset_spec().unet_config()["norm_num_groups"] == 8
    assert groups8.preset_spec().unet["block_out_channels"] == get_preset(plain.preset).unet["block_out_channels"]
    cache = tmp_path / "cache"
    for e in (plain, groups8):  # both cached with the preset's own network (diffusers' default: 32 groups)
        UNet2DModel(**get_preset(e.preset).unet_config()).save_pretrained(cache / e.id / "unet")
        (cache / e.id / "model_index.json").write_text("{}")
        (cache / e.id / "train.json").write_text(json.dumps({"preset": e.preset, "seed": 0, "epochs": 3}))
    assert is_built(plain, cache)
    with pytest.raises(TerdError, match=r"other settings than zoo entry 'groups8': norm_num_groups 32 \(entry: 8\)"):
        is_built(groups8, cache)
    UNet2DModel(**groups8.preset_spec().unet_config()).save_pretrained(cache / "plain" / "unet")
    with pytest.raises(TerdError, match=r"other settings than zoo entry 'plain': norm_num_groups 8 \(entry: 32\)"):
        is_built(plain, cache)  # a setting the preset leaves at diffusers' default counts too


def test_attack_success_takes_the_best_sampler_the_attack_offers(monkeypatch):
    import terd.attacks as attacks
    from terd.attacks import build_attack
    from terd.bench import attack_success

    asr = {"trojdiff-ddim": 0.86, "trojdiff-ddpm": 0.95, None: 0.97}
    calls = []

    def fake_eval(model_dir, n, seed, sampler=None, device="cpu", write=True):  # noqa: ANN001, ANN202
        assert not write  # the bench's measurement writes nothing into the model directory
        calls.append(sampler)
        return {"triggered": {"asr": asr[sampler]}, "clean": {"asr": 0.1 if sampler == "trojdiff-ddpm" else 0.0},
                "description": "fake"}

    monkeypatch.setattr(attacks, "evaluate_attack", fake_eval)
    monkeypatch.setattr(attacks, "load_attack", lambda d: build_attack("trojdiff", (1, 16, 16), setting="in-d2d"))
    got = attack_success("m", 8, 0)
    assert calls == ["trojdiff-ddim", "trojdiff-ddpm"]
    assert got["asr"] == 0.95 and got["clean_asr"] == 0.1 and got["asr_sampler"] == "trojdiff-ddpm"
    assert got["asr_by_sampler"] == {"trojdiff-ddim": 0.86, "trojdiff-ddpm": 0.95}
    assert got["clean_asr_by_sampler"] == {"trojdiff-ddim": 0.0, "trojdiff-ddpm": 0.1}  # a sampler's leak, seen
    bd = build_attack("baddiffusion", (1, 16, 16))
    asr[bd.sampler] = 0.97
    monkeypatch.setattr(attacks, "load_attack", lambda d: bd)
    got = attack_success("m", 8, 0)  # one sampler: the attack's own
    assert calls[2:] == [bd.sampler] and got["asr_by_sampler"] == {bd.sampler: 0.97} and got["asr"] == 0.97
    monkeypatch.setattr(attacks, "load_attack", lambda d: build_attack("trojdiff", (1, 16, 16), setting="in-d2d"))
    earlier = {"trojdiff-ddim": {"asr": 0.86, "clean_asr": 0.0, "attack": "earlier"}}
    got = attack_success("m", 8, 0, measured=earlier)  # what was measured already is not sampled again
    assert calls[3:] == ["trojdiff-ddpm"] and got["asr_by_sampler"] == {"trojdiff-ddim": 0.86, "trojdiff-ddpm": 0.95}
    asr["trojdiff-ddim"] = 1.0  # a sampler at ASR 1.0 cannot be beaten: the 1000-step DDPM check is not run
    got = attack_success("m", 8, 0)
    assert calls[4:] == ["trojdiff-ddim"] and got["asr_by_sampler"] == {"trojdiff-ddim": 1.0}
    assert got["asr"] == 1.0 and got["clean_asr"] == 0.0 and got["asr_sampler"] == "trojdiff-ddim"
    got = attack_success("m", 8, 0, measured={"trojdiff-ddpm": {"asr": 1.0, "clean_asr": 0.1, "attack": "earlier"}})
    assert calls[5:] == [] and got["asr_sampler"] == "trojdiff-ddpm" and got["clean_asr"] == 0.1


def test_attack_success_is_kept_in_the_cache_across_runs(tmp_path, monkeypatch):
    """A model's ASR is measured once per (model build, n, seed, device), whatever the output directory or
    defenses: the 1000-step check costs minutes per model. It lives in the zoo cache, not the model's directory."""
    import terd.attacks as attacks
    import terd.bench as bench
    import terd.models as models
    from terd.attacks import build_attack
    from terd.zoo import ZooEntry

    calls = []

    def fake_eval(model_dir, n, seed, sampler=None, device="cpu", write=True):  # noqa: ANN001, ANN202
        calls.append(sampler)
        return {"triggered": {"asr": 0.9}, "clean": {"asr": 0.0}, "description": "fake"}

    monkeypatch.setattr(attacks, "evaluate_attack", fake_eval)
    monkeypatch.setattr(attacks, "load_attack", lambda d: build_attack("trojdiff", (1, 16, 16), setting="d2i"))
    monkeypatch.setattr(attacks, "load_true_trigger", lambda d: (None, None))
    monkeypatch.setattr(models, "load_denoiser", lambda d, device="cpu": None)
    cache = tmp_path / "cache"
    (cache / "t").mkdir(parents=True)
    (cache / "t" / "train.json").write_text('{"seconds": 1}')
    entry = ZooEntry(id="t", kind="attack", attack="trojdiff")
    row = bench.evaluate_model(entry, str(cache), (), str(tmp_path / "out1"), attack_n=4)
    assert calls == ["trojdiff-ddim", "trojdiff-ddpm"] and row["asr"] == 0.9 and "measurements" not in row
    assert sorted(p.name for p in (cache / "t").iterdir()) == ["train.json"]  # nothing written beside the model
    again = bench.evaluate_model(entry, str(cache), (), str(tmp_path / "out2"), attack_n=4)
    assert len(calls) == 2 and again["asr_by_sampler"] == row["asr_by_sampler"]  # another run reuses it
    assert row["asr_seconds"] >= 0 and again["asr_seconds"] >= 0  # what the check cost each row (reused: ~0)
    bench.evaluate_model(entry, str(cache), (), str(tmp_path / "out1"), attack_n=8)
    assert len(calls) == 4  # another n is another measurement
    (cache / "t" / "train.json").write_text('{"seconds": 2}')  # the model was rebuilt
    bench.evaluate_model(entry, str(cache), (), str(tmp_path / "out1"), attack_n=8)
    assert len(calls) == 6
    (cache / bench.SUCCESS_DIR / "t.json").write_text("{not json")  # a damaged record is measured again
    bench.evaluate_model(entry, str(cache), (), str(tmp_path / "out1"), attack_n=8)
    assert len(calls) == 8


def _write_true_trigger(model_dir: Path):  # noqa: ANN202
    """A gamma = 1 trigger on 2 x 2 pixels (its LLR is Gaussian, so its input-detection ceiling has a closed form)."""
    import torch
    from safetensors.torch import save_file

    from terd.attacks.base import TRUE_TRIGGER_FILE

    r = torch.zeros(1, 16, 16)
    r[0, :2, :2] = 1.5
    save_file({"r": r, "gamma": torch.ones_like(r)}, str(model_dir / TRUE_TRIGGER_FILE))
    return r


def _one_built_model_zoo(tmp_path: Path) -> tuple[Path, Path]:
    """A one-model zoo whose model is already in the cache (the fakes reach the bench's workers only by fork)."""
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fakes reach the worker only through fork")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {id: b0, kind: benign, seed: 0}\n")
    cache = tmp_path / "cache"
    (cache / "b0").mkdir(parents=True)
    (cache / "b0" / "model_index.json").write_text("{}")
    (cache / "b0" / "train.json").write_text(json.dumps({"preset": "tiny-digits16", "seed": 0, "epochs": 40}))
    return zoo, cache


def _fake_success(model_dir, n, seed, measured, device):  # noqa: ANN001
    assert measured == {"own": {"asr": 0.86, "clean_asr": 0.0, "attack": "fake"}}
    with (Path(model_dir).parent / "asr-calls.txt").open("a") as fh:
        fh.write(Path(model_dir).name + "\n")
    return {"asr": 0.95, "clean_asr": 0.0, "asr_sampler": "s", "asr_by_sampler": {"s": 0.95}, "clean_asr_by_sampler": {"s": 0.0},
            "attack": "fake"}


def test_bench_re_measures_only_the_attack_of_rows_saved_before_every_sampler(tmp_path, monkeypatch):

    import terd.bench as bench

    zoo, cache = _one_built_model_zoo(tmp_path)
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    monkeypatch.setattr(bench, "attack_success", _fake_success)
    monkeypatch.setattr(bench, "_earlier_success", lambda d, row: {"own": {k: row[k] for k in ("asr", "clean_asr", "attack")}})
    out = tmp_path / "out"
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    saved = json.loads((out / "rows" / "b0.json").read_text())
    _write_true_trigger(cache / "b0")
    saved["row"] |= {"backdoored": True, "asr": 0.86, "clean_asr": 0.0, "attack": "fake"}  # as a backdoored row from before asr_by_sampler
    (out / "rows" / "b0.json").write_text(json.dumps(saved))
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["b0"]  # the defenses were not run again
    assert (cache / "asr-calls.txt").read_text().split() == ["b0"]
    row = json.loads((out / "rows" / "b0.json").read_text())["row"]
    assert row["asr"] == 0.95 and row["asr_by_sampler"] == {"s": 0.95}
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert (cache / "asr-calls.txt").read_text().split() == ["b0"]  # measured once


def test_bench_fills_in_clean_asr_per_sampler_from_the_cache_without_sampling(tmp_path, monkeypatch):
    """A row recorded before clean ASR was kept per sampler gets it from the zoo cache's measurements: nothing is
    sampled again, the defenses are not rerun, and the report lists each sampler's clean ASR."""
    import terd.bench as bench
    from terd.attacks import build_attack, save_attack

    zoo, cache = _one_built_model_zoo(tmp_path)
    save_attack(build_attack("trojdiff", (1, 16, 16), setting="d2i"), cache / "b0")  # a real attack record, no weights
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    out = tmp_path / "out"
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    _write_true_trigger(cache / "b0")
    saved = json.loads((out / "rows" / "b0.json").read_text())
    saved["row"] |= {"backdoored": True, "asr": 0.95, "clean_asr": 0.16, "attack": "fake", "asr_sampler": "trojdiff-ddpm",
                     "asr_by_sampler": {"trojdiff-ddim": 0.91, "trojdiff-ddpm": 0.95}}
    (out / "rows" / "b0.json").write_text(json.dumps(saved))
    key = bench.success_key(cache / "b0", bench.ATTACK_N, 0, "cpu")
    bench.store_success(cache, "b0", key, {name: {"asr": asr, "clean_asr": clean, "attack": "fake"} for name, asr, clean
                                           in (("trojdiff-ddim", 0.91, 0.03), ("trojdiff-ddpm", 0.95, 0.16))})
    # the worker has no weights to sample with: the fill-in must come from the row and the cache alone
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["b0"]  # the defenses were not run again
    row = json.loads((out / "rows" / "b0.json").read_text())["row"]
    assert row["clean_asr_by_sampler"] == {"trojdiff-ddim": 0.03, "trojdiff-ddpm": 0.16} and row["asr"] == 0.95
    assert "trojdiff-ddim 0.91 (clean 0.03), trojdiff-ddpm 0.95 (clean 0.16)" in (out / "report.md").read_text()


def test_bench_fills_in_the_input_detection_ceiling_of_backdoored_rows_without_rerunning_them(tmp_path, monkeypatch):

    from scipy.stats import norm

    import terd.bench as bench

    zoo, cache = _one_built_model_zoo(tmp_path)
    r = _write_true_trigger(cache / "b0")
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    out = tmp_path / "out"
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, echo=lambda s: None)
    saved = json.loads((out / "rows" / "b0.json").read_text())
    assert "input_tpr_bound" not in saved["row"]  # benign: no trigger, no ceiling
    saved["row"] |= {"backdoored": True, "asr": 0.95, "clean_asr": 0.0, "attack": "fake", "asr_by_sampler": {"s": 0.95},
                     "clean_asr_by_sampler": {"s": 0.0}}
    (out / "rows" / "b0.json").write_text(json.dumps(saved))  # a backdoored row recorded before the ceiling existed
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, input_fpr=bench.INPUT_FPR, echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["b0"]  # the defenses were not run again
    row = json.loads((out / "rows" / "b0.json").read_text())["row"]
    norm_r = float(r.norm())  # LLR ~ N(-|r|^2/2, |r|^2) benign, N(+|r|^2/2, |r|^2) backdoor
    assert row["input_tpr_bound"] == pytest.approx(norm.sf(norm.isf(bench.INPUT_FPR) - norm_r), abs=1e-6)


FULL_SCALE_ZOO = ZOO.parent / "zoo-cifar10.yaml"


def _full_scale_layout(root: Path) -> Path:
    """The zoo file next to the two local directories it names (empty stand-ins: only their paths matter)."""
    (root / "benchmarks").mkdir(parents=True)
    (root / "data/cifar-10-batches-py").mkdir(parents=True)
    (root / "models/ddpm-cifar10-32").mkdir(parents=True)
    zoo = root / "benchmarks/zoo-cifar10.yaml"
    zoo.write_text(FULL_SCALE_ZOO.read_text())
    return zoo


def test_full_scale_zoo_reads_its_data_and_pretrained_model_from_local_paths(tmp_path):
    from terd.zoo import is_built, model_dir

    zoo = _full_scale_layout(tmp_path)
    entries = {e.id: e for e in load_zoo(zoo)}
    google = entries["c10-google-ddpm"]
    assert google.kind == "pretrained" and not google.backdoored
    assert model_dir(google, tmp_path / "cache") == (tmp_path / "models/ddpm-cifar10-32").resolve()
    assert is_built(google, tmp_path / "cache")  # never built
    built = [e for e in entries.values() if e.kind != "pretrained"]
    assert len(built) >= 15 and all(e.base == "c10-google-ddpm" and e.preset == "ddpm-cifar10" for e in built)
    assert sum(not e.backdoored for e in entries.values()) >= 5
    assert {e.source for e in entries.values()} == {str((tmp_path / "data/cifar-10-batches-py").resolve())}
    assert {e.dataset for e in entries.values()} == {"cifar-10-batches-py"}  # the report's dataset label
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert {e.source for e in load_zoo(zoo, data=other)} == {str(other.resolve())}  # --data wins
    with pytest.raises(TerdError, match="--data .* does not exist"):
        load_zoo(zoo, data=tmp_path / "nope")
    (tmp_path / "data/cifar-10-batches-py").rmdir()
    with pytest.raises(TerdError, match="data .*cifar-10-batches-py' does not exist"):
        load_zoo(zoo)


@pytest.mark.parametrize("text, message", [
    ("models:\n  - {id: p, kind: pretrained}", "needs a 'path'"),
    ("models:\n  - {id: p, kind: pretrained, path: m, base: q}", "needs a 'path' \\(and no base"),
    ("models:\n  - {id: b, kind: benign, path: m}", "'path' is for kind pretrained"),
    ("models:\n  - {id: p, kind: pretrained, path: missing}", "path .*missing' does not exist"),
    ("data: 3\nmodels:\n  - {id: b, kind: benign}", "data must be a path"),
])
def test_bad_local_paths_in_zoo_files(tmp_path, text, message):
    (tmp_path / "m").mkdir()
    f = tmp_path / "z.yaml"
    f.write_text(text)
    with pytest.raises(TerdError, match=message):
        load_zoo(f)


def test_a_pretrained_base_is_read_where_it_lives(tmp_path, monkeypatch):
    import terd.zoo as zoo_mod

    shutil.copytree(ASSET, tmp_path / "google")
    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: g, kind: pretrained, path: google}\n"
                 "  - {id: bd, kind: attack, attack: baddiffusion, base: g}\n")
    calls = []
    monkeypatch.setattr(zoo_mod, "build_entry", lambda e, cache, device, base_dir: calls.append((e.id, base_dir)))
    dirs = zoo_mod.build_zoo(load_zoo(f), tmp_path / "cache", echo=lambda s: None)
    assert calls == [("bd", (tmp_path / "google").resolve())]  # the pretrained model is not built, only used
    assert dirs == [(tmp_path / "google").resolve(), tmp_path / "cache" / "bd"]


def test_bench_scans_a_pretrained_model_and_notices_when_its_files_change(tmp_path, monkeypatch):
    import multiprocessing

    import terd.bench as bench

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fake evaluator reaches the worker only through fork")
    shutil.copytree(ASSET, tmp_path / "m1")
    (tmp_path / "m1" / "train.json").unlink()  # a model from elsewhere: no terd training record
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {id: p1, kind: pretrained, path: m1}\n")
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    out = tmp_path / "out"
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=tmp_path / "cache", echo=lambda s: None)
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=tmp_path / "cache", echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["p1"]  # evaluated once, then reused
    saved = json.loads((out / "rows" / "p1.json").read_text())
    assert saved["key"]["entry"]["path"] == str((tmp_path / "m1").resolve())
    assert not (tmp_path / "cache" / "p1").exists()  # nothing copied or built
    (tmp_path / "m1" / "unet" / "config.json").write_text(  # the user changed the model (same config, new bytes)
        (tmp_path / "m1" / "unet" / "config.json").read_text() + "\n")
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=tmp_path / "cache", echo=lambda s: None)
    assert (out / "calls.txt").read_text().split() == ["p1", "p1"]


def test_rows_recorded_before_path_and_data_existed_keep_their_key():
    from terd.bench import _entry_key
    from terd.zoo import ZooEntry

    key = _entry_key(ZooEntry(id="b", kind="benign"))
    assert "path" not in key and "data" not in key and key["id"] == "b"
    assert "evaluate" not in key  # whether a model is scanned is not how: its rows stay valid either way


def test_bench_cli_refuses_a_missing_gpu_in_one_line(tmp_path):
    import torch
    from typer.testing import CliRunner

    from terd.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(app, ["bench", "--zoo", str(ZOO), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA device" in res.output


@pytest.mark.slow
def test_zoo_builds_from_a_pretrained_model_on_local_data(tmp_path):
    """For real: a clean fine-tune and an In-D2D attack of a model terd did not build, on a user's .npz."""
    import numpy as np

    from terd.attacks.base import load_attack
    from terd.data import digits16
    from terd.zoo import build_zoo

    ds = digits16()
    np.savez(tmp_path / "mine.npz", images=((ds.images[:256].numpy() + 1) * 127.5).astype(np.uint8),
             labels=ds.labels[:256].numpy())
    asset = ASSET
    (tmp_path / "zoo.yaml").write_text(
        f"data: mine.npz\nmodels:\n  - {{id: asset, kind: pretrained, path: {asset}}}\n"
        "  - {id: ft, kind: benign-finetune, base: asset, epochs: 1}\n"
        "  - {id: bd, kind: attack, attack: trojdiff, base: asset, epochs: 1, args: {setting: in-d2d, target_class: 3}}\n")
    entries = load_zoo(tmp_path / "zoo.yaml")
    dirs = build_zoo(entries, tmp_path / "cache", echo=lambda s: None)
    assert dirs[0] == asset
    train = json.loads((tmp_path / "cache/ft/train.json").read_text())
    assert train["dataset"] == "mine" and train["fine_tuned_from"] == str(asset)
    attack = load_attack(tmp_path / "cache/bd")
    assert attack.config()["target_data"] == str(tmp_path / "mine.npz") and attack.config()["target_label"] == 3
    assert build_zoo(entries, tmp_path / "cache", echo=lambda s: None) == dirs  # all built: nothing redone


def test_a_report_from_before_run_history_keeps_its_last_run(tmp_path):
    from terd.bench import _earlier_runs, _runs_line

    assert _earlier_runs(tmp_path) == []  # no earlier report
    old = {"seconds": 7831.0, "workers": 1, "machine": "2 CPU cores", "reused_rows": ["a"],
           "entries": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}
    (tmp_path / "results.json").write_text(json.dumps({"meta": old}))
    runs = _earlier_runs(tmp_path)
    assert [(r["seconds"], r["evaluated"]) for r in runs] == [(7831.0, ["b", "c"])]
    line = _runs_line({"runs": runs, "entries": old["entries"]})[0]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"runs": [{"seconds": 1}]}}))
    assert _earlier_runs(tmp_path) == []  # a damaged record is dropped, not a crash
    assert "7831.0 s with 1 worker(s), 2 model(s)" in line and "run times were kept): a." in line
    assert "building" not in line  # a run from before build times were kept says nothing of them
    # an --only report into the same directory lists only the runs that evaluated its models, and how many
    other = {"finished": "2026-12-08T02:22:20+00:00", "seconds": 2991.7, "workers": 2, "evaluated": ["p", "q"]}
    both = {**other, "seconds": 50.0, "evaluated": ["b", "p"]}
    line = _runs_line({"runs": [*runs, other, both], "entries": old["entries"]})[0]
    assert "2991.7" not in line and "50.0 s with 2 worker(s), 1 model(s) (2 in that run)" in line


def test_a_broken_pretrained_model_stops_the_zoo_before_any_build(tmp_path, monkeypatch):
    import terd.zoo as zoo_mod

    shutil.copytree(ASSET, tmp_path / "google")
    (tmp_path / "google" / "model_index.json").write_text("{not json")
    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: b, kind: benign}\n  - {id: g, kind: pretrained, path: google}\n")
    built = []
    monkeypatch.setattr(zoo_mod, "build_entry", lambda e, cache, device, base_dir: built.append(e.id))
    with pytest.raises(TerdError, match="zoo model 'g': "):
        zoo_mod.build_zoo(load_zoo(f), tmp_path / "cache", echo=lambda s: None)
    assert built == []  # nothing trained before the broken model was found


def test_a_cached_model_with_another_noise_schedule_is_refused(tmp_path):
    """tiny-digits16-ve has tiny-digits16's network: only the schedule tells a VE model from a VP one."""
    from diffusers import UNet2DModel

    from terd.models import NoiseSchedule, save_pipeline
    from terd.presets import get_preset
    from terd.zoo import is_built

    f = tmp_path / "z.yaml"
    f.write_text("models:\n  - {id: ve, kind: benign, preset: tiny-digits16-ve, epochs: 3}\n")
    (ve,) = load_zoo(f)
    cache = tmp_path / "cache"
    unet = UNet2DModel(**get_preset("tiny-digits16-ve").unet_config())
    (cache / "ve").mkdir(parents=True)
    (cache / "ve" / "train.json").write_text(json.dumps({"preset": "tiny-digits16-ve", "seed": 0, "epochs": 3}))
    save_pipeline(unet, NoiseSchedule.linear(), cache / "ve")  # a VP model under the VE preset's name
    with pytest.raises(TerdError, match=r"other settings than zoo entry 've': _class_name 'DDPMScheduler' "
                                        r"\(entry: 'EDMEulerScheduler'\)"):
        is_built(ve, cache)
    save_pipeline(unet, get_preset("tiny-digits16-ve").noise_schedule(), cache / "ve")
    assert is_built(ve, cache)


def _held_out_thresholds(fitted_on: list[str]):  # noqa: ANN202
    from terd.defense.model_detection import fit_thresholds

    return fit_thresholds([{"M_r": 0.010, "V_r": 1e-4}, {"M_r": 0.012, "V_r": 1.2e-4}, {"M_r": 0.011, "V_r": 1.1e-4}],
                          provenance={"preset": "fast", "models": fitted_on, "source": "a fit on other models"})


def test_held_out_thresholds_judge_every_model_outside_their_fit(tmp_path):
    """--thresholds: terd's decisions come from a fit made elsewhere; a model inside that fit is not judged, the
    others are judged by it alone (not by the zoo's benign models), and the report says which fit judged whom."""
    from terd.bench import decide_fixed, describe_fixed

    rows = [_row("b0", False, 0.011, 1e-4), _row("b1", False, 0.0105, 1.05e-4), _row("b2", False, 0.5, 1e-4),
            _row("x", True, 0.3, 1e-2, spread=0.1), _row("y", True, 0.011, 1e-4)]
    from terd.defense.model_detection import Thresholds

    thr = _held_out_thresholds(["b0"])
    same = Thresholds.from_dict(thr.to_dict())  # `shipped` loads the one fit anew for every model
    fixed = {"terd-fast": {r["id"]: same if r["id"] == "y" else thr for r in rows}}
    decide_fixed(rows, "terd-fast", fixed["terd-fast"], tmp_path)
    dec = {r["id"]: r["defenses"]["terd-fast"]["decision"] for r in rows}
    assert dec["b0"]["flagged"] is None and "in the fit" in dec["b0"]["note"]
    assert dec["b1"]["flagged"] is False and dec["x"]["flagged"] is True and dec["y"]["flagged"] is False
    assert dec["b2"]["flagged"] is True  # far over the fit: leave-one-out among b0-b2 would have kept it
    assert dec["x"]["cuts"] == thr.values() and dec["x"]["score"] > 0 > dec["b1"]["score"]
    summary = summarise(rows, ("terd-fast",), 0.9)
    row = summary["table"][0]
    assert (row["TPR"], row["TNR"], row["benign_models"]) == (0.5, 0.5, 3)  # b1 kept, b2 flagged; b0 unjudged
    meta = {"zoo": "z", "defenses": ["terd-fast", "elijah"], "workers": 1, "seconds": 1.0, "machine": "test",
            "thresholds": describe_fixed("t.json", fixed, rows, tmp_path)}
    assert meta["thresholds"]["unjudged"] == {"terd-fast": ["b0 (in the fit)"]}
    assert meta["thresholds"]["fits"]["terd-fast"][0]["judges"] == ["b1", "b2", "x", "y"]
    write_report(rows, ("terd-fast", "elijah"), tmp_path, meta, 0.9, tmp_path, fixed)
    report = (tmp_path / "report.md").read_text()
    assert "Held-out thresholds (`--thresholds t.json`)" in report and "a fit on other models (fitted on b0)" in report
    elijah = {r["id"]: r["defenses"]["elijah"]["decision"] for r in rows}
    assert elijah["b0"]["fitted_on"] == ["b1", "b2"]  # a defense the file does not cover: leave-one-out as before
    assert (tmp_path / "scatter_terd-fast_digits16.png").is_file()


def test_held_out_thresholds_from_a_file_or_shipped(tmp_path):
    from terd.bench import fixed_thresholds
    from terd.defense.calibration import default_thresholds
    from terd.models import load_denoiser
    from terd.zoo import ZooEntry

    f = _held_out_thresholds(["b0"]).save(tmp_path / "t.json")
    entries = [ZooEntry(id="m", kind="pretrained", path=str(ASSET))]
    assert fixed_thresholds(f, entries, tmp_path, ("terd-fast", "elijah"))["terd-fast"]["m"].M_r > 0
    with pytest.raises(TerdError, match="no terd-fast"):
        fixed_thresholds(f, entries, tmp_path, ("terd-paper",))
    with pytest.raises(TerdError, match="judges terd's defenses"):
        fixed_thresholds(f, entries, tmp_path, ("elijah",))
    shipped = fixed_thresholds("shipped", entries, tmp_path, ("terd-fast",))["terd-fast"]["m"]
    assert shipped == default_thresholds("fast", model=load_denoiser(ASSET))  # what `terd scan` would use
    assert "d16-benign-s4-e35" not in shipped.provenance["models"]  # the demo's benign model is outside that fit


def test_bench_skips_models_marked_evaluate_false_and_checks_thresholds_first(tmp_path, monkeypatch):
    import multiprocessing

    import terd.bench as bench

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fake evaluator reaches the worker only through fork")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {id: b0, kind: benign, seed: 0, evaluate: false}\n"
                   + "".join(f"  - {{id: b{i}, kind: benign, seed: {i}}}\n" for i in (1, 2, 3)))
    cache = tmp_path / "cache"
    for i in range(4):
        (cache / f"b{i}").mkdir(parents=True)
        (cache / f"b{i}" / "model_index.json").write_text("{}")
        (cache / f"b{i}" / "train.json").write_text(json.dumps({"preset": "tiny-digits16", "seed": i, "epochs": 40}))
    monkeypatch.setattr(bench, "evaluate_model", _fake_evaluate)
    out = tmp_path / "out"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TerdError):
        bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, thresholds=tmp_path / "bad.json",
                        echo=lambda s: None)
    assert not (out / "calls.txt").exists()  # refused before any scan
    f = _held_out_thresholds(["b1"]).save(tmp_path / "t.json")
    bench.run_bench(zoo, out, defenses=("terd-fast",), cache=cache, thresholds=f, echo=lambda s: None)
    assert sorted((out / "calls.txt").read_text().split()) == ["b1", "b2", "b3"]
    models = json.loads((out / "results.json").read_text())["models"]
    assert [m["defenses"]["terd-fast"]["decision"]["flagged"] for m in models] == [None, False, False]
    with pytest.raises(TerdError, match="'evaluate' must be true or false"):
        zoo.write_text("models:\n  - {id: b0, kind: benign, evaluate: maybe}\n")
        load_zoo(zoo)


def _zoo_with_fake_builds(tmp_path, monkeypatch, models: str, builder) -> list:  # noqa: ANN001
    """The entries of a zoo of ``models`` (YAML list lines), with ``builder`` standing in for every build."""
    import multiprocessing

    import terd.zoo as zoo_mod

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fake builder reaches the worker only through fork")
    f = tmp_path / "z.yaml"
    f.write_text("models:\n" + models)
    monkeypatch.setattr(zoo_mod, "build_entry", builder)
    return load_zoo(f)


def test_a_lone_build_gets_every_core(tmp_path, monkeypatch):
    import os

    from terd.zoo import build_zoo

    entries = _zoo_with_fake_builds(tmp_path, monkeypatch, "  - {id: b, kind: benign}\n  - {id: c, kind: "
                                    "benign-finetune, base: b}\n  - {id: d, kind: benign}\n  - {id: e, kind: benign}\n",
                                    _fake_build)
    cores = os.cpu_count() or 1
    build_zoo(entries[:2], tmp_path / "chain", workers=2, echo=lambda s: None)
    # a chain: each build starts alone with nothing else ready
    assert [int((tmp_path / "chain" / f"{i}.threads").read_text()) for i in "bc"] == [cores, cores]
    build_zoo(entries, tmp_path / "cache", workers=2, echo=lambda s: None)
    # three ready at the start: they share the cores, two at a time
    assert int((tmp_path / "cache" / "d.threads").read_text()) == max(1, cores // 2)


def test_a_model_starts_when_its_base_is_built_not_its_layer(tmp_path, monkeypatch):
    """slow (a base) and quick are one layer; quick-ft (on quick) must start while slow still builds: slow's fake
    build waits for quick-ft's and reports whether it came. Built layer by layer, it never would."""
    from terd.zoo import build_zoo

    entries = _zoo_with_fake_builds(tmp_path, monkeypatch, "  - {id: slow, kind: benign}\n  - {id: quick, kind: "
                                    "benign}\n  - {id: quick-ft, kind: benign-finetune, base: quick}\n",
                                    _fake_build_waiting)
    seen = []
    build_zoo(entries, tmp_path / "cache", workers=2, echo=seen.append)
    assert (tmp_path / "cache" / "slow.txt").read_text() == "saw quick-ft"
    assert seen[0] == "building 3 model(s): slow, quick, quick-ft" and re.fullmatch(r"  built slow \(3/3, \d+:\d\d:\d\d\)", seen[-1])


def _fake_build_waiting(e, cache, device, threads, base_dir):  # noqa: ANN001, ANN202
    """slow waits (up to 60 s) for quick-ft's build to have started; the others return at once."""
    import time

    cache = Path(cache)
    (cache / f"{e.id}.started").write_text("")
    if e.id == "slow":
        deadline = time.monotonic() + 60
        while not (cache / "quick-ft.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (cache / "slow.txt").write_text("saw quick-ft" if (cache / "quick-ft.started").exists() else "timed out")


def _fake_build(e, cache, device, threads, base_dir):  # noqa: ANN001, ANN202
    """Stands in for a build (in the worker process) and records the torch threads it was given."""
    (Path(cache) / f"{e.id}.threads").write_text(str(threads))


def test_rows_recorded_before_L_p_get_it_from_their_probe_summary(tmp_path, tiny_unet, schedule):
    """A row made before L_p existed holds the probe's summary (support, no element count): the bench fills L_p
    in from it, reading the image size from the model, and leaves rows without a recorded response alone. L_p is
    the localization when the summary's first look kept a patch-shaped window (listed), else 1."""
    from terd.bench import with_localization
    from terd.models import save_pipeline

    save_pipeline(tiny_unet, schedule, tmp_path / "m")
    patch = {"leading_support": 2.0, "window_elements": 2, "window_indices": [[0, 0, 0], [0, 1, 0]]}  # 2 x 1
    old = {"defenses": {"terd-fast": {"M_r": 0.1, "patch_probe": {"leading_support": 4.0}},
                        "terd-paper": {"M_r": 0.1, "patch_probe": {"leading_support": None}},
                        "elijah": {"spread": 0.2}, "terd-line": {"patch_probe": patch}}}
    assert with_localization(old, tmp_path / "m")
    elements = tiny_unet.config.in_channels * tiny_unet.config.sample_size ** 2
    assert old["defenses"]["terd-fast"]["L_p"] == 1.0 and old["defenses"]["terd-fast"]["patch_probe"]["elements"] == elements
    assert old["defenses"]["terd-line"]["L_p"] == 1.0  # a line of pixels is not a patch
    assert "L_p" not in old["defenses"]["terd-paper"] and "L_p" not in old["defenses"]["elijah"]
    square = {"leading_support": 4.0, "window_elements": 4, "window_indices": [[0, 0, 0], [0, 0, 1], [0, 1, 0],
                                                                                [0, 1, 1]], "elements": 256}
    row = {"defenses": {"terd-fast": {"patch_probe": square}}}
    assert with_localization(row, tmp_path / "missing") and row["defenses"]["terd-fast"]["L_p"] == 256 / 4
    assert not with_localization(old, tmp_path / "missing")  # already filled in: the model is not read again


def test_a_model_in_a_feature_s_own_fit_is_not_judged_by_it(tmp_path):
    from terd.bench import _not_judged
    from terd.defense.model_detection import refit_feature

    thr = refit_feature(_held_out_thresholds(["b0"]), "L_p", [1.0, 2.0], ["b1", "b2"])
    assert _not_judged({"id": "b1"}, thr, tmp_path) == "in the fit"
    assert _not_judged({"id": "b0"}, thr, tmp_path) == "in the fit" and _not_judged({"id": "x"}, thr, tmp_path) is None


def test_a_flagged_patch_model_s_input_detection_uses_the_candidates_its_verdict_implicates(tmp_path):
    """The report re-measures input detection as scan + check-inputs run it: on a model the patch probe's features
    flagged, over the probe's candidate and the reversion candidates with an image-wide anomaly (same noises, saved
    candidates, no network)."""
    from terd.defense.trigger import Trigger, save_candidates

    shape = (1, 4, 4)
    window = torch.zeros(shape, dtype=torch.bool)
    window[0, 2:4, 2:4] = True
    patch = Trigger(torch.where(window, 0.9, 0.0), torch.where(window, 0.1, 1.0))
    (tmp_path / "cache" / "x").mkdir(parents=True)
    patch.save(tmp_path / "cache" / "x" / "true_trigger.safetensors")
    at_patch = Trigger(torch.where(window, -2.0, 0.0), torch.ones(shape))  # the patch's place, the wrong value
    (tmp_path / "out" / "triggers").mkdir(parents=True)
    save_candidates([at_patch, patch], tmp_path / "out" / "triggers" / "x--terd-fast.candidates.safetensors")
    rows = [_row(f"b{i}", False, 0.01 + 0.001 * i, 1e-4 * (1 + 0.1 * i)) for i in range(4)]
    rows += [_row("x", True, 0.3, 1e-2), _row("missed", True, 0.0115, 1.1e-4)]
    for r in rows:
        r["defenses"]["terd-fast"]["L_p"] = 1.0 + 0.01 * len(r["id"]) * (r["id"] != "x") + 40.0 * (r["id"] == "x")
    rows[4]["defenses"]["terd-fast"]["patch_probe"] = {"candidate_index": 1}
    for r in rows[4:]:
        r["defenses"]["terd-fast"]["input_detection"] = {"tpr": 0.5, "tnr": 0.999, "n": 2000}
    meta = {"zoo": "z", "defenses": ["terd-fast"], "workers": 1, "seconds": 1.0, "machine": "test", "seed": 0,
            "input_fpr": 5e-4}
    summary = write_report(rows, ("terd-fast",), tmp_path / "out", meta, 0.9, tmp_path / "cache")
    inp = rows[4]["defenses"]["terd-fast"]["input_detection"]
    assert rows[4]["defenses"]["terd-fast"]["decision"]["flagged_by"] == ["M_r", "V_r", "L_p"]
    assert inp["by_verdict"]["candidates"] == [1] and inp["by_verdict"]["tpr"] > 0.9 and inp["by_verdict"]["tnr"] > 0.99
    assert "by_verdict" not in rows[5]["defenses"]["terd-fast"]["input_detection"]  # not flagged: the any-candidate rule
    (row,) = [t for t in summary["table"] if t["defense"] == "terd-fast"]
    assert row["input_TPR_any"] == 0.5 and row["input_TPR"] == 0.5  # the worst model: the missed one, as before
    rows.pop()
    summary = write_report(rows, ("terd-fast",), tmp_path / "out", meta, 0.9, tmp_path / "cache")
    (row,) = [t for t in summary["table"] if t["defense"] == "terd-fast"]
    assert row["input_TPR"] == round(inp["by_verdict"]["tpr"], 4) and row["input_TPR_any"] == 0.5
