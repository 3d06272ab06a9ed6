"""Declarative mapping: a YAML file of JMESPath expressions turns a JSON payload into
journey events, so that each hospital's CRM payloads are configuration, not code.

A mapping file (paths in error messages are the file's own keys)::

    version: 1
    type: type                         # where the source event type is
    type_map:                          # source type -> journey event type; others are skipped
      refund.initiated: crm.refund.initiated
    occurred_at: occurred_at           # ISO-8601 with offset, or Unix seconds / milliseconds
    identifiers:                       # people are linked by these (careloop.identity)
      - {kind: mrn, system: NWH, value: contact.mrn}
      - {kind: crm, system: "urn:example:crm:contact", value: contact.id}
      - {kind: phone, value: contact.phone, verified: contact.phone_verified}
      - {kind: email, value: contact.email}
    attributes: {product: data.product}
    subject: {resourceType: Basic, id: id, body: "{code: {text: type}}"}
    default_region: US                 # for phone numbers written without a country code

The mapper is pure (no I/O, no clock): the file is read once, when the connector is built.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import jmespath
import phonenumbers
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from careloop.config import format_errors, load_raw
from careloop.errors import ConfigError, PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent, is_known_event_type
from careloop.tables import RawMessage

# Contact points get fixed systems so that they match the ones other mappers write.
CONTACT_SYSTEMS = {"phone": "phone", "email": "email"}
_SAFE_TYPE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,80}$")
_FHIR_ID = re.compile(r"[^A-Za-z0-9\-.]")


def _expr(v: str) -> str:
    try:
        jmespath.compile(v)
    except JMESPathError as exc:
        raise ValueError(f"not a valid JMESPath expression ({type(exc).__name__})") from None
    return v


Expr = Annotated[str, AfterValidator(_expr)]


def _event_type(v: str) -> str:
    if not is_known_event_type(v):
        raise ValueError(f"{v!r} is not a journey event type (crm.<event> or the controlled vocabulary)")
    return v


def _region(v: str) -> str:
    if v not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("is not a phone region code such as US")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentifierRule(_Strict):
    """One identifier taken from the payload. Empty or missing values are left out."""

    kind: Literal["mrn", "fhir", "crm", "phone", "email", "other"]
    value: Expr
    system: str | None = Field(None, description="required for mrn/fhir/crm/other (e.g. the MRN's authority)")
    verified: bool | Expr = Field(
        False,
        description="phone/email: true, or an expression, when the sender vouches the contact "
        "point belongs to the person (lets a CRM contact id link through it)",
    )

    @model_validator(mode="after")
    def _system(self) -> IdentifierRule:
        if self.kind in CONTACT_SYSTEMS:
            if self.system not in (None, CONTACT_SYSTEMS[self.kind]):
                raise ValueError(f"system: {self.kind} identifiers always use system {self.kind!r}")
        elif not self.system:
            raise ValueError(f"system: required for kind {self.kind}")
        return self


class SubjectRule(_Strict):
    """The FHIR resource the event is about: a type, an id expression and, optionally, an
    expression giving the rest of the resource as an object."""

    resourceType: str = Field(pattern=r"^[A-Z][A-Za-z]{1,63}$")
    id: Expr
    body: Expr | None = None

    @field_validator("resourceType")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            _fhir_model(v)
        except (KeyError, ValueError, ImportError, AttributeError):
            raise ValueError("is not a FHIR R4B resource type") from None
        return v


class MappingSpec(_Strict):
    version: Literal[1] = 1
    type: Expr = "type"
    type_map: dict[str, Annotated[str, AfterValidator(_event_type)]] = Field(min_length=1)
    occurred_at: Expr
    identifiers: list[IdentifierRule] = Field(default_factory=list)
    attributes: dict[str, Expr] = Field(default_factory=dict)
    subject: SubjectRule | None = None
    default_region: Annotated[str, AfterValidator(_region)] = "US"


def resolve_path(path: Path, base_dir: Path) -> Path:
    """Relative mapping paths are relative to the config file's folder."""
    return path if path.is_absolute() else (base_dir / path)


def load_spec(path: Path, where: str) -> MappingSpec:
    """Read and validate a mapping file; ConfigError lines start with ``where`` and the file."""
    try:
        raw = load_raw(path)
    except ConfigError as exc:
        raise ConfigError([f"{where}: {p}" for p in exc.problems]) from None
    try:
        return MappingSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([f"{where}: {path}: {p}" for p in format_errors(err)]) from None


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 with an offset, or Unix seconds / milliseconds (numbers above 1e11 are ms)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        secs = value / 1000 if abs(value) > 1e11 else value
        return datetime.fromtimestamp(secs, UTC)
    if isinstance(value, str):
        s = value.strip()
        if s.isdigit():
            return parse_time(int(s))
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            return None
        return dt if dt.tzinfo is not None else None
    return None


def normalise_phone(value: str, region: str) -> str | None:
    """E.164, as the HL7 mapper writes it, so that contact points from both sources match."""
    try:
        num = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def normalise_email(value: str) -> str | None:
    v = value.strip().lower()
    local, at, domain = v.partition("@")
    return v if at and local and "." in domain and " " not in v else None


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, bool | dict | list):
        return None
    s = str(value).strip()
    return s or None


