"""The synthetic preference world: answer mapping, true reward, annotators and written files."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from importlib import resources

import pytest

from pmrlhf.world import (
    AnswerSpec,
    FamilySpec,
    World,
    WorldConfig,
    default_world,
    default_world_config,
    load_world,
    normalize,
    world_config_from_dict,
)

DEFAULT_FAMILIES = default_world_config().families


@pytest.fixture(scope="module")
def world() -> World:
    return default_world()


@pytest.fixture(scope="module")
def big_world() -> World:
    """Every answer and paraphrase of the default definitions (6 answers x 3 forms)."""
    return default_world(n_answers=6, n_paraphrases=3)


def detokenised(text: str) -> str:
    """How a word-level tokenizer's cleanup decodes a sentence: no space before punctuation."""
    return re.sub(r" ([.,?!])", r"\1", text)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def within_3se(observed: float, expected: float, variance: float) -> bool:
    return abs(observed - expected) <= 3 * math.sqrt(variance)


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("n_answers", [3, 4, 5, 6])
def test_shares_are_distributions_with_a_clear_majority(n_answers: int) -> None:
    w = default_world(n_answers=n_answers)
    assert len(w.families) >= 4
    for fam in w.families:
        p = fam.train_wordings[0]
        shares = w.truth_shares(p)
        assert len(shares) == len(w.answers(p)) == n_answers
        assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
        assert max(shares) >= 0.5
        assert min(shares) >= 0.1 - 1e-12
        assert w.majority(p) == shares.index(max(shares))
        assert sorted(shares)[-2] < max(shares)


def test_default_world_varies_shares_and_majority_position(world: World) -> None:
    rows = {tuple(sorted(f.shares)) for f in world.families}
    assert len(rows) > 1
    assert len({f.majority for f in world.families}) > 1


def test_every_answer_has_the_same_number_of_short_paraphrases(big_world: World) -> None:
    for fam in big_world.families:
        assert {len(texts) for texts in fam.paraphrases} == {3}
        for _, text in fam.sequences:
            assert 3 <= len(re.findall(r"\w+", text)) <= 6, text
    w = default_world()
    for fam in w.families:
        assert {len(texts) for texts in fam.paraphrases} == {2}
        assert len(w.valid_sequences(fam.train_wordings[0])) == 6


def test_wordings_split_into_train_and_held_out_eval(world: World) -> None:
    train, evals = world.train_prompts(), world.eval_prompts()
    assert not {normalize(p) for p in train} & {normalize(p) for p in evals}
    for fam in world.families:
        assert len(fam.train_wordings) >= 2 and len(fam.eval_wordings) >= 1
        assert {world.family_of(p) for p in fam.wordings} == {fam.name}
        assert {world.family(p) for p in fam.wordings} == {fam}
    assert train == default_world().train_prompts()
    assert evals == default_world().eval_prompts()
    two = default_world(n_eval_wordings=2)
    assert all(len(f.eval_wordings) == 2 for f in two.families)
    assert set(evals) < set(two.eval_prompts())


def test_eval_wordings_only_use_words_seen_in_training_texts(world: World) -> None:
    seen: set[str] = set()
    for text in world.train_prompts() + [t for f in world.families for _, t in f.sequences]:
        seen.update(normalize(text).split())
    for prompt in world.eval_prompts():
        assert set(normalize(prompt).split()) <= seen, prompt


def test_family_lookup_normalises_and_rejects_unknown_prompts(world: World) -> None:
    assert world.family_of("which SEASON do you like best?") == "season"
    assert world.family("  What is your favourite drink ?  ").name == "drink"
    with pytest.raises(KeyError):
        world.family_of("Which colour do you like best ?")
    with pytest.raises(KeyError):
        world.classify("Which colour do you like best ?", "I like summer best .")


def test_vocabulary_covers_every_prompt_and_response(big_world: World) -> None:
    vocab = big_world.vocabulary()
    assert len(vocab) == len(set(vocab))
    texts = set(vocab)
    for fam in big_world.families:
        assert set(fam.wordings) <= texts
        assert {t for _, t in fam.sequences} <= texts


