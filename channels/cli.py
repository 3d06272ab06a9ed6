"""'careloop channels ...': channel tools (mounted by careloop/cli.py)."""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from channels.twilio_loopback import TwilioLoopback

EXAMPLE_ACCOUNT_SID = "AC" + "0" * 32  # fixtures/config/example.yaml's channels.sms.account_sid

app = typer.Typer(help="Channel tools.", no_args_is_help=True)


@app.command("twilio-loopback")
def twilio_loopback(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8091,
    account_sid: Annotated[
        str, typer.Option(help="the account SID the twilio_sms channel uses")
    ] = EXAMPLE_ACCOUNT_SID,
) -> None:
    """Run a Twilio-compatible Messages API on 127.0.0.1 that keeps messages in memory and
    sends nothing (the example deployment's 'sms' channel points at it)."""
    server = TwilioLoopback(account_sid=account_sid, auth_token=None)
    base = server.start(port)
    typer.echo(f"Twilio-compatible loopback listening on {base} (account {account_sid}); Ctrl-C stops it")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        typer.echo(f"stopped after {len(server.messages)} messages")
