"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D), SPICE where possible.

English text goes through pycocoevalcap's PTBTokenizer and its scorers exactly as `COCOEvalCap` calls
them, so the numbers equal pycocoevalcap's. Two differences: every caption is put on one line first
(pycocoevalcap replaces only "\n"; a "\r" or "\u2028" there silently shifts captions between images),
and is NFC-normalised, so that an accent typed as a combining mark matches the precomposed letter.

Unsegmented scripts (`lang` in `CHARACTER_LANGS`: Chinese, Japanese, Thai, ...) are scored on
characters: the PTB tokenizer only splits on spaces and English punctuation, so a Chinese sentence
would come out as one "word" and BLEU/CIDEr would degenerate into whole-sentence matching. Such text
is NFKC-normalised, punctuation is removed, and each character of those scripts becomes a token
(runs of Latin letters or digits stay one token); the PTB tokenizer is bypassed. METEOR and SPICE
rely on English resources (stemmer, synonyms, parser) and are refused for these languages.

`lang` takes `en` or one of `CHARACTER_LANGS`, case-insensitive, with a region or script tag
(`zh-CN`, `zh_Hans`, `ja-JP` and `cmn` are `zh`/`ja`); anything else is refused (`normalize_lang`).
References mostly in those scripts scored with `lang="en"` print a one-line warning: the PTB tokenizer
leaves such a sentence as one "word", so BLEU/CIDEr come out near 0.

CIDEr's IDF weights come from the references being scored, so CIDEr on a few dozen images is not
comparable with a number computed over the full COCO test split (on a single image it is always 0);
compare models on the same set.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
import unicodedata

from .inputs import check_same_keys

ALL_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
CHARACTER_LANGS = {"zh", "ja", "th", "lo", "km", "my"}
LANGS = ("en", *sorted(CHARACTER_LANGS))
# Other names of a supported language (ISO 639-3, Chinese varieties written in Han characters).
_LANG_ALIASES = {"cmn": "zh", "yue": "zh", "wuu": "zh", "zho": "zh", "chi": "zh", "jpn": "ja", "tha": "th",
                 "eng": "en", "lao": "lo", "khm": "km", "mya": "my", "bur": "my"}
ENGLISH_ONLY = {"METEOR", "SPICE"}

# Code point ranges whose scripts write words without spaces; each character is a token.
_UNSEGMENTED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def normalize_lang(lang: str) -> str:
    """`lang` as one of `LANGS`: case-insensitive, a region or script subtag dropped (`zh-CN`, `zh_Hans`,
    `en-US`). Raises `ValueError` naming the supported values for anything else."""
    if not isinstance(lang, str) or not lang.strip():
        raise ValueError(f"language {lang!r} is not supported; use one of {', '.join(LANGS)}")
    primary = re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]
    primary = _LANG_ALIASES.get(primary, primary)
    if primary not in LANGS:
        raise ValueError(f"language {lang!r} is not supported; use one of {', '.join(LANGS)} (zh, ja, th, "
                         "lo, km, my are scored on characters; other languages written with spaces can be "
                         "scored as en, without METEOR and SPICE, which are English-only)")
    return primary


def unsegmented_share(texts) -> float:
    """The share of letters in `texts` that belong to scripts written without spaces (Chinese, ...)."""
    letters = unsegmented = 0
    for text in texts:
        for ch in text:
            if ch.isalpha():
                letters += 1
                unsegmented += _is_unsegmented(ch)
    return unsegmented / letters if letters else 0.0


def _is_unsegmented(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _UNSEGMENTED_RANGES)


def character_tokens(text: str) -> str:
    """Space-separated tokens for unsegmented scripts: one per character, punctuation removed, lower case."""
    tokens, word = [], ""
    for ch in unicodedata.normalize("NFKC", text).lower():
        category = unicodedata.category(ch)
        if category[0] == "M" and (word or tokens):
            # A combining mark (Thai vowels and tones) belongs to the character before it.
            if word:
                word += ch
            else:
                tokens[-1] += ch
        elif category[0] in "LN" and not _is_unsegmented(ch):
            word += ch  # Latin, Cyrillic, digits...: whole words stay one token
        else:
            if word:
                tokens.append(word)
                word = ""
            if category[0] not in "PZC":  # punctuation, spaces and control characters are dropped
                tokens.append(ch)
    if word:
        tokens.append(word)
    return " ".join(tokens)


def spice_available() -> tuple[bool, str]:
    """Whether pycocoevalcap's SPICE can run here without downloading, and if not, why."""
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError as e:
        return False, f"pycocoevalcap.spice cannot be imported ({e})"
    spice_dir = os.path.dirname(spice_pkg.__file__)
    if not os.path.exists(os.path.join(spice_dir, "spice-1.0.jar")):
        return False, f"spice-1.0.jar is missing from {spice_dir}"
    if not glob.glob(os.path.join(spice_dir, "lib", "stanford-corenlp-*.jar")):
        return False, (f"the Stanford CoreNLP jars are missing from {spice_dir}/lib (pycocoevalcap would "
                       "download them; copy stanford-corenlp-3.6.0.jar and -models.jar there to enable "
                       "SPICE)")
    return True, ""


# What pycocoevalcap's Java tokenizer writes to stderr on every call: progress, not a problem.
_CHATTER = re.compile(r"^PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.$")


