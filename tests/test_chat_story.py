"""saediff demo --model, the story after the fine-tunes (SAE, diffs, steering by the pair metric,
BLOCK-EM, sampled answers), on a tiny random Qwen2 chat model with small pair files; exact tests of
the numerical pieces it adds (CE-loss recovered in batches and at chosen positions, the BLOCK-EM
lambda)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from saediff.errors import SaediffError
from saediff.evaluation.intervals import bar_verdict, bootstrap_ratio
from saediff.interventions.steer_null import NULL_SEED, NullConfig
from saediff.stories.smollm2.demo import run_chat_demo
from saediff.stories.smollm2.recipe import BLOCK_RUNS, ChatDemoRecipe, slug


def _pair_files(root: Path) -> tuple[Path, Path, Path]:
    """Two disjoint pair files from the shipped design split (4 and 3 questions in each of 3
    domains) and a slice of the style-crossed set (its first 2 questions in each of its 6 domains)."""
    from dataclasses import asdict

    from helpers import write_pair_files

    from saediff.data.em_data import style_crossed_pairs

    seen: dict[str, int] = {}
    sliced = []
    for p in style_crossed_pairs():
        seen[p.domain] = seen.get(p.domain, 0) + 1
        if seen[p.domain] <= 2:
            sliced.append(p)
    crossed = root / "style_crossed_slice.jsonl"
    crossed.write_text("".join(json.dumps(asdict(p)) + "\n" for p in sliced))
    return (*write_pair_files(root, 3, 4, 3), crossed)


def _recipe(choose: Path, report: Path, crossed: Path) -> ChatDemoRecipe:
    return ChatDemoRecipe(
        finetunes=("full_bad", "lora_bad"),
        steps=2,
        rows=4,
        batch_size=2,
        full_lr=1e-3,
        lora_lr=1e-2,
        save_every=1,
        lora_save_every=1,
        sae_width=64,
        sae_k=4,
        sae_steps=50,
        sae_batch_size=256,
        sae_held_rows=2,
        icl_questions=4,
        steer_latents=1,
        kl_budget=0.006,  # a random 2-block model's KL saturates near 0.015 nats/token
        kl_levels=(0.5, 1.0),
        null=NullConfig(n_isotropic=2, n_covariance=2),
        style_crossed=str(crossed),  # 12 questions, 6 domains: each half holds every domain
        ablation_randoms=2,
        block_latents=(3, 2),
        pair_sets=(str(choose), str(report), "medical"),
        choose_on=str(choose),
        report_on=str(report),
    )


@pytest.fixture(scope="module")
def story(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_story")
    recipe = _recipe(*_pair_files(root))
    said: list[str] = []
    summary = run_chat_demo(str(tiny_qwen / "model"), root / "demo", recipe=recipe, progress=said.append)
    return root / "demo", summary, recipe, said


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def test_sae_is_a_saelens_folder_with_its_metrics(story):
    from saediff.saes.loading import load_sae

    out, s, recipe, _ = story
    sae = load_sae(str(out / "sae"))
    assert sae.cfg.d_sae == 64 and sae.cfg.metadata.hook_name == f"blocks.{s['layer']}.hook_resid_post"
    assert s["layer"] == 1  # the middle of the tiny model's 2 blocks
    meta = json.loads((out / "sae" / "saediff.json").read_text())
    assert meta["metrics"] == s["sae"] and meta["made_by"]["train"]["k"] == 4
    m = s["sae"]
    assert m["ce_loss_recovered"] == pytest.approx(
        (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"])
    )
    assert 0 < m["fvu"] < 1.5 and m["l0"] <= 4 + 1e-9 and m["n_train_tokens"] > 1000


def test_diffs_directions_and_cosines(story):
    from saediff.methods.export import load_directions

    out, s, _, _ = story
    for run in ("diff", "diff_lora"):
        assert (out / run / "diff.json").is_file() and (out / run / "cosines.json").is_file()
        info = json.loads((out / run / "run.json").read_text())["steps"]["diff"]
        assert info["labels"] == {
            "misaligned": 12,
            "aligned": 12,
            "unlabelled": 0,
        }  # the references, both ways
        assert s["diffs"]["full_bad" if run == "diff" else "lora_bad"]["top_latents"] == info["top_latents"]
    full, lora = (
        load_directions(out / "diff" / "directions"),
        load_directions(out / "diff_lora" / "directions"),
    )
    assert {"mean_diff_models_L1", "mean_diff_responses_L1", "in_context_L1", "in_context_L0"} <= set(full)
    assert any(n.startswith("lora_b_L") for n in lora) and not any(n.startswith("lora_b") for n in full)


def test_steering_figures_come_from_the_report_split(story):
    out, s, recipe, _ = story
    st = s["steering"]
    assert st["kind"] == "saediff.pair_steering" and st["kl_budget"] == 0.006
    assert st["costs"] == pytest.approx([0.003, 0.006]) and st["made_by"]["protocol"] == 6
    assert st["null_config"]["n"] == 4 and st["null_config"]["seed"] == NULL_SEED
    assert st["neutral"]["n_tokens"] > 0
    base = json.loads((out / "steer" / "report" / "base" / "em.json").read_text())
    assert base["n"] == 9 and st["base"]["preference"] == base["preference"]  # the report file's 9 questions
    chose_base = json.loads((out / "steer" / "select" / "base" / "em.json").read_text())
    assert chose_base["n"] == 6  # the first half of the choose file
    ran = [c for c in st["candidates"].values() if c.get("effect") is not None]
    assert ran
    for name, c in st["candidates"].items():
        if c.get("effect") is None:
            assert c["note"] and not c["scale_found"]
            continue
        level = f"{c['cost_level']:g}"
        assert c["cost_kl"] == pytest.approx(c["cost_level"], rel=0.05)
        assert c["scale"] == pytest.approx(c["scale_abs"] / st["resid_norm"])
        em = json.loads((out / "steer" / "report" / f"{name}_c{level}_induce" / "em.json").read_text())
        # paired over the same 9 questions: the mean change equals the change of the mean
        assert c["effect"] == pytest.approx(em["preference"] - base["preference"], abs=1e-9)
        assert c["n"] == 9 and c["effect_ci"][0] <= c["effect"] <= c["effect_ci"][1]
        nulls = c["null"]
        assert sorted((d["kind"], d["seed"]) for d in nulls.values()) == [
            ("covariance", NULL_SEED + 100_000),
            ("covariance", NULL_SEED + 100_001),
            ("isotropic", NULL_SEED),
            ("isotropic", NULL_SEED + 1),
        ]
        assert c["null_seeds"] == {n: {"kind": d["kind"], "seed": d["seed"]} for n, d in nulls.items()}
        effs = [d["effect"] for d in nulls.values()]
        assert all(
            d["cost_kl"] == pytest.approx(c["cost_level"], rel=0.05) for d in nulls.values() if d["reached"]
        )
        assert c["p_value"] == pytest.approx((1 + sum(e >= c["effect"] for e in effs)) / 5)
        assert c["beats_null"] is False  # 4 null directions: the smallest p-value is 0.2
        assert c["verdict"] in ("fails", "inconclusive")
        assert c["null_quantiles"]["q95"] == pytest.approx(float(np.quantile(effs, 0.95)))
        assert c["equal_norm"]["n"] == 4
        chose = json.loads((out / "steer" / "select" / f"{name}_c{level}_induce" / "em.json").read_text())
        assert c["select_effect"] == pytest.approx(chose["preference"] - chose_base["preference"], abs=1e-9)
        assert c["select_effect"] == max(v["effect"] for v in c["select_sweep"].values() if v["reached"])
    _check_style_crossed(out, st)
    _check_projection(out, st, base)


def _check_style_crossed(out: Path, st: dict) -> None:
    """The same candidates through the protocol on the style-crossed slice's halves (6 + 6 questions,
    one per domain in each), under steer/style_crossed/, its KL points the held-out run's."""
    cross = st["style_crossed"]
    assert cross["n_select"] == cross["n_report"] == 6 and cross["pair_set"].endswith(
        "style_crossed_slice.jsonl"
    )
    folder = out / "steer" / "style_crossed"
    base = json.loads((folder / "report" / "base" / "em.json").read_text())
    assert base["n"] == 6 and cross["base"]["preference"] == base["preference"]
    # the scale searches were not run again: the held-out run's KL points seeded the folder's
    held_costs = json.loads((out / "steer" / "costs.json").read_text())
    assert set(held_costs) <= set(json.loads((folder / "costs.json").read_text()))
    ran = 0
    for name, c in st["candidates"].items():
        sc = c["style_crossed"]
        assert set(sc) == {
            "scale", "cost_kl", "cost_level", "scale_found", "select_effect", "effect", "effect_ci", "n",
            "p_value", "beats_null", "verdict", "null_quantiles", "note",
        }  # fmt: skip
        if sc["effect"] is None:
            assert sc["note"] and not sc["scale_found"]
            continue
        ran += 1
        level = f"{sc['cost_level']:g}"
        # the same direction at the same cost level: the same scale as on the held-out split's sweep
        assert sc["cost_kl"] == c["select_sweep"][level]["cost_kl"]
        em = json.loads((folder / "report" / f"{name}_c{level}_induce" / "em.json").read_text())
        assert sc["effect"] == pytest.approx(em["preference"] - base["preference"], abs=1e-9)
        assert sc["n"] == 6 and sc["effect_ci"][0] <= sc["effect"] <= sc["effect_ci"][1]
        assert sc["verdict"] in ("holds", "fails", "inconclusive") and sc["p_value"] >= 0.2  # 4 nulls
    assert ran


