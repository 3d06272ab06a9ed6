"""Message templates: sandboxed Jinja2 per channel kind and language.

Variables are checked at config time: a template may use only the names in
``VARIABLES`` and, on them, only the fields ``FIELDS`` lists (what the engine's context,
``EngineCore._context``, provides); an unknown one is a config error, not a failure at
send time. So are ``include``, ``import`` and ``extends``: templates have no loader.

At send time a value that is missing (``None``: no product on the offer, an appointment
without a start) fails the render with a ``TemplateError``, which the engine records as
``template-error``: a patient never reads "None" or a half-filled message.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateError,
    TemplateRuntimeError,
    TemplateSyntaxError,
    meta,
    nodes,
    pass_context,
)
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

VARIABLES = frozenset({"person", "appointment", "encounter", "product", "site", "event"})
# The fields of each variable (None: a plain value, such as the product's name).
FIELDS: dict[str, frozenset[str] | None] = {
    "person": frozenset({"language", "timezone"}),
    "appointment": frozenset({"start", "end", "location", "type", "status"}),
    "encounter": frozenset({"discharged_at", "status"}),
    "product": None,
    "site": frozenset({"timezone"}),
    "event": frozenset(),
}
# Fields that say more than a plain message may (minimum necessary): the least
# ``phi_class`` a template that shows them must declare. A location ("Heart Center") or a
# visit type ("Oncology follow-up") tells whoever reads the phone what the visit is about.
FIELD_PHI = {"appointment.location": "limited", "appointment.type": "full"}
# ISO 639-2 codes some feeds send (HL7 PID-15 "SPA^Spanish^ISO6392") for the 639-1 ones
# templates are keyed by.
LANGUAGE_ALIASES = {"eng": "en", "spa": "es", "fra": "fr", "fre": "fr", "por": "pt", "vie": "vi"}
PHI_CLASSES = ("none", "limited", "full")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmailBody(_Strict):
    subject: str
    text: str
    html: str | None = None


class VariantBodies(_Strict):
    """A message variant (issue 10): other wording for some channel kinds of a template. It
    shares the template's ``phi_class`` and ``purpose``; kinds it leaves out use the base body."""

    sms: dict[str, str] = Field(default_factory=dict)
    email: dict[str, EmailBody] = Field(default_factory=dict)
    text: dict[str, str] = Field(default_factory=dict)


DEFAULT_VARIANT = "default"


class TemplateConfig(_Strict):
    """``phi_class``: the most sensitive information the rendered message may hold:
    none (no clinical detail), limited (dates, locations), full (clinical content).
    ``variants`` (optional): named alternative wordings the learner may choose between."""

    phi_class: str = Field("none", pattern="^(none|limited|full)$")
    purpose: str | None = None
    sms: dict[str, str] = Field(default_factory=dict)
    email: dict[str, EmailBody] = Field(default_factory=dict)
    text: dict[str, str] = Field(default_factory=dict)
    variants: dict[str, VariantBodies] = Field(default_factory=dict)

    def kinds(self) -> set[str]:
        out = {k for k in ("sms", "email", "text") if getattr(self, k)}
        if out:
            out |= {"text", "fhir", "json"}
        return out

    def variants_for(self, kind: str) -> list[str]:
        """The variants with their own body for channel template ``kind`` ("default" first)."""
        return [DEFAULT_VARIANT] + [
            n for n, v in self.variants.items() if kind in ("sms", "email", "text") and getattr(v, kind)
        ]

    def with_variant(self, name: str | None) -> TemplateConfig:
        """This template with variant ``name``'s bodies in place of the base ones."""
        if not name or name == DEFAULT_VARIANT or name not in self.variants:
            return self
        v = self.variants[name]
        return self.model_copy(update={k: getattr(v, k) for k in ("sms", "email", "text") if getattr(v, k)})


def _as_dt(v: Any) -> datetime:
    if isinstance(v, datetime):
        return v
    try:
        return datetime.fromisoformat(str(v)) if isinstance(v, str) else _no_date()
    except ValueError:
        return _no_date()


def _no_date() -> datetime:
    # A TemplateError, so the engine suppresses the one message (``template-error``)
    # instead of failing the whole event; the value itself stays out of the message.
    raise TemplateRuntimeError("a date or time this template shows is missing or not a date")