# --------------------------------------------------------------------------- answer mapping
def test_classify_every_paraphrase_and_its_spacing_and_case_variants(big_world: World) -> None:
    for fam in big_world.families:
        for prompt in fam.wordings:
            for a, text in fam.sequences:
                variants = [
                    text,
                    detokenised(text),
                    text.upper(),
                    text.lower(),
                    "  " + text.replace(" ", "   ") + " \n",
                    detokenised(text) + "</s>",
                    text + " </s> <pad> <pad>",
                    text + "</s> and then some garbage",
                ]
                for variant in variants:
                    assert big_world.classify(prompt, variant) == a, (prompt, variant)


def test_classify_decoded_forms_of_the_word_tokenizer(big_world: World) -> None:
    from pmrlhf.models import build_word_tokenizer

    tok = build_word_tokenizer(big_world.vocabulary())
    for fam in big_world.families:
        prompt = fam.train_wordings[0]
        for a, text in fam.sequences:
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert tok.unk_token_id not in ids
            for skip in (False, True):
                decoded = tok.decode(ids, skip_special_tokens=skip)
                assert big_world.classify(prompt, decoded) == a, decoded
    assert tok.decode(tok("I like summer best .")["input_ids"]) == "I like summer best."
    p = "Which season do you like best ?"
    assert big_world.classify(p, "I like summer best.") == 0
    assert big_world.classify(p, "I like summer best .") == 0


def test_classify_rejects_garbage(world: World) -> None:
    prompt = world.train_prompts()[0]
    for text in [
        "",
        "   ",
        "</s>",
        ".",
        "summer",
        "banana banana banana",
        "<unk> <unk> .",
        "I like summer best !",
        "I like sumer best .",
        "I like best summer .",
        "Which season do you like best ?",
    ]:
        assert world.classify(prompt, text) is None, text


def test_classify_rejects_other_families_answers(big_world: World) -> None:
    for fam in big_world.families:
        prompt = fam.train_wordings[0]
        for other in big_world.families:
            if other.name == fam.name:
                continue
            for _, text in other.sequences:
                assert big_world.classify(prompt, text) is None, (fam.name, text)


def test_classify_rejects_truncations_and_extra_words(big_world: World) -> None:
    for fam in big_world.families:
        prompt = fam.train_wordings[0]
        for _, text in fam.sequences:
            words = text.split()
            for cut in range(1, len(words)):
                assert big_world.classify(prompt, " ".join(words[:cut])) is None
            assert big_world.classify(prompt, detokenised(text)[:-1]) is None
            assert big_world.classify(prompt, text + " really") is None
            assert big_world.classify(prompt, "Well " + text) is None
            assert big_world.classify(prompt, " ".join([*words[:1], "really", *words[1:]])) is None
            assert big_world.classify(prompt, text + " " + text) is None


def test_distribution_counts_answers_and_invalid(world: World) -> None:
    prompt = "What is your favourite season ?"
    texts = [
        "I like summer best.",
        "Summer is my favourite .",
        "I like winter best .",
        "I prefer tea .",
        "I like summer",
    ]
    assert world.distribution(prompt, texts) == [0.4, 0.2, 0.0, 0.4]
    assert world.distribution(prompt, iter(["I like spring best ."])) == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        world.distribution(prompt, [])


# --------------------------------------------------------------------------- true reward
def test_true_reward_is_log_share_for_every_paraphrase(big_world: World) -> None:
    for fam in big_world.families:
        prompt = fam.eval_wordings[0]
        shares = big_world.truth_shares(prompt)
        for a, text in big_world.valid_sequences(prompt):
            assert big_world.true_reward(prompt, detokenised(text)) == math.log(shares[a])
        assert big_world.true_rewards(prompt) == [
            math.log(shares[a]) for a, _ in big_world.valid_sequences(prompt)
        ]
        with pytest.raises(ValueError):
            big_world.true_reward(prompt, "not an answer")


