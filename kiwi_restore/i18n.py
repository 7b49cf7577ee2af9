"""Message translation (gettext). The locale (LANGUAGE, LC_ALL, LC_MESSAGES, LANG) picks French or English."""

from __future__ import annotations

import gettext
import os
from collections.abc import Mapping
from pathlib import Path

DOMAIN = "kiwi_restore"
LOCALE_DIR = Path(__file__).with_name("locale")

_translation: gettext.NullTranslations | None = None


def _load() -> gettext.NullTranslations:
    global _translation
    if _translation is None:
        _translation = gettext.translation(DOMAIN, localedir=LOCALE_DIR, fallback=True)
    return _translation


def reset() -> None:
    """Forget the loaded catalog, so a changed locale environment takes effect (tests)."""
    global _translation
    _translation = None


def _(message: str) -> str:
    return _load().gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    return _load().ngettext(singular, plural, n)


def language() -> str:
    """'fr' or 'en', as chosen by the environment; used to pick document renderings."""
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return "fr" if value.split(":")[0].lower().startswith("fr") else "en"
    return "en"


def catalog_for(env: Mapping[str, str]) -> str | None:
    """The message catalog gettext would load under the environment ENV (None: English)."""
    languages = ["C"]
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        if env.get(var):
            languages = env[var].split(":")
            break
    return gettext.find(DOMAIN, LOCALE_DIR, languages=languages)
