"""The answer contract and its parser: is a completion well formed, which option (or open answer) does it
commit to, and is that the record's answer. Every reward and eval.py read answers through here.

    <think>the stain is brown</think><answer>A) brown</answer>

The completion is the policy's untrusted text: a policy optimised against this parser will look for any
loophole, so a hedge, a list of letters or a negated option commits to nothing. Untrusted text is put into
one canonical form (`canonical`) before the format check, this parser and every judge read it.
"""

import re
import unicodedata
from collections import Counter

from pathvlm import openqa
from pathvlm.records import LETTERS, Record


# ----------------------------------------------------------------------------------------------
# One normalisation of untrusted text: rewards.score_completions and evaluation.score apply it to every
# completion before anything reads it, and the parser's comparisons apply it to option texts.

LINE_BREAKS = str.maketrans({"\u2028": "\n", "\u2029": "\n", "\u0085": "\n"})
TAG_NAME_RE = re.compile(r"<\s*(/?)\s*(think|answer)\s*>", re.IGNORECASE)


def canonical(text: str) -> str:
    """The text as every reader sees it: Unicode NFKC (fullwidth "Ｂ" is "B", "ﬁ" is "fi"), format
    characters removed (Unicode category Cf: zero-width spaces and joiners, bidi marks, soft hyphens),
    U+2028, U+2029 and U+0085 as line breaks, and the tags written <think>, </answer> whatever their case or
    inner spaces. Without it a zero-width space inside "</answer>" or a fullwidth letter is read one way by
    the format check, another by the parser and a third by a judge."""
    if not isinstance(text, str):
        return text
    text = unicodedata.normalize("NFKC", text).translate(LINE_BREAKS)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return TAG_NAME_RE.sub(lambda m: f"<{m.group(1)}{m.group(2).lower()}>", text)


FORMAT_RE = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
# "C", "C)", "(C)", "C.", "C:", optionally followed by text:  "C) option text"
LETTER_RE = re.compile(r"^\(?\s*([A-Za-z])\s*(?:\)|\.|:|$)\s*(.*)$", re.DOTALL)

# A policy optimised against this parser will find any loophole, so the text after the letter must commit to
# that one option ("A) brown, B) blue, C) mixed" and "A) not brown" once both earned A).
# A letter marker: "(B)", "B)", "B." or "B:" in either case, or a bare capital "B". A bare lower-case letter
# is not one: "a" is the article in "C) a mixed stain".
MARKER_RE = re.compile(r"(?<![\w'’])(?:\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*\)|([A-Za-z])[.:](?!\w)"
                       r"|([A-Z])(?![\w'’]))")
# one list of negations for the parser and the rule judge: "without", "absent" and the prefix "non-" included
NEGATION_WORDS = (r"not|no|neither|nor|none|never|except|excluding|excluded|rather than|instead of|other than|"
                  r"ruled out|unlikely|incorrect|wrong|without|absent|lacks?|lacking|non")
NEGATION_RE = re.compile(rf"\b(?:{NEGATION_WORDS})\b|\b\w+n['’]t\b", re.IGNORECASE)


def is_well_formed(completion: str) -> bool:
    """Exactly `<think>…</think><answer>…</answer>` and nothing else (whitespace between allowed), each
    block holding more than whitespace: a blank `<think> </think>` would earn the format reward for nothing."""
    m = FORMAT_RE.match(completion)
    if not m or not m["think"].strip() or not m["answer"].strip():
        return False
    return all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def _norm(text: str) -> str:
    return " ".join(canonical(text).lower().split()).strip(" .;,")


def parse_answer(completion: str, options: list[str]) -> str | None:
    """The letter chosen in the completion's <answer> block, or None when there is none or it is
    ambiguous. Never raises. Accepts 'C) text', 'C', '(C)', 'c.', 'C:', the letter with a paraphrase of
    its own option, or the option text alone (exactly: 'A. fumigatus' is the option of that text, not A).
    None when the text after the letter names another option (by its letter or its text) or negates the
    option ('not', 'neither … nor', 'rather than', …)."""
    if not isinstance(completion, str) or not options:
        return None
    blocks = ANSWER_RE.findall(completion)
    letters = {_parse_block(b, options) for b in blocks}
    if len(letters) != 1:  # no block, or blocks that disagree
        return None
    return letters.pop()


def parse_open_answer(completion: str) -> str | None:
    """An open question's answer: the text of the completion's <answer> block, or None when there is none,
    it is empty, or two blocks say different things (normalised). Never raises."""
    if not isinstance(completion, str):
        return None
    blocks = [b.strip() for b in ANSWER_RE.findall(completion)]
    if not blocks or len({openqa.normalise(b) for b in blocks}) != 1 or not openqa.normalise(blocks[0]):
        return None
    return blocks[0]