@pytest.mark.parametrize(("n_answers", "n_paraphrases"), [(3, 1), (3, 2), (4, 3), (6, 3)])
def test_answer_target_of_true_rewards_is_truth_shares(n_answers: int, n_paraphrases: int) -> None:
    w = default_world(n_answers=n_answers, n_paraphrases=n_paraphrases)
    for prompt in w.train_prompts() + w.eval_prompts():
        truth = w.truth_shares(prompt)
        rewards = w.true_rewards(prompt)
        assert w.answer_target(prompt, rewards) == pytest.approx(truth, abs=1e-12)
        by_text = {text: r for (_, text), r in zip(w.valid_sequences(prompt), rewards)}
        assert w.answer_target(prompt, by_text) == pytest.approx(truth, abs=1e-12)
        shifted = [r + 7.5 for r in rewards]
        assert w.answer_target(prompt, shifted) == pytest.approx(truth, abs=1e-12)


def test_answer_target_sums_uneven_rewards_within_an_answer(world: World) -> None:
    prompt = "Which season do you like best ?"
    seqs = world.valid_sequences(prompt)
    assert [a for a, _ in seqs] == [0, 0, 1, 1, 2, 2]
    rewards = [0.0, math.log(3.0), 1.0, 1.0, 2.0, 0.0]
    e = math.e
    z = 1 + 3 + 2 * e + e**2 + 1
    expected = [4 / z, 2 * e / z, (e**2 + 1) / z]
    assert world.answer_target(prompt, rewards) == pytest.approx(expected, rel=1e-12)
    keyed = {detokenised(text).upper(): r for (_, text), r in zip(seqs, rewards)}
    assert world.answer_target(prompt, keyed) == pytest.approx(expected, rel=1e-12)
    # beta tempers the reward: softmax(r / 0.5) == softmax(2 r)
    doubled = [2 * r for r in rewards]
    assert world.answer_target(prompt, rewards, beta=0.5) == pytest.approx(
        world.answer_target(prompt, doubled), rel=1e-12
    )


def test_answer_target_rejects_misaligned_rewards(world: World) -> None:
    prompt = "Which season do you like best ?"
    seqs = world.valid_sequences(prompt)
    with pytest.raises(ValueError):
        world.answer_target(prompt, [0.0] * (len(seqs) - 1))
    with pytest.raises(ValueError):
        world.answer_target(prompt, {text: 0.0 for _, text in seqs[:-1]})
    with pytest.raises(ValueError):
        world.answer_target(prompt, {**{t: 0.0 for _, t in seqs}, "I prefer tea .": 0.0})
    with pytest.raises(ValueError):
        world.answer_target(prompt, [0.0] * len(seqs), beta=0.0)


# --------------------------------------------------------------------------- annotators
def test_pairs_follow_btl_over_sequences(world: World) -> None:
    prompt = "Which season do you like best ?"
    rows = world.sample_pairs(6000, seed=11, prompts=[prompt])
    shares = world.truth_shares(prompt)
    seqs = world.valid_sequences(prompt)
    index = {text: i for i, (_, text) in enumerate(seqs)}
    # Sequences are listed answer by answer, so for i < j "i wins" means the lower answer wins
    # (or, within one answer, the first paraphrase wins: a fair coin under BTL).
    answer_wins: Counter[tuple[int, int]] = Counter()
    answer_games: Counter[tuple[int, int]] = Counter()
    pair_wins: Counter[tuple[int, int]] = Counter()
    pair_games: Counter[tuple[int, int]] = Counter()
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        winner, loser = index[row["chosen"]], index[row["rejected"]]
        first, second = min(winner, loser), max(winner, loser)
        key = (seqs[first][0], seqs[second][0])
        answer_games[key] += 1
        answer_wins[key] += winner == first
        pair_games[(first, second)] += 1
        pair_wins[(first, second)] += winner == first
    assert set(answer_games) == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)}
    assert len(pair_games) == len(seqs) * (len(seqs) - 1) // 2
    for (a, b), n in answer_games.items():
        p = 0.5 if a == b else shares[a] / (shares[a] + shares[b])
        assert within_3se(answer_wins[(a, b)] / n, p, p * (1 - p) / n), ((a, b), n)
    # One fixed pair of sequences: the chosen-rate is σ(r*(summer) − r*(spring)).
    fixed = (index["I like summer best ."], index["I like spring best ."])
    n_fixed = pair_games[fixed]
    rate = pair_wins[fixed] / n_fixed
    p_fixed = 1 / (1 + math.exp(-(math.log(shares[0]) - math.log(shares[2]))))
    assert n_fixed > 200
    assert within_3se(rate, p_fixed, p_fixed * (1 - p_fixed) / n_fixed)
    assert abs(rate - 0.5) > 0.2


