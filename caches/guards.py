"""Near-miss guards: cheap, pure tests on two questions' text that say "these ask different things".

A semantic cache is fooled most often by two questions that share nearly every word and differ in
the one that decides the answer: a number ("5 km" / "10 km"), a negation ("... is a prime" / "...
is not a prime"), the direction of a conversion or comparison ("miles to km" / "km to miles"), a
named entity ("capital of France" / "capital of Germany"), the language or format asked for
("in Python" / "in Java"), or an opaque identifier ("order #A1234" / "order #B9876",
`caches.identifiers`). Sentence embeddings put such pairs very close together. Each guard
below is a pure function `(cached, query) -> bool` that is true when the pair shows that kind of
mismatch; `caches.verifier` uses some as hard rejects and feeds those of `FEATURE_GUARDS` to its
model as features (which ones are hard rejects, and why, is documented there with the
measurements).

Guards are deliberately conservative in what they call a mismatch: "one text has a number, the
other has none" is not a number mismatch (the model sees that as a separate feature), because
paraphrases often add or drop a detail.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from functools import lru_cache

from caches.identifiers import identifier_mismatch


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that carry no topic: dropped before comparing content words.
STOPWORDS = _wordset(
    """a about above after again all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    get got had has have having he her here hers him his how i if in into is it its itself just
    like me more most my myself of off on once only or other our ours out over own same she should
    so some such than that the their theirs them then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you
    your yours yourself s t ve ll d re m"""
)
NEGATIONS = _wordset("not no never none nobody nothing nowhere neither nor cannot without unable")
# "n't" contractions typed without the apostrophe: "why wont my phone turn on" is as negated as
# "why won't my phone turn on" (the guard used to veto that pair as a negation swap).
BARE_CONTRACTIONS = _wordset(
    """dont doesnt didnt isnt arent wasnt werent wont cant couldnt shouldnt wouldnt havent hasnt
    hadnt aint mustnt neednt"""
)
QUESTION_WORDS = _wordset("what why how which who whom whose when where")
# Connectors whose two sides must not swap: conversion, translation, comparison.
DIRECTIONAL = _wordset("to into than")
# Requested languages (natural and programming) and output formats. A pair that asks for different
# ones asks different questions whatever else it shares.
LANGUAGES_AND_FORMATS = _wordset(
    """english french german spanish italian portuguese dutch russian chinese mandarin cantonese
    japanese korean hindi urdu bengali tamil telugu marathi gujarati punjabi kannada malayalam
    arabic hebrew persian turkish greek polish swedish norwegian danish finnish czech hungarian
    romanian ukrainian vietnamese thai indonesian malay swahili latin sanskrit
    python java javascript typescript kotlin swift ruby php perl rust golang haskell scala
    c++ c# matlab fortran cobol sql bash powershell r
    json yaml xml csv html markdown pdf latex toml"""
)
# Countries and continents, so that a swapped place is caught in lower-case text too.
PLACES = _wordset(
    """afghanistan albania algeria argentina armenia australia austria azerbaijan bahrain
    bangladesh belarus belgium bhutan bolivia bosnia brazil bulgaria cambodia cameroon canada chile
    china colombia croatia cuba cyprus denmark ecuador egypt england estonia ethiopia europe fiji
    finland france georgia germany ghana greece guatemala haiti honduras hungary iceland india
    indonesia iran iraq ireland israel italy jamaica japan jordan kazakhstan kenya korea kuwait laos
    latvia lebanon libya lithuania luxembourg malaysia maldives mali malta mexico moldova mongolia
    montenegro morocco mozambique myanmar namibia nepal netherlands nicaragua niger nigeria norway
    oman pakistan palestine panama paraguay peru philippines poland portugal qatar romania russia
    rwanda scotland senegal serbia singapore slovakia slovenia somalia spain sudan sweden
    switzerland syria taiwan tajikistan tanzania thailand tunisia turkey uganda ukraine uruguay
    uzbekistan venezuela vietnam wales yemen zambia zimbabwe africa asia america"""
)

# Names of one place or currency: "US" / "USA" / "America", "India" / "Indian", "Rs" / "INR" /
# "rupees". One replacing another is a paraphrase, not a swap.
_ALIAS_GROUPS = (
    "us usa u.s u.s.a america american americans",
    "uk u.k britain british",
    "india indian indians",
    "china chinese",
    "japan japanese",
    "germany german germans",
    "france french",
    "russia russian russians",
    "pakistan pakistani pakistanis",
    "canada canadian canadians",
    "australia australian australians",
    "europe european europeans",
    "korea korean koreans",
    "mexico mexican mexicans",
    "rs inr rupee rupees \u20b9",
    "usd dollar dollars",
)
ALIASES = {word: group.split()[0] for group in _ALIAS_GROUPS for word in group.split()}
# "No" and "not" that negate nothing: "roll no. 1", "... and why or why not?", "if not, why?".
_NOT_NEGATING = re.compile(r"\b(?:why or why not|or not|if not)\b|\bno\.?\s*(?=\d)", re.IGNORECASE)

_APOSTROPHE = "\u2019"  # typographic apostrophe, read as '
_WORD = re.compile(r"[^\W_]+(?:[.,'\u2019+#][^\W_]+)*[+#]*")
# A number: "60,000" (thousands groups), "2.5", "60"; then an optional multiplier ("60k").
_NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?)"
    r"(?:\s*(k|m|bn|million|billion|thousand)\b)?",
    re.IGNORECASE,
)
_MULTIPLIERS = {
    "k": 1e3,
    "thousand": 1e3,
    "m": 1e6,
    "million": 1e6,
    "bn": 1e9,
    "billion": 1e9,
}
_CAPITALISED = re.compile(r"(?<![.?!]\s)(?<!^)\b([A-Z][\w\u2019'-]*)")
_WINDOW = 3


@lru_cache(maxsize=4096)
def words(text: str) -> tuple[str, ...]:
    """The lower-cased word tokens of `text`; "don't" and "c++" stay whole, "India's" is "india"."""
    found = _WORD.findall(text.lower().replace(_APOSTROPHE, "'"))
    return tuple(w.removesuffix("'s") for w in found)


def content_words(text: str) -> frozenset[str]:
    """The set of words of `text` that are neither stop words nor negations."""
    return frozenset(w for w in words(text) if w not in STOPWORDS and w not in NEGATIONS)


def numbers(text: str) -> frozenset[str]:
    """The numbers written in digits in `text`, normalised so that equal amounts compare equal.

    "60k", "60,000" and "60000" are all "60000"; "500,1000" is two numbers; decimals keep their
    digits, so versions stay apart ("3.10" is not "3.1").
    """
    found: set[str] = set()
    for digits, suffix in _NUMBER.findall(text):
        plain = digits.replace(",", "")
        if suffix:
            found.add(f"{float(plain) * _MULTIPLIERS[suffix.lower()]:.15g}")
        else:
            found.add(plain if "." in plain else plain.lstrip("0") or "0")
    return frozenset(found)


def is_negated(text: str) -> bool:
    """True when `text` contains a negation: "not", "never", "no", a "n't" contraction, ...

    Idioms that negate nothing do not count ("or not", "why or why not", "no. 1").
    """
    return any(
        w in NEGATIONS or w in BARE_CONTRACTIONS or w.endswith("n't")
        for w in words(_NOT_NEGATING.sub(" ", text))
    )


def entities(text: str) -> frozenset[str]:
    """Lower-cased names in `text`: capitalised words not opening a sentence, and known places.

    "I" and capitalised stop words are not names; neither is anything in a text that capitalises
    most of its words (titles, shouting). Multi-word names count word by word.
    """
    capitalised = [
        m.lower().replace(_APOSTROPHE, "'").removesuffix("'s") for m in _CAPITALISED.findall(text)
    ]
    names = set(words(text)) & PLACES
    if 2 * len(capitalised) <= len(words(text)):
        names.update(n for n in capitalised if n not in STOPWORDS and n != "i")
    return frozenset(names)


@lru_cache(maxsize=1024)
def replaced_spans(cached: str, query: str) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """The word spans that changed between the texts: (cached span, query span) pairs.

    From a word-level diff; spans only inserted or only deleted (a detail added or dropped) are
    not included, only spans that one text has in place of the other's.
    """
    a, b = words(cached), words(query)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return tuple(
        (a[i1:i2], b[j1:j2]) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag == "replace"
    )


def numbers_mismatch(cached: str, query: str) -> bool:
    """A number is swapped for another in the same place ("5 km to miles" / "10 km to miles").

    A number only one side gives ("best laptop" / "best laptop under 500") is not a swap.
    """
    a_all, b_all = numbers(cached), numbers(query)
    for a_span, b_span in replaced_spans(cached, query):
        if numbers(" ".join(a_span)) - b_all and numbers(" ".join(b_span)) - a_all:
            return True
    return False


def numbers_one_sided(cached: str, query: str) -> bool:
    """Exactly one text gives a number: a detail added or dropped (a feature, not a veto)."""
    return bool(numbers(cached)) != bool(numbers(query))


def negation_mismatch(cached: str, query: str) -> bool:
    """One text is negated and the other is not ("is 1 a prime" vs "why is 1 not a prime")."""
    return is_negated(cached) != is_negated(query)


def _sides(tokens: tuple[str, ...]) -> list[tuple[str, list[str], list[str]]]:
    """Each directional connector with the content words just before it and just after it.

    Both lists are nearest first and hold the content words within three tokens.
    """
    sides: list[tuple[str, list[str], list[str]]] = []
    for i, token in enumerate(tokens):
        if token not in DIRECTIONAL:
            continue
        before = [w for w in reversed(tokens[max(0, i - _WINDOW) : i]) if w not in STOPWORDS]
        after = [w for w in tokens[i + 1 : i + 1 + _WINDOW] if w not in STOPWORDS]
        sides.append((token, before, after))
    return sides


def _moved(cached: str, query: str) -> bool:
    cached_sides = _sides(words(cached))
    for connector, before, after in _sides(words(query)):
        for c_connector, c_before, c_after in cached_sides:
            if c_connector != connector:
                continue
            moved_before = [w for w in before if w not in c_before]
            moved_after = [w for w in after if w not in c_after]
            if (
                moved_before
                and moved_after
                and moved_before[0] != moved_after[0]
                and moved_before[0] in c_after
                and moved_after[0] in c_before
            ):
                return True
    return False


def direction_mismatch(cached: str, query: str) -> bool:
    """The two sides of "to"/"into"/"than" are swapped ("miles to km" / "km to miles").

    Around the same connector, ignoring words both texts have on the same side ("convert",
    "faster"), each text's nearest word before it stands after it in the other text and its
    nearest word after it stands before it. "Is Python faster than Java" / "Is Java faster than
    Python" is a swap; "eat every day to be healthy" / "healthy, to eat every day" is not.
    """
    return _moved(cached, query) and _moved(query, cached)


def _close(a: str, b: str) -> bool:
    """Two spellings of one name: "india"/"indian", "google"/"googling", "hilary"/"hillary".

    That is: a shared prefix of 4+ letters covering 80% of the shorter word with at most three
    letters after it in the longer, or one letter inserted, dropped or changed in words of 5+
    letters. "austria"/"australia" and "java"/"javascript" stay apart.
    """
    short, long_ = sorted((a, b), key=len)
    if len(short) < 4:
        return False
    pairs = zip(short, long_[: len(short)], strict=True)
    prefix = next((i for i, (x, y) in enumerate(pairs) if x != y), len(short))
    if prefix >= 4 and prefix >= 0.8 * len(short) and len(long_) - prefix <= 3:
        return True
    if len(short) < 5 or len(long_) - len(short) > 1:
        return False
    if len(short) == len(long_):
        return sum(x != y for x, y in zip(short, long_, strict=True)) == 1
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def _mentions(text_words: set[str], name: str) -> bool:
    """`name` occurs among `text_words`, possibly spelled a little differently (see `_close`) or
    under another of its names (`ALIASES`)."""
    if name in text_words:
        return True
    alias = ALIASES.get(name)
    return any(
        _close(name, w) or (alias is not None and ALIASES.get(w) == alias) for w in text_words
    )


def _swapped(cached: str, query: str, a_items: frozenset[str], b_items: frozenset[str]) -> bool:
    """In some replaced span, each side has an item that the other text does not mention."""
    a_words, b_words = set(words(cached)), set(words(query))
    for a_span, b_span in replaced_spans(cached, query):
        if any(x in a_items and not _mentions(b_words, x) for x in a_span) and any(
            y in b_items and not _mentions(a_words, y) for y in b_span
        ):
            return True
    return False


def entity_mismatch(cached: str, query: str) -> bool:
    """A name is swapped for another in the same place ("capital of France" / "... Germany")."""
    return _swapped(cached, query, entities(cached), entities(query))


def language_mismatch(cached: str, query: str) -> bool:
    """They ask for different languages or formats ("in Python" / "in Java", "JSON" / "CSV")."""
    return _swapped(cached, query, LANGUAGES_AND_FORMATS, LANGUAGES_AND_FORMATS)


def question_word_mismatch(cached: str, query: str) -> bool:
    """Both open with a question word and the words differ ("why ..." vs "how ...")."""
    a, b = words(cached)[:1], words(query)[:1]
    return bool(a and b) and a[0] in QUESTION_WORDS and b[0] in QUESTION_WORDS and a != b


Guard = Callable[[str, str], bool]

# Every guard by the name a `Verdict.reason` and the params file use.
GUARDS: dict[str, Guard] = {
    "numbers": numbers_mismatch,
    "negation": negation_mismatch,
    "direction": direction_mismatch,
    "entity": entity_mismatch,
    "language": language_mismatch,
    "question_word": question_word_mismatch,
    "identifier": identifier_mismatch,
}
# The guards the verifier's model also reads, as 0/1 features in this order. Not "identifier":
# it is only ever a hard veto (a vetoed pair never reaches the model) and it fires on too few of
# the fitting pairs (0.5% of qqp_train) for a feature to teach the model anything.
FEATURE_GUARDS: tuple[str, ...] = (
    "numbers",
    "negation",
    "direction",
    "entity",
    "language",
    "question_word",
)