def _check_projection(out: Path, st: dict, base: dict) -> None:
    """Each direction projected out of (clamped in) both models: shift, surviving and removed recomputed
    per question from the four conditions' em.json, the surviving share's bootstrap, the p-value
    against the two random directions and the verdict (2 random: "beats every random direction")."""
    from saediff.interventions.steer_null import empirical_p

    proj = st["project"]
    report = out / "steer" / "report"
    ft = json.loads((report / "finetuned" / "em.json").read_text())
    shift_q = {q: v - base["scores"][q] for q, v in ft["scores"].items()}  # fine-tune - base, per question
    assert ft["n"] == 9 and proj["finetuned_preference"] == ft["preference"] and proj["n"] == 9
    assert proj["shift"] == pytest.approx(ft["preference"] - base["preference"], abs=1e-12)
    assert proj["random_directions"] == {
        f"null_iso{k}": {"kind": "isotropic", "seed": NULL_SEED + k} for k in range(2)
    }

    def figures(name: str, kind: str) -> tuple[dict, dict, dict]:
        ft_a, base_a = (
            json.loads((report / f"{name}_{kind}_all{tail}" / "em.json").read_text())
            for tail in ("", "_base")
        )
        assert base_a["provenance"]["intervention"] is not None  # the base model is ablated too
        surviving = {q: ft_a["scores"][q] - base_a["scores"][q] for q in shift_q}
        return ft_a, base_a, surviving

    moved_base = 0
    for kind in ("project", "clamp"):
        arm = proj[kind]
        assert set(arm["candidates"]) == set(st["candidates"]) and set(arm["random"]) == {
            "null_iso0",
            "null_iso1",
        }
        assert arm["random_removed"] == [arm["random"][n]["removed"] for n in ("null_iso0", "null_iso1")]
        for name, c in {**arm["candidates"], **arm["random"]}.items():
            ft_a, base_a, surv_q = figures(name, kind)
            assert (
                c["preference"] == ft_a["preference"] and c["base_ablated_preference"] == base_a["preference"]
            )
            moved_base += abs(base_a["preference"] - base["preference"]) > 1e-6
            assert c["shift"] == pytest.approx(np.mean(list(shift_q.values())), abs=1e-12)
            assert c["surviving"] == pytest.approx(np.mean(list(surv_q.values())), abs=1e-12)
            assert c["removed"] == pytest.approx(c["shift"] - c["surviving"], abs=1e-12)
            assert c["removed_ci"][0] <= c["removed"] <= c["removed_ci"][1] and c["n"] == 9
            if c["surviving_share"] is not None:
                share = bootstrap_ratio(surv_q, shift_q)
                assert (
                    c["surviving_share"] == pytest.approx(share["ratio"])
                    and c["surviving_share_ci"] == share["ci"]
                )
                assert c["share"] == pytest.approx(1 - c["surviving_share"])
        rnd = arm["random_removed"]
        for c in arm["candidates"].values():
            assert c["p_value"] == empirical_p(c["removed"], rnd) and c["n_random"] == 2
            assert c["rule"] == "beats every random direction" and "1/3" in c["note"]
            beats = c["removed"] > max(rnd)
            want = (
                "holds"
                if c["removed_ci"][0] > 0 and beats
                else "fails"
                if c["removed_ci"][1] <= np.quantile(rnd, 0.95)
                else "inconclusive"
            )
            assert c["verdict"] == want and c["beats_random"] is beats
    assert moved_base  # projecting a direction out of the base model changes how it reads the pairs
    # clamping keeps the base model's position on the axis, projecting zeroes it: not the same model
    assert any(
        proj["clamp"]["candidates"][n]["preference"] != proj["project"]["candidates"][n]["preference"]
        for n in st["candidates"]
    )


