"""Data readers, formats, validation errors, prompt-length filtering and the stage split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmrlhf.data import (
    PairRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    load_pairs,
    load_prompts,
    load_rankings,
    load_records,
    load_scoring_records,
    load_sft_records,
    read_records,
    split_indices,
    subset_indices,
)
from pmrlhf.data.text import ChatRenderer
from pmrlhf.models import build_word_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"


@pytest.fixture(scope="module")
def tokenizer():
    texts = []
    for path in FIXTURES.glob("*.jsonl"):
        texts.extend(path.read_text().split())
    return build_word_tokenizer([*texts, "Human", "Assistant", "System", "user", "assistant"])


# --------------------------------------------------------------------------- readers
def test_load_records_reads_every_local_format(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(load_records(FIXTURES / "pairs.jsonl").to_list()), parquet)
    for source, rows in [
        (FIXTURES / "pairs.jsonl", 2),
        (FIXTURES / "pairs.csv", 2),
        (FIXTURES / "rankings.json", 2),
        (parquet, 2),
    ]:
        dataset = load_records(source)
        assert len(dataset) == rows
    assert load_records(FIXTURES / "pairs.csv")[1]["prompt"] == 'Say "hi", please.'


def test_missing_local_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_records(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- formats
def test_prompt_only_formats():
    prompts = load_prompts(FIXTURES / "prompts.jsonl")
    assert prompts[0] == PromptRecord("What is the capital of France?")
    # chat prompts (a message list, or messages minus the final reply) render in HH layout
    assert prompts[1].prompt == "\n\nHuman: Name a primary colour.\n\nAssistant:"
    assert prompts[2].prompt == "\n\nHuman: Say hello.\n\nAssistant:"


def test_sft_prompt_completion_and_chat_messages():
    assert load_sft_records(FIXTURES / "sft.jsonl")[0] == SFTRecord(
        "What is the capital of France?", "Paris."
    )
    chat = load_sft_records(FIXTURES / "sft_chat.jsonl")
    assert chat[0] == SFTRecord("\n\nHuman: What is two plus two?\n\nAssistant:", " Four.")
    assert chat[1].prompt.startswith("\n\nSystem: Be brief.\n\nHuman: Name a primary colour.")


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }} </{{ m.role }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        chat = load_sft_records(FIXTURES / "sft_chat.jsonl", tokenizer)
    finally:
        tokenizer.chat_template = None
    assert chat[0].prompt == "<user> What is two plus two? </user>\n<assistant>"
    # the completion is exactly what the template puts after the generation prompt
    assert chat[0].completion == " Four. </assistant>"


def test_pairwise_prompt_chosen_rejected():
    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    assert pairs[0] == PairRecord("What is the capital of France?", "Paris.", "Lyon.")
    assert pairs[0].as_ranking() == RankingRecord(pairs[0].prompt, ("Paris.", "Lyon."))


def test_hh_rlhf_prompt_is_the_shared_prefix_up_to_the_last_assistant_turn():
    pairs = load_pairs(FIXTURES / "hh_rlhf.jsonl")
    assert pairs[0] == PairRecord(
        "\n\nHuman: What is two plus two?\n\nAssistant:", " Four.", " Five."
    )
    # multi-turn: earlier turns stay in the prompt, and the responses share a first letter "R"
    second = pairs[1]
    assert second.prompt == (
        "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a primary colour.\n\nAssistant:"
    )
    assert (second.chosen, second.rejected) == (" Red is one.", " Rainbow.")
    assert load_prompts(FIXTURES / "hh_rlhf.jsonl")[1].prompt == second.prompt


def test_dahoas_layout_for_pairs_and_sft():
    pairs = load_pairs(FIXTURES / "dahoas.jsonl")
    assert pairs[0] == PairRecord(
        "\n\nHuman: What is two plus two?\n\nAssistant:", " Four.", " Five."
    )
    # SFT on Dahoas rows trains on the chosen response, as DeepSpeed-Chat's step 1 does
    assert load_sft_records(FIXTURES / "dahoas.jsonl")[1].completion == " Red."


def test_listwise_rankings_and_scores():
    rankings = load_rankings(FIXTURES / "rankings.jsonl")
    assert rankings[0] == RankingRecord("Name a fruit.", ("Apple.", "Pear.", "Rock."))
    assert rankings[1].k == 2
    assert [p.chosen for p in rankings[0].pairs()] == ["Apple.", "Apple.", "Pear."]
    scored = load_rankings(FIXTURES / "scored.jsonl")
    assert scored[0].responses == ("Apple.", "Pear.", "Rock.")  # sorted, higher score first
    # pairs are rankings with K = 2
    assert load_rankings(FIXTURES / "pairs.jsonl")[1].responses == ("Four.", "Five.")


def test_scoring_records_keep_responses_as_given():
    rows = load_scoring_records(FIXTURES / "sft.jsonl")
    assert rows[0].responses == ("Paris.",)
    assert rows.locations[0].endswith("sft.jsonl, line 1")


def test_plain_renderer_matches_hh_layout():
    renderer = ChatRenderer()
    messages = [{"role": "user", "content": "Hi"}]
    assert renderer.prompt(messages) + renderer.completion(messages, "Yo") == (
        "\n\nHuman: Hi\n\nAssistant: Yo"
    )


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("file", "kind", "location", "field", "problem"),
    [
        ("malformed.jsonl", "pair", "line 3", None, "malformed JSON"),
        ("missing_field.jsonl", "pair", "line 2", "rejected", "missing"),
        ("empty_text.jsonl", "pair", "line 2", "chosen", "empty"),
        ("non_string.jsonl", "pair", "line 2", "rejected", "must be a string"),
        ("duplicate_responses.jsonl", "ranking", "line 2", "responses", "duplicate"),
        ("short_ranking.jsonl", "ranking", "line 2", "responses", "at least 2"),
    ],
)
def test_bad_input_names_file_row_and_field(file, kind, location, field, problem):
    with pytest.raises(ValueError) as info:
        read_records(BAD / file, kind)
    message = str(info.value)
    assert file in message
    assert location in message
    assert problem in message
    if field is not None:
        assert f"field {field!r}" in message


def test_missing_column_names_first_row(tmp_path):
    path = tmp_path / "no_rejected.csv"
    path.write_text("prompt,chosen\nq,a\n")
    with pytest.raises(ValueError, match=r"no_rejected\.csv, row 1, field 'rejected': missing"):
        load_pairs(path)


def test_csv_empty_cell_names_its_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq2,,b\n")
    with pytest.raises(ValueError, match=r"pairs\.csv, row 2, field 'chosen'"):
        load_pairs(path)


def test_identical_pair_is_rejected(tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"same\.jsonl, line 1, field 'rejected': is identical"):
        load_pairs(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "q"}\n["q"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl, line 2: expected a JSON object"):
        load_prompts(path)


def test_bad_chat_message_names_the_message(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(
        ValueError, match=r"chat\.jsonl, line 1, field 'messages\[1\]\.content': is empty"
    ):
        load_sft_records(path)


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "What is two plus two?", "completion": "Four."},
        {"prompt": " ".join(["two"] * 40), "completion": "Four."},
        {"prompt": " ".join(["two"] * 41), "completion": "Four."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows whose prompt is longer than 40"):
        records = load_sft_records(path, tokenizer, max_prompt_tokens=40)
    assert len(records) == 2
    assert records.dropped == 1
    assert records.locations == [f"{path}, line 1", f"{path}, line 2"]


# --------------------------------------------------------------------------- splits
def test_paper_split_is_deterministic_disjoint_and_covering():
    parts = split_indices(1000)
    assert [len(p) for p in parts] == [200, 400, 400]
    assert parts == split_indices(1000, (0.2, 0.4, 0.4), 1234)
    assert split_indices(1000, seed=1) != parts
    assert sorted(i for p in parts for i in p) == list(range(1000))


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(0, 300),
    seed=st.integers(0, 2**31),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4).filter(lambda f: sum(f) > 0),
)
def test_split_partitions_any_size(n, seed, fractions):
    parts = split_indices(n, fractions, seed)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # covering and disjoint
    assert split_indices(n, fractions, seed) == parts


def test_subsets_of_a_file_are_the_split_parts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(50)))
    seen: set[str] = set()
    for stage, size in [("sft", 10), ("rm", 20), ("rl", 20)]:
        prompts = {r.prompt for r in load_prompts(path, subset=stage)}
        assert len(prompts) == size
        assert not prompts & seen
        seen |= prompts
        assert prompts == {r.prompt for r in load_prompts(path, subset=stage)}
    assert len(seen) == 50
    assert subset_indices(50, "all") == list(range(50))


def test_conversational_pairs_share_their_leading_turns_as_the_prompt(tmp_path):
    user = {"role": "user", "content": "Name a fruit."}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Apple."}],
        "rejected": [user, {"role": "assistant", "content": "Rock."}],
    }
    path = tmp_path / "chat_pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    expected_prompt = "\n\nHuman: Name a fruit.\n\nAssistant:"
    assert load_pairs(path)[0] == PairRecord(expected_prompt, " Apple.", " Rock.")
    assert load_sft_records(path)[0] == SFTRecord(expected_prompt, " Apple.")
    assert load_prompts(path)[0] == PromptRecord(expected_prompt)


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.jsonl", b'\xef\xbb\xbf{"prompt": "q", "chosen": "a", "rejected": "b"}\r\n'),
        ("bom.json", b'\xef\xbb\xbf[{"prompt": "q", "chosen": "a", "rejected": "b"}]'),
        ("bom.csv", b"\xef\xbb\xbfprompt,chosen,rejected\r\nq,a,b\r\n"),
    ],
)
def test_utf8_with_a_byte_order_mark_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert list(load_pairs(path)) == [PairRecord("q", "a", "b")]


@pytest.mark.parametrize(
    ("name", "content", "location"),
    [
        ("latin1.jsonl", b'{"prompt": "q"}\n{"prompt": "caf\xe9"}\n', "line 2"),
        ("latin1.json", b'[{"prompt": "q"},\n {"prompt": "caf\xe9"}]', "line 2"),
        ("latin1.csv", b"prompt\nq\ncaf\xe9\n", "line 3"),
    ],
)
def test_non_utf8_file_names_file_and_line(tmp_path, name, content, location):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}, {location}: not UTF-8 text \(byte 0xe9"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prompt,chosen,rejected\nq,a,b\nq,a,b,c\n", r"line 3: expected 3 fields"),
        ("prompt,chosen,rejected\nq,a\n", r"line 2: expected 3 fields"),
        ('prompt,chosen,rejected\nq,"a,b\n', r"line 2: malformed CSV"),
        ("prompt,chosen,prompt\nq,a,b\n", r"line 1: column 'prompt' appears twice"),
        ("prompt,,rejected\nq,a,b\n", r"line 1: the header has an empty column name"),
        ("prompt,chosen,rejected\n", r"no rows"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"bad\.csv(, )?.*{message}"):
        load_pairs(path)


def test_csv_cells_are_validated_as_the_text_in_the_file(tmp_path):
    # no type guessing: "42" stays a string and "NA" is a response, not a missing value
    path = tmp_path / "sft.csv"
    path.write_text('prompt,completion\n42,NA\n"multi\nline",null\n')
    records = load_sft_records(path)
    assert list(records) == [SFTRecord("42", "NA"), SFTRecord("multi\nline", "null")]


def test_tied_scores_are_rejected_for_training_and_kept_for_scoring(tmp_path):
    path = tmp_path / "tied.jsonl"
    rows = [
        {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2, 3]},
        {"prompt": "q", "responses": ["a", "b", "c"], "scores": [2.5, 1, 2.5]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ValueError,
        match=r"tied\.jsonl, line 2, field 'scores': scores\[0\] and scores\[2\] are tied at 2\.5",
    ):
        load_rankings(path)
    # scoring and SFT need no strict order: ties keep the listed order
    assert load_scoring_records(path)[1].responses == ("a", "c", "b")
    assert load_sft_records(path)[1].completion == "a"


@pytest.mark.parametrize(
    ("scores", "field"),
    [([1, "2"], "scores[1]"), (["1", "2"], "scores[0]"), ([1, None], "scores[1]"),
     ([True, 2], "scores[0]"), ("12", "scores")],
)  # fmt: skip
def test_mixed_type_scores_are_rejected_whatever_the_other_rows_hold(tmp_path, scores, field):
    # the same bad row is rejected alone and after a row of numbers, whose column type
    # would otherwise make the reader coerce "2" to 2
    good = {"prompt": "q", "responses": ["a", "b"], "scores": [1, 2.5]}
    bad = {"prompt": "q", "responses": ["a", "b"], "scores": scores}
    for rows, line in (([bad], 1), ([good, bad], 2)):
        path = tmp_path / "mixed.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match=rf"line {line}, field '{re.escape(field)}'"):
            load_rankings(path)


def test_int_and_float_scores_mix_freely(tmp_path):
    path = tmp_path / "numbers.jsonl"
    rows = [
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, 2.5]},
        {"prompt": "q", "responses": ["a", "b"], "scores": [3.0, 2]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.responses for r in load_rankings(path)] == [("b", "a"), ("a", "b")]


@pytest.mark.parametrize(
    ("row", "kind", "message"),
    [
        ({"prompt": "q", "chosen": "Paris.", "rejected": "Paris ."}, "pair",
         r"field 'rejected': tokenizes to the same tokens as 'chosen'"),
        ({"prompt": "q", "responses": ["Paris.", "Lyon.", "Paris ."]}, "ranking",
         r"field 'responses': items 0 and 2 tokenize to the same tokens"),
        ({"prompt": "q", "chosen": "Zzyzx", "rejected": "Qwxyq"}, "pair",
         r"field 'rejected': tokenizes to the same tokens"),  # both are the unknown token
    ],
)  # fmt: skip
def test_responses_that_tokenize_identically_are_duplicates(
    tmp_path, tokenizer, row, kind, message
):
    path = tmp_path / "same_tokens.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"same_tokens\.jsonl, line 1, " + message):
        read_records(path, kind, tokenizer)
    assert len(read_records(path, kind)) == 1  # without a tokenizer only equal strings clash
