"""The streaming model diff: one pass of both models over the same tokens, reading chosen blocks'
outputs at the response tokens with forward hooks, keeping the SAE's per-latent statistics and
float64 running sums for the mean differences (memory grows with blocks and groups, not tokens)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saediff import console
from saediff.errors import SaediffError
from saediff.methods.directions import Direction
from saediff.methods.sae_diff import DiffAccumulator
from saediff.models.hooks import parse_layer, read_blocks, resid_post

__all__ = ["StreamedDiff", "stream_diff"]

log = logging.getLogger(__name__)


@dataclass
class StreamedDiff:
    """What one streaming pass over both models leaves: the SAE statistics at its hook and, per
    block, float64 sums of the residual over response tokens (base and fine-tuned model, and the
    fine-tuned model's misaligned and aligned answers per prompt group). Memory: blocks x d_model x
    groups + d_sae x k, not tokens."""

    acc: DiffAccumulator
    hooks: list[str]
    sums: dict[str, torch.Tensor]
    """``base``, ``ft``: (L, d); ``mis``, ``ali``: (G, L, d), one row per prompt group"""
    counts: dict[str, torch.Tensor]
    """token counts: ``base``, ``ft`` scalars; ``mis``, ``ali`` (G,)"""
    groups: list = dataclasses.field(default_factory=lambda: [None])
    """the group of each row of ``sums['mis']`` (prompt domains; one None group without them)"""

    def mean_diffs(self, induced: str) -> list[Direction]:
        """Per block: finetuned - base (``induced``: ``mean_diff_models`` or ``lora_downstream``), and
        the fine-tuned model's misaligned - aligned answers, within each prompt group that has
        both kinds, averaged over those groups (each group counts once, so a group where every
        answer is misaligned, such as the fine-tune's own domain, leaves its topic out)."""
        c = self.counts
        out = [
            Direction(
                f"{induced}_L{parse_layer(h)}",
                self._mean("ft", L) - self._mean("base", L),
                h,
                induced,
                {"n_pos": int(c["ft"]), "n_neg": int(c["base"])},
            )
            for L, h in enumerate(self.hooks)
        ]
        both = (c["mis"] > 0) & (c["ali"] > 0)
        if bool(both.any()):
            nm, na = c["mis"][both].double(), c["ali"][both].double()
            within = (
                self.sums["mis"][both] / nm[:, None, None] - self.sums["ali"][both] / na[:, None, None]
            )  # (G', L, d)
            used = [g for g, b in zip(self.groups, both.tolist()) if b]
            meta = {
                "n_pos": int(nm.sum()),
                "n_neg": int(na.sum()),
                "model": "finetuned",
                "groups": [str(g) for g in used] if used != [None] else [],
            }
            out += [
                Direction(
                    f"mean_diff_responses_L{parse_layer(h)}",
                    within[:, L].mean(0).float(),
                    h,
                    "mean_diff_responses",
                    meta,
                )
                for L, h in enumerate(self.hooks)
            ]
        elif int(c["mis"].sum()) or int(c["ali"].sum()):
            log.warning(
                "response mean difference skipped: no prompt group has both misaligned and aligned answers "
                "(%d misaligned, %d aligned response tokens)",
                int(c["mis"].sum()),
                int(c["ali"].sum()),
            )
        return out

    def _mean(self, key: str, L: int) -> torch.Tensor:
        return (self.sums[key][L] / self.counts[key]).float()


@torch.no_grad()
def stream_diff(
    lm_base,
    lm_ft,
    toks,
    sae,
    labels: list | None = None,
    *,
    groups: list | None = None,
    batch_size: int = 32,
    progress: bool = True,
    layers: Sequence[int] | None = None,
) -> StreamedDiff:
    """One pass over ``toks`` (right-padded prompts with answers) through both models, reading the
    outputs of ``layers`` (default: every block) and the SAE's block at the response tokens with
    forward hooks on those blocks only, each forward stopped after the deepest: the SAE diff at its
    hook and the per-block sums of the mean differences at ``layers`` (``groups``: each row's prompt
    group, e.g. its domain, for the within-group response mean difference). Each block's output is
    summed inside its hook as the forward passes it, so a batch holds one block's activations
    (and the SAE block's response rows), not every block's. Activations stay on the models' device."""
    L_sae = parse_layer(sae.cfg.metadata.hook_name)
    blocks = list(range(lm_base.model.config.num_hidden_layers)) if layers is None else list(layers)
    hooked = sorted(set(blocks) | {L_sae})
    keep = toks.select("response")
    n_rows = toks.input_ids.shape[0]
    names = list(dict.fromkeys(groups)) if groups is not None else [None]
    if groups is not None and len(groups) != n_rows:
        raise SaediffError(f"stream_diff: {len(groups)} groups for {n_rows} rows")
    index = {g: j for j, g in enumerate(names)}
    row_group = torch.tensor([index[g] for g in groups] if groups is not None else [0] * n_rows)
    code = torch.tensor([1 if x is True else 0 if x is False else -1 for x in labels]) if labels else None
    acc = DiffAccumulator(sae)
    dev = lm_base.device
    run = _Sums.zeros(blocks, len(names), lm_base.model.config.hidden_size, L_sae, dev)
    for i in console.progress(range(0, n_rows, batch_size), desc="diff", enabled=progress):
        ids, attn, m = (t.to(dev) for t in toks.batch(slice(i, i + batch_size), keep))
        tok_code = tok_group = None
        if code is not None:  # each response token's label and group
            per_row = torch.stack([code[i : i + batch_size], row_group[i : i + batch_size]], 1).to(dev)
            tok_code, tok_group = per_row[:, None].expand(-1, ids.shape[1], -1)[m].unbind(-1)
        at_sae: dict[str, torch.Tensor] = {}
        read_blocks(lm_base.model, hooked, ids, attn, run.reader("base", m, tok_code, tok_group, at_sae))
        read_blocks(
            lm_ft.model,
            hooked,
            ids.to(lm_ft.device),
            attn.to(lm_ft.device),
            run.reader("ft", m, tok_code, tok_group, at_sae),
        )
        run.count(m, tok_code, tok_group)
        acc.update(at_sae["base"], at_sae["ft"])
    sums, counts = run.sums, run.counts
    if not int(counts["base"]):
        raise SaediffError("no response tokens to diff (do the prompts have answers?)")
    return StreamedDiff(acc, [resid_post(L) for L in blocks], sums, counts, names)


@dataclass
class _Sums:
    """The running sums of one ``stream_diff`` pass: per block row (``row``: block -> row), float64
    sums of the residual over response tokens (``base``, ``ft``: (L, d); ``mis``, ``ali``: (G, L, d)
    per prompt group) and their token counts."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    row: dict[int, int]
    L_sae: int
    dev: torch.device

    @classmethod
    def zeros(cls, blocks: list[int], n_groups: int, d: int, L_sae: int, dev: torch.device) -> _Sums:
        n_layers = len(blocks)
        sums = {k: torch.zeros(n_layers, d, dtype=torch.float64, device=dev) for k in ("base", "ft")}
        sums.update(
            {k: torch.zeros(n_groups, n_layers, d, dtype=torch.float64, device=dev) for k in ("mis", "ali")}
        )
        counts = {
            "base": torch.zeros((), dtype=torch.long),
            "ft": torch.zeros((), dtype=torch.long),
            "mis": torch.zeros(n_groups, dtype=torch.long),
            "ali": torch.zeros(n_groups, dtype=torch.long),
        }
        row = {block: L for L, block in enumerate(blocks)}  # a block's row in the sums
        return cls(sums, counts, row, L_sae, dev)

    def reader(
        self, key: str, m: torch.Tensor, tok_code, tok_group, at_sae: dict
    ) -> Callable[[int, torch.Tensor], None]:
        """What ``key``'s model does with a block's output in this batch (mask ``m``, response
        tokens' labels and groups): sum it into its row, keep it when it is the SAE's block."""
        sums, row, dev, L_sae = self.sums, self.row, self.dev, self.L_sae

        def read(block: int, x: torch.Tensor) -> None:
            x = x.to(dev)[m]  # (n_tok, d)
            if block == L_sae:
                at_sae[key] = x
            if block not in row:
                return
            L, x = row[block], x.double()
            sums[key][L] += x.sum(0)
            if key == "ft" and tok_code is not None:
                for part, want in (("mis", 1), ("ali", 0)):
                    sel = tok_code == want
                    sums[part][:, L].index_add_(0, tok_group[sel], x[sel])

        return read

    def count(self, m: torch.Tensor, tok_code, tok_group) -> None:
        """Add one batch's response tokens (mask ``m``) to the counts, per label and group."""
        counts = self.counts
        n = int(m.sum())
        counts["base"] += n
        counts["ft"] += n
        if tok_code is not None:
            for key, want in (("mis", 1), ("ali", 0)):
                counts[key] += torch.bincount(tok_group[tok_code == want].cpu(), minlength=len(counts[key]))
