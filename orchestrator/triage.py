"""Triage of inbound messages: pure functions from a message (and the person's recent
messages) to an ``Assessment`` — intent, red-flag tier, the rules that matched — and from
an assessment to a ``Plan`` (escalate? safety reply? help reply? derive an event?).

Rules, not models: a versioned lexicon (``fixtures/triage/lexicon.yaml``) of red-flag
terms in three tiers (emergency, urgent, routine), English and Spanish, matched on
normalized tokens with negation scoped to the clause ("no chest pain" and "sin dolor de
pecho" are not red flags; "no, I have chest pain" is). Sentiment comes from VADER
(vaderSentiment, offline); response patterns (bursts, unanswered questions, "???",
shouting) come from the person's recent inbound messages. No I/O here except loading the
lexicon file once; the engine supplies history and executes the plan.

The safety bias is deliberate: when rules disagree, the higher tier wins, and a
negation only cancels a red flag when it clearly scopes over it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.timeexpr import parse_duration

TIERS = ("emergency", "urgent", "routine")
TIER_RANK: dict[str | None, int] = {"emergency": 3, "urgent": 2, "routine": 1, None: 0}
INTENTS = (
    "confirm",
    "cancel",
    "reschedule",
    "question",
    "opt_out",
    "help",
    "complaint",
    "clinical_concern",
    "other",
)
DEFAULT_LEXICON = Path(__file__).resolve().parent.parent / "fixtures" / "triage" / "lexicon.yaml"

Tier = Literal["emergency", "urgent", "routine"]
Severity = Literal["emergency", "urgent", "routine"]

# Emoji carry meaning in replies; turn the common ones into words the rules can see.
_EMOJI = {
    "👍": " thumbsup ",
    "👌": " thumbsup ",
    "✅": " thumbsup ",
    "😡": " angryface ",
    "🤬": " angryface ",
    "😠": " angryface ",
    "😤": " angryface ",
    "🙄": " angryface ",
}
_TOKEN = re.compile(r"[a-z0-9]+|[.,;:!?\n]")
_ELONGATED = re.compile(r"([a-z])\1{2,}")
_POST_NEGATION = frozenset({"free", "gone", "resolved", "fine"})
_SHORT_REPLY = 3  # single-word intent terms (C, yes, stop, help) only count in a reply this short
_ES_WORDS = frozenset(
    {
        "de",
        "el",
        "la",
        "que",
        "y",
        "en",
        "los",
        "las",
        "mi",
        "me",
        "tengo",
        "estoy",
        "por",
        "con",
        "para",
        "una",
        "un",
        "muy",
        "pero",
        "cita",
        "si",
        "dolor",
        "no",
        "puedo",
        "gracias",
        "es",
        "esta",
        "hoy",
        "manana",
        "se",
        "lo",
        "le",
        "mas",
        "ya",
        "pecho",
        "ayuda",
        "quiero",
    }
)
_EN_WORDS = frozenset(
    {
        "the",
        "i",
        "my",
        "and",
        "to",
        "is",
        "a",
        "have",
        "it",
        "you",
        "im",
        "of",
        "in",
        "for",
        "this",
        "that",
        "be",
        "can",
        "will",
        "am",
        "with",
        "me",
        "not",
        "dont",
        "cant",
        "please",
        "thanks",
        "appointment",
        "pain",
        "what",
        "when",
        "yes",
    }
)


# ----------------------------------------------------------------------------- lexicon


@dataclass(frozen=True, slots=True)
class Term:
    """A compiled term: a sequence of (kind, value) with kind word|prefix|gap|alt."""

    source: str
    parts: tuple[tuple[str, Any], ...]

    @property
    def single_word(self) -> bool:
        return len(self.parts) == 1


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    tier: Tier
    lang: str
    terms: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class Lexicon:
    version: str
    rules: tuple[Rule, ...]
    intents: dict[str, tuple[Term, ...]]
    cues: frozenset[str]
    window: int
    not_after: tuple[Term, ...]
    clause_breaks: frozenset[str]
    idioms: tuple[Term, ...] = ()
    not_typos: frozenset[str] = frozenset()
    paperwork: frozenset[str] = frozenset()


def _squash(word: str) -> str:
    """Runs of three or more of one letter ("paaain", "nooo") to one letter."""
    return _ELONGATED.sub(r"\1", word)


def _variants(word: str) -> frozenset[str]:
    """An elongated word ("paaain", "bleeeding") could stand for the one- or two-letter
    spelling; a plain word stands for itself (so "feel" never meets "fell")."""
    if not _ELONGATED.search(word):
        return frozenset({word})
    return frozenset({word, _ELONGATED.sub(r"\1", word), _ELONGATED.sub(r"\1\1", word)})


def _one_edit(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance of at most one (a typo: "chets", "brething")."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long_ = (a, b) if la < lb else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def compile_term(text: str) -> Term:
    parts: list[tuple[str, Any]] = []
    for w in normalize_words(text.replace("~", " GAPMARK ").replace("*", "STARMARK").replace("|", "ALTMARK")):
        if w == "gapmark":
            parts.append(("gap", None))
        elif "altmark" in w:
            parts.append(("alt", frozenset(x for x in w.split("altmark") if x)))
        elif w.endswith("starmark"):
            parts.append(("prefix", w.removesuffix("starmark")))
        else:
            parts.append(("word", w))
    if not parts or parts[0][0] == "gap" or parts[-1][0] == "gap":
        raise ValueError(f"bad lexicon term {text!r}")
    return Term(text, tuple(parts))


class _RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    tier: Tier
    lang: Literal["en", "es"]
    terms: list[str] = Field(min_length=1)


class _NegationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cues: list[str]
    window: int = Field(5, ge=1, le=10)
    not_after: list[str] = Field(default_factory=list)
    clause_breaks: list[str] = Field(default_factory=list)


class _LexiconSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    negation: _NegationSpec
    rules: list[_RuleSpec]
    intents: dict[str, list[str]]
    idioms: list[str] = Field(default_factory=list)
    not_typos: list[str] = Field(default_factory=list)
    paperwork: list[str] = Field(default_factory=list)

    @field_validator("intents")
    @classmethod
    def _known(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = set(v) - set(INTENTS)
        if unknown:
            raise ValueError(f"unknown intents {sorted(unknown)}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> _LexiconSpec:
        ids = [r.id for r in self.rules]
        if len(ids) != len(set(ids)):
            raise ValueError("rule ids must be unique")
        return self


@functools.lru_cache(maxsize=8)
def load_lexicon(path: Path = DEFAULT_LEXICON) -> Lexicon:
    """Load and compile a lexicon file (cached per path). Raises ValueError naming the file."""
    try:
        # BaseLoader: every scalar a string, so "no", "y" and "yes" stay words, not booleans.
        spec = _LexiconSpec.model_validate(
            yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        )
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"triage lexicon {path.name}: {type(exc).__name__}") from None
    rules = tuple(Rule(r.id, r.tier, r.lang, tuple(compile_term(t) for t in r.terms)) for r in spec.rules)
    intents = {k: tuple(compile_term(t) for t in v) for k, v in spec.intents.items()}
    neg = spec.negation
    return Lexicon(
        spec.version,
        rules,
        intents,
        frozenset(neg.cues),
        neg.window,
        tuple(compile_term(t) for t in neg.not_after),
        frozenset(neg.clause_breaks),
        tuple(compile_term(t) for t in spec.idioms),
        frozenset(spec.not_typos),
        frozenset(spec.paperwork),
    )


# ----------------------------------------------------------------------------- text


def normalize_words(text: str) -> list[str]:
    """Lowercase ASCII words (accents and apostrophes dropped); punctuation kept as tokens."""
    for emoji, word in _EMOJI.items():
        text = text.replace(emoji, word)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub("['\u2019`\u00b4]", "", text.lower())
    return _TOKEN.findall(text)


@dataclass(frozen=True, slots=True)
class Tokens:
    words: tuple[str, ...]  # lowercase, accents and apostrophes dropped, elongations squashed
    clause: tuple[int, ...]  # clause number of each word
    variants: tuple[frozenset[str], ...] = ()  # spellings each word may stand for
    fuzzy: bool = False  # also accept one typo in words of five letters or more
    exact: frozenset[str] = frozenset()  # ordinary words never read as a typo ("doing")


def tokenize(text: str, lex: Lexicon) -> Tokens:
    words: list[str] = []
    clause: list[int] = []
    c = 0
    for tok in normalize_words(text):
        if not tok[0].isalnum():
            c += 1
            continue
        w = _squash(tok)
        if w in lex.clause_breaks:
            c += 1
            continue
        words.append(tok)
        clause.append(c)
    return Tokens(tuple(_squash(w) for w in words), tuple(clause), tuple(_variants(w) for w in words))


def _part_ok(kind: str, val: Any, toks: Tokens, j: int) -> bool:
    forms = toks.variants[j] if toks.variants else frozenset({toks.words[j]})
    if kind == "word":
        if val in forms:
            return True
        word = toks.words[j]
        return toks.fuzzy and len(val) >= 5 and word not in toks.exact and _one_edit(val, word)
    if kind == "prefix":
        return any(f.startswith(val) for f in forms)
    return bool(forms & val)  # alt


def _match_at(parts: tuple[tuple[str, Any], ...], toks: Tokens, i: int) -> int | None:
    """End index (exclusive) of a match of ``parts`` starting at token ``i``, or None."""

    def go(p: int, j: int) -> int | None:
        if p == len(parts):
            return j
        kind, val = parts[p]
        if kind == "gap":
            for skip in range(0, 4):
                k = j + skip
                if k < len(toks.words) and toks.clause[k] == toks.clause[i]:
                    end = go(p + 1, k)
                    if end is not None:
                        return end
            return None
        if j < len(toks.words) and toks.clause[j] == toks.clause[i] and _part_ok(kind, val, toks, j):
            return go(p + 1, j + 1)
        return None

    return go(0, i)


def find(term: Term, toks: Tokens) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(len(toks.words)):
        end = _match_at(term.parts, toks, i)
        if end is not None:
            out.append((i, end))
    return out


def _starts_with(terms: tuple[Term, ...], toks: Tokens, i: int) -> bool:
    return any(_match_at(t.parts, toks, i) is not None for t in terms)


def negated(toks: Tokens, start: int, end: int, lex: Lexicon) -> bool:
    """Is the match [start, end) negated within its clause?"""
    c = toks.clause[start]
    for j in range(max(0, start - lex.window), start):
        if toks.clause[j] != c or toks.words[j] not in lex.cues:
            continue
        # "no, I have ..." is split by the comma; "no I have ..." and "can't stop ..." are
        # not negations of what follows.
        if j + 1 < len(toks.words) and _starts_with(lex.not_after, toks, j + 1):
            continue
        return True
    for j in range(end, min(len(toks.words), end + 2)):
        if toks.clause[j] == c and toks.words[j] in _POST_NEGATION:
            return True
    return False


# ----------------------------------------------------------------------------- assessment


@dataclass(frozen=True, slots=True)
class Inbound:
    """One earlier inbound message of the person (for response patterns)."""

    at: datetime
    text: str


@dataclass(frozen=True, slots=True)
class History:
    inbound: Sequence[Inbound] = ()  # earlier messages, oldest first
    last_outbound_at: datetime | None = None  # the last thing we (or staff) sent the person


@dataclass(frozen=True, slots=True)
class Assessment:
    intent: str
    tier: str | None
    rules: tuple[str, ...]  # red-flag rule ids that matched (not negated), highest tier first
    negated: tuple[str, ...]  # rule ids whose match was negated
    intent_rules: tuple[str, ...]
    patterns: tuple[str, ...]  # response-pattern and sentiment signals
    sentiment: float  # VADER compound, -1..1
    language: str
    lexicon_version: str
    evidence: dict[str, Any] = field(default_factory=dict)  # rule id -> matched words (PHI: store only)

    @property
    def frustration(self) -> int:
        return len(self.patterns)

    def to_json(self) -> dict[str, Any]:
        return {
            "intent": self.intent,
            "tier": self.tier,
            "rules": list(self.rules),
            "negated": list(self.negated),
            "intent_rules": list(self.intent_rules),
            "patterns": list(self.patterns),
            "sentiment": round(self.sentiment, 3),
            "language": self.language,
            "lexicon_version": self.lexicon_version,
        }


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score (English lexicon; Spanish leans on the complaint terms)."""
    return float(_vader().polarity_scores(text)["compound"])


