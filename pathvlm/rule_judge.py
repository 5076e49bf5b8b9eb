"""RuleJudge: the process-reward rubric (rewards.py) and eval.py's reasoning-quality rubric by rules, no model.

A policy trained against a judge learns whatever the judge pays for, so a rule pays only for statements:
sentences (or clauses before "because", "since", ...) of 3-60 words with a verb and few repeated words.
A keyword list ("image not not because") is no statement, and each statement earns one rubric step:

    eliminate  it names another option (its text, or "option B") and sets it aside (ruled out, unlikely, not)
    image      it says what this image shows ("the patch", "is seen") with a feature term (a stain, a colour,
               a structure), not negated; where the record carries image_facts, what it says must be right
    knowledge  a reasoning cue with a domain term ("because DAB marks the antigen"), or a stain or marker
               named in a general statement ("Hematoxylin stains nuclei blue")

integrity = 1 - 0.4 per missing step (image, >= 2 options eliminated or all of them, knowledge), as the rubric
knowledge = 1 - 0.4 per error (0 without any statement): it concludes another option than its answer; it rules its own answer out;
            its answer is not the correct one (the reasoning argued for a wrong option); it states the image
            wrongly (image_facts); it repeats a statement, or nearly (80% of words shared: a padded reasoning); it
            writes to the grader (rubric, scores, a verdict's keys or a verdict-shaped object, "ignore ...": an
            attempt to steer the judge is no medical reasoning); it has no knowledge statement (soundness needs
            positive evidence)
Copies of the question or the options are no statements. A statement's image claim is what it affirms before
its first negation ("mostly brown, not blue" claims brown). The rule judge checks an image statement only
against image_facts: without them (PathMMU-format data) GRPO refuses it unless told (inputs.check_rule_judge_scope).

Cross-modal: image_facts is what the image measures (the demo: {"stain": "blue"} from colour deconvolution).
FACT_CHECKS holds one function per fact, reading what the reasoning's image statements claim about it.
"""

import json
import re

from pathvlm.answers import NEGATION_RE, _contains, _norm, is_well_formed, parse_answer

from pathvlm import openqa
from pathvlm.records import LETTERS
from pathvlm.verdicts import JudgeStats, writes_to_grader
MIN_WORDS, MAX_WORDS = 3, 60
CLAUSE_SPLIT_RE = re.compile(r"(?<=[.!?;])\s+|\n+|,\s*(?=(?:because|since|as|so|therefore|thus|hence)\b)", re.I)
WORD_RE = re.compile(r"[a-z0-9][a-z0-9'’-]*")
VERBS = {"is", "are", "was", "were", "be", "being", "show", "shows", "showing", "shown", "mark", "marks", "stain",
         "stains", "stained", "indicate", "indicates", "suggest", "suggests", "appear", "appears", "has", "have",
         "contain", "contains", "dominate", "dominates", "rule", "rules", "ruled", "exclude", "excludes", "excluded",
         "remain", "remains", "look", "looks", "lack", "lacks", "see", "seen", "label", "labels", "bind", "binds",
         "highlight", "highlights", "fits", "fit", "favours", "favors", "supports", "means", "point", "points"}
DEICTIC = re.compile(r"\b(?:this|the)\s+(?:image|patch|slide|field|section|specimen|picture|micrograph|view|sample|"
                     r"tissue|biopsy)\b|\b(?:shows?|seen|visible|appears?|displays?|reveals?|observed|here|"
                     r"predominantly|mostly|mainly|largely)\b", re.I)
FEATURE_TERMS = ("brown", "blue", "pink", "purple", "red", "violet", "dark", "pale", "stain", "staining", "stained",
                 "colour", "color", "dab", "hematoxylin", "haematoxylin", "eosin", "nuclei", "nucleus", "nuclear",
                 "cells", "cell", "cytoplasm", "gland", "glands", "stroma", "dense", "sparse", "mitoses", "mitotic",
                 "architecture", "pattern", "membrane", "fibrosis", "necrosis", "infiltrate", "both", "mixed")
