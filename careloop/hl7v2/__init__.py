"""The HL7 v2 codec the MLLP and file connectors and the v2 mapper share: framing-free
parsing (header, encoding characters, escapes, batches, charsets) and acknowledgments.

It lives in the kernel because both plugin packages need it and plugin packages never
import each other (DESIGN.md)."""
