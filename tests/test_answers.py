"""The answer contract: the parser finds the chosen letter in every accepted form, and returns None
(never raises) for anything unparseable or ambiguous."""

import string
from itertools import permutations

import datasets
from hypothesis import given, settings
from hypothesis import strategies as st

from pathvlm.answers import _norm, is_well_formed, parse_answer
from pathvlm.records import LETTERS, Record, check_record, load_split, prompt_messages, target_text
from rewards import score_completions

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
                "<think></think><answer>A</answer>", "<think>x</think><think>y</think><answer>A</answer>",
                "<think> </think><answer>A</answer>", "<think>x</think><answer>\n\t</answer>"]:
        assert not is_well_formed(bad), bad


# ----------------------------------------------------------------------------------------------
# Hacks a policy optimised against the parser could find: a block must commit to one option

def test_hedged_negated_and_blank_completions_earn_nothing():
    record = Record("x", "a.png", "Which stain dominates?", ["brown", "blue", "mixed"], "A")
    hacks = ["<think>x</think><answer>A) brown, B) blue, C) mixed</answer>",
             "<think>x</think><answer>A) not brown</answer>",
             "<think> </think><answer>A) brown</answer>"]
    scores = score_completions({"format": 1.0, "accuracy": 1.0}, hacks, [record] * 3, require_format=True)
    assert scores["total"] == [1.0, 1.0, 0.0]  # the format alone, never the accuracy
    assert [parse_answer(h, record.options) for h in hacks] == [None, None, "A"]


def test_an_option_inside_another_is_not_a_second_option():
    options = ["carcinoma", "adenocarcinoma"]
    for text, want in [("A) carcinoma", "A"), ("B) adenocarcinoma", "B"), ("adenocarcinoma", "B"),
                       ("B) Adenocarcinoma, well differentiated", "B"), ("A) adenocarcinoma", None),
                       ("B) adenocarcinoma or carcinoma", None), ("B) adenocarcinoma (B), not A", None)]:
        assert parse_answer(f"<answer>{text}</answer>", options) == want, text
    # the chosen option's own text may contain another option's: that is not naming it
    options = ["carcinoma", "colon carcinoma"]
    assert parse_answer("<answer>B) carcinoma of the colon</answer>", options) == "B"
    assert parse_answer("<answer>A) carcinoma, colon carcinoma</answer>", options) is None


def test_words_of_the_chosen_option_never_count_against_it():
    options = ["No evidence of malignancy", "Adenocarcinoma", "Hepatitis B"]
    for text, want in [("A) No evidence of malignancy", "A"), ("A) no malignancy", "A"),
                       ("C) hepatitis B infection", "C"), ("A) not adenocarcinoma", None),
                       ("A) no evidence of malignancy, not adenocarcinoma", None), ("B) no adenocarcinoma", None),
                       ("B) adenocarcinoma rather than C", None), ("C) hepatitis B, not A", None),
                       ("C) hepatitis B or B", None), ("A) No, no evidence of malignancy", None)]:
        assert parse_answer(f"<answer>{text}</answer>", options) == want, text


def test_an_option_that_starts_like_a_letter_answer_is_read_as_its_text():
    # Species names in pathology options: "A. fumigatus" is option B's text, not the letter A with "fumigatus"
    fungi = ["Candida albicans", "A. fumigatus", "Mucor", "Histoplasma"]
    for text, want in [("A. fumigatus", "B"), ("B) A. fumigatus", "B"), ("B. A. fumigatus", "B"), ("A", "A"),
                       ("A) Candida albicans", "A"), ("(A)", "A"), ("B) A. fumigatus infection", "B"),
                       ("A) A. fumigatus", None),  # letter and option text disagree
                       ("A. fumigatus infection", None),  # A) and a paraphrase, or B's text and more words
                       ("A. fumigatus, not Candida albicans", None)]:
        assert parse_answer(f"<answer>{text}</answer>", fungi) == want, text
    bacteria = ["E. coli", "Klebsiella", "Proteus", "Pseudomonas", "Enterococcus"]
    for text, want in [("E. coli", "A"), ("A) E. coli", "A"), ("E", "E"), ("E) Enterococcus", "E"),
                       ("E) E. coli", None), ("E. coli infection", None), ("E) coli", None), ("e: coli sepsis", None),
                       ("E) Enterococcus faecalis", "E")]:
        assert parse_answer(f"<answer>{text}</answer>", bacteria) == want, text
    # two exact readings that disagree: "A" is the letter A and option B's text
    for text, want in [("A", None), ("B) A", "B"), ("AB", "D"), ("O", "A")]:
        assert parse_answer(f"<answer>{text}</answer>", ["O", "A", "B", "AB"]) == want, text
    assert parse_answer("<answer>A</answer>", ["A", "B", "AB", "O"]) == "A"  # both readings agree
    assert parse_answer("<answer>A. fumigatus</answer>", ["fumigatus", "A. fumigatus"]) is None


# Every way the contract accepts a letter {L} ({l} in lower case) with or without its option text {T}, and
# the text alone (not among LETTER_FORMS: where option A's text is "B", a block "B" is ambiguous)
LETTER_FORMS = ["{L}) {T}", "{L}", "({L})", "({L}) {T}", "{l}) {T}", "  {L}.  ", "{l}.", "{L}:", "{l}: {T}"]
ACCEPTED_FORMS = LETTER_FORMS + ["{T}"]

