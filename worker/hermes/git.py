"""Hermes' git branch probe, without starting git where there is no repository to find.

Hermes' `session.create` answers with the branch of the session's cwd
(`tui_gateway.git_probe.branch`): `git branch --show-current`, and when that fails
`git rev-parse --short HEAD`. Outside a repository both fail, so every create there
starts git twice for an empty answer (~3-4 ms of a ~6 ms create on this machine).
Git finds a repository by walking up from the directory: a `.git` entry, or the
directory itself being a bare repository (HEAD, objects/, refs/). When that walk finds
nothing, and the environment does not point git elsewhere, git's answer is known to be
empty and we give it without starting git. Anywhere else Hermes' own probe runs, so a
repository's branch is always git's answer.
"""

from __future__ import annotations

import os
from typing import Callable

# any of these makes git look somewhere the walk does not: leave the answer to git
_GIT_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_COMMON_DIR", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")


def in_repository(cwd: str) -> bool:
    """True unless git surely finds no repository from `cwd` (a missing directory included: git fails there)."""
    if any(os.environ.get(name) for name in _GIT_ENV):
        return True
    try:
        path = os.path.realpath(cwd)  # git walks the physical path (it chdirs, then getcwd)
    except (OSError, ValueError):
        return True
    if not os.path.isdir(path):
        return False  # `git -C <missing>` fails: the probe answers ""
    while True:
        if os.path.lexists(os.path.join(path, ".git")) or _bare(path):
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def _bare(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))
            and os.path.isdir(os.path.join(path, "refs")))


def without_git_outside_repos(probe: Callable[[str], str]) -> Callable[[str], str]:
    """`probe` (Hermes' branch probe), answering "" at once where git would find no repository."""

    def branch(cwd: str) -> str:
        if not cwd:
            return probe(cwd)
        try:
            if not in_repository(cwd):
                return ""
        except Exception:
            pass
        return probe(cwd)

    branch.__wrapped__ = probe  # type: ignore[attr-defined]
    return branch


def install(server) -> None:
    """Wrap the probe `session.create` and friends call (`server._git_branch_for_cwd`), once."""
    current = getattr(server, "_git_branch_for_cwd", None)
    if callable(current) and not hasattr(current, "__wrapped__"):
        server._git_branch_for_cwd = without_git_outside_repos(current)