class DeclarativeMapper:
    """Maps JSON raw messages with a ``MappingSpec``. Unmapped event types raise
    SkipMessage (the raw message stays stored, skipped with that reason)."""

    name: ClassVar[str] = "declarative"
    # Never chosen by message kind: a webhook connector names it, with its mapping file
    # (``MapperChoice("declarative", {"spec_file": ..., "where": ...})``).
    accepts: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, spec: MappingSpec | None = None, *, spec_file: Path | None = None, where: str = "mapping"
    ) -> None:
        if spec is None:
            if spec_file is None:
                raise ConfigError([f"{where}: a mapping file is required"])
            spec = load_spec(spec_file, where)
        self.spec = spec
        self._compiled: dict[str, ParsedResult] = {}

    @classmethod
    def from_file(cls, path: Path, where: str = "mapping") -> DeclarativeMapper:
        return cls(load_spec(path, where))

    def _search(self, expr: str, doc: Any) -> Any:
        parsed = self._compiled.get(expr)
        if parsed is None:
            parsed = self._compiled[expr] = jmespath.compile(expr)
        try:
            return parsed.search(doc)
        except JMESPathError as exc:  # e.g. join() over a number: the payload is not as mapped
            raise PermanentError(
                f"mapping expression {expr!r} failed on this payload ({type(exc).__name__})"
            ) from None

    def map(self, raw: RawMessage) -> list[MappedEvent]:
        try:
            doc = json.loads(raw.body)
        except (ValueError, UnicodeDecodeError):
            raise PermanentError("body is not JSON") from None
        return [self.map_document(doc)]

    def map_document(self, doc: Any) -> MappedEvent:
        spec = self.spec
        source_type = _scalar(self._search(spec.type, doc))
        if source_type is None:
            raise SkipMessage(f"no event type at {spec.type!r}")
        etype = spec.type_map.get(source_type)
        if etype is None:
            shown = source_type if _SAFE_TYPE.match(source_type) else "(unprintable)"
            raise SkipMessage(f"event type {shown!r} is not mapped")
        at = parse_time(self._search(spec.occurred_at, doc))
        if at is None:
            raise PermanentError(
                f"occurred_at: no ISO-8601 time with offset or epoch at {spec.occurred_at!r}"
            )
        idents, invalid = self._identifiers(doc)
        attributes: dict[str, Any] = {}
        for key, expr in spec.attributes.items():
            value = self._search(expr, doc)
            if value is not None:
                attributes[key] = value
        if invalid:
            attributes["invalid_identifiers"] = invalid  # field kinds only, never the values
        return MappedEvent(
            type=etype, occurred_at=at, identifiers=idents, attributes=attributes, subject=self._subject(doc)
        )

    def _identifiers(self, doc: Any) -> tuple[list[Identifier], list[str]]:
        out: list[Identifier] = []
        invalid: list[str] = []
        for rule in self.spec.identifiers:
            value = _scalar(self._search(rule.value, doc))
            if value is None:
                continue
            if rule.kind == "phone":
                value = normalise_phone(value, self.spec.default_region)
            elif rule.kind == "email":
                value = normalise_email(value)
            if value is None:
                invalid.append(rule.kind)
                continue
            verified = (
                rule.verified if isinstance(rule.verified, bool) else self._search(rule.verified, doc) is True
            )
            system = CONTACT_SYSTEMS.get(rule.kind) or rule.system
            assert system is not None
            ident = Identifier(
                system, value, kind=rule.kind, verified=verified and rule.kind in CONTACT_SYSTEMS
            )
            if all(i.token() != ident.token() for i in out):
                out.append(ident)
        return out, invalid

    def _subject(self, doc: Any) -> dict[str, Any] | None:
        rule = self.spec.subject
        if rule is None:
            return None
        rid = _scalar(self._search(rule.id, doc))
        if rid is None:
            return None
        resource: dict[str, Any] = {}
        if rule.body is not None:
            body = self._search(rule.body, doc)
            if body is not None and not isinstance(body, dict):
                raise PermanentError("subject.body: the expression must give an object")
            resource.update({k: v for k, v in (body or {}).items() if v is not None})
        # FHIR ids allow [A-Za-z0-9-.]{1,64}; other characters become '-'.
        resource.update(resourceType=rule.resourceType, id=_FHIR_ID.sub("-", rid)[:64])
        validate_resource(resource)
        return resource


def _fhir_model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class  # slow import: only when a subject is mapped

    return get_fhir_model_class(resource_type)


def validate_resource(resource: dict[str, Any]) -> None:
    """Validate against the FHIR R4B model; errors name fields, never values."""
    try:
        _fhir_model(resource["resourceType"]).model_validate(resource)
    except ValidationError as err:
        where = ", ".join(".".join(str(p) for p in e["loc"]) or "(resource)" for e in err.errors()[:5])
        raise PermanentError(f"subject: not a valid FHIR R4B {resource['resourceType']} at {where}") from None