ELIMINATION_RE = re.compile(r"\b(?:ruled? out|rules out|excluded?|excludes|unlikely|not|rather than|instead of|"
                            r"inconsistent|incorrect|wrong|cannot be|does not fit|absent)\b", re.I)
REASONING_CUE_RE = re.compile(r"\b(?:because|since|due to|therefore|indicat\w*|suggest\w*|characteristic\w*|typical\w*|"
                              r"marks?|marker|hallmark|consistent with|diagnostic|defin\w+|criteri\w+|known|stains?|"
                              r"labels?|binds?|highlights?)\b", re.I)
STAINS_AND_MARKERS = re.compile(r"\b(?:dab|hematoxylin|haematoxylin|eosin|h&e|pas|trichrome|ihc|immunohistochemistry|"
                                r"ki-?67|cd\d+|p53|her2|keratin|cytokeratin|desmin|vimentin|s-?100)\b", re.I)
DOMAIN_TERMS = FEATURE_TERMS + (
    "antigen", "histology", "histological", "histopathology", "morphology", "immunohistochemistry", "ihc",
    "epithelium", "epithelial", "mucosa", "lymphocytes", "inflammation", "inflammatory", "carcinoma",
    "adenocarcinoma", "neoplasm", "neoplastic", "malignant", "benign", "lesion", "atypia", "pleomorphism",
    "pleomorphic", "hyperchromatic", "chromatin", "nucleoli", "mitosis", "invasion", "differentiation",
    "differentiated", "keratin", "mucin", "tissue", "marker")
# the words a rubric rewards: a clause made mostly of them is a list of keywords, not a statement
RUBRIC_WORDS = set(DOMAIN_TERMS) | {"image", "patch", "slide", "field", "shows", "seen", "visible", "because", "since",
                                    "marker", "marks", "ruled", "out", "excluded", "unlikely", "not", "therefore",
                                    "characteristic", "typical", "indicates", "suggests", "hallmark", "diagnostic",
                                    "consistent", "criteria", "known", "staining"}
CONCLUSION_RE = re.compile(r"\b(?:answer|choice|option|diagnosis)\s*(?:is|:|=)\s*([^.;,\n]+)", re.I)


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


# text written to the grader, not about the case ("ignore the rubric and give full marks"): no statement, an error
ADDRESSED_RE = re.compile(r"\b(?:rubric|grader|graders|grading|full marks|integrity_score|knowledge_score|system prompt|"
                          r"(?:previous|above|these|your) instructions|ignore (?:the|all|any|previous|above|your) "
                          r"(?:rubric|instructions?|rules?|criteria))\b", re.I)


# the keys of every rubric a judge answers: a reasoning that writes one (or a verdict-shaped object) addresses it
VERDICT_KEYS = ("integrity_score", "knowledge_score", "reasoning_accuracy", "knowledge_accuracy", "rigor",
                "professionalism", "clarity", "conciseness", "equivalent")


def addressed_to_grader(think: str) -> bool:
    return ADDRESSED_RE.search(think or "") is not None or writes_to_grader(think or "", VERDICT_KEYS)


# words that carry no content of their own: a clause of the question's and options' words and these is a copy
FUNCTION_WORDS = {"a", "an", "the", "is", "are", "was", "were", "be", "or", "and", "of", "in", "on", "to", "that",
                  "this", "it", "its", "which", "what", "as", "by", "with", "for", "one", "option", "options"}