NEGATING_WORDS = {"not", "no", "neither", "nor", "none", "except", "rather", "than", "instead", "of", "is"}
word = st.text(alphabet=string.ascii_lowercase, min_size=2, max_size=8).filter(lambda w: w not in NEGATING_WORDS)
# An option that starts like a letter answer, as species names do ("H. pylori"), its letter often a valid one
letter_like = st.builds("{}. {}".format, st.sampled_from(LETTERS[:5]), word)
option_text = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=" -"),
                      min_size=1, max_size=20).filter(lambda s: s.strip())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(option_text, letter_like), min_size=2, max_size=5,
                unique_by=lambda s: " ".join(s.lower().split())), st.data())
def test_parser_recovers_the_letter(options, data):
    i = data.draw(st.integers(0, len(options) - 1))
    letter = LETTERS[i]
    block = data.draw(st.sampled_from(LETTER_FORMS)).format(L=letter, l=letter.lower(), T=options[i])
    # a block that is also another option's exact text ("B" beside an option "B") has two readings
    ambiguous = any(_norm(o) == _norm(block) for j, o in enumerate(options) if j != i)
    assert parse_answer(f"<think>reasons</think><answer>{block}</answer>", options) == (None if ambiguous else letter)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.lists(st.one_of(option_text, letter_like), min_size=0, max_size=4))
def test_parser_never_raises(text, options):
    result = parse_answer(text, options)
    assert result is None or result in LETTERS[: len(options)]


# Options made of words (none of them a word the negated forms below use, which an option's own text may
# hold), some starting like a letter answer ("C. word"), no option's words inside another's: a block built
# from two of them names two options.
distinct_options = st.lists(st.one_of(st.lists(word, min_size=1, max_size=3).map(" ".join), letter_like),
                            min_size=2, max_size=5, unique=True
                            ).filter(lambda opts: not any(f" {a} " in f" {b} " for a, b in permutations(opts, 2)))
SEPARATORS = [" ", ", ", ",", " or ", " and ", "/", " / ", "; ", "\n", " | ", " & ", " vs ", " - ", " or maybe ", ". "]


def fill(form: str, options: list[str], i: int) -> str:
    return form.format(L=LETTERS[i], l=LETTERS[i].lower(), T=options[i])


def two_distinct(data, options) -> tuple[int, int]:
    i = data.draw(st.integers(0, len(options) - 1))
    return i, data.draw(st.integers(0, len(options) - 1).filter(lambda j: j != i))


@settings(max_examples=500, deadline=None)
@given(distinct_options, st.data())
def test_a_block_naming_two_options_never_parses(options, data):
    i, j = two_distinct(data, options)
    first, second = data.draw(st.sampled_from(ACCEPTED_FORMS)), data.draw(st.sampled_from(ACCEPTED_FORMS))
    block = fill(first, options, i) + data.draw(st.sampled_from(SEPARATORS)) + fill(second, options, j)
    assert parse_answer(f"<think>reasons</think><answer>{block}</answer>", options) is None, block


@settings(max_examples=500, deadline=None)
@given(distinct_options, st.data())
def test_a_negated_option_never_parses(options, data):
    i, j = two_distinct(data, options)
    form = data.draw(st.sampled_from(["not {T}", "{L}) not {T}", "({L}) Not {T}", "{L}: NOT {T}",
                                      "{T} is not the answer", "{L}) {T} is not the answer", "{L} is not the answer",
                                      "{L}) {T} isn't it", "neither {L} nor {M}", "{L}) neither {T} nor {U}",
                                      "{L}) none of them", "{L}) anything except {T}", "{L}) {U} rather than {T}",
                                      "{L}) no {T}", "{L}) {T} instead of {U}"]))
    block = form.format(L=LETTERS[i], M=LETTERS[j], T=options[i], U=options[j])
    assert parse_answer(f"<think>reasons</think><answer>{block}</answer>", options) is None, block


@settings(max_examples=300, deadline=None)
@given(distinct_options, st.data())
def test_the_exact_forms_still_parse(options, data):
    i = data.draw(st.integers(0, len(options) - 1))
    block = fill(data.draw(st.sampled_from(ACCEPTED_FORMS)), options, i)
    assert parse_answer(f"<think>reasons</think><answer>{block}</answer>", options) == LETTERS[i], block


some_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and "<" not in s)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=" \t\n\r", max_size=5), some_text, some_text)
def test_a_blank_think_or_answer_is_not_well_formed(blank, think, answer):
    assert is_well_formed(f"<think>{think}</think><answer>{answer}</answer>")
    assert not is_well_formed(f"<think>{blank}</think><answer>{answer}</answer>")
    assert not is_well_formed(f"<think>{think}</think><answer>{blank}</answer>")


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


def test_check_record_wants_one_letter_of_the_options(tmp_path):
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    for answer, ok in [("B", True), ("C", True), ("D", False), ("", False), ("AB", False), ("b", False), (1, False)]:
        record = Record(id=f"r-{answer}", image="a.png", question="q?", options=["x", "y", "z"], answer=answer)
        reason = check_record(record, str(tmp_path), set())
        assert (reason is None) == ok, (answer, reason)
        assert ok or "is not among the options" in reason or reason == "wrong type: 'answer' is int 1, expected a string"
