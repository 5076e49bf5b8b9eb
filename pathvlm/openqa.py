"""Open-ended questions: a reference answer instead of options ("What is present?" -> "granulomas").

An open record (records.Record with options == []) keeps its reference in `answer` and accepted other wordings
in `alternatives`. The model reasons inside <think> and gives a short answer inside <answer>; that answer is
compared with every reference after `normalise`, by three measures:

    exact   1 if the normalised answer equals a normalised reference
    f1      token F1 against the best reference (SQuAD's and the PathVQA literature's open-question metric):
            F1 = 2PR/(P + R), P = shared tokens / answer tokens, R = shared tokens / reference tokens
    recall  R alone, as PathVQA papers report it beside F1. Never a reward: listing every term scores 1.

An answer of twenty terms that holds the right one has P = 1/20, so F1 = 0.10 against 1.0 for the right
word alone, and a repeated word counts once per occurrence in the reference (a bag of tokens, as SQuAD). A
short list still pays under F1 (f1_reward says why), so the f1 reward also charges for words past the
reference's length. A judged equivalence (rewards.open_answer_reward_scores, judge=api|self|rule) credits
other words for the same thing; rule_equivalent is the rule judge's small check.
"""

import re
import unicodedata

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
# Plurals no suffix rule gets right, most of them Latin and Greek words of pathology (and a few English ones).
IRREGULAR = {"nuclei": "nucleus", "fungi": "fungus", "bacilli": "bacillus", "cocci": "coccus", "thrombi": "thrombus",
             "emboli": "embolus", "calculi": "calculus", "villi": "villus", "bronchi": "bronchus",
             "bacteria": "bacterium", "ova": "ovum", "metastases": "metastasis", "mitoses": "mitosis",
             "necroses": "necrosis", "stenoses": "stenosis", "thromboses": "thrombosis", "diagnoses": "diagnosis",
             "anastomoses": "anastomosis", "vertebrae": "vertebra", "men": "man", "women": "woman",
             "children": "child", "teeth": "tooth", "feet": "foot", "mice": "mouse"}
# Singular words that end like a plural: left alone ("mucosa" and "virus" are safe already by their ending).
NOT_PLURAL = {"this", "lens", "pancreas", "series", "species", "diabetes", "herpes", "rabies", "scabies", "measles",
              "mumps", "ascites", "biceps", "always", "perhaps"}


def singular(word: str) -> str:
    """A token's singular by suffix rules: granulomas -> granuloma, arteries -> artery, masses -> mass,
    granulomata -> granuloma; -us, -ss and -is words (fungus, mass, fibrosis) are singular already."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 3 or word in NOT_PLURAL or not word.isalpha():
        return word
    if word.endswith("omata"):
        return word[:-2]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "ches", "shes", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalise(text: str) -> str:
    """Lower case; accents off (é -> e, æ -> ae) but letters of every script kept (α, β, л: "α-actinin" and
    "β-actinin" are two answers, and a negation in another script stays a word); punctuation to spaces
    except a decimal point (2.5), and no thousands separator (1,000 -> 1000); articles dropped; numbers
    written out up to twenty as digits; each word singular.
    "The Granulomas." -> "granuloma", "Two nuclei" -> "2 nucleus"."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("æ", "ae").replace("œ", "oe")
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # 2.5 kept whole through the punctuation pass
    text = re.sub(r"[^\w\s\0]|_", " ", text).replace("\0", ".")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(singular(w) for w in words)


def tokens(text: str) -> list[str]:
    return normalise(text).split()


def references(record) -> list[str]:
    """The reference answer and its accepted alternatives (an open records.Record)."""
    return [record.answer, *record.alternatives]


def exact_match(answer: str | None, refs: list[str]) -> bool:
    if answer is None or not normalise(answer):
        return False
    return normalise(answer) in {normalise(r) for r in refs}


def _overlap(answer: list[str], reference: list[str]) -> int:
    """Shared tokens, each counted as often as it is in both (a bag, as SQuAD's F1)."""
    left = list(reference)
    shared = 0
    for token in answer:
        if token in left:
            left.remove(token)
            shared += 1
    return shared