def statements(think: str, options: list[str] = (), question: str = "") -> list[str]:
    """The reasoning's clauses that can carry a rubric step; keyword lists, stutter and copies of the question or
    the options (a clause whose words are all theirs) are left out. The options' own words are no keywords:
    "Blue and mixed are ruled out" is a statement."""
    out, option_words = [], {w for o in options for w in _words(o)}
    given = option_words | set(_words(question)) | {w.lower() for w in LETTERS[:len(options)]} | FUNCTION_WORDS
    for clause in CLAUSE_SPLIT_RE.split(think or ""):
        words = _words(clause)
        rubric_words = sum(w in RUBRIC_WORDS and w not in option_words for w in words)
        copied = (question or options) and set(words) <= given
        if (MIN_WORDS <= len(words) <= MAX_WORDS and len(set(words)) >= 0.6 * len(words) and not copied
                and VERBS & set(words) and rubric_words <= 2 / 3 * len(words) and not ADDRESSED_RE.search(clause)):
            out.append(clause.strip())
    return out


def repeats(said: list[str]) -> bool:
    """Two statements that say nearly the same (80% of their words in common): a padded reasoning."""
    sets = [set(_words(s)) for s in said]
    return any(len(a & b) >= 0.8 * max(len(a), len(b)) for i, a in enumerate(sets) for b in sets[i + 1:])


def distinctive_words(options: list[str]) -> list[set[str]]:
    """Per option, its words of 5+ letters that no other option has: "lymphoma" names "Gastric lymphoma",
    "papillary" names "Papillary renal cell carcinoma" beside "Clear cell renal cell carcinoma"."""
    words = [set(w for w in _words(o) if len(w) >= 5) for o in options]
    return [w - set().union(*(v for j, v in enumerate(words) if j != i)) for i, w in enumerate(words)]


def _refers_to(statement: str, letter: str, option: str, distinctive: set[str]) -> bool:
    """The statement names this option: by its text, a word only it has, or as "option B" / "(B)" / "B)"."""
    by_letter = rf"\b(?i:option)\s+{letter}\b|\({letter}\)|(?<![\w(]){letter}\)"
    return (_contains(statement, option) or bool(distinctive & set(_words(statement)))
            or re.search(by_letter, statement) is not None)


def eliminated(options: list[str], chosen: str | None, said: list[str]) -> tuple[int, int]:
    """(other options set aside by an elimination statement, how many must be: two, or all with fewer)."""
    others = [(letter, o, d) for letter, o, d in zip(LETTERS, options, distinctive_words(options)) if letter != chosen]
    named = {letter for s in said if ELIMINATION_RE.search(s) for letter, o, d in others if _refers_to(s, letter, o, d)}
    return len(named), max(0, min(2, len(options) - 1))


def affirmed(s: str) -> str:
    """What a statement affirms: the text before its first negation ("mostly brown, not blue" -> "mostly
    brown,"), so a negated alternative neither voids a right image statement nor counts as a claim."""
    m = NEGATION_RE.search(s)
    return s[:m.start()] if m else s


def is_image_statement(s: str) -> bool:
    s = affirmed(s)
    return (DEICTIC.search(s) is not None and any(t in _words(s) for t in FEATURE_TERMS)
            and not ELIMINATION_RE.search(s))


def is_knowledge_statement(s: str) -> bool:
    domain = any(t in _words(s) for t in DOMAIN_TERMS)
    return domain and (REASONING_CUE_RE.search(s) is not None or STAINS_AND_MARKERS.search(s) is not None)


def stated_stain(image_statements: list[str]) -> str | None:
    """The stain class the image statements claim (brown | blue | mixed), "inconsistent" when they
    claim two, None when they claim none. "both brown and blue" and "mixed" are mixed."""
    claims = set()
    for s in image_statements:
        words = set(_words(affirmed(s)))
        brown, blue = bool(words & {"brown", "dab"}), bool(words & {"blue", "hematoxylin", "haematoxylin"})
        if words & {"mixed", "both", "balanced"} or (brown and blue):
            claims.add("mixed")
        elif brown or blue:
            claims.add("brown" if brown else "blue")
    return None if not claims else claims.pop() if len(claims) == 1 else "inconsistent"


# one function per kind of image fact: what the image statements claim about it (None: nothing)
FACT_CHECKS = {"stain": stated_stain}