def is_correct(completion: str, record: Record) -> bool:
    """closed: the gold letter; open: a reference (answer or an alternative) exactly, after openqa.normalise."""
    if record.options:
        return parse_answer(completion, record.options) == record.answer
    return openqa.exact_match(parse_open_answer(completion), openqa.references(record))


def _parse_block(block: str, options: list[str]) -> str | None:
    """Two readings of a block: as an option's exact text, and as a letter with the text after it. They part
    when an option's text starts like a letter answer ("A. fumigatus", "E. coli", "H. pylori"). Exact evidence
    beats a paraphrase: "A. fumigatus", when that is option B's text, is B, because reading it as A would take
    "fumigatus" for a paraphrase of A's text, and a paraphrase is credited only on the word of its letter. Two
    exact readings that disagree are ambiguous: "A" is the letter A and the text of option B in [O, A, B, AB]."""
    text = block.strip()
    valid = LETTERS[: len(options)]
    m = LETTER_RE.match(text)
    by_letter = valid.index(m.group(1).upper()) if m and m.group(1).upper() in valid else None
    by_text = [i for i, o in enumerate(options) if _norm(o) == _norm(text)]
    if len(by_text) == 1:
        exact_letter = by_letter is not None and _norm(m.group(2)) in ("", _norm(options[by_letter]))
        return None if exact_letter and by_letter != by_text[0] else valid[by_text[0]]
    if by_letter is None:
        return None
    return valid[by_letter] if _commits_to(by_letter, m.group(2), options) else None


def _commits_to(chosen: int, said: str, options: list[str]) -> bool:
    """Whether `said`, the text after the letter of option `chosen`, is nothing, that option's text, or a
    paraphrase of it (7B models shorten long options) that names no other option and does not negate it.
    The option's own words never count against it, up to as often as its text has them: "No evidence of
    malignancy", "Hepatitis B" (but not "Hepatitis B or B"), "colon carcinoma" beside an option "carcinoma"."""
    own = options[chosen]
    if not _norm(said) or _norm(said) == _norm(own):
        return True
    others = [i for i in range(len(options)) if i != chosen]
    # An option that starts like a letter answer carries its letter as part of a name: "B) A. fumigatus hyphae"
    # repeats the name, "B) A" names option A.
    markers = Counter(_markers(_drop_letter_head(said, own))) - Counter(_markers(_drop_letter_head(own, own)))
    if markers.keys() & {LETTERS[i] for i in others}:
        return False  # "A) brown, B) blue"
    if any(_contains(said, options[i]) and not _contains(own, options[i]) for i in others):
        return False  # "A) blue" (letter and text disagree), "A) brown or blue"
    # The letter and the words after it can spell another option whose text starts like a letter answer:
    # with E) Enterococcus and A) E. coli, "E. coli infection" (or "E) coli, gram negative") is E) with a
    # paraphrase or A's text with more words. Text alone is credited only when exact, so neither reading wins.
    if any(_starts_with(said, rest) for rest in _letter_rests(options, chosen)):
        return False
    return not Counter(_negations(said)) - Counter(_negations(own))  # "A) not brown", "A) brown is not it"


def _letter_rests(options: list[str], chosen: int) -> list[str]:
    """The text after the letter of each other option that reads as `chosen`'s letter: "coli" of "E. coli"."""
    rests = []
    for i, option in enumerate(options):
        m = LETTER_RE.match(option.strip())
        if i != chosen and m and m.group(1).upper() == LETTERS[chosen] and _norm(m.group(2)):
            rests.append(m.group(2))
    return rests


def _drop_letter_head(text: str, option: str) -> str:
    """`text` without the letter and first word of `option` where `option` starts like a letter answer:
    "A. fumigatus hyphae" -> " hyphae" for the option "A. fumigatus"."""
    m = LETTER_RE.match(option.strip())
    first_word = re.match(r"\w+", m.group(2)) if m else None
    if not first_word:
        return text
    head = rf"(?<![\w'’])\(?\s*{m.group(1)}\s*[).:]\s*{re.escape(first_word.group())}(?!\w)"
    return re.sub(head, " ", text, flags=re.IGNORECASE)


def _starts_with(text: str, words: str) -> bool:
    return re.match(rf"{re.escape(_norm(words))}(?!\w)", _norm(text)) is not None


def _markers(text: str) -> list[str]:
    return ["".join(m.groups("")).upper() for m in MARKER_RE.finditer(text)]


def _negations(text: str) -> list[str]:
    return NEGATION_RE.findall(_norm(text).replace("’", "'"))


def _contains(text: str, option: str) -> bool:
    """`option` in `text` as whole words, after normalisation: "adenocarcinoma" does not contain "carcinoma"."""
    option = _norm(option)
    return bool(option) and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", _norm(text)) is not None
