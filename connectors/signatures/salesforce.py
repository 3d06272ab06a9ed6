"""Salesforce Outbound Messages: SOAP notifications that Salesforce does not sign.

Authentication is therefore by transport: the caller's IP must be in the configured
allowlist (Salesforce publishes its ranges) — checked before the body is read — and the
message's ``OrganizationId`` must be the configured org (checked right after a parse with
defusedxml, which refuses entity expansion and external entities). Salesforce retries
until it gets the SOAP acknowledgement ``<Ack>true</Ack>``, which is sent only after the
notifications are committed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from connectors.signatures import Rejected

OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body>'
    f'<notificationsResponse xmlns="{OUTBOUND_NS}"><Ack>true</Ack></notificationsResponse>'
    "</soapenv:Body></soapenv:Envelope>"
).encode()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_allowed(client_ip: str | None, allow: Sequence[Network]) -> bool:
    if client_ip is None:
        return False
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(addr in net for net in allow)


def check_ip(client_ip: str | None, allow: Sequence[Network]) -> None:
    if not ip_allowed(client_ip, allow):
        raise Rejected("caller address is not in the allowlist", status=403, code="forbidden")


@dataclass(frozen=True, slots=True)
class Notification:
    id: str
    object_type: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    organization_id: str
    action_id: str
    notifications: list[Notification] = field(default_factory=list)


class NotOutboundMessage(ValueError):
    """The body is not a Salesforce outbound message (PHI-free reason)."""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _value(el: Element) -> Any:
    if el.get(f"{{{XSI_NS}}}nil") == "true":
        return None
    children = list(el)
    if not children:
        return (el.text or "").strip()
    return {_local(c.tag): _value(c) for c in children}


def parse(body: bytes) -> OutboundMessage:
    """Parse a notifications envelope (defusedxml: no DTDs, entities or external refs)."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True)
    except (DefusedXmlException, SafeET.ParseError):
        raise NotOutboundMessage("body is not well-formed XML without DTDs or entities") from None
    notes = root.find(f"{{{SOAP_NS}}}Body/{{{OUTBOUND_NS}}}notifications")
    if notes is None:
        raise NotOutboundMessage("body is not a SOAP notifications envelope")
    org = (notes.findtext(f"{{{OUTBOUND_NS}}}OrganizationId") or "").strip()
    action = (notes.findtext(f"{{{OUTBOUND_NS}}}ActionId") or "").strip()
    out = OutboundMessage(org, action)
    for n in notes.findall(f"{{{OUTBOUND_NS}}}Notification"):
        nid = (n.findtext(f"{{{OUTBOUND_NS}}}Id") or "").strip()
        obj = n.find(f"{{{OUTBOUND_NS}}}sObject")
        if not nid or obj is None:
            raise NotOutboundMessage("a Notification lacks Id or sObject")
        otype = (obj.get(f"{{{XSI_NS}}}type") or "sObject").rsplit(":", 1)[-1]
        fields = {_local(c.tag): _value(c) for c in obj}
        out.notifications.append(Notification(nid, otype, fields))
    return out


def same_org(given: str, configured: str) -> bool:
    # Org ids come as 15- or 18-character ids; the first 15 characters are the id itself
    # (case-sensitive), the last three a case-insensitive checksum.
    return len(given) >= 15 and given[:15] == configured[:15]


def check_org(msg: OutboundMessage, configured: str) -> None:
    if not same_org(msg.organization_id, configured):
        raise Rejected("OrganizationId is not the configured organization", status=403, code="forbidden")