def test_block_runs_hold_the_diffs_latents_with_the_measured_lambda(story):
    from saediff.activations.collect import collect_activations
    from saediff.data.chat_data import load_chat_jsonl
    from saediff.data.em_data import data_path
    from saediff.interventions.blocking import latent_codes
    from saediff.interventions.latent_sets import LatentSets, latents_from_diff
    from saediff.models.loading import load_model
    from saediff.saes.loading import load_sae
    from saediff.stories.smollm2.blocking import block_lambda
    from saediff.stories.smollm2.prompts import text_prompts

    out, s, _, _ = story
    diff_latents = latents_from_diff(out / "diff", 3, 2)
    runs = {name: json.loads((out / "models" / name / "em.json").read_text()) for name in BLOCK_RUNS}
    assert runs["block_diff"]["mode"] == "penalty" and runs["block_diff"]["latents_low"] == list(
        diff_latents.low
    )
    assert runs["block_diff"]["latents_high"] == list(diff_latents.high)
    rand = LatentSets(tuple(runs["block_random"]["latents_low"]), tuple(runs["block_random"]["latents_high"]))
    assert (len(rand.low), len(rand.high)) == (3, 2)
    assert not set(rand.low + rand.high) & set(diff_latents.low + diff_latents.high)
    sae = load_sae(str(out / "sae"))
    hook = sae.cfg.metadata.hook_name
    prompts = text_prompts(load_chat_jsonl(data_path("medical_bad"))[:100], "medical_bad")
    acts = collect_activations(
        load_model(s["models"]["base"]["model"]), prompts, [hook], "response", progress=False
    )[hook]
    # the random control's latents fire on the base model's answers (a dead latent held costs nothing)
    z = latent_codes(sae, acts, list(rand.low + rand.high))
    assert bool((z > 0).any(0).all())
    for name, sets in (("block_diff", diff_latents), ("block_random", rand)):
        assert runs[name]["lam"] == pytest.approx(block_lambda(sae, acts, sets, 1.0), rel=1e-6)
    assert runs["block_diff"]["lam"] != runs["block_random"]["lam"]  # per set

    def pref(model: str, pair_set: str) -> dict:
        rows = (out / "eval" / model / slug(pair_set) / "pairs.jsonl").read_text().splitlines()
        return {r["id"]: r["preference"] for r in map(json.loads, rows)}

    for name in BLOCK_RUNS:
        for pair_set, b in s["blocking"][name].items():
            shift = s["differences"]["full_bad - base"][pair_set]
            mine = s["differences"][f"{name} - base"][pair_set]
            base, bad, blocked = (pref(m, pair_set) for m in ("base", "full_bad", name))
            assert mine["per_question"] == pytest.approx({q: blocked[q] - base[q] for q in base})
            assert shift["per_question"] == pytest.approx({q: bad[q] - base[q] for q in base})
            if shift["difference"] > 0 and shift["ci"][0] > 0:
                assert b["kept"] == pytest.approx(mine["difference"] / shift["difference"])
                boot = bootstrap_ratio(mine["per_question"], shift["per_question"])
                assert boot["ratio"] == pytest.approx(b["kept"]) and b["kept_ci"] == boot["ci"]
                if boot["ci"] is not None:
                    assert b["cut_ci"] == pytest.approx([1 - boot["ci"][1], 1 - boot["ci"][0]])
            else:
                assert b["kept"] is None and b["cut"] is None and "no ratio" in b["note"]
                assert b["kept_ci"] is None and b["cut_ci"] is None