def language(toks: Tokens) -> str:
    es = sum(1 for w in toks.words if w in _ES_WORDS)
    en = sum(1 for w in toks.words if w in _EN_WORDS)
    return "es" if es > en else "en"


def _shouting(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 8 and sum(c.isupper() for c in letters) / len(letters) >= 0.7


def _is_question(text: str, toks: Tokens, lex: Lexicon) -> bool:
    return "?" in text or (bool(toks.words) and _starts_with(lex.intents.get("question", ()), toks, 0))


def patterns(
    text: str,
    toks: Tokens,
    now: datetime,
    history: History,
    lex: Lexicon,
    burst_count: int = 3,
    burst_within: timedelta = timedelta(minutes=10),
    negative_below: float = -0.4,
    score: float | None = None,
) -> tuple[str, ...]:
    out: list[str] = []
    recent = [m for m in history.inbound if now - m.at <= burst_within]
    if len(recent) + 1 >= burst_count:
        out.append("pattern.burst")
    unanswered = [
        m
        for m in history.inbound
        if _is_question(m.text, tokenize(m.text, lex), lex)
        and (history.last_outbound_at is None or history.last_outbound_at < m.at)
    ]
    if unanswered:
        out.append("pattern.unanswered-question")
    if re.search(r"\?\s*\?|[?!]{3,}", text):
        out.append("pattern.punctuation")
    if _shouting(text):
        out.append("pattern.shouting")
    if (score if score is not None else sentiment(text)) <= negative_below:
        out.append("sentiment.negative")
    return tuple(out)


def _intent_hits(lex: Lexicon, toks: Tokens) -> dict[str, str]:
    hits: dict[str, str] = {}
    short = len(toks.words) <= _SHORT_REPLY
    for intent, terms in lex.intents.items():
        if intent == "question":
            continue
        for t in terms:
            if t.single_word and not short and intent in ("confirm", "opt_out", "help"):
                continue
            if find(t, toks):
                hits[intent] = t.source
                break
    return hits


def assess(
    text: str,
    *,
    keyword: str | None = None,
    now: datetime,
    history: History = History(),
    lex: Lexicon | None = None,
    burst_count: int = 3,
    burst_within: timedelta = timedelta(minutes=10),
) -> Assessment:
    """Assess one inbound message. ``keyword`` is the channel mapper's reading of a bare
    keyword reply (stop|start|help|confirm|cancel), which wins for the intent."""
    lex = lex or load_lexicon()
    toks = tokenize(text, lex)
    flags = _without_idioms(toks, lex)
    matched: dict[str, list[str]] = {}
    neg: list[str] = []
    best: str | None = None
    for rule in lex.rules:
        for term in rule.terms:
            for start, end in find(term, flags):
                if negated(flags, start, end, lex):
                    if rule.id not in neg:
                        neg.append(rule.id)
                    continue
                matched.setdefault(rule.id, []).append(" ".join(flags.words[start:end]))
                tier = rule.tier
                if tier == "emergency" and _about_paperwork(flags, start, lex):
                    tier = "urgent"  # staff still see it; no "call 911" to a question about a form
                if TIER_RANK[tier] > TIER_RANK[best]:
                    best = tier
    tier_of = {r.id: r.tier for r in lex.rules}
    rules = tuple(sorted(matched, key=lambda r: (-TIER_RANK[tier_of[r]], r)))
    score = sentiment(text)
    pats = patterns(text, toks, now, history, lex, burst_count, burst_within, score=score)
    hits = _intent_hits(lex, toks)
    if keyword in ("stop", "help", "confirm", "cancel"):
        hits[{"stop": "opt_out"}.get(keyword, keyword)] = f"keyword:{keyword}"
    intent = _intent(hits, best, text, toks, lex, pats)
    intent_rules = tuple(f"intent.{k}" for k in hits)
    return Assessment(
        intent,
        best,
        rules,
        tuple(r for r in neg if r not in matched),
        intent_rules,
        pats,
        score,
        language(toks),
        lex.version,
        {r: matched[r] for r in rules},
    )


def _about_paperwork(toks: Tokens, start: int, lex: Lexicon) -> bool:
    """Whether the clause of the match at ``start`` is about a form or a history ("the form
    asks about chest pain", "family history: stroke"): the lexicon's ``paperwork`` words."""
    clause = toks.clause[start]
    return any(toks.clause[i] == clause and w in lex.paperwork for i, w in enumerate(toks.words))


def _without_idioms(toks: Tokens, lex: Lexicon) -> Tokens:
    """The tokens the red-flag rules see: idioms blanked, one typo tolerated (except in
    the lexicon's ``not_typos``: ordinary words one edit away from a red-flag word)."""
    words = list(toks.words)
    variants = list(toks.variants)
    for idiom in lex.idioms:
        for start, end in find(idiom, toks):
            words[start:end] = ["_"] * (end - start)
            variants[start:end] = [frozenset({"_"})] * (end - start)
    return Tokens(tuple(words), toks.clause, tuple(variants), fuzzy=True, exact=lex.not_typos)


def _intent(
    hits: dict[str, str], tier: str | None, text: str, toks: Tokens, lex: Lexicon, pats: tuple[str, ...]
) -> str:
    # A red flag outranks every other reading; STOP outranks everything else (it is the law).
    if tier in ("emergency", "urgent"):
        return "clinical_concern"
    for intent in ("opt_out", "help", "reschedule", "cancel"):
        if intent in hits:
            return intent
    if "complaint" in hits or len(pats) >= 2 or (not toks.words and "pattern.punctuation" in pats):
        return "complaint"
    if tier == "routine":
        return "clinical_concern"
    if "confirm" in hits:
        return "confirm"
    if _is_question(text, toks, lex):
        return "question"
    return "other"


# ----------------------------------------------------------------------------- config and plan


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(v: str) -> str:
    parse_duration(v)
    return v


def _all_severities() -> list[Severity]:
    return ["emergency", "urgent", "routine"]


def _tier_severity() -> dict[Tier, Severity | None]:
    return {"emergency": "emergency", "urgent": "urgent", "routine": "routine"}


def _intent_severity() -> dict[str, Severity | None]:
    return {"complaint": "routine", "reschedule": "routine", "question": "routine"}


def _slas() -> dict[Severity, str]:
    return {"emergency": "15m", "urgent": "2h", "routine": "1d"}


class RouteConfig(_Strict):
    """Where an escalation is announced: an outbox row on ``channel``.

    kind ``task``: a FHIR Task for the EHR's work list; ``email``: a notice to ``to``;
    ``webhook``: a JSON notice; ``sms``: a short page to ``to`` (an on-call phone).
    ``levels``: the escalation levels (0 = first notice, 1 = first re-escalation ...)."""

    channel: str
    kind: Literal["task", "email", "webhook", "sms"]
    to: str | None = None
    levels: list[int] = Field(default_factory=lambda: [0])
    severities: list[Severity] = Field(default_factory=_all_severities)

    @model_validator(mode="after")
    def _to(self) -> RouteConfig:
        if self.kind in ("email", "sms") and not self.to:
            raise ValueError(f"a {self.kind} route needs 'to'")
        return self


class WritebackConfig(_Strict):
    """Confirm/cancel replies written back to the EHR on ``channel`` (the ``fhir_writeback``
    plugin): a FHIR Task for staff (reason ``appointment-confirmed`` or
    ``appointment-declined``, focus the Appointment). Updating the Appointment's patient
    participant status directly is not offered: the write-back channel creates
    Communication and Task resources only."""

    channel: str
    mode: Literal["task"] = "task"


class TriageConfig(_Strict):
    """The ``triage`` section of the config file."""

    enabled: bool = True
    lexicon: str | None = Field(
        None, description="lexicon file; default: the bundled fixtures/triage/lexicon.yaml"
    )
    # tier -> escalation severity, or null for "do not escalate". Emergency cannot be switched off.
    severity: dict[Tier, Severity | None] = Field(default_factory=_tier_severity)
    frustration_threshold: int = Field(
        2, ge=1, description="signals (patterns, sentiment) that make a complaint"
    )
    frustration_severity: Severity | None = "routine"
    # Non-clinical intents that still need a person: a routine work item by default.
    intent_severity: dict[str, Severity | None] = Field(default_factory=_intent_severity)
    safety_reply: str = "safety-reply"
    help_reply: str = "help-reply"
    sla: dict[Severity, str] = Field(default_factory=_slas)
    max_level: int = Field(2, ge=0, le=10)
    routes: list[RouteConfig] = Field(default_factory=list)
    writeback: WritebackConfig | None = None
    history: str = "72h"
    burst_count: int = Field(3, ge=2)
    burst_within: str = "10m"
    silence_after_concern: str | None = Field(
        "24h",
        description="a concern below the escalation threshold, then silence this long: escalate routine",
    )

    @field_validator("intent_severity")
    @classmethod
    def _intents(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        unknown = set(v) - {"complaint", "reschedule", "question", "cancel", "confirm", "other"}
        if unknown:
            raise ValueError(f"unknown intents {sorted(unknown)}")
        return v

    @field_validator("history", "burst_within")
    @classmethod
    def _dur(cls, v: str) -> str:
        return _duration(v)

    @field_validator("silence_after_concern")
    @classmethod
    def _dur_opt(cls, v: str | None) -> str | None:
        return _duration(v) if v is not None else v

    @field_validator("sla")
    @classmethod
    def _slas(cls, v: dict[str, str]) -> dict[str, str]:
        for d in v.values():
            _duration(d)
        return v

    @model_validator(mode="after")
    def _emergency(self) -> TriageConfig:
        if self.severity.get("emergency", "emergency") != "emergency":
            raise ValueError("severity.emergency must stay 'emergency' (an emergency always escalates)")
        return self

    def sla_for(self, severity: str) -> timedelta:
        return parse_duration(self.sla.get(severity, "1d"))  # type: ignore[call-overload]

    def lexicon_path(self, base_dir: Path) -> Path:
        if self.lexicon is None:
            return DEFAULT_LEXICON
        p = Path(self.lexicon)
        return p if p.is_absolute() else (base_dir / p)


def check_config(raw: dict[str, Any], base_dir: Path, templates: set[str], channels: set[str]) -> list[str]:
    """Config problems in the ``triage`` section, with dotted paths (for careloop.wiring)."""
    from careloop.config import format_errors

    try:
        cfg = TriageConfig.model_validate(raw)
    except ValidationError as err:
        return format_errors(err, ("triage",))
    problems: list[str] = []
    try:
        load_lexicon(cfg.lexicon_path(base_dir))
    except ValueError as exc:
        problems.append(f"triage.lexicon: {exc}")
    for key in ("safety_reply", "help_reply"):
        if getattr(cfg, key) not in templates:
            problems.append(f"triage.{key}: unknown template {getattr(cfg, key)!r}")
    for i, r in enumerate(cfg.routes):
        if r.channel not in channels:
            problems.append(f"triage.routes.{i}.channel: unknown channel {r.channel!r}")
    if cfg.writeback is not None and cfg.writeback.channel not in channels:
        problems.append(f"triage.writeback.channel: unknown channel {cfg.writeback.channel!r}")
    return problems


@dataclass(frozen=True, slots=True)
class Plan:
    """What the engine does about one assessment."""

    escalate: tuple[str, str] | None = None  # (severity, reason)
    safety_reply: bool = False
    help_reply: bool = False
    derive: str | None = None  # confirm|cancel: an appointment event derived from the reply
    watch_silence: bool = False  # a concern that did not escalate: escalate if silence follows


def plan(a: Assessment, cfg: TriageConfig, keyword: str | None = None) -> Plan:
    """Pure policy: the assessment and the configured thresholds -> actions."""
    escalate: tuple[str, str] | None = None
    if a.tier is not None:
        sev = cfg.severity.get(a.tier, a.tier)  # type: ignore[call-overload]
        if a.tier == "emergency":
            sev = "emergency"  # never configurable away
        if sev is not None:
            escalate = (sev, f"red-flag-{a.tier}")
    if escalate is None and a.frustration >= cfg.frustration_threshold and cfg.frustration_severity:
        escalate = (cfg.frustration_severity, "frustration")
    if escalate is None and (sev := cfg.intent_severity.get(a.intent)):
        escalate = (sev, f"{a.intent}-request" if a.intent != "complaint" else "complaint")
    derive = None
    if a.intent in ("confirm", "cancel") or keyword in ("confirm", "cancel"):
        derive = keyword if keyword in ("confirm", "cancel") else a.intent
    watch = a.tier is not None and escalate is None
    return Plan(
        escalate=escalate,
        safety_reply=a.tier == "emergency",
        help_reply=a.intent == "help" and keyword != "stop",
        derive=derive,
        watch_silence=watch,
    )