def test_pairs_default_to_training_prompts_and_can_skip_same_answer_pairs(world: World) -> None:
    rows = world.sample_pairs(600, seed=3)
    assert {r["prompt"] for r in rows} == set(world.train_prompts())
    cross = world.sample_pairs(600, seed=3, cross_answer_only=True)
    same = 0
    for row in cross:
        a = world.classify(row["prompt"], row["chosen"])
        b = world.classify(row["prompt"], row["rejected"])
        assert a is not None and b is not None and a != b
    for row in rows:
        same += world.classify(row["prompt"], row["chosen"]) == world.classify(
            row["prompt"], row["rejected"]
        )
    assert same > 0


def test_rankings_follow_plackett_luce(world: World) -> None:
    prompt = "Which drink do you prefer ?"
    rows = world.sample_rankings(6000, k=3, seed=5, prompts=[prompt])
    reward = {text: world.true_reward(prompt, text) for _, text in world.valid_sequences(prompt)}
    n_answers = len(world.answers(prompt))
    # For positions 1 and 2: observed answer counts against the PL conditional probabilities
    # given the drawn set (and the items already placed), summed over rows.
    for position in (0, 1):
        observed = [0.0] * n_answers
        expected = [0.0] * n_answers
        variance = [0.0] * n_answers
        for row in rows:
            responses = row["responses"]
            assert len(responses) == 3 == len(set(responses))
            remaining = responses[position:]
            z = sum(math.exp(reward[t]) for t in remaining)
            probs = [0.0] * n_answers
            for t in remaining:
                probs[world.classify(prompt, t)] += math.exp(reward[t]) / z
            for a in range(n_answers):
                expected[a] += probs[a]
                variance[a] += probs[a] * (1 - probs[a])
            observed[world.classify(prompt, responses[position])] += 1
        for a in range(n_answers):
            assert abs(observed[a] - expected[a]) <= 3 * math.sqrt(variance[a]), (position, a)
    tops = Counter(world.classify(prompt, r["responses"][0]) for r in rows)
    assert tops.most_common(1)[0][0] == world.majority(prompt)


def test_rankings_check_k(world: World) -> None:
    assert all(len(r["responses"]) == 6 for r in world.sample_rankings(20, k=6, seed=0))
    with pytest.raises(ValueError):
        world.sample_rankings(1, k=7)
    with pytest.raises(ValueError):
        world.sample_rankings(1, k=1)


def test_off_world_responses_are_added_last_in_a_share_of_rankings(world: World) -> None:
    drink, season = "Which drink do you prefer ?", "Which season do you like best ?"
    other_drink = next(p for p in world.train_prompts() if p != drink and
                       world.family_of(p) == world.family_of(drink))  # fmt: skip
    rankings = world.sample_rankings(4000, k=3, seed=1, prompts=[drink, other_drink, season])
    slips = [{"prompt": drink, "response": "Lemonade, please."},
             {"prompt": other_drink, "response": "Milk."},
             {"prompt": other_drink, "response": "Milk."},
             {"prompt": drink, "response": "  "}]  # fmt: skip
    rows = world.add_off_world(rankings, slips, share=0.5, seed=2)
    assert [r["responses"][:3] for r in rows] == [r["responses"] for r in rankings]
    assert all(len(r["responses"]) == 3 for r in rankings)  # the input is not changed
    drawn = Counter()
    for row in rows:
        if world.family_of(row["prompt"]) != world.family_of(drink):
            assert len(row["responses"]) == 3  # no slips of this family: left as it is
            continue
        if len(row["responses"]) == 4:
            # a slip of the row's family, whichever wording it was sampled for, ranked last
            assert world.classify(row["prompt"], row["responses"][3]) is None
            drawn[row["responses"][3]] += 1
    n_drink = sum(world.family_of(r["prompt"]) == world.family_of(drink) for r in rows)
    share = sum(drawn.values()) / n_drink
    assert abs(share - 0.5) <= 3 * math.sqrt(0.25 / n_drink)
    # drawn as often as sampled: "Milk." twice as often as "Lemonade, please."; blanks never
    assert set(drawn) == {"Milk.", "Lemonade, please."}
    n = sum(drawn.values())
    assert abs(drawn["Milk."] / n - 2 / 3) <= 3 * math.sqrt(2 / 9 / n)
    assert world.add_off_world(rankings, slips, share=0.0) == rankings
    assert all(len(r["responses"]) == 4 for r in world.add_off_world(
        rankings, slips, share=1.0) if world.family_of(r["prompt"]) == "drink")  # fmt: skip
    listed = {"prompt": season, "response": "I like summer best ."}
    with pytest.raises(ValueError, match=r"off-world row 1: 'I like summer best \.' is a listed"):
        world.add_off_world(rankings, [slips[0], listed], share=0.5)
    with pytest.raises(ValueError, match="share"):
        world.add_off_world(rankings, slips, share=1.5)


