"""Choose cpm's threshold α from the reference model's own token probabilities.

cpm treats a response token as meaningful when π_ref(y_t|s_t) > α and keeps the KL term on the
others (docs/method.md, conditional PM). This command samples responses from the reference and
looks at the reference probabilities of their tokens.

With a world file (--world), every sample is valid (one of the world's answers) or invalid. The
valid-answer tokens (those of valid samples, and every token of every valid answer by teacher
forcing) should lie above α; the slips (in each invalid sample, its least likely token, where
the reference left the valid answers) should lie at or below it. The recommended α is the value
on a log-spaced grid that separates the two best while keeping at most 1% (--max-valid-below) of
the valid responses whole: a valid response with a token under α leaves preference matching for
the KL term, which biases the answer distribution, while a slip that the reference finds likely
is better left to the reward model to score.

Without a world, the recommended α is a low quantile (--tail) of all sampled tokens' reference
probabilities: about that share of the tokens the reference produces gets the KL term.

Writes alpha.json and alpha.png to --out and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pmrlhf.rl.rollout import _eos_ids, generate, token_logprobs

if TYPE_CHECKING:
    from pmrlhf.world import World

__all__ = [
    "ALPHA_GRID",
    "AlphaReport",
    "add_arguments",
    "alpha_report",
    "plot_alpha_report",
    "run",
]

#: Candidate thresholds: 34 log-spaced values from 1e-4 to 0.5 (about 9 per decade).
ALPHA_GRID: tuple[float, ...] = (
    *(float(a) for a in np.logspace(-4.0, math.log10(0.5), 34)[:-1]),
    0.5,
)
#: Quantiles reported for each group of probabilities.
QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
#: Histogram bins (log10 of the probability) kept in alpha.json.
HISTOGRAM_EDGES: tuple[float, ...] = tuple(float(e) for e in np.linspace(-8.0, 0.0, 41))


@dataclass
class AlphaReport:
    """The recommended α and the evidence for it (see :func:`alpha_report`).

    ``method`` is ``separation`` (a world told valid answers from slips) or ``tail`` (no world:
    α is the ``tail`` quantile of all sampled tokens). Counts of valid/invalid samples and the
    valid/slip statistics are ``None`` without a world. ``grid`` has one row per candidate α:
    ``valid_at_or_below`` (share of valid-answer tokens that would get the KL term),
    ``slips_above`` (share of slips that would be treated as meaningful) and
    ``tokens_at_or_below`` (share of all sampled tokens that would get the KL term).
    The raw probabilities behind it are kept for plotting but not written by :meth:`to_dict`.
    ``slip_responses`` holds every invalid sample as ``{"prompt", "response"}``: what the
    reference says outside the world, e.g. for annotators to rank below the world's answers.
    """

    recommended_alpha: float
    method: str
    prompts: int
    samples: int
    max_new_tokens: int
    sampled_tokens: int
    token_quantiles: dict[str, float]
    tokens_at_or_below: float
    grid: list[dict[str, float]]
    tail: float | None = None
    max_valid_below: float | None = None
    valid_samples: int | None = None
    invalid_samples: int | None = None
    invalid_without_eos: int | None = None
    valid_tokens: int | None = None
    valid_quantiles: dict[str, float] | None = None
    slip_quantiles: dict[str, float] | None = None
    valid_at_or_below: float | None = None
    valid_responses_at_or_below: float | None = None
    slips_above: float | None = None
    valid_probabilities: list[float] = field(default_factory=list, repr=False)
    slip_probabilities: list[float] = field(default_factory=list, repr=False)
    token_probabilities: list[float] = field(default_factory=list, repr=False)
    slip_responses: list[dict[str, str]] = field(default_factory=list, repr=False)

    @property
    def separated(self) -> bool | None:
        """With a world: α has every valid-answer token above it and every slip at or below."""
        if self.method != "separation":
            return None
        return self.valid_at_or_below == 0.0 and self.slips_above == 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of alpha.json: every field but the raw probabilities, a log10
        histogram of them, and the summary."""
        out = asdict(self)
        for key in ("valid_probabilities", "slip_probabilities", "token_probabilities"):
            del out[key]
        out["separated"] = self.separated
        out["histogram_log10"] = {
            "edges": list(HISTOGRAM_EDGES),
            "tokens": _histogram(self.token_probabilities),
            **(
                {
                    "valid": _histogram(self.valid_probabilities),
                    "slips": _histogram(self.slip_probabilities),
                }
                if self.method == "separation"
                else {}
            ),
        }
        out["summary"] = self.summary
        return out

    @property
    def summary(self) -> str:
        """A few lines of plain text: the recommendation and its evidence."""
        a = self.recommended_alpha
        samples = (
            f"{self.samples} samples from {self.prompts} prompt{'s' if self.prompts != 1 else ''} "
            f"(≤ {self.max_new_tokens} new tokens)"
        )
        tq = self.token_quantiles
        if self.method == "tail":
            assert self.tail is not None
            capped = a == ALPHA_GRID[-1] and self.tokens_at_or_below < self.tail
            return "\n".join(
                [
                    f"recommended α = {a:.3g}: the {self.tail:.0%} quantile of the reference "
                    f"probabilities of {self.sampled_tokens} sampled tokens"
                    + (f" (capped at {ALPHA_GRID[-1]})" if capped else ""),
                    f"  {samples}",
                    f"  meaning: {self.tokens_at_or_below:.1%} of the tokens the reference samples "
                    "have π_ref ≤ α and get the KL term; the rest are treated as meaningful (PM term)",
                    f"  token probabilities: 1% {tq['q01']:.3g}, 5% {tq['q05']:.3g}, "
                    f"10% {tq['q10']:.3g}, median {tq['q50']:.3g}",
                    "  no world given: valid answers and slips are not told apart; pass --world to "
                    "choose α by separating them",
                ]
            )
        vq, sq = self.valid_quantiles or {}, self.slip_quantiles or {}
        lines = [
            f"recommended α = {a:.3g}: the grid value that best separates valid responses "
            "(their least likely token above α) from slips (at or below α), with at most "
            f"{self.max_valid_below:.0%} of the valid responses at or below it",
            f"  {samples}: {self.valid_samples} valid, {self.invalid_samples} invalid"
            + (
                f" ({self.invalid_without_eos} of them stopped at the token limit)"
                if self.invalid_without_eos
                else ""
            ),
            f"  valid-answer tokens (n={self.valid_tokens}, sampled and teacher-forced): "
            f"lowest {vq['q00']:.3g}, 1% {vq['q01']:.3g}, 5% {vq['q05']:.3g}, median {vq['q50']:.3g}",
        ]
        if self.invalid_samples:
            lines.append(
                f"  slips (least likely token of each invalid sample, n={self.invalid_samples}): "
                f"median {sq['q50']:.3g}, 90% {sq['q90']:.3g}, highest {sq['q100']:.3g}"
            )
            examples = list(dict.fromkeys(s["response"].strip() for s in self.slip_responses))
            if examples:
                lines.append("  slips, e.g.: " + " · ".join(repr(t) for t in examples[:3]))
        else:
            lines.append("  no invalid sample: no slips to separate; α only has to stay below "
                         "the valid-answer tokens")  # fmt: skip
        lines.append(
            f"  at α: {self.valid_responses_at_or_below:.1%} of valid responses have a token at or "
            f"below α ({self.valid_at_or_below:.1%} of valid-answer tokens; they get the KL term), "
            f"{self.slips_above:.1%} of slips above α (treated as meaningful); "
            f"{self.tokens_at_or_below:.1%} of all sampled tokens at or below α"
        )
        if self.separated:
            gap = (
                f"between the highest slip {sq['q100']:.3g} and "
                if self.invalid_samples
                else "below "
            )
            lines.append(
                f"  separation: clean; any α {gap}the lowest valid token {vq['q00']:.3g} works"
            )
        elif self.invalid_samples and sq["q100"] < vq["q00"]:
            lines.append(
                "  separation: the groups are separable (highest slip "
                f"{sq['q100']:.3g} < lowest valid token {vq['q00']:.3g}) but no grid value lies between them"
            )
        else:
            lines.append(
                "  separation: imperfect; the groups overlap (no α separates all valid-answer "
                "tokens from all slips)"
            )
        return "\n".join(lines)


