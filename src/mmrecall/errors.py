"""Errors a user can cause and fix: a bad data file, a bad submission, bad params, a missing stage input.

The CLI prints any of them as one line, `mmrecall <command>: error: <message>`, and exits with 1
(`--debug` shows the traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message tells the user what to fix (it names the file, and the line if any)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder a command needs does not exist (yet): the message says which stage makes it."""


class MissingLoggedMemberError(UserError):
    """A member the ranker needs has no logged checkpoint in the tracking store: the message names the member
    and its run (or says that no run of it was found), and the store."""