def _f1(said: list[str], gold: list[str]) -> float:
    """Token F1 of one answer against one reference: 2PR/(P + R) over the shared tokens."""
    shared = _overlap(said, gold)
    return 2 * shared / (len(said) + len(gold)) if shared else 0.0  # 2PR/(P+R) with P = s/|said|, R = s/|gold|


def token_f1(answer: str | None, refs: list[str]) -> float:
    """Max over the references of token F1 (module docstring); 0 for no answer."""
    said = tokens(answer or "")
    return max((_f1(said, tokens(ref)) for ref in refs), default=0.0)


def f1_reward(answer: str | None, refs: list[str]) -> float:
    """The reward of open_answer_reward=f1: max over the references of token F1 x min(1, reference words /
    answer words). Up to the reference's length it is F1; each word past it is paid for. Plain F1 pays for
    hedging: listing k one-word answers scores 2/(k+1) when one is right (all three demo classes: 0.50 on
    every item, beating a model that guesses right less than half the time). With the factor it scores
    2/(k(k+1)) <= 1/k, so a list earns less than its likeliest term alone, whatever the model believes."""
    said = tokens(answer or "")
    if not said:
        return 0.0
    return max((_f1(said, gold) * min(1.0, len(gold) / len(said)) for gold in map(tokens, refs)), default=0.0)


def token_recall(answer: str | None, refs: list[str]) -> float:
    """Max over the references of the share of its tokens the answer holds: PathVQA papers' open-question
    recall. Listing every term scores 1, so it is a metric to report, never a reward."""
    said, golds = tokens(answer or ""), [gold for gold in map(tokens, refs) if gold]
    return max((_overlap(said, gold) / len(gold) for gold in golds), default=0.0)


# ----------------------------------------------------------------------------------------------
# The rule judge's equivalence check: no model, for the demo and for tests. A real dataset's paraphrases
# need a model judge (judge=api or self); this knows a handful of pathology synonyms and one containment rule.

SYNONYMS = [  # each set: wordings of one answer, as normalise writes them
    {"granuloma", "granulomatous inflammation", "granulomatous reaction"},
    {"malignant", "cancerous", "malignancy"},
    {"benign", "noncancerous", "non cancerous"},
    {"necrosis", "necrotic tissue", "cell death"},
    {"fibrosis", "scarring", "scar tissue"},
    {"hemorrhage", "haemorrhage", "bleeding"},
    {"hematoxylin", "haematoxylin"},
    {"dab", "diaminobenzidine", "3 3 diaminobenzidine"},
]
LIST_RE = re.compile(r",|;|/|\bor\b|\band\b|\bnot\b|\bno\b|\bneither\b|\bnor\b|\bexcept\b")
MAX_EXTRA_WORDS = 1  # "granuloma" may be "caseating granuloma", not a list of findings ending in it


def rule_equivalent(answer: str | None, refs: list[str]) -> bool:
    """Whether `answer` says what a reference says: the same after normalisation; a listed synonym of it; or
    a reference at its end (an English noun phrase ends in its head: "caseating granuloma") after at most
    MAX_EXTRA_WORDS word, with no list or negation ("granuloma, necrosis", "abscess or granuloma",
    "no granuloma" are not). Of two words without a comma only the last counts ("blue brown" is brown), so
    naming two answers earns no more than naming the second alone. A reference holding "and" or "or" (or a
    comma) matches whole."""
    said = normalise(answer or "")
    if not said:
        return False
    wordings = {normalise(r) for r in refs} - {""}
    for group in SYNONYMS:
        if wordings & group:
            wordings |= group
    if said in wordings:
        return True
    # the list check reads the answer as written: normalise has already turned its commas into spaces
    if LIST_RE.search((answer or "").lower()):
        return False
    return any(not LIST_RE.search(w) and said.endswith(" " + w)
               and len(said.split()) <= len(w.split()) + MAX_EXTRA_WORDS for w in wordings)
