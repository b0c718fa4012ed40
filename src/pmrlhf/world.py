"""A synthetic preference world: prompts, a small set of valid answers, and a hidden BTL reward.

Preference collapse and preference matching can only be measured where the whole response
distribution is known. This module builds such a world for a tiny word-level language model:

* Prompts come from a few question *families* (season, drink, route to work, pet, breakfast,
  weekend plan), each asked in several wordings. The last wording(s) of every family are held
  out for evaluation, so a policy is also judged on phrasings it never trained on.
* Each family has a small, enumerable set of *answers*; each answer is said in the same number
  of short *paraphrases*. The valid responses to a prompt are exactly these paraphrases; any
  other text (another family's answer, a truncated or extended sentence, garbage) is invalid.
* A hidden ground-truth reward gives every paraphrase of answer ``a`` the reward
  ``r*(a) = log share(a)``. With ``n`` paraphrases per answer, softmax over all valid
  *sequences* puts ``share(a) / n`` on each paraphrase, so the per-answer mass is exactly
  ``share(a)``: the preference-matching target over sequences reproduces the family's
  majority/minority shares over answers.
* Annotators compare sequences under this reward: pairs by Bradley–Terry–Luce, K-wise rankings
  by Plackett–Luce. Demonstrations for SFT are uniform over valid sequences, so the SFT model
  starts with no preference and everything it learns about the majority comes from feedback.

The families are data: the default ones live in the packaged file ``worlds/default.json``,
and a user's world file has the same schema (docs/data-formats.md, "Preference worlds").
:func:`load_world` reads such a file, :func:`default_world` the packaged one.
:meth:`World.write_files` writes ordinary jsonl datasets (the formats :mod:`pmrlhf.data` reads)
plus ``world.json``, itself a world file, from which :func:`load_world` rebuilds the same world.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from pmrlhf.runtime import write_jsonl
from pmrlhf.theory import btl_probability

__all__ = [
    "DEFAULT_END_MARKERS",
    "AnswerSpec",
    "Family",
    "FamilySpec",
    "World",
    "WorldConfig",
    "default_world",
    "default_world_config",
    "load_world",
    "normalize",
    "packaged_world_config",
    "world_config_from_dict",
]

# Same split as the word-level tokenizer in pmrlhf.models: runs of word characters, and every
# other non-space character on its own.
_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")

#: Special-token strings after which a decoded response is cut off (end of sequence, padding).
DEFAULT_END_MARKERS: tuple[str, ...] = ("</s>", "<pad>", "<eos>", "<|endoftext|>", "<|im_end|>")

SeedLike = int | np.random.Generator


def normalize(text: str) -> str:
    """Lower-case ``text`` and put exactly one space between words and punctuation marks.

    A word-level tokenizer may decode ``"I like summer best ."`` as ``"I like summer best."``;
    both normalise to ``"i like summer best ."``, so matching does not depend on detokenisation.
    """
    return " ".join(_TOKEN_PATTERN.findall(text.lower()))


# --------------------------------------------------------------------------- definitions
@dataclass(frozen=True)
class AnswerSpec:
    """One answer of a family: a name and its paraphrase pool (the first few are used)."""

    name: str
    paraphrases: tuple[str, ...]


@dataclass(frozen=True)
class FamilySpec:
    """A question family as defined: its wordings, answer pool and preference shares.

    ``wordings``: the prompts, the last ``WorldConfig.n_eval_wordings`` of which are held out.
    ``answers``: the answer pool; a world uses the first ``WorldConfig.n_answers`` of them.
    ``shares``: candidate share rows aligned with ``answers``; a world with ``n`` answers uses
    the row of length ``n``. Rows are listed per answer count because the constraints
    (majority ≥ 0.5, every minority ≥ 0.1) cannot be met by truncating one long row.
    """

    name: str
    wordings: tuple[str, ...]
    answers: tuple[AnswerSpec, ...]
    shares: tuple[tuple[float, ...], ...]

    def share_row(self, n_answers: int) -> tuple[float, ...]:
        """The share row for a world that uses ``n_answers`` answers of this family."""
        for row in self.shares:
            if len(row) == n_answers:
                return row
        raise ValueError(f"family {self.name!r} defines no shares for {n_answers} answers")


@dataclass(frozen=True)
class WorldConfig:
    """Family definitions, how much of them a world uses, and the constraints it enforces.

    ``n_answers`` answers per family (3 by default; the default families allow 3–6), each with
    ``n_paraphrases`` surface forms (the same count for every answer, so that equal rewards per
    answer give answer shares equal to the family shares). ``n_eval_wordings`` wordings per
    family are held out. ``min_majority``/``min_minority`` are checked on every family's
    shares so that the majority is clear and every minority is large enough to be measured.
    """

    families: tuple[FamilySpec, ...]
    n_answers: int = 3
    n_paraphrases: int = 2
    n_eval_wordings: int = 1
    min_majority: float = 0.5
    min_minority: float = 0.1
    end_markers: tuple[str, ...] = field(default=DEFAULT_END_MARKERS)


@dataclass(frozen=True)
class Family:
    """A family as used by a world: the selected answers, paraphrases and normalised shares."""

    name: str
    train_wordings: tuple[str, ...]
    eval_wordings: tuple[str, ...]
    answers: tuple[str, ...]
    paraphrases: tuple[tuple[str, ...], ...]
    shares: tuple[float, ...]

    @property
    def wordings(self) -> tuple[str, ...]:
        """All wordings, training ones first."""
        return self.train_wordings + self.eval_wordings

    @property
    def majority(self) -> int:
        """Index of the answer with the largest share."""
        return max(range(len(self.shares)), key=self.shares.__getitem__)

    @property
    def rewards(self) -> tuple[float, ...]:
        """The ground-truth reward of each answer, ``log share``, shared by its paraphrases."""
        return tuple(math.log(s) for s in self.shares)

    @property
    def sequences(self) -> tuple[tuple[int, str], ...]:
        """Every valid response as ``(answer index, text)``, answer by answer."""
        return tuple((a, text) for a, texts in enumerate(self.paraphrases) for text in texts)


# --------------------------------------------------------------------------- the world
class World:
    """The preference world: prompt lookup, answer mapping, true rewards and data sampling.

    All methods that take a prompt accept any of its wordings, compared after
    :func:`normalize`; an unknown prompt raises ``KeyError``.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config if config is not None else default_world_config()
        self.families: tuple[Family, ...] = tuple(
            _resolve(spec, self.config) for spec in self.config.families
        )
        self._by_prompt: dict[str, Family] = {}
        self._answer_of: dict[str, dict[str, int]] = {}
        self._check_and_index()

    # ------------------------------------------------------------------ construction checks
    def _check_and_index(self) -> None:
        if not self.families:
            raise ValueError("a world needs at least one family")
        names = [f.name for f in self.families]
        if len(set(names)) != len(names):
            raise ValueError(f"family names must be unique, got {names}")
        seen_forms: dict[str, str] = {}
        for fam in self.families:
            for wording in fam.wordings:
                key = normalize(wording)
                if not key:
                    raise ValueError(f"family {fam.name!r} has an empty wording")
                if key in self._by_prompt:
                    other = self._by_prompt[key].name
                    raise ValueError(f"wording {wording!r} is used by {other!r} and {fam.name!r}")
                self._by_prompt[key] = fam
            index: dict[str, int] = {}
            for a, text in fam.sequences:
                form = normalize(text)
                if not form:
                    raise ValueError(f"family {fam.name!r} has an empty paraphrase")
                if any(marker.lower() in text.lower() for marker in self.config.end_markers):
                    raise ValueError(f"paraphrase {text!r} contains an end-of-sequence marker")
                if form in seen_forms:
                    raise ValueError(
                        f"paraphrase {text!r} duplicates one of {seen_forms[form]!r} "
                        "(paraphrases must be distinct across all answers and families)"
                    )
                seen_forms[form] = f"{fam.name}/{fam.answers[a]}"
                index[form] = a
            self._answer_of[fam.name] = index
        # A paraphrase that is a word-prefix of another would make truncations valid answers.
        tokens = {form: form.split(" ") for form in seen_forms}
        for form, words in tokens.items():
            for other, other_words in tokens.items():
                if other != form and other_words[: len(words)] == words:
                    raise ValueError(f"paraphrase {form!r} is a prefix of {other!r}")

    # ------------------------------------------------------------------ prompts and answers
    def family(self, prompt: str) -> Family:
        """The family a prompt wording belongs to, with its answers, paraphrases and shares."""
        try:
            return self._by_prompt[normalize(prompt)]
        except KeyError:
            raise KeyError(f"prompt {prompt!r} is not a wording of any family") from None

    def knows(self, prompt: str) -> bool:
        """Whether ``prompt`` is a wording of one of the world's families."""
        return normalize(prompt) in self._by_prompt

    def family_of(self, prompt: str) -> str:
        """The name of the family a prompt wording belongs to (plain text, for reports)."""
        return self.family(prompt).name

    def train_prompts(self) -> list[str]:
        """Training wordings of every family, family by family (deterministic)."""
        return [w for fam in self.families for w in fam.train_wordings]

    def eval_prompts(self) -> list[str]:
        """Held-out wordings of every family; none of them appears in any training file."""
        return [w for fam in self.families for w in fam.eval_wordings]

    def answers(self, prompt: str) -> list[str]:
        """Answer names of the prompt's family, in index order."""
        return list(self.family(prompt).answers)

    def valid_sequences(self, prompt: str) -> list[tuple[int, str]]:
        """Every valid response ``(answer index, text)``, answer by answer."""
        return list(self.family(prompt).sequences)

    def majority(self, prompt: str) -> int:
        """Index of the majority answer of the prompt's family."""
        return self.family(prompt).majority

    def vocabulary(self) -> list[str]:
        """Every prompt wording (training and held-out) and every valid response, once each.

        A tokenizer built on these texts covers every word the world can produce, so no valid
        response is ever mapped to ``<unk>``.
        """
        texts = [w for fam in self.families for w in fam.wordings]
        texts += [text for fam in self.families for _, text in fam.sequences]
        return list(dict.fromkeys(texts))

    def classify(self, prompt: str, text: str) -> int | None:
        """The answer index of a response to ``prompt``, or ``None`` if it is invalid.

        The text is cut at the first end-of-sequence/padding marker, normalised (case, spaces,
        spacing around punctuation) and then matched *exactly* against the family's
        paraphrases. Another family's answer, a truncation, extra words and garbage are invalid.
        """
        fam = self.family(prompt)
        cut = len(text)
        lowered = text.lower()
        for marker in self.config.end_markers:
            pos = lowered.find(marker.lower())
            if pos != -1:
                cut = min(cut, pos)
        return self._answer_of[fam.name].get(normalize(text[:cut]))

    def distribution(self, prompt: str, texts: Iterable[str]) -> list[float]:
        """Empirical frequencies of sampled responses over the answers, then "invalid" last.

        The result has ``len(answers(prompt)) + 1`` entries and sums to 1.
        """
        n_answers = len(self.family(prompt).answers)
        counts = [0] * (n_answers + 1)
        total = 0
        for text in texts:
            a = self.classify(prompt, text)
            counts[n_answers if a is None else a] += 1
            total += 1
        if total == 0:
            raise ValueError("distribution() needs at least one response")
        return [c / total for c in counts]

    # ------------------------------------------------------------------ the hidden reward
    def truth_shares(self, prompt: str) -> list[float]:
        """The population's share of each answer (softmax of the true reward over sequences)."""
        return list(self.family(prompt).shares)

    def true_reward(self, prompt: str, text: str) -> float:
        """Ground-truth reward ``log share(answer)`` of a valid response; ``ValueError`` if invalid."""
        fam = self.family(prompt)
        a = self.classify(prompt, text)
        if a is None:
            raise ValueError(f"{text!r} is not a valid response to {prompt!r}")
        return fam.rewards[a]

    def true_rewards(self, prompt: str) -> list[float]:
        """Ground-truth rewards aligned with :meth:`valid_sequences`."""
        fam = self.family(prompt)
        return [fam.rewards[a] for a, _ in fam.sequences]

    def answer_target(
        self,
        prompt: str,
        sequence_rewards: Mapping[str, float] | Sequence[float],
        beta: float = 1.0,
    ) -> list[float]:
        """Per-answer mass of ``softmax(r / beta)`` over the prompt's valid sequences.

        Preference matching targets a distribution over *sequences*; the share of an answer is
        the sum over its surface forms. ``sequence_rewards`` is either a list aligned with
        :meth:`valid_sequences` or a mapping from response text to reward (keys are matched
        after normalisation and must be exactly the valid sequences). With the true rewards
        and ``beta = 1`` this returns :meth:`truth_shares`; with a learned reward model's
        scores it is the answer distribution a PM-trained policy should reach.
        """
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        fam = self.family(prompt)
        seqs = fam.sequences
        if isinstance(sequence_rewards, Mapping):
            by_form: dict[str, float] = {}
            for text, value in sequence_rewards.items():
                form = normalize(text)
                if form not in self._answer_of[fam.name]:
                    raise ValueError(f"{text!r} is not a valid response to {prompt!r}")
                if form in by_form:
                    raise ValueError(f"{text!r} is given twice (after normalisation)")
                by_form[form] = float(value)
            missing = [t for _, t in seqs if normalize(t) not in by_form]
            if missing:
                raise ValueError(f"rewards missing for valid responses {missing}")
            values = [by_form[normalize(t)] for _, t in seqs]
        else:
            values = [float(v) for v in sequence_rewards]
            if len(values) != len(seqs):
                raise ValueError(
                    f"expected {len(seqs)} rewards (one per valid sequence), got {len(values)}"
                )
        if not all(math.isfinite(v) for v in values):
            raise ValueError("rewards must be finite")
        # softmax(r / beta) over the sequences in Python floats, summed per answer. (theory's
        # pm_optimal_policy is the same law; its float64 kernel rounds differently in the last
        # bit, and the demo's recorded targets are kept bit-stable.)
        scaled = [v / beta for v in values]
        top = max(scaled)
        weights = [math.exp(v - top) for v in scaled]
        total = sum(weights)
        shares = [0.0] * len(fam.answers)
        for (a, _), w in zip(seqs, weights):
            shares[a] += w / total
        return shares

    # ------------------------------------------------------------------ annotators and data
    def _prompt_pool(self, prompts: Sequence[str] | None) -> list[str]:
        pool = list(self.train_prompts() if prompts is None else prompts)
        if not pool:
            raise ValueError("no prompts to sample from")
        for p in pool:
            self.family(p)
        return pool

    def sample_pairs(
        self,
        n: int,
        seed: SeedLike = 0,
        prompts: Sequence[str] | None = None,
        cross_answer_only: bool = False,
    ) -> list[dict[str, str]]:
        """``n`` BTL comparisons ``{"prompt", "chosen", "rejected"}``.

        Each row picks a prompt uniformly (training wordings by default), then an unordered
        pair of distinct valid sequences uniformly among all such pairs, and lets the first
        win with probability ``σ(r*(y1) − r*(y2))``. By default the pair may hold two
        paraphrases of the same answer: those are fair coin flips, which is what BTL over
        sequences says, and they teach a reward model that paraphrases are worth the same.
        ``cross_answer_only=True`` draws only pairs of different answers.
        """
        if n < 0:
            raise ValueError("n must be non-negative")
        rng = np.random.default_rng(seed)
        pool = self._prompt_pool(prompts)
        pairs_of: dict[str, list[tuple[int, int]]] = {}
        first_wins_of: dict[str, list[list[float]]] = {}  # BTL: P(sequence i beats sequence j)
        for p in pool:
            fam = self.family(p)
            seqs = fam.sequences
            rewards = torch.tensor([fam.rewards[a] for a, _ in seqs], dtype=torch.float64)
            first_wins_of[fam.name] = btl_probability(rewards[:, None], rewards[None, :]).tolist()
            pairs_of[fam.name] = [
                (i, j)
                for i in range(len(seqs))
                for j in range(i + 1, len(seqs))
                if not cross_answer_only or seqs[i][0] != seqs[j][0]
            ]
            if not pairs_of[fam.name]:
                raise ValueError(f"family {fam.name!r} has no pair to compare")
        rows: list[dict[str, str]] = []
        for _ in range(n):
            prompt = pool[int(rng.integers(len(pool)))]
            fam = self.family(prompt)
            seqs = fam.sequences
            pairs = pairs_of[fam.name]
            i, j = pairs[int(rng.integers(len(pairs)))]
            if rng.random() < 0.5:
                i, j = j, i
            first_wins = rng.random() < first_wins_of[fam.name][i][j]
            win, lose = (i, j) if first_wins else (j, i)
            rows.append({"prompt": prompt, "chosen": seqs[win][1], "rejected": seqs[lose][1]})
        return rows

    def sample_rankings(
        self,
        n: int,
        k: int = 3,
        seed: SeedLike = 0,
        prompts: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """``n`` Plackett–Luce rankings ``{"prompt", "responses"}``, best first.

        Each row picks a prompt uniformly, ``k`` distinct valid sequences uniformly without
        replacement, and ranks them by reward plus independent Gumbel noise, which samples
        exactly the Plackett–Luce law (with ``k = 2`` it is the BTL comparison).
        """
        if n < 0:
            raise ValueError("n must be non-negative")
        if k < 2:
            raise ValueError(f"a ranking needs k >= 2 responses, got {k}")
        rng = np.random.default_rng(seed)
        pool = self._prompt_pool(prompts)
        rows: list[dict[str, Any]] = []
        for _ in range(n):
            prompt = pool[int(rng.integers(len(pool)))]
            fam = self.family(prompt)
            seqs = fam.sequences
            if k > len(seqs):
                raise ValueError(f"k = {k} exceeds the {len(seqs)} valid responses of {fam.name!r}")
            picked = rng.choice(len(seqs), size=k, replace=False)
            rewards = np.array([fam.rewards[seqs[int(i)][0]] for i in picked])
            scores = rewards + rng.gumbel(size=k)
            order = np.argsort(-scores, kind="stable")
            rows.append({"prompt": prompt, "responses": [seqs[int(picked[o])][1] for o in order]})
        return rows

    def add_off_world(
        self,
        rankings: Sequence[dict[str, Any]],
        off_world: Iterable[dict[str, str]],
        share: float,
        seed: SeedLike = 0,
    ) -> list[dict[str, Any]]:
        """``rankings`` with, in about ``share`` of the rows, one off-world response ranked last.

        ``off_world`` holds ``{"prompt", "response"}`` rows whose response the world does not
        list, such as the SFT model's invalid samples (``AlphaReport.slip_responses``). An
        annotator ranks every answer the world lists above text that is not one: a paraphrase it
        does not list, another family's answer, a truncation. A row gets a response drawn from
        those of its own family (as often as it occurs there, so common slips are seen most);
        rows of a family without any keep their responses. The rows are copied.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must lie in [0, 1], got {share}")
        pools: dict[str, list[str]] = {}
        for i, row in enumerate(off_world):
            prompt, response = row["prompt"], row["response"]
            if not response.strip():
                continue
            if self.classify(prompt, response) is not None:
                raise ValueError(
                    f"off-world row {i}: {response!r} is a listed answer to {prompt!r}, not "
                    "off-world text"
                )
            pools.setdefault(self.family_of(prompt), []).append(response)
        rng = np.random.default_rng(seed)
        out: list[dict[str, Any]] = []
        for ranking in rankings:
            pool = pools.get(self.family_of(ranking["prompt"]), [])
            responses = list(ranking["responses"])
            if pool and rng.random() < share:
                responses.append(pool[int(rng.integers(len(pool)))])
            out.append({**ranking, "responses": responses})
        return out

    def sft_rows(
        self, n: int, seed: SeedLike = 0, prompts: Sequence[str] | None = None
    ) -> list[dict[str, str]]:
        """``n`` demonstrations ``{"prompt", "completion"}``, balanced over (prompt, sequence).

        Every (prompt, valid sequence) combination appears ``n // m`` or ``n // m + 1`` times
        (``m`` combinations), in shuffled order. The SFT model therefore starts uniform over
        valid sequences, and its answer preferences can only come from the feedback stage.
        """
        if n < 0:
            raise ValueError("n must be non-negative")
        rng = np.random.default_rng(seed)
        pool = self._prompt_pool(prompts)
        combos = [(p, text) for p in pool for _, text in self.family(p).sequences]
        full, rest = divmod(n, len(combos))
        picks = list(range(len(combos))) * full
        picks += [int(i) for i in rng.choice(len(combos), size=rest, replace=False)]
        order = rng.permutation(len(picks))
        return [
            {"prompt": combos[picks[int(o)]][0], "completion": combos[picks[int(o)]][1]}
            for o in order
        ]

    def describe(self) -> dict[str, Any]:
        """The content of ``world.json``: everything needed to rebuild and evaluate the world."""
        return {
            "n_answers": self.config.n_answers,
            "n_paraphrases": self.config.n_paraphrases,
            "n_eval_wordings": self.config.n_eval_wordings,
            "min_majority": self.config.min_majority,
            "min_minority": self.config.min_minority,
            "end_markers": list(self.config.end_markers),
            "reward": "every paraphrase of answer a has reward log(share[a])",
            "families": [
                {
                    "name": fam.name,
                    "train_wordings": list(fam.train_wordings),
                    "eval_wordings": list(fam.eval_wordings),
                    "majority": fam.majority,
                    "answers": [
                        {
                            "name": name,
                            "share": share,
                            "reward": reward,
                            "paraphrases": list(texts),
                        }
                        for name, share, reward, texts in zip(
                            fam.answers, fam.shares, fam.rewards, fam.paraphrases
                        )
                    ],
                }
                for fam in self.families
            ],
        }

    def write_files(
        self,
        out_dir: str | os.PathLike[str],
        n_pairs: int = 2000,
        n_rankings: int = 1000,
        n_sft: int = 2000,
        seed: int = 0,
        ranking_size: int = 3,
        cross_answer_only: bool = False,
    ) -> dict[str, Path]:
        """Write the datasets and ``world.json`` to ``out_dir``; returns ``{name: path}``.

        Files (jsonl, one object per line): ``sft.jsonl`` {"prompt", "completion"},
        ``pairs.jsonl`` {"prompt", "chosen", "rejected"}, ``rankings.jsonl``
        {"prompt", "responses"} best to worst, ``prompts_train.jsonl`` and
        ``prompts_eval.jsonl`` {"prompt"}. Only training wordings appear in the first four.
        Rankings hold ``ranking_size`` responses each (see :meth:`sample_rankings`).
        The SFT, pair and ranking draws use independent streams spawned from ``seed``, so the
        same seed gives byte-identical files and changing one count leaves the others intact.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sft_seq, pair_seq, rank_seq = np.random.SeedSequence(seed).spawn(3)
        contents: dict[str, list[dict[str, Any]]] = {
            "sft": self.sft_rows(n_sft, seed=np.random.default_rng(sft_seq)),
            "pairs": self.sample_pairs(
                n_pairs, seed=np.random.default_rng(pair_seq), cross_answer_only=cross_answer_only
            ),
            "rankings": self.sample_rankings(
                n_rankings, k=ranking_size, seed=np.random.default_rng(rank_seq)
            ),
            "prompts_train": [{"prompt": p} for p in self.train_prompts()],
            "prompts_eval": [{"prompt": p} for p in self.eval_prompts()],
        }
        paths: dict[str, Path] = {}
        for name, rows in contents.items():
            paths[name] = write_jsonl(out / f"{name}.jsonl", rows)
        world_path = out / "world.json"
        description = self.describe()
        description["seed"] = seed
        world_path.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")
        paths["world"] = world_path
        return paths


# --------------------------------------------------------------------------- helpers
def _resolve(spec: FamilySpec, config: WorldConfig) -> Family:
    """Select answers, paraphrases and wordings of one family and check the share constraints."""
    n_a, n_p, n_e = config.n_answers, config.n_paraphrases, config.n_eval_wordings
    if n_a < 2:
        raise ValueError(f"n_answers must be at least 2, got {n_a}")
    if n_p < 1:
        raise ValueError(f"n_paraphrases must be at least 1, got {n_p}")
    if n_e < 1 or n_e >= len(spec.wordings):
        raise ValueError(
            f"family {spec.name!r}: n_eval_wordings must be in [1, {len(spec.wordings) - 1}], "
            f"got {n_e}"
        )
    if len(spec.answers) < n_a:
        raise ValueError(f"family {spec.name!r} defines {len(spec.answers)} answers, need {n_a}")
    chosen = spec.answers[:n_a]
    names = [a.name for a in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"family {spec.name!r} has duplicate answer names {names}")
    for ans in chosen:
        if len(ans.paraphrases) < n_p:
            raise ValueError(
                f"answer {spec.name}/{ans.name} has {len(ans.paraphrases)} paraphrases, need {n_p}"
            )
    row = spec.share_row(n_a)
    if any(not (s > 0 and math.isfinite(s)) for s in row):
        raise ValueError(f"family {spec.name!r}: shares must be positive, got {row}")
    total = math.fsum(row)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"family {spec.name!r}: shares must sum to 1, got {total}")
    shares = tuple(s / total for s in row)
    ranked = sorted(shares, reverse=True)
    if ranked[0] < config.min_majority - 1e-9 or ranked[0] <= ranked[1]:
        raise ValueError(
            f"family {spec.name!r}: needs a unique majority of at least {config.min_majority}, "
            f"got shares {row}"
        )
    if ranked[-1] < config.min_minority - 1e-9:
        raise ValueError(
            f"family {spec.name!r}: smallest share must be at least {config.min_minority}, "
            f"got {row}"
        )
    return Family(
        name=spec.name,
        train_wordings=tuple(spec.wordings[: len(spec.wordings) - n_e]),
        eval_wordings=tuple(spec.wordings[len(spec.wordings) - n_e :]),
        answers=tuple(names),
        paraphrases=tuple(tuple(a.paraphrases[:n_p]) for a in chosen),
        shares=shares,
    )