def _local(v: Any, tz: str | None) -> datetime:
    # The engine hands templates datetimes already in the recipient's zone.
    dt = _as_dt(v)
    return dt.astimezone(ZoneInfo(tz)) if tz else dt


# Dates and times in the reader's language, without depending on the machine's locales.
_ES_DAYS = ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo")
_ES_MONTHS = (
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "octubre",
    "noviembre",
    "diciembre",
)
_EN_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def normalize_language(lang: str | None) -> str | None:
    """``es-MX``, ``ES``, ``spa`` -> ``es``."""
    if not lang:
        return None
    primary = str(lang).replace("_", "-").split("-")[0].strip().lower()
    return LANGUAGE_ALIASES.get(primary, primary) or None


def _language(ctx: Any) -> str:
    person = ctx.get("person") if hasattr(ctx, "get") else None
    lang = person.get("language") if isinstance(person, dict) else None
    return normalize_language(lang) or "en"


@pass_context
def _local_date(ctx: Any, v: Any, tz: str | None = None) -> str:
    dt = _local(v, tz)
    if _language(ctx) == "es":
        return f"{_ES_DAYS[dt.weekday()]} {dt.day} de {_ES_MONTHS[dt.month - 1]}"
    return f"{_EN_DAYS[dt.weekday()]} {_EN_MONTHS[dt.month - 1]} {dt.day}"


@pass_context
def _local_time(ctx: Any, v: Any, tz: str | None = None) -> str:
    dt = _local(v, tz)
    text = (
        dt.strftime("%H:%M")
        if _language(ctx) == "es"
        else (f"{dt.hour % 12 or 12}:{dt.minute:02d} {'AM' if dt.hour < 12 else 'PM'}")
    )
    return f"{text} {dt.tzname()}" if _other_zone(ctx, dt) else text


def _other_zone(ctx: Any, dt: datetime) -> bool:
    """Whether the reader's clock differs from the site's at ``dt`` (someone living in
    another state than the clinic's): then a time says its zone, so that "7:30 AM" cannot
    be read on the wrong clock."""
    site = (ctx.get("site") or {}).get("timezone")
    if not site or dt.tzinfo is None:
        return False
    return dt.utcoffset() != dt.astimezone(ZoneInfo(site)).utcoffset()


def _present(value: Any) -> Any:
    if value is None:
        raise TemplateRuntimeError("a value this template shows is missing")
    return value


def _env(autoescape: bool = False) -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=autoescape, finalize=_present)
    env.filters["local_date"] = _local_date
    env.filters["local_time"] = _local_time
    return env


_TEXT = _env()
_HTML = _env(autoescape=True)


def _bodies(
    prefix: str, sms: dict[str, str], text: dict[str, str], email: dict[str, EmailBody]
) -> list[tuple[str, str, bool]]:
    bodies: list[tuple[str, str, bool]] = []
    for lang, body_text in sms.items():
        bodies.append((f"{prefix}.sms.{lang}", body_text, False))
    for lang, body_text in text.items():
        bodies.append((f"{prefix}.text.{lang}", body_text, False))
    for lang, body in email.items():
        bodies.append((f"{prefix}.email.{lang}.subject", body.subject, False))
        bodies.append((f"{prefix}.email.{lang}.text", body.text, False))
        if body.html:
            bodies.append((f"{prefix}.email.{lang}.html", body.html, True))
    return bodies


