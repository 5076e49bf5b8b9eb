"""VQA records: the schema, the prompt, the answer contract and its parser, for two kinds of question.

A record is one JSON line, its image a file beside the JSONL (any `datasets.load_dataset("json")` reads it):

    {"id": "demo-rl-00017", "image": "images/rl-00017.png", "question": "Which stain dominates?",
     "options": ["brown", "blue", "mixed"], "answer": "B", "explanation": "...", "source": "demo/stain"}

closed (multiple choice, options given): the answer is a letter; the model reasons inside <think>...</think>
    and answers inside <answer>B) blue</answer>.
open (no options): the answer is the reference text, `alternatives` other accepted wordings; the model
    answers in a few words, <answer>granulomas</answer>, compared after openqa.normalise.
A split may mix both kinds.
"""

import difflib
import json
import os
import re
import string
import typing
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields

import openqa
from images import file_image_problem

LETTERS = string.ascii_uppercase


@dataclass
class Record:
    id: str
    image: str  # path relative to the JSONL file's directory
    question: str
    options: list[str]  # [] for an open question
    answer: str  # closed: a letter, "A", "B", ...; open: the reference answer's text
    explanation: str = ""
    source: str = ""
    # What the image measures, where a preparer can measure it (the demo: {"stain": "blue", "dab": 0.02,
    # "hematoxylin": 0.09}): the rule judge checks the reasoning's statement about the image against it.
    # It belongs to the image: a record shown with another image takes that image's facts.
    image_facts: dict = field(default_factory=dict)
    alternatives: list[str] = field(default_factory=list)  # open only: other accepted wordings of the answer

    @property
    def kind(self) -> str:
        return "closed" if self.options else "open"

    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)] if self.options else self.answer


KINDS = ("closed", "open")


# ----------------------------------------------------------------------------------------------
# Prompt and target

INSTRUCTION = ("Think step by step inside <think> </think>: describe what the image shows, rule out the wrong "
               "options, and recall the relevant pathology knowledge. Then give the final choice inside "
               "<answer> </answer> as the letter and the option text, for example <answer>A) option text</answer>.")
OPEN_INSTRUCTION = ("Think step by step inside <think> </think>: describe what the image shows and recall the "
                    "relevant pathology knowledge. Then give the final answer in a few words inside "
                    "<answer> </answer>.")


def option_lines(options: list[str]) -> list[str]:
    """["A) brown", "B) blue", ...]: the options as the model (and a judge) sees them."""
    return [f"{LETTERS[i]}) {o}" for i, o in enumerate(options)]


def format_prompt_text(question: str, options: list[str]) -> str:
    """The question, its options and the instruction; without options, the open-question instruction."""
    return "\n".join([question.strip(), *option_lines(options), INSTRUCTION if options else OPEN_INSTRUCTION])


def prompt_messages(record: Record) -> list[dict]:
    """Chat messages for the processor's chat template: one image, then the text."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": format_prompt_text(record.question, record.options)}]}]


def target_text(record: Record) -> str:
    """The SFT target: the paper's format with the record's explanation as the reasoning."""
    answer = f"{record.answer}) {record.answer_text()}" if record.options else record.answer.strip()
    return f"<think>{record.explanation.strip()}</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------
# Parsing

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
NEGATION_RE = re.compile(r"\b(?:not|no|neither|nor|none|never|except|excluding|excluded|rather than|instead of|"
                         r"other than|ruled out|unlikely|incorrect|wrong)\b|\b\w+n['’]t\b")


def is_well_formed(completion: str) -> bool:
    """Exactly `<think>…</think><answer>…</answer>` and nothing else (whitespace between allowed), each
    block holding more than whitespace: a blank `<think> </think>` would earn the format reward for nothing."""
    m = FORMAT_RE.match(completion)
    if not m or not m["think"].strip() or not m["answer"].strip():
        return False
    return all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .;,")


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


# ----------------------------------------------------------------------------------------------
# Reading and writing prepared splits

FIELD_TYPES = typing.get_type_hints(Record)  # {"id": str, ..., "options": list[str], "image_facts": dict}
REQUIRED = [f.name for f in fields(Record) if f.default is MISSING and f.default_factory is MISSING]
WANTED = {str: "a string", list[str]: "a list of strings", dict: 'a mapping such as {"stain": "blue"}'}


def field_problem(values: dict) -> str | None:
    """The first field whose value is not of the type Record declares for it, named with the type found and
    the type wanted: one rule for every field, read from the annotations. `values`: a record's fields."""
    for name, wanted in FIELD_TYPES.items():
        if name not in values:
            continue
        value, item_type = values[name], (typing.get_args(wanted) or [None])[0]
        if not isinstance(value, typing.get_origin(wanted) or wanted):
            return f"wrong type: '{name}' is {_json_type(value)}, expected {WANTED[wanted]}"
        for position, item in enumerate(value if item_type else []):
            if not isinstance(item, item_type):
                return f"wrong type: '{name}' item {position} is {_json_type(item)}, expected {WANTED[wanted]}"
    return None