# --------------------------------------------------------------------------- world files
#: The packaged world the demo uses, relative to the ``pmrlhf`` package.
DEFAULT_WORLD_FILE = ("worlds", "default.json")

_SETTINGS: dict[str, type] = {
    "n_answers": int,
    "n_paraphrases": int,
    "n_eval_wordings": int,
    "min_majority": float,
    "min_minority": float,
}
# Keys that world.json carries for readers (the seed, the reward, the majority index) and that
# the loader accepts and ignores: they follow from the rest of the file.
_TOP_KEYS = {"families", "end_markers", "reward", "seed", "description", *_SETTINGS}
_FAMILY_KEYS = {"name", "train_wordings", "eval_wordings", "answers", "shares", "majority"}
_ANSWER_KEYS = {"name", "paraphrases", "share", "reward"}


def world_config_from_dict(data: Any, source: str = "world file") -> WorldConfig:
    """The :class:`WorldConfig` a parsed world file describes (schema: docs/data-formats.md).

    Every family lists ``train_wordings`` then ``eval_wordings`` (together its wordings, the
    last ``n_eval_wordings`` held out) and its ``answers`` (``name``, ``paraphrases``). Shares
    are given either per answer (``share``, one row over all listed answers) or per family
    (``shares``, one row per answer count a world may use). Settings left out take the
    :class:`WorldConfig` defaults. A malformed file raises ``ValueError`` naming ``source``
    and the field.
    """

    def fail(where: str, message: str) -> NoReturn:
        raise ValueError(f"{source}: {where}: {message}")

    def check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            fail(where, f"must be an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            fail(where, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        return obj

    def required(obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            fail(where, f"missing field {key!r}")
        return obj[key]

    def text(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            fail(where, f"must be a non-empty string, got {value!r}")
        return value

    def texts(value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            fail(where, "must be a non-empty list of strings")
        return tuple(text(v, f"{where}[{i}]") for i, v in enumerate(value))

    def number(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, f"must be a number, got {value!r}")
        return float(value)

    top = check_keys(data, _TOP_KEYS, "top level")
    families_raw = required(top, "families", "top level")
    if not isinstance(families_raw, list) or not families_raw:
        fail("families", "must be a non-empty list of family objects")
    families = []
    for f, raw in enumerate(families_raw):
        where = f"families[{f}]"
        fam = check_keys(raw, _FAMILY_KEYS, where)
        answers_raw = required(fam, "answers", where)
        if not isinstance(answers_raw, list) or not answers_raw:
            fail(f"{where}.answers", "must be a non-empty list of answer objects")
        answers = []
        per_answer_shares = []
        for a, raw_answer in enumerate(answers_raw):
            at = f"{where}.answers[{a}]"
            ans = check_keys(raw_answer, _ANSWER_KEYS, at)
            answers.append(
                AnswerSpec(
                    text(required(ans, "name", at), f"{at}.name"),
                    texts(required(ans, "paraphrases", at), f"{at}.paraphrases"),
                )
            )
            if "share" in ans:
                per_answer_shares.append(number(ans["share"], f"{at}.share"))
        if "shares" in fam:
            if per_answer_shares:
                fail(where, "give shares either per answer ('share') or per family ('shares')")
            rows_raw = fam["shares"]
            if not isinstance(rows_raw, list) or not rows_raw:
                fail(f"{where}.shares", "must be a non-empty list of share rows")
            shares = []
            for r, row in enumerate(rows_raw):
                if not isinstance(row, list):
                    fail(f"{where}.shares[{r}]", "must be a list of numbers")
                shares.append(
                    tuple(number(v, f"{where}.shares[{r}][{i}]") for i, v in enumerate(row))
                )
        elif len(per_answer_shares) == len(answers):
            shares = [tuple(per_answer_shares)]
        else:
            fail(where, "every answer needs a 'share', or the family a 'shares' list")
        families.append(
            FamilySpec(
                name=text(required(fam, "name", where), f"{where}.name"),
                wordings=texts(required(fam, "train_wordings", where), f"{where}.train_wordings")
                + texts(required(fam, "eval_wordings", where), f"{where}.eval_wordings"),
                answers=tuple(answers),
                shares=tuple(shares),
            )
        )
    settings: dict[str, Any] = {}
    for key, kind in _SETTINGS.items():
        if key in top:
            value = top[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                fail(key, f"must be an integer, got {value!r}")
            settings[key] = int(value) if kind is int else number(value, key)
    if "end_markers" in top:
        settings["end_markers"] = texts(top["end_markers"], "end_markers")
    return WorldConfig(families=tuple(families), **settings)


def load_world(path: str | os.PathLike[str]) -> World:
    """The world a world file describes: the packaged default's schema, or a ``world.json``
    written by :meth:`World.write_files` (which rebuilds the same world)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None
    return World(world_config_from_dict(data, str(path)))


@functools.cache
def packaged_world_config(name: str) -> WorldConfig:
    """A world file shipped in the package's ``worlds/`` folder (``default.json`` for the demo,
    ``chat.json`` for chat models), read once."""
    resource = resources.files("pmrlhf").joinpath(DEFAULT_WORLD_FILE[0], name)
    source = f"{DEFAULT_WORLD_FILE[0]}/{name}"
    return world_config_from_dict(json.loads(resource.read_text(encoding="utf-8")), source)


def default_world_config() -> WorldConfig:
    """The packaged world definitions (``worlds/default.json``), read once."""
    return packaged_world_config(DEFAULT_WORLD_FILE[1])


def default_world(
    n_answers: int | None = None,
    n_paraphrases: int | None = None,
    n_eval_wordings: int | None = None,
) -> World:
    """The demo's world: the packaged families, with the file's settings unless given here."""
    config = default_world_config()
    return World(
        replace(
            config,
            n_answers=config.n_answers if n_answers is None else n_answers,
            n_paraphrases=config.n_paraphrases if n_paraphrases is None else n_paraphrases,
            n_eval_wordings=config.n_eval_wordings if n_eval_wordings is None else n_eval_wordings,
        )
    )