def test_sft_rows_are_balanced_over_training_prompts_and_sequences(world: World) -> None:
    combos = [(p, t) for p in world.train_prompts() for _, t in world.valid_sequences(p)]
    n = 5 * len(combos) + 7
    rows = world.sft_rows(n, seed=2)
    assert len(rows) == n
    counts = Counter((r["prompt"], r["completion"]) for r in rows)
    assert set(counts) == set(combos)
    assert set(counts.values()) == {5, 6}
    assert sum(v == 6 for v in counts.values()) == 7


def test_sampling_is_deterministic_given_the_seed(world: World) -> None:
    assert world.sample_pairs(50, seed=7) == world.sample_pairs(50, seed=7)
    assert world.sample_pairs(50, seed=7) != world.sample_pairs(50, seed=8)
    assert world.sample_rankings(50, seed=7) == world.sample_rankings(50, seed=7)
    assert world.sample_rankings(50, seed=7) != world.sample_rankings(50, seed=8)
    assert world.sft_rows(50, seed=7) == world.sft_rows(50, seed=7)
    assert world.sft_rows(50, seed=7) != world.sft_rows(50, seed=8)


# --------------------------------------------------------------------------- files
FILES = {
    "sft": {"prompt", "completion"},
    "pairs": {"prompt", "chosen", "rejected"},
    "rankings": {"prompt", "responses"},
    "prompts_train": {"prompt"},
    "prompts_eval": {"prompt"},
}


def test_written_files_have_the_documented_columns(tmp_path, world: World) -> None:
    paths = default_world().write_files(tmp_path, n_pairs=300, n_rankings=200, n_sft=250, seed=4)
    assert set(paths) == {*FILES, "world"}
    for name, columns in FILES.items():
        assert paths[name] == tmp_path / f"{name}.jsonl"
        rows = read_jsonl(paths[name])
        assert rows and all(set(r) == columns for r in rows), name
    assert len(read_jsonl(paths["sft"])) == 250
    assert len(read_jsonl(paths["pairs"])) == 300
    assert len(read_jsonl(paths["rankings"])) == 200
    assert [r["prompt"] for r in read_jsonl(paths["prompts_train"])] == world.train_prompts()
    assert [r["prompt"] for r in read_jsonl(paths["prompts_eval"])] == world.eval_prompts()
    for row in read_jsonl(paths["sft"]):
        assert row["completion"] in {t for _, t in world.valid_sequences(row["prompt"])}
    for row in read_jsonl(paths["rankings"]):
        assert all(world.classify(row["prompt"], t) is not None for t in row["responses"])


def test_eval_wordings_never_appear_in_training_files(tmp_path, world: World) -> None:
    paths = world.write_files(tmp_path, n_pairs=2000, n_rankings=1000, n_sft=1000, seed=9)
    held_out = {normalize(p) for p in world.eval_prompts()}
    for name in ("sft", "pairs", "rankings", "prompts_train"):
        prompts = {normalize(r["prompt"]) for r in read_jsonl(paths[name])}
        assert prompts and not prompts & held_out, name
        assert prompts == {normalize(p) for p in world.train_prompts()}, name


