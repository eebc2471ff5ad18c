#!/usr/bin/env python3
"""Generate the bundled synthetic preference dataset for simpo-ray.

Regenerate the committed file (from the repository root) with:

    python3 examples/data/make_preferences.py --seed 0 --rows 640

which writes ``examples/data/preferences.jsonl`` (the path beside this
script). The output is byte-identical for a given ``--seed``/``--rows``.
Pure standard library; no third-party imports.

Each line is a JSON object with exactly the keys ``prompt``, ``chosen`` and
``rejected`` (ASCII only, no empty strings, chosen != rejected, prompts unique).

Task families (prompts drawn from the seed, several phrasings per family):

* ``add`` / ``sub`` / ``mul``  small-integer arithmetic ("17 + 25 = 42.")
* ``larger``   which of two numbers is larger ("83 is larger than 47.")
* ``capital``  capitals from a fixed table of 30 countries
* ``reverse``  reverse a short word ("'stone' reversed is 'enots'.")
* ``spell``    spell a short word with hyphens ("'stone' is spelled s-t-o-n-e.")
* ``count``    number of letters in a short word ("'stone' has 5 letters.")
* ``day``      the day after / before a day of the week
* ``unit``     simple unit conversions (m->cm, km->m, hours->minutes, ...)
* ``parity``   even or odd ("14 is even.")

The chosen answer is always correct and concise, in one fixed template per
family. The rejected answer is, in roughly equal thirds (cycled per family):

* ``wrong``         an incorrect answer in the same concise template
                    (off-by-small number, wrong capital, swapped letters, ...)
* ``padded``        the correct answer buried among 2-4 rambling filler
                    sentences drawn from a fixed pool
* ``wrong_padded``  an incorrect answer buried in the same kind of filler

Intended signal: SimPO compares the length-normalised (average per-token)
log-probability of chosen vs rejected. A tiny byte-level model trained for a
few hundred steps can learn (1) to prefer terse, template-like answers over
filler-laden ones (the easy, stylistic signal; rejected texts are several
times longer on average) and (2) to prefer correct over incorrect content
within the same template (the harder, semantic signal, isolated by the
``wrong`` kind, where chosen and rejected have the same style and nearly the
same length).
"""

import argparse
import json
import os
import random
from collections import Counter

MAX_PROMPT = 119
MAX_CHOSEN = 79
MAX_REJECTED = 399

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Australia", "Canberra"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Peru", "Lima"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Belgium", "Brussels"),
]

WORDS = [
    "apple", "stone", "river", "cloud", "green", "table", "house", "light",
    "bread", "chair", "water", "music", "plant", "tiger", "horse", "mouse",
    "candle", "garden", "silver", "window", "pencil", "rabbit", "orange",
    "forest", "bridge", "planet", "yellow", "winter", "summer", "basket",
    "cat", "dog", "sun", "cup", "pen", "box", "hat", "map", "egg", "fox",
    "bird", "fish", "lamp", "door", "tree", "book", "rain", "snow", "moon",
    "star", "ship", "coin", "frog", "leaf", "wolf", "king", "bell", "milk",
    "sand", "wind", "rocket", "jacket", "button", "carpet", "kitten",
    "monkey", "pocket", "spider", "tunnel", "violin",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
        "Sunday"]

# (from-unit plural, to-unit plural, factor, small range of values)
UNITS = [
    ("meters", "centimeters", 100, (1, 30)),
    ("kilometers", "meters", 1000, (1, 20)),
    ("hours", "minutes", 60, (1, 24)),
    ("minutes", "seconds", 60, (1, 30)),
    ("kilograms", "grams", 1000, (1, 20)),
    ("days", "hours", 24, (1, 14)),
    ("feet", "inches", 12, (1, 20)),
]

FILLERS = [
    "Well, let me think about this for a moment.",
    "That is a really interesting question, and there are many ways to look at it.",
    "Before I answer, it is worth saying that questions like this come up a lot.",
    "Hmm, I want to be careful here and consider everything.",
    "There are a few different angles we could take on this one.",
    "Let me walk through my reasoning slowly, step by step.",
    "People often get confused about this, so it deserves some thought.",
    "I have been asked something like this before, and it always makes me pause.",
    "To be honest, I am not completely sure, but here is what I think.",
    "It is important to take our time and not rush to a conclusion.",
    "Okay, so, this is the kind of thing that seems simple at first.",
    "Anyway, that is just my general feeling about it.",
    "I hope that helps, although there is always more one could say.",
    "Of course, everyone might see it a little differently.",
    "So, putting all of that together, we can finally say something.",
    "Let me know if you would like me to go over it again in more detail.",
    "Interesting, really, when you stop and think about it.",
    "Generally speaking, it depends on how you look at the problem.",
    "First, let us remind ourselves what the question is actually asking.",
    "I will try my best to give a good answer to this.",
]

