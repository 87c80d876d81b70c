"""Short-answer normalisation, the way the standard VQA evaluation script does it.

Lower-case; newlines/tabs to spaces; each punctuation mark is removed when it touches a space
(or the text has a digit-comma-digit group, so ``1,000`` -> ``1000``) and becomes a space
otherwise; a period not followed by a digit is removed (``2.5`` stays); number words
``zero``..``ten`` become digits; the articles a/an/the are dropped; apostrophe-less
contractions are restored (``dont`` -> ``don't``). The VQA evaluation scores with it and the
CoMD recipe's answer judge compares with it, so it sits below both.
"""
from __future__ import annotations

import re

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "aren't can't couldn't didn't doesn't don't hadn't hasn't haven't he'd he'll he's i'd i'll "
    "i'm i've isn't it'd it'll it's let's ma'am mightn't mustn't shan't she'd she'll "
    "shouldn't that's there's they'd they'll they're they've wasn't we'd we're we've weren't "
    "what's where's who's won't wouldn't you'd you'll you're you've y'all").split()}
# Plain words that would otherwise be "restored" into contractions.
for _word in ("hell", "ill", "id", "its", "lets", "shell", "wed", "well", "were",
              "wont", "cant"):
    _CONTRACTIONS.pop(_word, None)
_CONTRACTIONS.update({"cant": "can't", "wont": "won't"})


def normalize_answer(text: str) -> str:
    """Normalise a short answer the way the VQA evaluation does (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)