def _q(q: float) -> str:
    return f"q{round(100 * q):02d}"


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {_q(q): float("nan") for q in QUANTILES}
    return {_q(q): float(np.quantile(values, q, method="inverted_cdf")) for q in QUANTILES}


def _histogram(values: Sequence[float]) -> list[int]:
    logs = np.log10(np.clip(np.asarray(values, dtype=np.float64), 1e-300, 1.0))
    logs = np.clip(logs, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(logs, bins=np.asarray(HISTOGRAM_EDGES))
    return [int(c) for c in counts]


def _share_at_or_below(values: np.ndarray, alpha: float) -> float:
    return float((values <= alpha).mean()) if values.size else 0.0


def _share_above(values: np.ndarray, alpha: float) -> float:
    return float((values > alpha).mean()) if values.size else 0.0


def separation_score(valid: np.ndarray, slips: np.ndarray, alpha: float) -> float:
    """Share of valid-answer tokens above α plus share of slips at or below α (2 = clean)."""
    return _share_above(valid, alpha) + (_share_at_or_below(slips, alpha) if slips.size else 1.0)


def separating_alpha(
    valid: np.ndarray,
    slips: np.ndarray,
    grid: Sequence[float] = ALPHA_GRID,
    max_valid_below: float = 1.0,
) -> float:
    """The grid value that maximises :func:`separation_score` among the candidates: the grid
    values with at most ``max_valid_below`` of ``valid`` at or below them, and always the
    smallest one (so a bound no value meets gives the smallest). Among tied values, the
    geometric middle of the longest run of consecutive tied grid values (when that middle scores
    as well; otherwise the run's grid value nearest to it)."""
    allowed = np.array([_share_at_or_below(valid, a) <= max_valid_below for a in grid])
    allowed[0] = True  # the smallest threshold is always a candidate
    scores = np.array(
        [separation_score(valid, slips, a) if ok else -np.inf for a, ok in zip(grid, allowed)]
    )
    best = scores.max()
    tied = np.abs(scores - best) <= 1e-12
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*tied, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append((start, i - 1))
            start = None
    lo, hi = max(runs, key=lambda r: r[1] - r[0])
    middle = math.sqrt(grid[lo] * grid[hi])
    if separation_score(valid, slips, middle) >= best - 1e-12:
        return middle
    return grid[(lo + hi) // 2]


def tail_alpha(tokens: np.ndarray, tail: float) -> float:
    """The smallest sampled probability p with share(tokens ≤ p) ≥ ``tail`` (capped at the grid's
    top, 0.5, since cpm needs α < 1)."""
    value = float(np.quantile(tokens, tail, method="inverted_cdf"))
    return min(value, ALPHA_GRID[-1])


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@torch.no_grad()
def alpha_report(
    ref,
    tokenizer,
    prompts: Sequence[str],
    world: World | None = None,
    max_new_tokens: int = 16,
    samples_per_prompt: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    *,
    tail: float = 0.05,
    max_valid_below: float = 0.01,
) -> AlphaReport:
    """Sample ``samples_per_prompt`` responses per prompt from ``ref`` (temperature 1, no top-p,
    seeded with ``seed``) and recommend cpm's α from their reference token probabilities.

    With ``world`` (every prompt a wording it knows): valid-answer tokens are the tokens of the
    valid samples and, by teacher forcing, of every valid answer of every prompt; slips are,
    per invalid sample, its least likely token. α is the grid value that best separates them
    with at most ``max_valid_below`` of the valid responses under it (:func:`separating_alpha`).
    Without a world: α is the ``tail`` quantile of all sampled tokens' probabilities, so about
    that share of them gets the KL term (:func:`tail_alpha`).
    """
    from pmrlhf.evaluate import valid_sequence_logprobs
    from pmrlhf.runtime import set_seed

    prompts = list(prompts)
    if not prompts:
        raise ValueError("alpha_report needs at least one prompt")
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("samples_per_prompt", samples_per_prompt)
    _check_positive("batch_size", batch_size)
    if not (isinstance(tail, (int, float)) and 0.0 < tail < 1.0):
        raise ValueError(f"tail must lie strictly between 0 and 1, got {tail!r}")
    if not (isinstance(max_valid_below, (int, float)) and 0.0 <= max_valid_below <= 1.0):
        raise ValueError(f"max_valid_below must lie in [0, 1], got {max_valid_below!r}")
    if world is not None:
        foreign = [p for p in prompts if not world.knows(p)]
        if foreign:
            raise ValueError(
                f"{len(foreign)} of the {len(prompts)} prompts are not wordings of the world's "
                f"families (the first: {foreign[0]!r})"
            )
    was_training = ref.training
    ref.eval()
    set_seed(seed)
    eos = set(_eos_ids(tokenizer, ref))
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    tokens: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    # per valid response, its least likely token: the response is matched exactly only when
    # every one of its tokens is meaningful, so α is chosen on responses, like the slips
    valid_minima: list[float] = []
    slips: list[float] = []
    slip_responses: list[dict[str, str]] = []
    n_valid = n_invalid = invalid_without_eos = 0
    for start in range(0, len(jobs), batch_size):
        rollout = generate(ref, tokenizer, jobs[start : start + batch_size], max_new_tokens)
        logp, _ = token_logprobs(
            ref, rollout.sequences, rollout.attention_mask, rollout.prompt_length
        )
        probs = logp.double().exp().cpu()
        mask = rollout.response_mask.bool().cpu()
        ids = rollout.response_ids.cpu()
        for i, (prompt, text) in enumerate(zip(rollout.prompts, rollout.responses, strict=True)):
            p = probs[i][mask[i]].numpy()
            if p.size == 0:
                continue
            tokens.append(p)
            if world is None:
                continue
            if world.classify(prompt, text) is None:
                n_invalid += 1
                slips.append(float(p.min()))
                slip_responses.append({"prompt": prompt, "response": text})
                if int(ids[i][mask[i]][-1]) not in eos:
                    invalid_without_eos += 1
            else:
                n_valid += 1
                valid.append(p)
                valid_minima.append(float(p.min()))
    if world is not None:
        for prompt in dict.fromkeys(prompts):
            logp, mask = valid_sequence_logprobs(ref, tokenizer, world, prompt)
            forced = logp.double().exp().cpu()
            valid.append(forced[mask.bool().cpu()].numpy())
            valid_minima.extend(
                float(row[keep].min()) for row, keep in zip(forced, mask.bool().cpu(), strict=True)
            )
    ref.train(was_training)
    all_tokens = np.concatenate(tokens) if tokens else np.zeros(0)
    if all_tokens.size == 0:
        raise ValueError("the reference sampled no response token; raise max_new_tokens")
    common: dict[str, Any] = {
        "prompts": len(prompts),
        "samples": len(jobs),
        "max_new_tokens": max_new_tokens,
        "sampled_tokens": int(all_tokens.size),
        "token_quantiles": _quantiles(all_tokens),
        "token_probabilities": all_tokens.tolist(),
    }
    if world is None:
        alpha = tail_alpha(all_tokens, tail)
        grid = [
            {"alpha": a, "tokens_at_or_below": _share_at_or_below(all_tokens, a)}
            for a in ALPHA_GRID
        ]
        return AlphaReport(
            recommended_alpha=alpha,
            method="tail",
            tokens_at_or_below=_share_at_or_below(all_tokens, alpha),
            grid=grid,
            tail=float(tail),
            **common,
        )
    valid_p = np.concatenate(valid)
    slip_p = np.asarray(slips, dtype=np.float64)
    minima_p = np.asarray(valid_minima, dtype=np.float64)
    alpha = separating_alpha(minima_p, slip_p, max_valid_below=max_valid_below)
    grid = [
        {
            "alpha": a,
            "valid_at_or_below": _share_at_or_below(valid_p, a),
            "valid_responses_at_or_below": _share_at_or_below(minima_p, a),
            "slips_above": _share_above(slip_p, a),
            "tokens_at_or_below": _share_at_or_below(all_tokens, a),
        }
        for a in ALPHA_GRID
    ]
    return AlphaReport(
        recommended_alpha=alpha,
        method="separation",
        tokens_at_or_below=_share_at_or_below(all_tokens, alpha),
        grid=grid,
        max_valid_below=max_valid_below,
        valid_samples=n_valid,
        invalid_samples=n_invalid,
        invalid_without_eos=invalid_without_eos,
        valid_tokens=int(valid_p.size),
        valid_quantiles=_quantiles(valid_p),
        slip_quantiles=_quantiles(slip_p),
        valid_at_or_below=_share_at_or_below(valid_p, alpha),
        valid_responses_at_or_below=_share_at_or_below(minima_p, alpha),
        slips_above=_share_above(slip_p, alpha),
        valid_probabilities=valid_p.tolist(),
        slip_probabilities=slip_p.tolist(),
        slip_responses=slip_responses,
        **common,
    )


def plot_alpha_report(report: AlphaReport, path: str | os.PathLike) -> Path:
    """Histogram of log10 reference token probabilities with the recommended α as a line:
    valid-answer tokens against slips (world given), or all sampled tokens (no world)."""
    from pmrlhf.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    groups = (
        [("valid-answer tokens", report.valid_probabilities, "tab:blue"),
         ("slips (least likely token of an invalid sample)", report.slip_probabilities, "tab:red")]
        if report.method == "separation"
        else [("all sampled tokens", report.token_probabilities, "tab:gray")]
    )  # fmt: skip
    every = [p for _, values, _ in groups for p in values]
    low = min(-4.5, math.floor(math.log10(max(min(every), 1e-12))))
    bins = np.linspace(low, 0.0, 4 * int(-low) + 1)
    for label, values, color in groups:
        if not values:
            continue
        logs = np.log10(np.clip(np.asarray(values), 1e-12, 1.0))
        weights = np.full(logs.shape, 1.0 / logs.size)
        ax.hist(logs, bins=bins, weights=weights, alpha=0.55, color=color,
                label=f"{label} (n={logs.size})")  # fmt: skip
    ax.axvline(math.log10(report.recommended_alpha), color="black", linestyle="--",
               label=f"recommended α = {report.recommended_alpha:.3g}")  # fmt: skip
    ax.set_xlabel("log10 π_ref(token)")
    ax.set_ylabel("share of the group")
    ax.set_title("Reference token probabilities and cpm's threshold α")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, Path(path))


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ref",
        required=True,
        metavar="MODEL",
        help="reference model: folder, hub id or .gguf file",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="prompt data file or hub dataset (a 'prompt' column; chat messages get the "
        "tokenizer's chat template), read as `pmrlhf rl` reads its prompts",
    )
    parser.add_argument(
        "--world",
        default=None,
        metavar="WORLD_JSON",
        help="the prompts' preference world: 'default' (the demo's) or a world file such as a "
        "demo's data/world.json; α is then chosen to separate valid answers from slips",
    )
    parser.add_argument(
        "--max-valid-below",
        type=float,
        default=0.01,
        metavar="Q",
        help="with --world: α keeps at most this share of the valid responses under it, where "
        "they would get the KL term instead of preference matching (default: 0.01)",
    )
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=8,
        metavar="N",
        help="responses sampled per prompt (default: 8)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        metavar="N",
        help="maximum response length (default: 16)",
    )
    parser.add_argument(
        "--tail",
        type=float,
        default=0.05,
        metavar="Q",
        help="without --world: α is this quantile of the sampled tokens' reference "
        "probabilities, i.e. about this share of them gets the KL term (default: 0.05)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="responses sampled at once (default: 64)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/alpha"),
        metavar="DIR",
        help="output folder for alpha.json and alpha.png (default: runs/alpha)",
    )