def _json_type(value) -> str:
    text = repr(value)
    return "null" if value is None else f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def record_from_json(data) -> Record:
    """A JSON line's object as a Record; ValueError naming the key when it is not one."""
    if not isinstance(data, dict):
        raise ValueError(f"a record is a JSON object {{\"id\": ..., \"image\": ..., ...}}, got {_json_type(data)}")
    for key in data:
        if key not in FIELD_TYPES:
            close = difflib.get_close_matches(key, FIELD_TYPES, n=1)
            raise ValueError(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                       f"; a record's keys are {', '.join(FIELD_TYPES)}"))
    missing = [name for name in REQUIRED if name not in data]
    if missing:
        raise ValueError(f"missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    problem = field_problem(data)
    if problem:
        raise ValueError(problem)
    return Record(**data)


def load_split(path: str) -> list[Record]:
    """Read a prepared JSONL split. Errors name the file, the line, the record and the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} ({_not_prepared_hint(path)})")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a valid record (not JSON: {e})") from None
            try:
                records.append(record_from_json(data))
            except ValueError as e:
                record_id = data.get("id") if isinstance(data, dict) else None
                which = f"record '{record_id}'" if isinstance(record_id, str) else "record"
                raise ValueError(f"{path}:{n}: {which}: {e}") from None
    if not records:
        report = _report_of(path)
        raise ValueError(f"{path}: the split is empty" + (f"; {report} says what the preparation kept and skipped"
                                                           if report else ""))
    return records


def _report_of(split_path: str) -> str | None:
    """The preparer's report beside a split: report-<split>.json (PathVQA) or report.json."""
    folder, split = os.path.dirname(split_path), os.path.splitext(os.path.basename(split_path))[0]
    for name in (f"report-{split}.json", "report.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _not_prepared_hint(split_path: str) -> str:
    """For a split file that does not exist: a preparer writes no file for a split that came out empty, so
    when its report is there, say which splits it wrote rather than to run it."""
    report = _report_of(split_path)
    try:
        with open(report) as f:
            counts = json.load(f)["counts"]
    except (TypeError, OSError, ValueError, KeyError):  # no report, or not one of ours
        return "run the matching data/<name>/prepare.py first"
    split = os.path.splitext(os.path.basename(split_path))[0]
    written = ", ".join(f"{name} ({n})" for name, n in counts.items()) or "none"
    return (f"the preparation's {report} lists the splits it wrote: {written}; a split that comes out empty is "
            f"not written, so '{split}' was empty or misnamed: see the report's skipped and filtered records, and "
            f"the preparer's sizes and subsets")


def image_path(split_path: str, record: Record) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(split_path)), record.image)


def check_fields(record: Record, seen_ids: set) -> str | None:
    """Why a record's text fields make it unusable, or None: check_record without the image."""
    problem = field_problem(vars(record))
    if problem:
        return problem
    if record.id in seen_ids:
        return "duplicate id"
    if not record.question.strip():
        return "empty question"
    if not record.options:  # an open question
        if not openqa.normalise(record.answer):
            return "empty answer: an open question (no options) needs its reference answer's text"
        if any(not openqa.normalise(a) for a in record.alternatives):
            return "empty alternative answer"
        return None
    if record.alternatives:
        return ("alternatives given with options: alternatives are accepted wordings of an open question's answer; "
                "a multiple-choice record's answer is the letter of one option")
    if len(record.options) < 2:
        return "fewer than two options"
    if len(record.options) > len(LETTERS):
        return "too many options"
    if any(not o.strip() for o in record.options):
        return "empty option"
    # one letter of the options: `in` on the string of letters alone would also let "" and "AB" through
    if not (len(record.answer) == 1 and record.answer in LETTERS[: len(record.options)]):
        return f"answer {record.answer!r} is not among the options"
    return None


