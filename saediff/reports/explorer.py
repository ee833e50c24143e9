"""An interactive latent explorer for notebooks: pick a latent from a diff run's table, read its
dashboard card, steer the base model with it at a chosen scale and read the answers change.

    ex = LatentExplorer("runs/demo/diff", labeller=judge_fn)
    ex.widget()                       # ipywidgets: latent picker, card, scale slider, "steer" button
    ex.steer(245, scale=1.0)          # the same without widgets: answers before and after

Steering adds ``scale x the mean residual norm`` along the latent's unit decoder row at the SAE's
block, at every position (``saediff.interventions.steering.add_direction``), as ``saediff steer`` does.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from saediff.errors import SaediffError

__all__ = ["LatentExplorer"]


class LatentExplorer:
    """A diff run's latents with their cards, and steering of the run's base model."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        questions: list | None = None,
        n_questions: int = 8,
        labeller: Callable[[list], list[bool | None]] | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
    ):
        """``questions``: Prompts to answer (default: ``n_questions`` of the run's, spread over its
        order); ``labeller(prompts with responses)``: True for a misaligned answer (an exact judge,
        or a wrapper around an LLM judge); ``max_new_tokens``: default the length of the run's answers."""
        from saediff.activations.collect import prompt_activations
        from saediff.data.runs import read_run, run_questions
        from saediff.methods.sae_diff import LatentDiff
        from saediff.models.hooks import parse_layer
        from saediff.models.loading import load_model
        from saediff.reports.dashboard import dashboard_data
        from saediff.saes.loading import load_sae

        self.run_dir = Path(run_dir)
        info = read_run(self.run_dir)["steps"]["diff"]
        self.diff = LatentDiff.from_json(json.loads((self.run_dir / "diff.json").read_text()))
        self.sae = load_sae(info["sae"])
        self.layer = parse_layer(info["sae_hook"])
        self.lm = load_model(info["base"])
        q = run_questions(self.run_dir)
        if questions is None:
            qs = q.prompts
            questions = [qs[i * len(qs) // n_questions] for i in range(min(n_questions, len(qs)))]
        self.questions = list(questions)
        answers = [p.response for p in q.first_answers if p.response]
        self.max_new_tokens = max_new_tokens or max(
            8, max(len(self.lm.tokenizer(a)["input_ids"]) for a in answers) + 1 if answers else 64
        )
        self.labeller, self.seed = labeller, seed
        self.cards = {d["latent"]: d for d in dashboard_data(self.run_dir, lm=self.lm, sae=self.sae)}
        self.resid_norm = float(
            prompt_activations(self.lm, self.questions, [self.layer], progress=False)[self.layer]
            .norm(dim=1)
            .mean()
        )

    def table(self, n: int = 20) -> list[dict]:
        """The ``n`` latents that rose most: latent, mean before and after, delta."""
        return [
            {
                "latent": i,
                "mean_base": float(self.diff.mean_base[i]),
                "mean_ft": float(self.diff.mean_ft[i]),
                "delta": float(self.diff.delta[i]),
            }
            for i in self.diff.top(n)
        ]

    def card_html(self, latent: int) -> str:
        """The dashboard card of a carded latent, or its statistics and decoder neighbours otherwise."""
        from saediff.methods.sae_diff import _neighbours
        from saediff.reports.dashboard import card_html

        if latent in self.cards:
            return card_html(self.cards[latent])
        nb = ", ".join(f"#{j} ({c:.2f})" for j, c in _neighbours(self.sae, latent, 5))
        return (
            f"<b>latent {latent}</b>: mean {float(self.diff.mean_base[latent]):.3f} &rarr; "
            f"{float(self.diff.mean_ft[latent]):.3f}; decoder neighbours {nb} (no card: rerun saediff diff "
            f"with a larger --top)"
        )

    def steer(self, latent: int, scale: float, n: int | None = None) -> dict:
        """Answers of the base model to the questions without and with the latent added at
        ``scale`` x the mean residual norm; with a labeller, the misaligned share of each."""
        import dataclasses

        from saediff.interventions.steering import add_direction
        from saediff.models.loading import generate

        if not 0 <= latent < self.sae.cfg.d_sae:
            raise SaediffError(f"latent {latent} out of range: the SAE has {self.sae.cfg.d_sae} latents")
        qs = self.questions[:n] if n else self.questions
        unit = self.sae.W_dec[latent].detach().float()
        unit = unit / unit.norm()
        convs = [p.messages for p in qs]
        before = generate(self.lm, convs, max_new_tokens=self.max_new_tokens, seed=self.seed, progress=False)
        with add_direction(self.lm.model, self.layer, unit, scale * self.resid_norm):
            after = generate(
                self.lm, convs, max_new_tokens=self.max_new_tokens, seed=self.seed, progress=False
            )
        rows = [
            {"question": p.question, "before": b.strip(), "after": a.strip()}
            for p, b, a in zip(qs, before, after)
        ]
        out = {"latent": latent, "scale": scale, "added_norm": scale * self.resid_norm, "answers": rows}
        if self.labeller is not None:
            for key in ("before", "after"):
                labels = self.labeller([dataclasses.replace(p, response=r[key]) for p, r in zip(qs, rows)])
                for r, lab in zip(rows, labels):
                    r[f"{key}_misaligned"] = lab
                known = [x for x in labels if x is not None]
                out[f"misaligned_{key}"] = sum(map(bool, known)) / len(known) if known else None
        return out

    def answers_html(self, result: dict) -> str:
        def mark(r, key):
            lab = r.get(f"{key}_misaligned")
            return "" if lab is None else (" <b style='color:#c00'>misaligned</b>" if lab else " aligned")

        head = (
            f"<p>latent {result['latent']} at scale {result['scale']:g} (added norm {result['added_norm']:.2f})"
            + (
                f": misaligned {result['misaligned_before']:.0%} &rarr; {result['misaligned_after']:.0%}"
                if result.get("misaligned_before") is not None
                else ""
            )
            + "</p>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(r['question'])}</td><td>{html.escape(r['before'])}{mark(r, 'before')}</td>"
            f"<td>{html.escape(r['after'])}{mark(r, 'after')}</td></tr>"
            for r in result["answers"]
        )
        return head + (
            "<table border=1 cellpadding=3><tr><th>question</th><th>before</th><th>steered</th></tr>"
            + rows
            + "</table>"
        )

    def widget(self, n_latents: int = 20):
        """The ipywidgets explorer: a latent picker over the top risers, its card, a scale slider and
        a button that steers and shows the answers."""
        import ipywidgets as w

        options = [(f"#{r['latent']}  delta {r['delta']:+.3f}", r["latent"]) for r in self.table(n_latents)]
        pick = w.Dropdown(options=options, description="latent")
        scale = w.FloatSlider(value=0.5, min=0.0, max=3.0, step=0.05, description="scale x |resid|")
        button = w.Button(description="steer the base model")
        card, answers = w.HTML(self.card_html(options[0][1])), w.HTML()

        def on_pick(change):
            card.value = self.card_html(change["new"])
            answers.value = ""

        def on_steer(_):
            answers.value = "<i>generating...</i>"
            answers.value = self.answers_html(self.steer(pick.value, scale.value))

        pick.observe(on_pick, names="value")
        button.on_click(on_steer)
        self._widgets = {"pick": pick, "scale": scale, "button": button, "card": card, "answers": answers}
        return w.VBox([pick, card, w.HBox([scale, button]), answers])