def check(name: str, tpl: TemplateConfig) -> list[str]:
    """Config-time problems, with their paths: syntax errors, unknown variables and fields,
    tags that need a loader, and fields that need a higher ``phi_class`` (``FIELD_PHI``)."""
    problems: list[str] = []
    bodies = _bodies(f"templates.{name}", tpl.sms, tpl.text, tpl.email)
    if not bodies:
        problems.append(f"templates.{name}: needs at least one body (sms, email or text)")
    for vname, vbody in tpl.variants.items():
        where = f"templates.{name}.variants.{vname}"
        if vname == DEFAULT_VARIANT:
            problems.append(f"{where}: the name {DEFAULT_VARIANT!r} is the base body")
        vb = _bodies(where, vbody.sms, vbody.text, vbody.email)
        if not vb:
            problems.append(f"{where}: needs at least one body (sms, email or text)")
        for kind in ("sms", "email", "text"):
            if getattr(vbody, kind) and not getattr(tpl, kind):
                problems.append(f"{where}.{kind}: the template has no {kind} body to vary")
        bodies.extend(vb)
    for path, text, html in bodies:
        env = _HTML if html else _TEXT
        try:
            ast = env.parse(text)
        except TemplateSyntaxError as exc:
            problems.append(f"{path}: template syntax error at line {exc.lineno}: {exc.message}")
            continue
        try:  # walking the tree compiles it: an unknown filter or test shows here
            undeclared = meta.find_undeclared_variables(ast)
        except TemplateError as exc:
            problems.append(f"{path}: {exc.message or type(exc).__name__}")
            continue
        for var in sorted(undeclared - VARIABLES):
            problems.append(f"{path}: unknown variable {var!r} (allowed: {', '.join(sorted(VARIABLES))})")
        problems.extend(f"{path}: {p}" for p in _structure_problems(ast, undeclared & VARIABLES))
        for field in sorted(_fields_used(ast, undeclared & VARIABLES)):
            need = FIELD_PHI.get(field)
            if need is not None and PHI_CLASSES.index(need) > PHI_CLASSES.index(tpl.phi_class):
                problems.append(
                    f"{path}: shows {field}, so the template's phi_class must be at least {need!r} "
                    f"(it is {tpl.phi_class!r})"
                )
    return problems


def _fields_used(ast: nodes.Template, variables: set[str]) -> set[str]:
    """``var.field`` for every constant field of a context variable the template reads."""
    out: set[str] = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = getattr(node, "node", None)
        if not isinstance(base, nodes.Name) or base.ctx != "load" or base.name not in variables:
            continue
        if isinstance(node, nodes.Getattr):
            out.add(f"{base.name}.{node.attr}")
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            out.add(f"{base.name}.{node.arg.value}")
    return out


def _structure_problems(ast: nodes.Template, variables: set[str]) -> list[str]:
    """Unknown fields of the context's variables, and tags that need a template loader."""
    problems: list[str] = []
    for tag in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        problems.append(f"line {tag.lineno}: {type(tag).__name__.lower()} is not available in templates")
    for used in sorted(_fields_used(ast, variables)):
        var, name = used.split(".", 1)
        fields = FIELDS.get(var)
        if fields is not None and name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            problems.append(f"unknown field {used} (known: {known})")
    return problems


@lru_cache(maxsize=1024)
def _compiled(text: str, html: bool) -> Template:
    # Compiling is the costly part of rendering; bodies come from the config, so they repeat.
    return (_HTML if html else _TEXT).from_string(text)


def render(
    tpl: TemplateConfig, kind: str, language: str | None, context: dict[str, Any]
) -> dict[str, str] | None:
    """The channel content for ``kind`` ({"text": ...} or email parts), or None if the
    template has no body for that kind. ``language`` (else the context's
    ``person.language``: the site's default when the person has none) comes first, then
    English, then any language; dates and times are written in the language of the body
    that was chosen. An email subject is one line, whatever the data held."""
    chosen: list[str] = []
    given_person = context.get("person")
    if not language and isinstance(given_person, dict) and given_person.get("language"):
        language = str(given_person["language"])

    def pick(d: dict[str, Any]) -> Any:
        for lang in (language or "en", normalize_language(language) or "en", "en", *d):
            if d.get(lang):
                chosen.append(lang)
                return d[lang]
        return None

    def ctx() -> dict[str, Any]:
        given = context.get("person")
        person: dict[str, Any] = given if isinstance(given, dict) else {}
        return {**context, "person": {**person, "language": chosen[-1] if chosen else language}}

    if kind == "email":
        body = pick(tpl.email)
        if body is None:
            return None
        out = {
            "subject": " ".join(_compiled(body.subject, False).render(ctx()).split()),
            "text": _compiled(body.text, False).render(ctx()),
        }
        if body.html:
            out["html"] = _compiled(body.html, True).render(ctx())
        return out
    if kind == "sms":
        text = pick(tpl.sms)
        return {"text": _compiled(text, False).render(ctx())} if text is not None else None
    # text, fhir, json: any short text the template has
    text = pick(tpl.text) or pick(tpl.sms)
    if text is None and (body := pick(tpl.email)) is not None:
        text = body.text
    return {"text": _compiled(text, False).render(ctx())} if text is not None else None
