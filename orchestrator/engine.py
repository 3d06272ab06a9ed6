"""The orchestrate stage: journey events and due timers -> decisions, timers, outbox rows.

``Orchestrator`` joins the core (``orchestrator/core.py``: claims, playbooks, the gate,
sends, timers, journey state) with its triage steps (``orchestrator/triage_steps.py``) and
learning steps (``orchestrator/learning_steps.py``).
"""

from __future__ import annotations

from orchestrator.learning_steps import LearningSteps
from orchestrator.triage_steps import TriageSteps


class Orchestrator(TriageSteps, LearningSteps):
    """The stage. ``channels`` describes the configured channels for the gate."""
