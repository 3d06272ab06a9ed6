"""Every connector and mapper through its kind's conformance kit."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, ClassVar

from careloop.tables import RawMessage
from connectors.fhir_subscription import FhirSubscriptionConnector
from connectors.hl7v2_mllp import MLLPConnector
from connectors.smtp_inbound import SmtpInboundConnector
from connectors.testing import ConnectorConformance
from connectors.twilio_sms_inbound import TwilioSmsInboundConnector
from connectors.webhook import WebhookConnector
from mapping.email_reply import EmailReplyMapper
from mapping.fhir import FhirMapper
from mapping.hl7v2 import HL7v2Mapper
from mapping.testing import MapperConformance
from mapping.twilio_sms import TwilioSmsMapper
from tests.conftest import CORPUS, FIXTURES

SIU = (FIXTURES / "hl7" / "siu_s12_booked.hl7").read_bytes()
A03 = (FIXTURES / "hl7" / "adt_a03_discharge.hl7").read_bytes()
SMS = {
    "From": "+15555550101",
    "To": "+15555550199",
    "Body": "C",
    "MessageSid": "SM" + "1" * 32,
    "AccountSid": "AC" + "0" * 32,
}
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "NWH", "value": "NW100009"}],
    "name": [{"family": "Conformo", "given": ["Tess"]}],
    "telecom": [{"system": "phone", "value": "+15555550109"}],
}
NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


def reply_email() -> bytes:
    m = EmailMessage()
    m["From"] = "tess.conformo@example.org"
    m["To"] = "reply@replies.careloop.example"
    m["Subject"] = "Re: visit"
    m["Message-ID"] = "<c1@example.org>"
    m.set_content("C")
    return bytes(m)


def raw(kind: str, body: bytes, connector: str = "c", n: int = 1) -> RawMessage:
    return RawMessage(
        id=n, connector=connector, kind=kind, content_type="x", received_at=NOW, body=body, headers={}
    )


# ------------------------------------------------------------------ connectors


class TestMLLPConformance(ConnectorConformance):
    connector_class = MLLPConnector
    config: ClassVar[dict[str, Any]] = {"plugin": "hl7v2_mllp", "port": 2575}
    bad_configs = (({"port": 70000}, "port"), ({"max_message_bytes": 1}, "max_message_bytes"))

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        return [(SIU, {}), (A03, {})]


class TestWebhookConformance(ConnectorConformance):
    connector_class = WebhookConnector
    config: ClassVar[dict[str, Any]] = {
        "plugin": "webhook",
        "path": "/webhooks/crm",
        "signature": "standard-webhooks",
        "secret": "whsec_Y29uZm9ybWFuY2UtdGVzdC1zZWNyZXQtdmFsdWU=",
        "mapping": str(FIXTURES / "mapping" / "crm.yaml"),
    }
    secrets = ("whsec_Y29uZm9ybWFuY2UtdGVzdC1zZWNyZXQtdmFsdWU=",)
    bad_configs = (({"signature": "carrier-pigeon"}, "signature"),)

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        return [((FIXTURES / "crm" / "refund_initiated.json").read_bytes(), {})]


class TestTwilioInboundConformance(ConnectorConformance):
    connector_class = TwilioSmsInboundConnector
    config: ClassVar[dict[str, Any]] = {"plugin": "twilio_sms_inbound", "auth_token": "conformance-token-1"}
    secrets = ("conformance-token-1",)
    bad_configs = (({"auth_token": ""}, "auth_token"), ({"path": "no-slash"}, "path"))

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        return [(json.dumps(SMS).encode(), {})]


class TestFhirSubscriptionConformance(ConnectorConformance):
    connector_class = FhirSubscriptionConnector
    config: ClassVar[dict[str, Any]] = {
        "plugin": "fhir_subscription",
        "base_url": "http://127.0.0.1:8090/fhir",
        "secret": "conformance-hook-secret",
    }
    secrets = ("conformance-hook-secret",)
    bad_configs = (({"path": "fhir"}, "path"),)

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        note = CORPUS / "fhir-r4-backport" / "json" / "r4-notification-full-resource.json"
        out: list[tuple[bytes, dict[str, str]]] = [(json.dumps(PATIENT).encode(), {})]
        if note.exists():
            out.append((note.read_bytes(), {}))
        return out


class TestSmtpInboundConformance(ConnectorConformance):
    connector_class = SmtpInboundConnector
    config: ClassVar[dict[str, Any]] = {"plugin": "smtp_inbound", "reply_domain": "replies.careloop.example"}
    bad_configs = (({"port": 0}, "port"),)

    def samples(self) -> list[tuple[bytes, dict[str, str]]]:
        return [(reply_email(), {})]


# ------------------------------------------------------------------ mappers


class TestHL7v2MapperConformance(MapperConformance):
    mapper_class = HL7v2Mapper
    phi = ("Testperson", "5550101", "NW100001", "Fictivo")

    def samples(self) -> list[RawMessage]:
        first = SIU.split(b"MSH|")[1]
        return [raw("hl7v2:SIU^S12", b"MSH|" + first), raw("hl7v2:ADT^A03", A03, n=2)]

    def unmapped(self) -> list[RawMessage]:
        oru = A03.replace(b"ADT^A03^ADT_A03", b"ORU^R01^ORU_R01")
        return [raw("hl7v2:ORU^R01", oru, n=3)]


class TestFhirMapperConformance(MapperConformance):
    mapper_class = FhirMapper
    phi = ("Conformo", "5550109", "NW100009")

    def samples(self) -> list[RawMessage]:
        return [raw("fhir:Patient", json.dumps(PATIENT).encode())]

    def unmapped(self) -> list[RawMessage]:
        org = {"resourceType": "Organization", "id": "o1", "name": "Northwind"}
        return [raw("fhir:Organization", json.dumps(org).encode(), n=2)]


class TestTwilioSmsMapperConformance(MapperConformance):
    mapper_class = TwilioSmsMapper
    phi = ("+15555550101",)

    def samples(self) -> list[RawMessage]:
        return [raw("sms:inbound", json.dumps(SMS).encode())]

    def unmapped(self) -> list[RawMessage]:
        status = {**SMS, "MessageStatus": "delivered"}
        status.pop("Body")
        return [raw("sms:status", json.dumps(status).encode(), n=2)]  # no outbox key: nothing to map


class TestEmailReplyMapperConformance(MapperConformance):
    mapper_class = EmailReplyMapper
    phi = ("tess.conformo@example.org",)

    def samples(self) -> list[RawMessage]:
        return [raw("email:inbound", reply_email())]
