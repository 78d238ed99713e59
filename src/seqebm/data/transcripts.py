"""Speech transcripts: the unit set :data:`SPEECH_UNITS` and the normalisation of free text onto it.

* :data:`SPEECH_UNITS`: space, apostrophe and the 26 lower-case letters (index = unit id);
* :func:`normalize_transcript`: free text -> units (lower-case, accents stripped, numbers and a few
  symbols spelled out, other punctuation dropped); the normalisation used by speech-mini and by
  ``load_manifest(..., normalize=True)``;
* :func:`validate_transcript`: check that a transcript is already in the unit set;
* :func:`number_to_words`, :func:`digits_to_words`: English number words ("nineteen forty seven",
  "four seven zero one").

Re-exported by :mod:`seqebm.data.speech`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any

__all__ = ["SPEECH_UNITS", "normalize_transcript", "validate_transcript", "number_to_words", "digits_to_words"]

#: Transcript units: space, apostrophe and the 26 lower-case letters (index = unit id).
SPEECH_UNITS: tuple[str, ...] = (" ", "'", *string.ascii_lowercase)
_UNIT_SET = frozenset(SPEECH_UNITS)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}
_LETTER_MAP = {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:(\.\d+)|(st|nd|rd|th))?(?![\w])")
_SPOKEN_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus "}


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_ONES[n % 10])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int, *, ordinal: bool = False) -> str:
    """Cardinal (or ordinal) English words for ``0 <= n < 10**12``: ``1947`` ->
    ``"one thousand nine hundred forty seven"``, ``21, ordinal=True`` -> ``"twenty first"``."""
    if not 0 <= n < 10**12:
        raise ValueError(f"number_to_words handles 0 <= n < 10**12, got {n}")
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += _below_thousand(n // scale) + [name]
            n %= scale
    if n or not words:
        words += _below_thousand(n)
    if ordinal:
        last = words[-1]
        if last in _ORDINAL_IRREGULAR:
            words[-1] = _ORDINAL_IRREGULAR[last]
        elif last.endswith("y"):
            words[-1] = last[:-1] + "ieth"
        else:
            words[-1] = last + "th"
    return " ".join(words)


def _year_words(n: int) -> str:
    """``1947`` -> "nineteen forty seven", ``1905`` -> "nineteen oh five", ``1900`` -> "nineteen hundred"."""
    hi, lo = divmod(n, 100)
    tail = "hundred" if lo == 0 else (f"oh {_ONES[lo]}" if lo < 10 else number_to_words(lo))
    return f"{number_to_words(hi)} {tail}"


def digits_to_words(digits: str) -> str:
    """A digit string spoken digit by digit: ``"4701"`` -> ``"four seven zero one"``."""
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"expected a non-empty string of digits 0-9, got {digits!r}")
    return " ".join(_ONES[int(d)] for d in digits)


def _spell_number(m: re.Match[str]) -> str:
    whole, decimals, suffix = m.group(1), m.group(2), m.group(3)
    n = int(whole.replace(",", ""))
    if n >= 10**12:
        return f" {digits_to_words(whole.replace(',', ''))} "
    if suffix:
        return f" {number_to_words(n, ordinal=True)} "
    if decimals:
        return f" {number_to_words(n)} point {digits_to_words(decimals[1:])} "
    if "," not in whole and len(whole) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099):
        return f" {_year_words(n)} "
    if len(whole) > 1 and whole[0] == "0":  # "007": digit by digit
        return f" {digits_to_words(whole)} "
    return f" {number_to_words(n)} "


def _unit_name(c: str) -> str:
    return f"{c!r} (U+{ord(c):04X})"


def normalize_transcript(text: str) -> str:
    """Map free text onto :data:`SPEECH_UNITS` (the speech-mini normalisation).

    Lower-cases; strips accents (``"café"`` -> ``"cafe"``) and maps a few letters (``"ß"`` ->
    ``"ss"``); spells numbers (``"in 1947"`` -> ``"in nineteen forty seven"``, ``"3.5"`` -> ``"three
    point five"``, ``"21st"`` -> ``"twenty first"``, ``"1,200"`` -> ``"one thousand two hundred"``)
    and ``&``/``%``/``+``; turns other punctuation, symbols and hyphens into spaces; keeps
    apostrophes inside words only (``"don't"``, not quotes); collapses spaces. May return ``""``.

    Raises:
        ValueError: letters or digits with no mapping (``"ж"``, ``"½"``), naming them.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    s = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    s = _NUMBER.sub(_spell_number, s)
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    out: list[str] = []
    bad: list[str] = []
    for c in s:
        if c in _UNIT_SET:
            out.append(c)
        elif c in _LETTER_MAP:
            out.append(_LETTER_MAP[c])
        elif c in _SPOKEN_SYMBOLS:
            out.append(_SPOKEN_SYMBOLS[c])
        elif unicodedata.category(c)[0] in "LN":
            if c not in bad:
                bad.append(c)
        else:  # punctuation, symbols, other whitespace, controls
            out.append(" ")
    if bad:
        raise ValueError(f"characters outside the unit set with no spelling: "
                         f"{', '.join(_unit_name(c) for c in bad)} in {text!r}")
    words = (w.strip("'") for w in "".join(out).split())
    return " ".join(w for w in words if w)


def validate_transcript(text: Any, *, where: str = "") -> str:
    """Check that ``text`` is a non-empty transcript in :data:`SPEECH_UNITS`; returns it with runs of
    spaces collapsed. ``where`` (e.g. ``"train.jsonl:3"``) prefixes the error message.

    Raises:
        ValueError: not a string, empty, or characters outside the unit set (named in the message).
    """
    at = f"{where}: " if where else ""
    if not isinstance(text, str):
        raise ValueError(f"{at}transcript must be a string, got {type(text).__name__} {text!r}")
    if not text.strip():
        raise ValueError(f"{at}empty transcript {text!r}")
    bad = sorted({c for c in text if c not in _UNIT_SET}, key=text.index)
    if bad:
        raise ValueError(
            f"{at}characters outside the unit set (lower-case a-z, apostrophe, space): "
            f"{', '.join(_unit_name(c) for c in bad)} in {text!r}; normalise it first "
            f"(normalize_transcript(), or load_manifest(..., normalize=True))")
    return " ".join(text.split())