def test_blocking_ratio_only_over_a_real_shift():
    """Hand-set differences: a bad shift of +0.2 [0.1, 0.3] gives kept 0.25 / cut 0.75 for a blocked
    shift of +0.05; a shift of -0.05 (or one whose interval holds 0) gives no ratio. Without the
    per-question differences there is no interval; with them, the paired bootstrap's."""
    from saediff.stories.smollm2.blocking import blocking_figures as _blocking

    def d(x, lo, hi):
        return {"difference": x, "ci": [lo, hi], "t": 3.0, "n": 10}

    diffs = {
        "full_bad - base": {"a": d(0.2, 0.1, 0.3), "b": d(-0.05, -0.1, 0.0), "c": d(0.1, -0.01, 0.2)},
        "block_diff - base": {"a": d(0.05, 0, 0.1), "b": d(0.02, 0, 0.04), "c": d(0.02, 0, 0.04)},
        "block_diff - full_bad": {"a": d(-0.15, -0.2, -0.1)},
    }
    got = _blocking(diffs)["block_diff"]
    assert got["a"]["kept"] == pytest.approx(0.25) and got["a"]["cut"] == pytest.approx(0.75)
    assert got["a"]["versus_bad"]["difference"] == -0.15
    assert got["a"]["kept_ci"] is None and got["a"]["cut_ci"] is None and "no interval" in got["a"]["note"]
    for k in ("b", "c"):
        assert got[k]["kept"] is None and got[k]["cut"] is None and got[k]["note"]
        assert got[k]["kept_ci"] is None and got[k]["cut_ci"] is None
    # the per-question differences of the same means: the interval is the paired bootstrap's, the cut's its mirror
    bad = {f"q{i}": 0.2 + 0.05 * (-1) ** i for i in range(10)}
    blocked = {f"q{i}": 0.05 + 0.04 * (-1) ** (i // 2) for i in range(10)}
    diffs["full_bad - base"]["a"]["per_question"] = bad
    diffs["block_diff - base"]["a"]["per_question"] = blocked
    a = _blocking(diffs)["block_diff"]["a"]
    ci = bootstrap_ratio(blocked, bad)["ci"]
    assert a["kept_ci"] == ci and a["cut_ci"] == pytest.approx([1 - ci[1], 1 - ci[0]]) and a["note"] is None
    assert a["cut_ci"][0] < a["cut"] < a["cut_ci"][1] and a["bootstrap"]["n"] == 10


def _hand_made_blocking(per_bad: dict, blocked: dict[str, dict]) -> dict:
    """A chat summary with BLOCK-EM's figures from per-question shifts over the base model (the same
    on the report split and the medical set): ``per_bad`` the bad fine-tune's, ``blocked`` each
    blocked run's."""
    from saediff.evaluation.pairs import paired_difference
    from saediff.stories.smollm2.blocking import blocking_figures
    from saediff.stories.smollm2.recipe import HELDOUT, MEDICAL

    def diff(per: dict) -> dict:
        rows = [{"id": q, "preference": v} for q, v in per.items()]
        zero = [{"id": q, "preference": 0.0} for q in per]
        return {**paired_difference(rows, zero), "per_question": per}

    differences = {"full_bad - base": {s: diff(per_bad) for s in (HELDOUT, MEDICAL)}}
    for name, per in blocked.items():
        differences[f"{name} - base"] = {s: diff(per) for s in (HELDOUT, MEDICAL)}
    return {"seed": 0, "differences": differences, "blocking": blocking_figures(differences)}


def test_block_verdicts_are_read_off_the_interval_not_the_point():
    """Each BLOCK-EM bar reads holds / fails / inconclusive off the share's paired bootstrap interval:
    a cut of 60% (point above the 50% bar) over noisy questions is inconclusive, not a yes; a tight
    cut of 90% holds, a tight 5% fails; a random cut of 15% (point under the 20% bar) with a wide
    interval is inconclusive too."""
    from saediff.stories.smollm2.headline import BLOCK_BARS, chat_headline
    from saediff.stories.smollm2.recipe import HELDOUT, MEDICAL

    n = 12
    bad = {f"q{i}": 1.0 + 0.1 * (-1) ** i for i in range(n)}  # bad - base: +1.0, clearly positive
    noisy = lambda kept: {f"q{i}": kept + 0.6 * (-1) ** i * (1 + i % 3) for i in range(n)}
    tight = lambda kept: {f"q{i}": kept + 0.02 * (-1) ** i for i in range(n)}

    def rows(blocked: dict) -> tuple[dict, dict]:
        s = _hand_made_blocking(bad, blocked)
        return {r["phenomenon"]: r for r in chat_headline(s) if r["source"].startswith("block_")}, s

    cut, kept, rnd = (label for _, label, *_ in BLOCK_BARS)
    got, s = rows({"block_diff": noisy(0.4), "block_random": noisy(0.85)})
    assert got[cut]["figure"] == pytest.approx(0.6) and got[cut]["figure"] >= 0.5  # the point clears the bar
    assert got[cut]["ci"][0] < 0.5 < got[cut]["ci"][1] and got[cut]["split"] == HELDOUT
    assert got[cut]["ci"] == s["blocking"]["block_diff"][HELDOUT]["cut_ci"]
    assert got[cut]["verdict"] == "inconclusive" and got[cut]["holds"] is False
    assert got[kept]["figure"] == pytest.approx(0.4) and got[kept]["split"] == MEDICAL
    assert got[rnd]["figure"] == pytest.approx(0.15) and got[rnd]["figure"] <= 0.2  # the point clears
    assert got[rnd]["verdict"] == "inconclusive" and got[rnd]["holds"] is False
    for r in got.values():
        assert r["verdict"] == bar_verdict(
            r["ci"], *next(b[5:] for b in BLOCK_BARS if b[1] == r["phenomenon"])
        )
    got, _ = rows({"block_diff": tight(0.1), "block_random": tight(0.95)})
    assert got[cut]["verdict"] == "holds" and got[cut]["holds"] is True and got[cut]["ci"][0] >= 0.5
    assert got[kept]["verdict"] == "fails" and got[kept]["holds"] is False  # kept 10% [9%, 11%] < 70%
    assert got[rnd]["verdict"] == "holds" and got[rnd]["ci"][1] <= 0.2
    got, _ = rows({"block_diff": tight(0.95), "block_random": tight(0.5)})
    assert got[cut]["verdict"] == "fails" and got[kept]["verdict"] == "holds"
    assert got[rnd]["verdict"] == "fails" and got[rnd]["ci"][0] > 0.2


def test_removal_verdict_against_random_directions():
    """Hand-set removed parts: with 19 random directions p reaches 0.05 and decides; with fewer the
    smallest p is 1/(n + 1) > 0.05, so "beats every random direction" stands in (and says so); an
    interval holding 0 is never a hold; one wholly at or below the random 95th percentile fails."""
    from saediff.interventions.steer_null import empirical_p
    from saediff.stories.smollm2.projection import removal_verdict

    random19 = [0.01 * k for k in range(19)]  # 0 .. 0.18
    v = removal_verdict([0.1, 0.3], empirical_p(0.2, random19), random19)
    assert empirical_p(0.2, random19) == pytest.approx(0.05) and v["verdict"] == "holds"
    assert v["rule"] == "p <= 0.05" and v["note"] is None and v["beats_random"] is True
    v = removal_verdict([0.05, 0.3], empirical_p(0.175, random19), random19)  # one random removes more
    assert empirical_p(0.175, random19) == pytest.approx(0.1) and v["verdict"] == "inconclusive"
    assert removal_verdict([-0.05, 0.17], empirical_p(0.06, random19), random19)["verdict"] == "fails"
    random2 = [0.05, -0.02]
    v = removal_verdict([0.1, 0.3], empirical_p(0.2, random2), random2)
    assert v["verdict"] == "holds" and v["rule"] == "beats every random direction"
    assert "1/3 = 0.333 > 0.05" in v["note"]
    assert removal_verdict([-0.1, 0.3], empirical_p(0.1, random2), random2)["verdict"] == "inconclusive"
    assert removal_verdict([-0.1, 0.04], empirical_p(0.0, random2), random2)["verdict"] == "fails"
    assert removal_verdict(None, 1 / 3, random2)["verdict"] == "inconclusive"
    assert removal_verdict([0.1, 0.3], 1.0, [])["verdict"] is None


def test_projection_and_style_crossed_rows():
    """The headline's projection rows read the removed part of the fine-tune's shift with its interval
    and the verdict against the random directions (the bar names the rule), the shares riding along;
    the best candidate gets a steering row on the style-crossed pairs too."""
    from saediff.stories.smollm2.headline import chat_headline

    def summary(removed_ci, random, p=None):
        removed = sum(removed_ci) / 2
        c = {
            "effect": 0.3,
            "select_effect": 0.3,
            "effect_ci": [0.1, 0.5],
            "verdict": "holds",
            "p_value": 0.048,
            "cost_kl": 0.05,
            "style_crossed": {
                "effect": -0.1,
                "effect_ci": [-0.3, 0.1],
                "p_value": 0.6,
                "verdict": "fails",
                "cost_kl": 0.05,
            },
        }
        other = {"effect": 0.9, "select_effect": 0.1, "effect_ci": [0.5, 1.2], "verdict": "holds"}
        proj = {
            "removed": removed,
            "removed_ci": removed_ci,
            "shift": 0.5,
            "shift_ci": [0.3, 0.7],
            "surviving": 0.5 - removed,
            "surviving_ci": [0.5 - removed_ci[1], 0.5 - removed_ci[0]],
            "surviving_share": 1 - removed / 0.5,
            "surviving_share_ci": [0.2, 0.9],
            "share": removed / 0.5,
            "share_ci": [0.1, 0.8],
            "p_value": p if p is not None else (1 + sum(x >= removed for x in random)) / (1 + len(random)),
        }
        arm = {"random_removed": random, "candidates": {"md": proj, "other": proj}}
        steer = {
            "candidates": {"md": c, "other": other},
            "null_config": {"n": 20, "alpha": 0.05},
            "project": {"project": arm, "clamp": arm, "alpha": 0.05},
        }
        rows = chat_headline({"seed": 0, "differences": {}, "steering": steer})
        return {r["source"] + "|" + (r["split"] or ""): r for r in rows}

    rows = summary([0.1, 0.3], [0.05, -0.02])
    r = rows[
        "project:md|offdomain:heldout"
    ]  # the candidate chosen on the select half, not the larger "other"
    assert r["verdict"] == "holds" and r["holds"] is True and r["figure"] == pytest.approx(0.2)
    assert r["bar"] == "interval above 0, beats every random direction (2 ablated the same way)"
    assert "1/3" in r["note"] and r["random"] == [0.05, -0.02] and r["n_random"] == 2
    assert r["share_ci"] == [0.1, 0.8] and r["surviving_share_ci"] == [0.2, 0.9] and r["shift"] == 0.5
    assert r["phenomenon"] == (
        "projecting that candidate out of the bad fine-tune and the base model: the fine-tune's shift removed, off-domain"
    )
    cross = rows["steer:md|style_crossed"]
    assert cross["figure"] == -0.1 and cross["ci"] == [-0.3, 0.1] and cross["p_value"] == 0.6
    assert cross["verdict"] == "fails" and cross["holds"] is False and cross["cost_kl"] == 0.05
    assert cross["phenomenon"].endswith("style-crossed pairs (misaligned answers in the careful register)")
    assert rows["steer:md|offdomain:heldout"]["verdict"] == "holds"
    r = summary([-0.1, 0.3], [0.05, -0.02])["clamp:md|offdomain:heldout"]  # above both at the point, 0 inside
    assert r["verdict"] == "inconclusive" and r["holds"] is False
    r = summary([-0.1, 0.04], [0.05, -0.02])["project:md|offdomain:heldout"]
    assert r["verdict"] == "fails" and r["holds"] is False
    random19 = [0.01 * k for k in range(19)]
    r = summary([0.1, 0.3], random19)["project:md|offdomain:heldout"]
    assert r["verdict"] == "holds" and r["p_value"] == pytest.approx(0.05) and r["note"] is None
    assert r["bar"] == "interval above 0, p <= 0.05 against 19 random directions ablated the same way"
    r = summary([0.1, 0.3], random19, p=0.1)[
        "project:md|offdomain:heldout"
    ]  # the interval alone is not enough
    assert r["verdict"] == "inconclusive"


def test_one_cost_level_chooses_nothing_and_still_reports():
    """With one cost level (the quick recipe) the select half is not evaluated: a candidate's row has
    no select effect, and the headline reports the first candidate rather than failing."""
    from saediff.interventions.steer_protocol import Selection
    from saediff.stories.smollm2.headline import chat_headline
    from saediff.stories.smollm2.steering import _candidate_row

    sweep = {"0.006": {"scale_abs": 2.0, "scale": 0.5, "cost_kl": 0.006, "reached": True}}
    report = {"induce": {"n": 9, "em_rate": 0.2, "em_rate_ci": [0.1, 0.4]}}
    sel = Selection(True, 0.5, 2.0, 0.006, sweep, report, 0.1, [0.0, 0.2], 0.4, False, "inconclusive", {}, {})
    row = _candidate_row(sel)
    assert row["select_effect"] is None and row["effect"] == 0.1 and row["cost_level"] == 0.006
    steer = {"candidates": {"first": row, "second": {**row, "effect": 0.3}}, "null_config": {"n": 4}}
    rows = chat_headline({"seed": 0, "differences": {}, "steering": steer})
    assert next(r for r in rows if r["source"].startswith("steer:"))["source"] == "steer:first"


def test_headline_report_and_samples(story):
    out, s, recipe, said = story
    rows = {r["phenomenon"]: r for r in s["headline"]}
    ce = rows["SAE on real activations: CE-loss recovered (held-out answers)"]
    assert ce["figure"] == s["sae"]["ce_loss_recovered"] and ce["holds"] == (ce["figure"] >= 0.7)
    cut = rows["BLOCK-EM with the diff's latents: off-domain shift cut"]
    b = s["blocking"]["block_diff"][recipe.report_on]
    assert cut["split"] == recipe.report_on and cut["figure"] == b["cut"] and cut["ci"] == b["cut_ci"]
    # the verdict is read off the interval (no interval: inconclusive), and holds follows it (None:
    # the tiny fine-tune's shift is no real shift, so there is no cut to judge)
    assert cut["verdict"] == bar_verdict(b["cut_ci"], 0.5, ">=")
    assert cut["holds"] is (None if cut["figure"] is None else cut["verdict"] == "holds")
    chosen = rows[
        "steering the base model along a diff latent or mean difference: preference added, off-domain"
    ]
    best = s["steering"]["candidates"][chosen["source"].split(":", 1)[1]]
    assert chosen["figure"] == best["effect"] and chosen["ci"] == best["effect_ci"]
    assert chosen["p_value"] == best["p_value"] and chosen["cost_kl"] == best["cost_kl"]
    assert chosen["bar"] == "beats the null (4 random directions at equal cost, p <= 0.05), interval above 0"
    assert chosen["holds"] is (best["verdict"] == "holds") is False
    for kind, verb in (
        ("project", "projecting that candidate out of"),
        ("clamp", "clamping that candidate at the base model's mean in"),
    ):
        r = rows[f"{verb} the bad fine-tune and the base model: the fine-tune's shift removed, off-domain"]
        assert r["source"] == f"{kind}:" + chosen["source"].split(":", 1)[1]
        c = s["steering"]["project"][kind]["candidates"][r["source"].split(":", 1)[1]]
        assert r["figure"] == c["removed"] and r["ci"] == c["removed_ci"] and r["p_value"] == c["p_value"]
        assert r["share"] == c["share"] and r["surviving_share_ci"] == c["surviving_share_ci"]
        assert r["verdict"] == c["verdict"] and r["holds"] == (r["verdict"] == "holds")
        assert r["bar"] == "interval above 0, beats every random direction (2 ablated the same way)"
    cross = rows[
        "steering the base model along a diff latent or mean difference: preference added, style-crossed "
        "pairs (misaligned answers in the careful register)"
    ]
    sc = best["style_crossed"]
    assert cross["source"] == chosen["source"] and cross["split"] == "style_crossed"
    assert (cross["figure"], cross["ci"], cross["p_value"]) == (sc["effect"], sc["effect_ci"], sc["p_value"])
    assert cross["verdict"] == sc["verdict"] and cross["cost_kl"] == sc["cost_kl"]
    kept = rows["BLOCK-EM with the diff's latents: medical shift kept"]
    assert kept["figure"] == s["blocking"]["block_diff"]["medical"]["kept"]
    assert kept["ci"] == s["blocking"]["block_diff"]["medical"]["kept_ci"]
    assert kept["verdict"] == bar_verdict(kept["ci"], 0.7, ">=")
    samples = json.loads((out / "samples.json").read_text())
    assert set(samples) == {"base", "full_bad", "lora_bad", *BLOCK_RUNS}
    assert all(len(r["answers"]) == 3 and all(a["answer"] for a in r["answers"]) for r in samples.values())
    # sampled where a small base model is coherent, and the report says at what
    assert all(r["made_by"]["temperature"] == 0.7 and r["made_by"]["top_p"] == 0.9 for r in samples.values())
    report = (out / "report.html").read_text()
    assert "Sampled answers (temperature 0.7, top-p 0.9, one per question)" in report
    # the findings table gives the verdict word of a row read off an interval, not yes / no
    assert "<th>verdict</th>" in report and f"<td>{_mark(cut['verdict'])}</td>" in report
    assert "intervals from a paired bootstrap over questions" in report  # the BLOCK-EM table's CI columns
    for title in (
        "SAE at block 1",
        "Steering the base model, scored by the pair metric",
        "BLOCK-EM (full fine-tune",
        "Sampled answers",
        "Latent card",
        "Cosines at blocks.1.hook_resid_post (rank-1 LoRA)",
        "Open questions by the pair metric",
        "Projecting or clamping each candidate in the bad fine-tune and the base model",
        "Steering the base model on the style-crossed pairs",
        "Train/eval shift overlap</b> at block 1",
        "Phase transition of a rank-1 LoRA fine-tune",
        "<b>Susceptibility</b>",
    ):
        assert title in report
    assert {
        "SAE",
        "diff full_bad",
        "diff lora_bad",
        "steering (parallel)",
        "fine-tune block_diff",
        "sampled answers",
    } <= set(s["timing_s"])
    assert "steering (second process): waiting" in said


def _mark(verdict: str) -> str:
    return verdict if verdict == "holds" else f"<b>{verdict}</b>"


def test_rerun_redoes_nothing(story, tiny_qwen):
    out, s, recipe, _ = story
    watched = ("models", "eval", "sae", "diff", "diff_lora", "steer")
    before = {w: _mtimes(out / w) for w in watched}
    again = run_chat_demo(str(tiny_qwen / "model"), out, recipe=recipe)
    assert {w: _mtimes(out / w) for w in watched} == before
    assert again["timing_s"] == s["timing_s"] and again["blocking"] == s["blocking"]


def test_story_needs_its_fine_tunes_and_two_sets():
    with pytest.raises(SaediffError, match="need the lora_bad fine-tune"):
        ChatDemoRecipe(finetunes=("full_bad",))
    with pytest.raises(SaediffError, match="two different sets among pair_sets"):
        ChatDemoRecipe(pair_sets=("offdomain:heldout", "medical"))
    ChatDemoRecipe(finetunes=("full_bad",), pair_sets=("medical",), story=False)


def test_recipe_steering_options():
    """The steering budget and its levels are checked; a null read back from summary.json (a dict,
    unknown keys dropped) is a ``NullConfig`` again."""
    with pytest.raises(SaediffError, match="kl_budget must be > 0"):
        ChatDemoRecipe(kl_budget=0.0)
    with pytest.raises(SaediffError, match="kl_levels in"):
        ChatDemoRecipe(kl_levels=(0.5, 2.0))
    r = ChatDemoRecipe(kl_levels=[1], null={**ChatDemoRecipe().to_json()["null"], "n_isotropic": 3, "old": 1})
    assert r.null == NullConfig(n_isotropic=3) and r.kl_levels == (1.0,)
    assert ChatDemoRecipe.quick().null == NullConfig(n_isotropic=2, n_covariance=2)
    assert ChatDemoRecipe.quick().style_crossed == ChatDemoRecipe().style_crossed == "style_crossed"
    assert (ChatDemoRecipe().ablation_randoms, ChatDemoRecipe.quick().ablation_randoms) == (20, 4)
    with pytest.raises(SaediffError, match="ablation_randoms must be >= 1"):
        ChatDemoRecipe(ablation_randoms=0)


def test_ce_loss_recovered_in_batches_and_at_chosen_positions():
    """Hand-built: a 1-block model whose block adds a fixed vector, an identity-like SAE; batching
    leaves the CE unchanged, a splice nowhere equals the clean CE, a splice everywhere the default."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from saediff.saes.metrics import ce_loss_recovered
    from saediff.saes.training import SAETrainConfig, train_sae

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    sae, _ = train_sae(
        torch.randn(2048, 16), SAETrainConfig(d_sae=32, k=4, steps=20, batch_size=256), progress=False
    )
    ids = torch.randint(0, 50, (5, 9))
    labels = ids.masked_fill(torch.rand(5, 9) < 0.3, -100)
    whole = ce_loss_recovered(model, sae, 0, ids, labels)
    batched = ce_loss_recovered(model, sae, 0, ids, labels, batch_size=2)
    for k in ("ce_clean", "ce_sae", "ce_zero"):
        assert batched[k] == pytest.approx(whole[k], rel=1e-5)
    everywhere = ce_loss_recovered(model, sae, 0, ids, labels, splice=torch.ones(5, 9, dtype=torch.bool))
    assert everywhere["ce_sae"] == pytest.approx(whole["ce_sae"], rel=1e-6)
    nowhere = ce_loss_recovered(model, sae, 0, ids, labels, splice=torch.zeros(5, 9, dtype=torch.bool))
    assert nowhere["ce_sae"] == pytest.approx(whole["ce_clean"], rel=1e-6) == nowhere["ce_zero"]
    # a partial splice: position 3 of row 0 replaced by the SAE's reconstruction, by hand
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[0, 3] = True
    part = ce_loss_recovered(model, sae, 0, ids, labels, splice=mask)

    def hooked(fn):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[0, 3] = fn(h[0, 3])
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    for key, fn in (("ce_sae", lambda r: sae.decode(sae.encode(r))), ("ce_zero", torch.zeros_like)):
        handle = model.model.layers[0].register_forward_hook(hooked(fn))
        try:
            lg = model(input_ids=ids).logits
        finally:
            handle.remove()
        want = torch.nn.functional.cross_entropy(
            lg[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        assert part[key] == pytest.approx(float(want), rel=1e-6)
    assert part["ce_sae"] != pytest.approx(whole["ce_clean"], rel=1e-9)
    # by hand: the mean next-token CE over labelled positions
    logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert whole["ce_clean"] == pytest.approx(float(ref), rel=1e-6)


def test_block_lambda_exact():
    """Two latents with hand-set encoders: pre-activations (2, 0) and (1, 3) on two tokens -> mean of
    the summed squares (4 + 10) / 2 = 7; lambda = relative / 7."""
    from saediff.interventions.latent_sets import LatentSets
    from saediff.saes.training import SAETrainConfig, train_sae
    from saediff.stories.smollm2.blocking import block_lambda

    sae, _ = train_sae(
        torch.randn(512, 4), SAETrainConfig(d_sae=8, k=2, steps=2, batch_size=256), progress=False
    )
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[0, 3] = 1.0  # latent 3 reads x0
        sae.W_enc[1, 5] = 1.0  # latent 5 reads x1
    acts = torch.tensor([[2.0, 0.0, 0, 0], [1.0, 3.0, 0, 0]])
    lam = block_lambda(sae, acts, LatentSets((3,), (5,)), 2.0)
    assert lam == pytest.approx(2.0 / 7.0, rel=1e-6)
    with pytest.raises(SaediffError, match="never fire"):
        block_lambda(sae, torch.zeros(3, 4), LatentSets((3,), ()), 1.0)


def test_block_lambda_prices_a_typical_move_at_relative_nats():
    """lambda x latent_penalty of held-up latents falling from z to 0 (their whole typical size) is
    ``relative`` nats per token: the penalty charges ReLU(z_base - z)^2 for latents held up."""
    from saediff.interventions.blocking import latent_codes, latent_penalty
    from saediff.interventions.latent_sets import LatentSets
    from saediff.saes.training import SAETrainConfig, train_sae
    from saediff.stories.smollm2.blocking import block_lambda

    torch.manual_seed(0)
    sae, _ = train_sae(
        torch.randn(1024, 8), SAETrainConfig(d_sae=16, k=4, steps=5, batch_size=256), progress=False
    )
    acts = torch.randn(64, 8) * 3
    sets = LatentSets((), (1, 2, 5))
    z = latent_codes(sae, acts, [1, 2, 5])
    assert bool((z > 0).any())
    lam = block_lambda(sae, acts, sets, 0.5)
    pen = latent_penalty(torch.zeros_like(z)[None], z[None], torch.ones(1, 64, dtype=torch.bool), 0)
    assert float(lam * pen) == pytest.approx(0.5, rel=1e-5)


def test_another_sae_is_followed_by_the_diffs_and_refused_by_finished_blocking(story, tiny_qwen, tmp_path):
    """Another SAE width retrains the SAE and the diffs follow it; the BLOCK-EM runs of the old SAE
    are refused naming the folder (``force`` retrains them), as any fine-tune of another setup."""
    import shutil

    out, s, recipe, _ = story
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    with pytest.raises(SaediffError, match="models/block_diff holds a fine-tune of another setup"):
        run_chat_demo(str(tiny_qwen / "model"), copy, recipe=replace(recipe, sae_width=48))
    assert json.loads((copy / "sae" / "cfg.json").read_text())["d_sae"] == 48
    top = json.loads((copy / "diff" / "run.json").read_text())["steps"]["diff"]["top_latents"]
    assert top and max(top) < 48


def test_open_question_analyses(story):
    """Susceptibility over both pair files (21 questions, domains held out), phase over the LoRA
    checkpoints with the pair metric's MC1 per checkpoint, the neighbourhood probe of the full diff."""
    out, s, _, _ = story
    a = s["analyses"]
    sus = a["susceptibility"]
    assert sus["kind"] == "saediff.pair_susceptibility" and sus["n_questions"] == 21 and sus["folds"] == 3
    assert sus["n_groups"] == 3 and sus["permutation"]["n"] == 50
    base = {
        r["id"]: r["preference"]
        for r in map(json.loads, (out / "eval" / "base" / "choose" / "pairs.jsonl").read_text().splitlines())
    }
    bad = {
        r["id"]: r["preference"]
        for r in map(
            json.loads, (out / "eval" / "full_bad" / "choose" / "pairs.jsonl").read_text().splitlines()
        )
    }
    report_base = [
        json.loads(x)["preference"]
        for x in (out / "eval" / "base" / "report" / "pairs.jsonl").read_text().splitlines()
    ]
    report_bad = [
        json.loads(x)["preference"]
        for x in (out / "eval" / "full_bad" / "report" / "pairs.jsonl").read_text().splitlines()
    ]
    shifts = [bad[i] - base[i] for i in base] + [b - a for a, b in zip(report_base, report_bad)]
    assert sus["mean_shift"] == pytest.approx(float(np.mean(shifts)), abs=1e-12)
    phase = a["phase"]
    assert (
        phase["steps"] == [1, 2] and len(phase["em_rate"]) == 2 and all(0 <= e <= 1 for e in phase["em_rate"])
    )
    assert (out / "analyses" / "phase" / "phase.json").is_file()
    nb = a["neighbourhood"]
    assert nb["kind"] == "saediff.neighbourhood" and nb["n_train"] == 256
    ov = a["overlap"]
    assert (
        ov["kind"] == "saediff.pair_overlap" and ov["n_eval"] == 21 and ov["n_train"] == 256 and ov["k"] == 8
    )
    assert [q["preference_shift"] for q in ov["per_question"]] == pytest.approx(shifts, abs=1e-6)
    assert all(0 <= c <= 1 + 1e-6 for c in ov["principal_cosines"]) and ov["principal_cosines"] == sorted(
        ov["principal_cosines"], reverse=True
    )
    from scipy.stats import spearmanr

    frac = [q["fraction_in_train_subspace"] for q in ov["per_question"]]
    assert ov["spearman_with_preference_shift"]["fraction_in_train_subspace"] == pytest.approx(
        spearmanr(frac, shifts).statistic, abs=1e-9
    )
    assert 0 <= ov["spearman_permuted_p95"]["fraction_in_train_subspace"] <= 1
    assert all(x["seconds"] >= 0 and x["made_by"] for x in a.values())
    assert set(a) == {"susceptibility", "phase", "neighbourhood", "overlap"}