@contextlib.contextmanager
def _quiet_pycocoevalcap():
    """Drop pycocoevalcap's chatter: all it writes to stdout (Python prints and its Java child processes
    alike: the tokenizer's progress, BLEU's length ratios) and the tokenizer's progress line on stderr,
    which would bury a caller's own output. Anything else on stderr is passed on."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no file descriptors 1 and 2 (some daemons): only Python-level output can be moved
        saved = None
    devnull = open(os.devnull, "w")
    err = tempfile.TemporaryFile("w+")
    try:
        if saved is not None:
            os.dup2(devnull.fileno(), 1)
            os.dup2(err.fileno(), 2)
        with contextlib.redirect_stdout(devnull):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        err.seek(0)
        kept = [line for line in err.read().splitlines() if not _CHATTER.match(line.strip())]
        if kept:
            print("\n".join(kept), file=sys.stderr)
        devnull.close()
        err.close()


def _tokenize(predictions: dict, references: dict, keys: list, lang: str) -> tuple[dict, dict]:
    if lang in CHARACTER_LANGS:
        gts = {k: [character_tokens(c) for c in references[k]] for k in keys}
        res = {k: [character_tokens(predictions[k])] for k in keys}
        return gts, res
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": _clean(c)} for c in references[k]] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": _clean(predictions[k])}] for k in keys})
    return gts, res


def _clean(text: str) -> str:
    # PTBTokenizer pairs its output lines with the captions in order; pycocoevalcap only replaces
    # "\n", so a "\r" or "\u2028" inside a caption would shift every later caption onto the wrong image.
    # NFC: "e" + U+0301 and "é" are one text (canonically equivalent) and must be one word.
    return " ".join(unicodedata.normalize("NFC", text).splitlines())


def _scorer(name: str):
    if name == "Bleu":
        from pycocoevalcap.bleu.bleu import Bleu
        return Bleu(4)
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor()
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge
        return Rouge()
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider
        return Cider()
    from pycocoevalcap.spice.spice import Spice
    return Spice()


def _scorer_failed(name: str, scorer, res: dict) -> ValueError:
    """The error for a scorer whose Java process died (METEOR runs out of heap on a caption of some ten
    thousand words). pycocoevalcap's METEOR keeps its lock then, and its `__del__` would wait for it for
    ever: the lock is released and the process ended here."""
    process, why = getattr(scorer, "meteor_p", None), "no message"
    if process is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()  # closed even when its flush fails, so __del__ does not flush again
        process.kill()
        process.wait()
        lines = [line for line in process.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        why = next((line.strip() for line in lines if "Exception" in line or "Error" in line),
                   lines[-1].strip() if lines else why)
    lock = getattr(scorer, "lock", None)
    if lock is not None and lock.locked():
        lock.release()
    longest = max((len(c.split()) for captions in res.values() for c in captions), default=0)
    return ValueError(f"{name} failed: its Java process stopped ({why}); the longest prediction has "
                      f"{longest} words. Shorten the predictions or score without {name}")


def caption_metrics(predictions: dict, references: dict, lang: str = "en", metrics=None,
                    per_sample: bool = False) -> dict:
    """Corpus-level caption metrics under pycocoevalcap's names (`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`,
    `CIDEr`, `SPICE`).

    `predictions` maps a key to one caption, `references` the same keys to lists of captions.
    `metrics` picks from `ALL_METRICS` (default: all that apply; SPICE only when its jars are
    installed, otherwise one line on stderr says why it is skipped). With `per_sample=True` the
    result also holds `per_sample: {key: {metric: score}}`.
    """
    check_same_keys(predictions, references)
    lang = normalize_lang(lang)
    unsegmented = lang in CHARACTER_LANGS
    if not unsegmented and unsegmented_share(c for refs in references.values() for c in refs) > 0.5:
        print(f"warning: the references are mostly Chinese, Japanese or Thai text, but the language is "
              f"{lang!r}: the PTB tokenizer does not split it into words, so BLEU/CIDEr score it as ~0; "
              "score it as zh, ja or th", file=sys.stderr)
    if metrics is None:
        metrics = [m for m in ALL_METRICS if not (unsegmented and m in ENGLISH_ONLY)]
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    if unsegmented and ENGLISH_ONLY & set(metrics):
        raise ValueError(f"{sorted(ENGLISH_ONLY & set(metrics))} need English resources and cannot score "
                         f"lang={lang!r}")
    if "SPICE" in metrics:
        ok, why = spice_available()
        if not ok:
            print(f"SPICE skipped: {why}", file=sys.stderr)
            metrics = [m for m in metrics if m != "SPICE"]

    keys = list(references)
    result, per_key = {}, {k: {} for k in keys}
    with _quiet_pycocoevalcap():
        gts, res = _tokenize(predictions, references, keys, lang)
        # Scorers get positions as keys: SPICE lists its per-sample scores in sorted(keys) order, the others
        # in dict order, and only 0..n-1 sorts as it stands (never mixing int and str, and JSON-safe).
        gts, res = ({i: d[k] for i, k in enumerate(keys)} for d in (gts, res))
        for name in metrics:
            scorer = _scorer(name)
            try:
                score, scores = scorer.compute_score(gts, res)
            except (OSError, ValueError) as e:  # a broken pipe, or an empty line read as a float
                raise _scorer_failed(name, scorer, res) from e
            del scorer  # METEOR's Java process ends when its scorer is collected
            names = BLEU_KEYS if name == "Bleu" else (name,)
            if name == "Bleu":
                score, scores = list(score), list(scores)
            else:
                score, scores = [score], [scores]
            for metric, corpus_value, sample_values in zip(names, score, scores):
                result[metric] = float(corpus_value)
                for k, v in zip(keys, sample_values):
                    # SPICE gives a dict of sub-scores per sample; its headline is the "All" F-score.
                    per_key[k][metric] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)
    if per_sample:
        result["per_sample"] = per_key
    return result