def test_written_files_are_deterministic_and_streams_independent(tmp_path) -> None:
    w = default_world()
    a = w.write_files(tmp_path / "a", n_pairs=100, n_rankings=100, n_sft=100, seed=1)
    b = w.write_files(tmp_path / "b", n_pairs=100, n_rankings=100, n_sft=100, seed=1)
    c = w.write_files(tmp_path / "c", n_pairs=100, n_rankings=100, n_sft=100, seed=2)
    d = w.write_files(tmp_path / "d", n_pairs=150, n_rankings=100, n_sft=100, seed=1)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    for name in ("sft", "pairs", "rankings"):
        assert a[name].read_bytes() != c[name].read_bytes(), name
    assert a["sft"].read_bytes() == d["sft"].read_bytes()
    assert a["rankings"].read_bytes() == d["rankings"].read_bytes()


def test_world_json_describes_and_rebuilds_the_world(tmp_path) -> None:
    w = default_world(n_answers=4, n_paraphrases=3)
    paths = w.write_files(tmp_path, n_pairs=10, n_rankings=10, n_sft=10, seed=0)
    data = json.loads(paths["world"].read_text())
    assert [f["name"] for f in data["families"]] == [f.name for f in w.families]
    season = data["families"][0]
    assert set(season) >= {"name", "train_wordings", "eval_wordings", "answers", "majority"}
    assert [a["name"] for a in season["answers"]] == w.answers(season["train_wordings"][0])
    assert all(len(a["paraphrases"]) == 3 for a in season["answers"])
    assert all(len(r["responses"]) == 3 for r in read_jsonl(paths["rankings"]))
    four = w.write_files(tmp_path / "k4", n_pairs=0, n_rankings=10, n_sft=0, ranking_size=4)
    assert all(len(r["responses"]) == 4 for r in read_jsonl(four["rankings"]))
    assert four["pairs"].read_text() == "" and four["sft"].read_text() == ""
    assert sum(a["share"] for a in season["answers"]) == pytest.approx(1.0)
    rebuilt = load_world(paths["world"])
    assert rebuilt.train_prompts() == w.train_prompts()
    assert rebuilt.eval_prompts() == w.eval_prompts()
    for prompt in w.train_prompts() + w.eval_prompts():
        assert rebuilt.valid_sequences(prompt) == w.valid_sequences(prompt)
        assert rebuilt.truth_shares(prompt) == pytest.approx(w.truth_shares(prompt), abs=1e-15)


# --------------------------------------------------------------------------- definitions
def one_family(**changes) -> FamilySpec:
    base = DEFAULT_FAMILIES[0]
    values = {
        "name": base.name,
        "wordings": base.wordings,
        "answers": base.answers,
        "shares": base.shares,
    }
    values.update(changes)
    return FamilySpec(**values)


def test_invalid_definitions_are_rejected() -> None:
    season = DEFAULT_FAMILIES[0]
    duplicate = one_family(
        answers=(
            AnswerSpec("a", ("I like it .", "Fine .")),
            AnswerSpec("b", ("i like IT.", "Great .")),
            AnswerSpec("c", ("No thanks .", "Never .")),
        )
    )
    prefix = one_family(
        answers=(
            AnswerSpec("a", ("I like it", "Fine .")),
            AnswerSpec("b", ("I like it a lot .", "Great .")),
            AnswerSpec("c", ("No thanks .", "Never .")),
        )
    )
    for bad in [
        WorldConfig(families=(duplicate,)),
        WorldConfig(families=(prefix,)),
        WorldConfig(families=(one_family(shares=((0.45, 0.35, 0.20),)),)),
        WorldConfig(families=(one_family(shares=((0.6, 0.35, 0.05),)),)),
        WorldConfig(families=(one_family(shares=((0.6, 0.3, 0.2),)),)),
        WorldConfig(
            families=(season, one_family(name="copy", answers=DEFAULT_FAMILIES[1].answers))
        ),
        WorldConfig(families=(season, season)),
        replace(default_world_config(), n_paraphrases=4),
        replace(default_world_config(), n_answers=7),
        replace(default_world_config(), n_eval_wordings=len(season.wordings)),
        replace(default_world_config(), n_eval_wordings=0),
    ]:
        with pytest.raises(ValueError):
            World(bad)
    World(WorldConfig(families=(one_family(shares=((0.5, 0.3, 0.2),)),)))


# --------------------------------------------------------------------------- world files
def packaged_default() -> dict:
    resource = resources.files("pmrlhf") / "worlds" / "default.json"
    return json.loads(resource.read_text(encoding="utf-8"))


