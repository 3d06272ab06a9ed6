"""The one error tree of careloop.

Every message here must be free of PHI: name fields, ids and codes, never values
taken from a patient's record.
"""

from __future__ import annotations

from datetime import timedelta


class CareloopError(Exception):
    """Base of every error careloop raises on purpose."""


class ConfigError(CareloopError):
    """The configuration is invalid. ``problems`` holds one ``path: message`` per error."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class TransientError(CareloopError):
    """Worth retrying with backoff (timeouts, 429, 5xx, a locked database).

    ``retry_after``: the wait the provider asked for (an HTTP ``Retry-After``), if any; the
    deliver stage retries no sooner than that, and holds the channel's other items back
    meanwhile. None: our own backoff alone decides."""

    retry_after: timedelta | None = None

    def __init__(self, *args: object, retry_after: timedelta | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class ChannelUnavailable(TransientError):
    """The channel, not the item, cannot send now (its credentials were rejected): the
    deliver stage does not count the attempt against the item (an outage of hours must not
    dead-letter every message waiting) and holds the channel's items for ``retry_after``;
    they still expire at their ``not_after``. If the channel sent anything since it was last
    unavailable, the refusal may be the item's own and counts as an ordinary attempt."""

    def __init__(self, *args: object, retry_after: timedelta = timedelta(minutes=5)) -> None:
        super().__init__(*args, retry_after=retry_after)


class PermanentError(CareloopError):
    """Retrying will not help: the item goes to the dead-letter table."""


class RecipientOptedOut(PermanentError):
    """The provider refused the send because the recipient opted out with it (Twilio 21610:
    a STOP given to Twilio or the carrier that we never saw). The item is dead-lettered and
    the opt-out is recorded for the person, so later messages are suppressed, not refused."""


class SkipMessage(CareloopError):
    """The input is valid but nothing is mapped from it (an unmapped message type)."""
