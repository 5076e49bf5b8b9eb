"""The answer contract: the parser finds the chosen letter in every accepted form, and returns None
(never raises) for anything unparseable or ambiguous."""

import datasets
from hypothesis import given, settings
from hypothesis import strategies as st

from mcq import LETTERS, Record, is_well_formed, load_split, parse_answer, prompt_messages, target_text

OPTIONS = ["brown", "blue", "mixed", "adenocarcinoma of the colon"]


def test_accepted_forms():
    for text, want in [("<answer>C) mixed</answer>", "C"), ("<answer>C</answer>", "C"), ("<answer>(C)</answer>", "C"),
                       ("<answer>mixed</answer>", "C"), ("<answer>  c.  </answer>", "C"), ("<answer>b: Blue</answer>", "B"),
                       ("<think>x</think>\n<answer>\nD) Adenocarcinoma  of the colon.\n</answer>", "D"),
                       ("<answer>A) dark brown staining</answer>", "A")]:
        assert parse_answer(text, OPTIONS) == want, text


def test_unparseable_or_ambiguous_is_none():
    for text in ["", "C) mixed", "<answer></answer>", "<answer>E</answer>", "<answer>purple</answer>",
                 "<answer>A) blue</answer>",  # letter and option text disagree
                 "<answer>A</answer><answer>B</answer>", "<answer>A or B</answer>", None, 42]:
        assert parse_answer(text, OPTIONS) is None, text


def test_format_is_strict():
    assert is_well_formed("<think>brown</think><answer>A) brown</answer>")
    assert is_well_formed(" <think>a\nb</think>\n<answer>A</answer>\n")
    for bad in ["<think>x</think>", "<answer>A</answer>", "<think>x</think><answer>A</answer> extra",
                "<think></think><answer>A</answer>", "<think>x</think><think>y</think><answer>A</answer>"]:
        assert not is_well_formed(bad), bad


option_text = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=" -"),
                      min_size=1, max_size=20).filter(lambda s: s.strip())


@settings(max_examples=200, deadline=None)
@given(st.lists(option_text, min_size=2, max_size=5, unique_by=lambda s: " ".join(s.lower().split())),
       st.data())
def test_parser_recovers_the_letter(options, data):
    i = data.draw(st.integers(0, len(options) - 1))
    letter = LETTERS[i]
    form = data.draw(st.sampled_from(["{L}) {T}", "{L}", "({L})", "{l}) {T}", "  {L}.  "]))
    text = f"<think>reasons</think><answer>{form.format(L=letter, l=letter.lower(), T=options[i])}</answer>"
    assert parse_answer(text, options) == letter


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.lists(option_text, min_size=0, max_size=4))
def test_parser_never_raises(text, options):
    result = parse_answer(text, options)
    assert result is None or result in LETTERS[: len(options)]


def test_target_parses_back_and_is_well_formed():
    r = Record("x", "a.png", "Which stain?", OPTIONS, "D", "Glands are malignant.")
    assert is_well_formed(target_text(r)) and parse_answer(target_text(r), r.options) == "D"
    text = prompt_messages(r)[0]["content"][1]["text"]
    assert "D) adenocarcinoma of the colon" in text and "<answer>" in text


def test_prepared_split_loads_with_datasets(demo_data):
    path = f"{demo_data}/test.jsonl"
    ours = load_split(path)
    theirs = datasets.load_dataset("json", data_files=path, split="train")
    assert len(theirs) == len(ours) == 24
    assert theirs[0]["id"] == ours[0].id and theirs[0]["options"] == ours[0].options