KINDS = ["wrong", "padded", "wrong_padded"]


def _off_by_small(rng, n, lo=0):
    """A nearby integer != n, not below lo."""
    while True:
        cand = n + rng.choice([-3, -2, -1, 1, 2, 3])
        if cand != n and cand >= lo:
            return cand


def _swap_adjacent(rng, s):
    """Swap two adjacent differing characters of s (s must have one)."""
    idx = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
    i = rng.choice(idx)
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]


# Each family returns (prompt, chosen, wrong_answer_sentence).

def fam_add(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    p = rng.choice([
        "What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.",
        "What is the sum of {a} and {b}?", "Please calculate {a} + {b}.",
    ]).format(a=a, b=b)
    return p, "%d + %d = %d." % (a, b, a + b), \
        "%d + %d = %d." % (a, b, _off_by_small(rng, a + b))


def fam_sub(rng):
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    p = rng.choice([
        "What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?",
        "Take {b} away from {a}. What is left?",
        "What is the difference between {a} and {b}?",
    ]).format(a=a, b=b)
    return p, "%d - %d = %d." % (a, b, a - b), \
        "%d - %d = %d." % (a, b, _off_by_small(rng, a - b))


def fam_mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    p = rng.choice([
        "What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
        "What is the product of {a} and {b}?", "Compute {a} multiplied by {b}.",
    ]).format(a=a, b=b)
    return p, "%d * %d = %d." % (a, b, a * b), \
        "%d * %d = %d." % (a, b, _off_by_small(rng, a * b))


def fam_larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    p = rng.choice([
        "Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
        "Of {a} and {b}, which is greater?", "Is {a} or {b} the larger number?",
    ]).format(a=a, b=b)
    hi, lo = max(a, b), min(a, b)
    return p, "%d is larger than %d." % (hi, lo), \
        "%d is larger than %d." % (lo, hi)


def fam_capital(rng):
    i = rng.randrange(len(CAPITALS))
    country, cap = CAPITALS[i]
    p = rng.choice([
        "What is the capital of {c}?", "Name the capital city of {c}.",
        "Which city is the capital of {c}?", "What city serves as the capital of {c}?",
        "Tell me the capital of {c}.",
    ]).format(c=country)
    j = rng.choice([k for k in range(len(CAPITALS)) if k != i])
    return p, "The capital of %s is %s." % (country, cap), \
        "The capital of %s is %s." % (country, CAPITALS[j][1])


def fam_reverse(rng):
    w = rng.choice(WORDS)
    p = rng.choice([
        "Reverse the word '{w}'.", "What is '{w}' spelled backwards?",
        "Write the word '{w}' in reverse order.",
    ]).format(w=w)
    r = w[::-1]
    bad = rng.choice([w, _swap_adjacent(rng, r)])
    return p, "'%s' reversed is '%s'." % (w, r), "'%s' reversed is '%s'." % (w, bad)


def fam_spell(rng):
    w = rng.choice(WORDS)
    p = rng.choice([
        "Spell the word '{w}' letter by letter.", "How do you spell '{w}'?",
        "Spell out '{w}' with hyphens between the letters.",
    ]).format(w=w)
    if rng.random() < 0.5:
        bad = _swap_adjacent(rng, w)
    else:
        k = rng.randrange(len(w))
        bad = w[:k] + w[k + 1:]
    return p, "'%s' is spelled %s." % (w, "-".join(w)), \
        "'%s' is spelled %s." % (w, "-".join(bad))


def fam_count(rng):
    w = rng.choice(WORDS)
    p = rng.choice([
        "How many letters are in the word '{w}'?", "Count the letters in '{w}'.",
        "How long is the word '{w}' in letters?",
    ]).format(w=w)
    return p, "'%s' has %d letters." % (w, len(w)), \
        "'%s' has %d letters." % (w, _off_by_small(rng, len(w), lo=1))


def fam_day(rng):
    i = rng.randrange(7)
    d = DAYS[i]
    if rng.random() < 0.5:
        p = rng.choice([
            "What day comes after {d}?", "Which day of the week follows {d}?",
            "If today is {d}, what day is tomorrow?", "What is the day after {d}?",
            "Name the day that follows {d}.",
        ]).format(d=d)
        ans, rel = DAYS[(i + 1) % 7], "after"
    else:
        p = rng.choice([
            "What day comes before {d}?", "If today is {d}, what day was yesterday?",
            "What is the day before {d}?", "Which day of the week precedes {d}?",
            "Name the day that comes just before {d}.",
        ]).format(d=d)
        ans, rel = DAYS[(i - 1) % 7], "before"
    bad = rng.choice([x for x in DAYS if x not in (ans, d)])
    return p, "The day %s %s is %s." % (rel, d, ans), \
        "The day %s %s is %s." % (rel, d, bad)


def fam_unit(rng):
    src, dst, f, (lo, hi) = rng.choice(UNITS)
    n = rng.randint(lo, hi)
    p = rng.choice([
        "How many {dst} are in {n} {src}?", "Convert {n} {src} to {dst}.",
        "What is {n} {src} in {dst}?",
    ]).format(n=n, src=src, dst=dst)
    good = n * f
    if rng.random() < 0.5:
        bad = n * rng.choice([x for x in (10, 12, 24, 60, 100, 1000) if x != f])
    else:
        bad = good + rng.choice([-1, 1]) * rng.choice([1, 2, 5, 10])
    if bad == good or bad <= 0:
        bad = good + f
    return p, "%d %s = %d %s." % (n, src, good, dst), \
        "%d %s = %d %s." % (n, src, bad, dst)


def fam_parity(rng):
    n = rng.randint(1, 999)
    p = rng.choice([
        "Is {n} even or odd?", "Is the number {n} odd or even?",
        "Tell me whether {n} is even or odd.",
    ]).format(n=n)
    good = "even" if n % 2 == 0 else "odd"
    bad = "odd" if good == "even" else "even"
    return p, "%d is %s." % (n, good), "%d is %s." % (n, bad)


FAMILIES = [
    ("add", fam_add), ("sub", fam_sub), ("mul", fam_mul),
    ("larger", fam_larger), ("capital", fam_capital), ("reverse", fam_reverse),
    ("spell", fam_spell), ("count", fam_count), ("day", fam_day),
    ("unit", fam_unit), ("parity", fam_parity),
]


def pad(rng, answer):
    """Bury answer among 2-4 filler sentences before and 0-1 after."""
    while True:
        k_before = rng.randint(2, 4)
        k_after = rng.randint(0, 1)
        fill = rng.sample(FILLERS, k_before + k_after)
        text = " ".join(fill[:k_before] + [answer] + fill[k_before:])
        if len(text) <= MAX_REJECTED:
            return text


def generate(seed, rows):
    rng = random.Random(seed)
    seen = set()
    out = []
    fam_counts = Counter()
    for i in range(rows):
        # Round-robin over families; fall through to the next family if one
        # runs out of fresh prompts.
        for shift in range(len(FAMILIES)):
            name, fn = FAMILIES[(i + shift) % len(FAMILIES)]
            for _ in range(500):
                prompt, chosen, wrong = fn(rng)
                if prompt not in seen:
                    break
            else:
                continue
            break
        else:
            raise RuntimeError("ran out of unique prompts")
        seen.add(prompt)
        kind = KINDS[fam_counts[name] % len(KINDS)]
        fam_counts[name] += 1
        if kind == "wrong":
            rejected = wrong
        elif kind == "padded":
            rejected = pad(rng, chosen)
        else:
            rejected = pad(rng, wrong)
        out.append((name, kind, {"prompt": prompt, "chosen": chosen,
                                 "rejected": rejected}))
    rng.shuffle(out)
    return out


def check(row):
    assert set(row) == {"prompt", "chosen", "rejected"}
    for k, v in row.items():
        assert isinstance(v, str) and v and v.isascii(), (k, v)
    assert row["chosen"] != row["rejected"], row
    assert len(row["prompt"]) <= MAX_PROMPT, row
    assert len(row["chosen"]) <= MAX_CHOSEN, row
    assert len(row["rejected"]) <= MAX_REJECTED, row


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--out", default=os.path.join(here, "preferences.jsonl"))
    args = ap.parse_args()

    rows = generate(args.seed, args.rows)
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        for _, _, row in rows:
            check(row)
            f.write(json.dumps(row, ensure_ascii=True) + "\n")

    fams = Counter(n for n, _, _ in rows)
    kinds = Counter(k for _, k, _ in rows)
    n = len(rows)
    mc = sum(len(r["chosen"]) for _, _, r in rows) / n
    mr = sum(len(r["rejected"]) for _, _, r in rows) / n
    print("wrote %d rows to %s (seed %d)" % (n, args.out, args.seed))
    print("rows per family: " + ", ".join(
        "%s=%d" % (name, fams[name]) for name, _ in FAMILIES))
    print("rows per rejection kind: " + ", ".join(
        "%s=%d" % (k, kinds[k]) for k in KINDS))
    print("mean chars: chosen=%.1f rejected=%.1f" % (mc, mr))
    for k in KINDS:
        rs = [r for _, kk, r in rows if kk == k]
        print("  %-12s chosen=%.1f rejected=%.1f" % (
            k, sum(len(r["chosen"]) for r in rs) / len(rs),
            sum(len(r["rejected"]) for r in rs) / len(rs)))


if __name__ == "__main__":
    main()