def check_record(record: Record, root: str, seen_ids: set) -> str | None:
    """Why a record cannot be used, or None. `root` is the directory its image path is relative to."""
    return check_fields(record, seen_ids) or check_image(record, root)


def check_image(record: Record, root: str) -> str | None:
    """Why the image a record (of well-typed fields) names cannot be used, or None (image_problem)."""
    if not record.image.strip():
        return "image missing: the record names no image"
    path = os.path.join(root, record.image)
    if not os.path.isfile(path):
        return f"image missing: {record.image}"
    stat = os.stat(path)
    return file_image_problem(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, record.image)


def check_records(records: list[Record], root: str) -> list[str | None]:
    """check_record of each record in turn (a repeated id is the later record's problem), the images decoded
    on several threads: Pillow's decoders release the GIL, and a split of 5,000 photos takes a minute on one."""
    from concurrent.futures import ThreadPoolExecutor

    seen, reasons = set(), []
    for record in records:
        reasons.append(check_fields(record, seen))
        if isinstance(record.id, str):  # a list id is reported, not hashed
            seen.add(record.id)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda r, reason: None if reason else check_image(r, root), records, reasons))
    return [reason or image for reason, image in zip(reasons, images)]


class SplitWriter:
    """Collects records per split, drops broken ones with a reason, writes `<split>.jsonl` and
    `report.json` listing every skipped id. Nothing is dropped silently."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.splits: dict[str, list[Record]] = {}
        self.skipped: list[dict] = []
        self.seen: set[str] = set()
        os.makedirs(out_dir, exist_ok=True)

    def skip(self, record_id: str, reason: str):
        self.skipped.append({"id": str(record_id), "reason": reason})

    def add(self, split: str, record: Record) -> bool:
        reason = check_record(record, self.out_dir, self.seen)
        if reason:
            self.skip(record.id, reason)
            return False
        self.seen.add(record.id)
        self.splits.setdefault(split, []).append(record)
        return True

    def write(self, extra: dict | None = None) -> dict:
        for split, records in self.splits.items():
            tmp = os.path.join(self.out_dir, f".{split}.jsonl.tmp")
            with open(tmp, "w") as f:
                for r in records:
                    data = asdict(r)
                    if not data["alternatives"]:  # a multiple-choice record's lines stay as they were before the key
                        del data["alternatives"]
                    f.write(json.dumps(data, ensure_ascii=False) + "\n")
            os.replace(tmp, os.path.join(self.out_dir, f"{split}.jsonl"))
        report = {"counts": {s: len(r) for s, r in self.splits.items()},
                  "skipped": len(self.skipped),
                  "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in self.skipped)),
                  "skipped_records": self.skipped, **(extra or {})}
        with open(os.path.join(self.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        counts = ", ".join(f"{s} {n}" for s, n in report["counts"].items())
        print(f"wrote {self.out_dir}: {counts}; skipped {len(self.skipped)}"
              + (f" {report['skipped_by_reason']} (see report.json)" if self.skipped else ""))
        return report


# Words the embedded tiny tokenizer learns as whole tokens (model.tiny_corpus): the vocabulary of the
# prompt, the answer format and the demo's explanations.
TRAINING_WORDS = [
    "<think>", "</think>", "<answer>", "</answer>", "A) ", "B) ", "C) ", "D) ",
    "The patch is mostly brown. The patch is mostly blue. The patch shows both brown and blue.",
    "Brown and blue are ruled out. Brown and mixed are ruled out. Blue and mixed are ruled out.",
    "DAB marks the antigen brown. Hematoxylin stains nuclei blue. DAB and hematoxylin are balanced.",
    "Which stain dominates this patch? brown blue mixed",
    "Which half of the patch is denser in nuclei? left right top bottom upper lower",
    "Nuclei are dense in the left half. Nuclei are dense in the right half.",
    "Immunohistochemistry tissue colon stain nuclei cytoplasm dense sparse region",
]
