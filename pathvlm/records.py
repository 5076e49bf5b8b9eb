"""VQA records: the schema, the prompt and target, reading and writing splits, for two kinds of question.

A record is one JSON line, its image a file beside the JSONL (any `datasets.load_dataset("json")` reads it):

    {"id": "demo-rl-00017", "image": "images/rl-00017.png", "question": "Which stain dominates?",
     "options": ["brown", "blue", "mixed"], "answer": "B", "explanation": "...", "source": "demo/stain"}

closed (multiple choice, options given): the answer is a letter; the model reasons inside <think>...</think>
    and answers inside <answer>B) blue</answer>.
open (no options): the answer is the reference text, `alternatives` other accepted wordings; the model
    answers in a few words, <answer>granulomas</answer>, compared after openqa.normalise.
A split may mix both kinds. How a completion's answer is read against a record is answers.py's.
"""

import difflib
import json
import os
import string
import typing
import unicodedata
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields

from pathvlm import openqa
from pathvlm.errors import path_problem
from pathvlm.images import file_image_problem

LETTERS = string.ascii_uppercase
# Cyrillic and Greek letters that look like Latin ones (NFKC keeps them apart): a record's answer letter written
# with one is named as such, and a completion that writes a verdict's keys with them is still writing them
LOOK_ALIKES = str.maketrans("АВЕКМНОРСТХаеорсухіјѕԁԛԝΑΒΕΖΗΙΚΜΝΟΡΤΥΧοκνρτυχ",
                            "ABEKMHOPCTXaeopcyxijsdqwABEZHIKMNOPTYXokvptux")


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
    problem = path_problem(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"data file not found: {path} ({_not_prepared_hint(path)})")
    if problem:
        raise ValueError(f"{path} {problem}: give the prepared split's .jsonl file")
    records = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is dropped
        for n, line in enumerate(f, 1):
            if "\0" in line:  # what a crash or a failed copy leaves: a tail of zero bytes, not text
                raise ValueError(f"{path}:{n}: NUL bytes in the line: the file is damaged (a copy or write cut "
                                 "short); prepare it again")
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
    broken = next((i for i, o in enumerate(record.options) if _hidden(o, allow_newline=False)), None)
    if broken is not None:  # the prompt lists one option a line: a line break in one shows the model a phantom
        return (f"option {LETTERS[broken]} holds a line break or control character ({record.options[broken]!r}): "
                "the prompt would show its second part as an option line of its own; write the option on one line")
    keys = [_option_key(o) for o in record.options]
    twice = next((o for o, k in zip(record.options, keys) if keys.count(k) > 1), None)
    if twice is not None:
        return (f"two options are the same text ({twice!r}, after Unicode normalisation, case and invisible "
                "characters): the answer letter would not name one of them")
    # one letter of the options: `in` on the string of letters alone would also let "" and "AB" through
    if not (len(record.answer) == 1 and record.answer in LETTERS[: len(record.options)]):
        return f"answer {record.answer!r} is not among the options" + _look_alike(record.answer)
    return None


def _option_key(text: str) -> str:
    """An option as a reader sees it: NFKC, format characters (zero-width, bidi marks) gone, case and spacing
    folded; "brown" and "brown" with a zero-width space are one option."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return " ".join(text.casefold().split())


def _look_alike(answer: str) -> str:
    """What the message adds for an answer letter that only looks like a Latin capital (Cyrillic А, Greek Α, a
    fullwidth Ａ): which character it is, so the reader is not left staring at an 'A' that is refused."""
    if len(answer) != 1 or answer.isascii():
        return ""
    name = unicodedata.name(answer, f"U+{ord(answer):04X}")
    latin = unicodedata.normalize("NFKC", answer)
    if latin.isascii() and latin in LETTERS:
        return f": it is {name} (U+{ord(answer):04X}), a form of the Latin {latin}; write the plain letter {latin}"
    base = answer.translate(LOOK_ALIKES)
    looks = f", which looks like the Latin {base} but is not" if base in LETTERS else ""
    return f": it is {name} (U+{ord(answer):04X}){looks}; the answer is a Latin capital letter, A for the first option"


# Characters that change how a text is laid out or read without being seen: control characters (a newline in an
# option shows the model a phantom option line, "D) purple"), and the line and paragraph separators.
HIDDEN_LAYOUT = {"\u2028", "\u2029", "\u0085"}


def _hidden(text: str, allow_newline: bool) -> bool:
    return any((unicodedata.category(ch) == "Cc" and not (allow_newline and ch in "\n\t\r"))
               or ch in HIDDEN_LAYOUT for ch in text)


def text_warnings(record: Record) -> list[str]:
    """What a usable record's text holds that a reader should know of (warned and counted, not dropped): a control
    character in the question (line breaks in a question are text layout; in an option they are an error, in
    check_fields). A judge sees all of it as JSON, escaped (verdicts.json_block)."""
    if isinstance(record.question, str) and _hidden(record.question, allow_newline=True):
        return ["a control character in the question"]
    return []


def check_record(record: Record, root: str, seen_ids: set) -> str | None:
    """Why a record cannot be used, or None. `root` is the directory its image path is relative to."""
    return check_fields(record, seen_ids) or check_image(record, root)


def check_image(record: Record, root: str) -> str | None:
    """Why the image a record (of well-typed fields) names cannot be used, or None (image_problem)."""
    if not record.image.strip():
        return "image missing: the record names no image"
    path = os.path.join(root, record.image)
    problem = path_problem(path)
    if problem:
        return f"image missing: {record.image}" if problem == "does not exist" else f"image {record.image} {problem}"
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
        self.warnings: Counter = Counter()  # records kept with text_warnings, by warning
        self.seen: set[str] = set()
        os.makedirs(out_dir, exist_ok=True)

    def skip(self, record_id: str, reason: str):
        self.skipped.append({"id": str(record_id), "reason": reason})

    def add(self, split: str, record: Record) -> bool:
        reason = check_record(record, self.out_dir, self.seen)
        if reason:
            self.skip(record.id, reason)
            return False
        self.warnings.update(text_warnings(record))
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
                  "skipped_records": self.skipped, "warnings": dict(self.warnings), **(extra or {})}
        with open(os.path.join(self.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        counts = ", ".join(f"{s} {n}" for s, n in report["counts"].items())
        print(f"wrote {self.out_dir}: {counts}; skipped {len(self.skipped)}"
              + (f" {report['skipped_by_reason']} (see report.json)" if self.skipped else ""))
        for warning, n in self.warnings.items():
            print(f"warning: {n} record(s) kept with {warning} (report.json: warnings)")
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