def test_default_world_is_the_packaged_world_file(tmp_path) -> None:
    data = packaged_default()
    assert [f["name"] for f in data["families"]] == [f.name for f in default_world().families]
    path = tmp_path / "default.json"
    path.write_text(json.dumps(data))
    assert load_world(path).describe() == default_world().describe()
    # Settings in the file are the defaults; default_world overrides only what it is given.
    data["n_answers"] = 4
    path.write_text(json.dumps(data))
    assert load_world(path).describe() == default_world(n_answers=4).describe()
    assert default_world(n_paraphrases=3).config.n_answers == packaged_default()["n_answers"]


def user_world(**top) -> dict:
    """A small hand-written world file: one family, shares per family for 2 and 3 answers."""
    return {
        "families": [
            {
                "name": "colour",
                "train_wordings": ["Which colour do you like ?", "What is your colour ?"],
                "eval_wordings": ["Which colour is your favourite ?"],
                "answers": [
                    {"name": "red", "paraphrases": ["Red .", "I like red ."]},
                    {"name": "blue", "paraphrases": ["Blue .", "I like blue ."]},
                    {"name": "green", "paraphrases": ["Green .", "I like green ."]},
                ],
                "shares": [[0.7, 0.3], [0.6, 0.25, 0.15]],
            }
        ],
        **top,
    }


def test_user_world_file_with_share_rows_per_answer_count(tmp_path) -> None:
    path = tmp_path / "colours.json"
    path.write_text(json.dumps(user_world()))
    w = load_world(path)  # WorldConfig defaults: 3 answers, 2 paraphrases, 1 held-out wording
    assert w.eval_prompts() == ["Which colour is your favourite ?"]
    assert w.truth_shares("Which colour do you like ?") == pytest.approx([0.6, 0.25, 0.15])
    assert w.classify("Which colour do you like ?", "i like GREEN.") == 2
    path.write_text(json.dumps(user_world(n_answers=2, n_paraphrases=1, n_eval_wordings=2)))
    two = load_world(path)
    assert two.truth_shares("Which colour do you like ?") == pytest.approx([0.7, 0.3])
    assert two.valid_sequences("What is your colour ?") == [(0, "Red ."), (1, "Blue .")]
    assert two.train_prompts() == ["Which colour do you like ?"]
    # world.json written for this world is itself a world file that rebuilds it
    rebuilt = load_world(two.write_files(tmp_path / "out", 5, 5, 5, ranking_size=2)["world"])
    assert rebuilt.describe() == two.describe()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(n_answer=3), "top level: unknown field(s) ['n_answer']"),
        (lambda d: d.update(n_answers="3"), "n_answers: must be an integer"),
        (lambda d: d.update(families=[]), "families: must be a non-empty list"),
        (lambda d: d["families"][0].pop("eval_wordings"), "families[0]: missing field 'eval_wordings'"),
        (lambda d: d["families"][0]["answers"][1].pop("paraphrases"),
         "families[0].answers[1]: missing field 'paraphrases'"),
        (lambda d: d["families"][0]["answers"][2].update(paraphrases=["Green .", 3]),
         "families[0].answers[2].paraphrases[1]: must be a non-empty string"),
        (lambda d: d["families"][0]["answers"][0].update(share=0.5),
         "families[0]: give shares either per answer ('share') or per family ('shares')"),
        (lambda d: d["families"][0].pop("shares"),
         "families[0]: every answer needs a 'share', or the family a 'shares' list"),
        (lambda d: d["families"][0]["shares"][1].__setitem__(0, True),
         "families[0].shares[1][0]: must be a number"),
    ],
)  # fmt: skip
def test_malformed_world_files_name_the_file_and_field(tmp_path, change, message) -> None:
    data = user_world()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_world(path)


def test_world_file_rules_are_checked_after_parsing(tmp_path) -> None:
    path = tmp_path / "w.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{path}: malformed JSON")):
        load_world(path)
    data = user_world()
    data["families"][0]["shares"] = [[0.4, 0.35, 0.25]]  # no majority of at least 0.5
    with pytest.raises(ValueError, match="unique majority"):
        World(world_config_from_dict(data))
