"""Multiple-choice VQA: the record schema, the prompt, the answer contract and its parser.

A record is one JSON line, its image a file beside the JSONL (any `datasets.load_dataset("json")` reads it):

    {"id": "demo-rl-00017", "image": "images/rl-00017.png", "question": "Which stain dominates?",
     "options": ["brown", "blue", "mixed"], "answer": "B", "explanation": "...", "source": "demo/stain"}

The model is asked to reason inside <think>...</think> and answer inside <answer>B) blue</answer>.
"""

import json
import os
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass

LETTERS = string.ascii_uppercase


@dataclass
class Record:
    id: str
    image: str  # path relative to the JSONL file's directory
    question: str
    options: list[str]
    answer: str  # a letter: "A", "B", ...
    explanation: str = ""
    source: str = ""

    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


# ----------------------------------------------------------------------------------------------
# Prompt and target

INSTRUCTION = ("Think step by step inside <think> </think>: describe what the image shows, rule out the wrong "
               "options, and recall the relevant pathology knowledge. Then give the final choice inside "
               "<answer> </answer> as the letter and the option text, for example <answer>A) option text</answer>.")


def option_lines(options: list[str]) -> list[str]:
    """["A) brown", "B) blue", ...]: the options as the model (and a judge) sees them."""
    return [f"{LETTERS[i]}) {o}" for i, o in enumerate(options)]


def format_prompt_text(question: str, options: list[str]) -> str:
    return "\n".join([question.strip(), *option_lines(options), INSTRUCTION])


def prompt_messages(record: Record) -> list[dict]:
    """Chat messages for the processor's chat template: one image, then the text."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": format_prompt_text(record.question, record.options)}]}]


def target_text(record: Record) -> str:
    """The SFT target: the paper's format with the record's explanation as the reasoning."""
    return f"<think>{record.explanation.strip()}</think><answer>{record.answer}) {record.answer_text()}</answer>"


# ----------------------------------------------------------------------------------------------
# Parsing

FORMAT_RE = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "C", "C)", "(C)", "C.", "C:", optionally followed by text:  "C) option text"
LETTER_RE = re.compile(r"^\(?\s*([A-Za-z])\s*(?:\)|\.|:|$)\s*(.*)$", re.DOTALL)


def is_well_formed(completion: str) -> bool:
    """Exactly `<think>…</think><answer>…</answer>` and nothing else (whitespace between allowed)."""
    m = FORMAT_RE.match(completion)
    if not m:
        return False
    return all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .;,")


def parse_answer(completion: str, options: list[str]) -> str | None:
    """The letter chosen in the completion's <answer> block, or None when there is none or it is
    ambiguous. Never raises. Accepts 'C) text', 'C', '(C)', 'c.', or the option text alone."""
    if not isinstance(completion, str) or not options:
        return None
    blocks = ANSWER_RE.findall(completion)
    letters = {_parse_block(b, options) for b in blocks}
    if len(letters) != 1:  # no block, or blocks that disagree
        return None
    return letters.pop()


def _parse_block(block: str, options: list[str]) -> str | None:
    text = block.strip()
    valid = LETTERS[: len(options)]
    normed = [_norm(o) for o in options]
    m = LETTER_RE.match(text)
    if m and m.group(1).upper() in valid:
        letter, rest = m.group(1).upper(), _norm(m.group(2))
        if not rest or rest == normed[valid.index(letter)]:
            return letter
        if rest in normed:  # "C) <text of option A>": letter and text disagree
            return None
        return letter  # the letter with a paraphrase of its option
    matches = [i for i, o in enumerate(normed) if o == _norm(text)]
    return valid[matches[0]] if len(matches) == 1 else None


# ----------------------------------------------------------------------------------------------
# Reading and writing prepared splits

def load_split(path: str) -> list[Record]:
    """Read a prepared JSONL split. Errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (run the matching data/<name>/prepare.py first)")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a valid record ({e})") from None
    if not records:
        raise ValueError(f"{path}: the split is empty")
    return records


def image_path(split_path: str, record: Record) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(split_path)), record.image)


def check_record(record: Record, root: str, seen_ids: set) -> str | None:
    """Why a record cannot be used, or None. `root` is the directory its image path is relative to."""
    if record.id in seen_ids:
        return "duplicate id"
    if not isinstance(record.question, str) or not record.question.strip():
        return "empty question"
    if not isinstance(record.options, list) or len(record.options) < 2:
        return "fewer than two options"
    if len(record.options) > len(LETTERS):
        return "too many options"
    if any(not isinstance(o, str) or not o.strip() for o in record.options):
        return "empty option"
    if record.answer not in LETTERS[: len(record.options)]:
        return f"answer {record.answer!r} is not among the options"
    path = os.path.join(root, record.image)
    if not os.path.isfile(path):
        return f"image missing: {record.image}"
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # any decoder error means the image is unusable
        return f"image unreadable: {record.image} ({type(e).__name__})"
    return None


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
                    f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
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