def run(args: argparse.Namespace) -> int:
    from pmrlhf.data import load_prompts
    from pmrlhf.evaluate import check_world_prompts
    from pmrlhf.models import check_device, load_causal_lm, load_tokenizer
    from pmrlhf.optim import compute_dtype

    # every option is checked before any model is loaded
    for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 < args.tail < 1.0:
        raise ValueError(f"--tail must lie strictly between 0 and 1, got {args.tail}")
    if not 0.0 <= args.max_valid_below <= 1.0:
        raise ValueError(f"--max-valid-below must lie in [0, 1], got {args.max_valid_below}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file; give a folder")
    device = check_device(args.device)
    world = None
    if args.world is not None:
        from pmrlhf.world import default_world, load_world

        world = default_world() if args.world == "default" else load_world(args.world)
    tokenizer = load_tokenizer(args.ref, option_name="--ref")
    prompts = [r.prompt for r in load_prompts(args.prompts, tokenizer)]
    if world is not None:
        check_world_prompts(world, prompts, f"--world {args.world}", args.prompts)
    ref = load_causal_lm(
        args.ref, dtype=compute_dtype("auto", device), device=device, option_name="--ref"
    )
    report = alpha_report(
        ref,
        tokenizer,
        prompts,
        world=world,
        max_new_tokens=args.max_new_tokens,
        samples_per_prompt=args.samples_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        tail=args.tail,
        max_valid_below=args.max_valid_below,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "alpha.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_alpha_report(report, out / "alpha.png")
    print(report.summary)
    print(f"wrote {out / 'alpha.json'} and {out / 'alpha.png'}")
    return 0
