"""Passwords out of sight: URLs and free text with every password masked."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*?):([^/?#]*)@")
_ANY_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s'\"]*):[^@\s'\"]*@")


def mask_url(url: str) -> str:
    """Returns the URL with its password replaced by `***`."""
    return _USERINFO.sub(r"\1\2:***@", url, count=1)


def mask_secrets(text: str) -> str:
    """Masks the password of every URL in `text`."""
    return _ANY_CREDENTIALS.sub(r"\1:***@", text)