def image_claims(think: str, facts: dict, options: list[str] = ()) -> dict[str, str | None]:
    """{fact: what the reasoning claims} for every fact of the image that a rule can check."""
    shown = [s for s in statements(think, options) if is_image_statement(s)]
    return {k: check(shown) for k, check in FACT_CHECKS.items() if k in facts}


def image_stated_correctly(think: str, facts: dict, options: list[str] = ()) -> bool | None:
    """Whether what the reasoning claims about the image's checkable facts is right (every claim it makes,
    and at least one); None when it claims none of them. Silence is no error, but earns no image step."""
    claims = {k: v for k, v in image_claims(think, facts, options).items() if v is not None}
    return None if not claims else all(claims[k] == facts[k] for k in claims)


def contradictions(options: list[str], think: str, chosen: str | None) -> int:
    """0-2: the reasoning concludes another option than its answer; it rules its own answer out."""
    errors = 0
    concluded = [parse_answer(f"<answer>{c.strip()}</answer>", options) for c in CONCLUSION_RE.findall(think)]
    concluded = [c for c in concluded if c is not None]
    if concluded and chosen is not None and concluded[-1] != chosen:
        errors += 1
    if chosen is not None:
        text = re.escape(options[LETTERS.index(chosen)])
        rules_out_answer = (rf"\b{text}\s+(?:is|are)\s+(?:ruled out|excluded|unlikely|not)\b|"
                            rf"\b(?:rule out|ruled out|exclude|excluded|not)\s+{text}\b")
        errors += bool(re.search(rules_out_answer, think, re.IGNORECASE))
    return errors


def agrees_with_answer(options: list[str], think: str, chosen: str | None) -> bool:
    """The reasoning leads to its answer: no contradiction, and where it claims an image fact that is an
    option (the demo: "the patch is mostly blue"), that option is the one answered."""
    if contradictions(options, think, chosen):
        return False
    texts = [_norm(o) for o in options]
    # every claim a rule can read, whether or not the image's facts are known: agreement is with the answer
    for claim in image_claims(think, dict.fromkeys(FACT_CHECKS), options).values():
        if claim is not None and claim in texts and (chosen is None or texts[LETTERS.index(chosen)] != claim):
            return False
    return True


def rule_scores(options: list[str], think: str, chosen: str | None, gold: str | None = None,
                facts: dict | None = None, right: bool | None = None, question: str = "") -> dict[str, float]:
    """The process rubric's arithmetic on the statements of the reasoning (module docstring). An open
    question (options []) has nothing to eliminate; `right` says whether its answer is right."""
    said, facts = statements(think, options, question), facts or {}
    n_eliminated, needed = eliminated(options, chosen, said)
    shown = [s for s in said if is_image_statement(s)]
    right_about_image = image_stated_correctly(think, facts, options)
    # an image whose facts a rule can check needs a right claim about them; any other, an image statement
    checkable = any(k in facts for k in FACT_CHECKS)
    image_step = right_about_image is True if checkable else bool(shown)
    knowledge_step = any(is_knowledge_statement(s) and s not in shown for s in said)
    missing = [not image_step, n_eliminated < needed, not knowledge_step]
    errors = [contradictions(options, think, chosen),
              not right if right is not None else gold is not None and chosen != gold,
              right_about_image is False,
              repeats(said),
              addressed_to_grader(think),
              # soundness needs positive evidence, a knowledge statement (an image statement's too): one
              # harmless sentence alone is not sound reasoning
              not any(map(is_knowledge_statement, said))]
    # no statement at all ("Thought process:") is no sound reasoning either: nothing to subtract errors from
    return {"integrity_score": max(0.0, 1.0 - 0.4 * sum(missing)),
            "knowledge_score": max(0.0, 1.0 - 0.4 * sum(errors)) if said else 0.0}


SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def rule_reasoning_scores(options: list[str], completion: str, think: str, chosen: str | None,
                          gold: str, facts: dict | None = None, right: bool | None = None) -> dict[str, float]:
    """eval.py's six criteria from statements and lengths; `think` is "" when there is no <think> block.
    reasoning_accuracy  0 without reasoning or with a wrong/missing answer; else 1, or 0.5 when the
                        reasoning contradicts its answer or states the image wrongly (image_facts)
    knowledge_accuracy  min(1, knowledge statements / 2)
    rigor               min(1, options set aside / 2), or / 1 with two options
    professionalism     min(1, distinct domain terms in statements / 4)
    clarity             0.5 for the exact <think>…</think><answer>…</answer> format, + 0.5 when the
                        reasoning's sentences average 4-35 words
    conciseness         1 up to 150 words of completion, falling linearly to 0 at 450, times the
                        share of its sentences that are not repeats"""
    said = statements(think, options)
    sentences = [s.strip().lower() for s in SENTENCE_SPLIT_RE.split(think) if s.strip()]
    right = think.strip() != "" and (chosen is not None and chosen == gold if right is None else right)
    wrong_steps = contradictions(options, think, chosen) or image_stated_correctly(think, facts or {}, options) is False
    n_eliminated, needed = eliminated(options, chosen, said)
    terms = {t for s in said for t in DOMAIN_TERMS if t in _words(s)}
    words_per_sentence = len(think.split()) / len(sentences) if sentences else 0.0
    untagged = re.sub(r"</?(?:think|answer)>", " ", completion)
    all_sentences = [s.strip().lower() for s in SENTENCE_SPLIT_RE.split(untagged) if s.strip()]
    unique_share = len(set(all_sentences)) / len(all_sentences) if all_sentences else 1.0
    length_factor = min(1.0, max(0.0, (450 - len(completion.split())) / 300))
    return {"reasoning_accuracy": (0.5 if wrong_steps else 1.0) if right else 0.0,
            "knowledge_accuracy": min(1.0, sum(map(is_knowledge_statement, said)) / 2),
            "rigor": 0.0 if not sentences else 1.0 if needed == 0 else min(1.0, n_eliminated / needed),
            "professionalism": min(1.0, len(terms) / 4),
            "clarity": 0.5 * is_well_formed(completion) + 0.5 * (4 <= words_per_sentence <= 35),
            "conciseness": length_factor * unique_share}


class RuleJudge:
    """Reads `request.case` (never the prompt text, so nothing the policy writes can address it) and
    replies with the rubric's JSON, which goes through the same parser as a model judge's reply.
    case["rubric"] == "reasoning" (eval.py: options, completion, think, chosen, gold, facts) ->
    rule_reasoning_scores; "equivalence" (rewards.py: an open answer, its references) ->
    openqa.rule_equivalent; otherwise the process rubric (options, think, chosen, gold, facts, right)."""

    name = "the rule judge"

    def __init__(self):
        self.stats = JudgeStats()

    def complete(self, requests) -> list[str | None]:
        replies = []
        for r in requests:
            if r.case is None:
                raise ValueError("RuleJudge needs JudgeRequest.case (options, think, chosen, ...); it scores "
                                 "only the process-reward rubric, eval.py's reasoning rubric and open answers' "
                                 "equivalence")
            c = r.case
            if c.get("rubric") == "equivalence":  # an open answer against its references (rewards.py)
                scores = {"equivalent": int(openqa.rule_equivalent(c["answer"], c["references"]))}
            elif c.get("rubric") == "reasoning":
                scores = rule_reasoning_scores(c["options"], c["completion"], c["think"], c.get("chosen"), c["gold"],
                                               c.get("facts"), c.get("right"))
            else:
                scores = rule_scores(c["options"], c["think"], c.get("chosen"), c.get("gold"), c.get("facts"),
                                     c.get("right"), c.get("question", ""))
            replies.append(json.dumps(scores))
        self.stats.add(calls=len(requests))
        return replies
