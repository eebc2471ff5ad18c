"""Token streams identical to inference: one-pass tokenization of the rendered
conversation, the BOS policy, the end-of-turn token, and special-token text kept as text.

The ids of ``prompt + completion`` are the tokenization of the whole rendered
conversation in one pass, as ``tokenizer.apply_chat_template(conversation,
tokenize=True)`` gives them to an inference stack; the prompt / completion boundary
comes from the rendering itself (the prompt rendered with ``add_generation_prompt=True``
must be a text prefix of the full rendering, and its ids a prefix of the full ids;
where the tokenizer merges a token across that boundary, the boundary is placed by
character offsets and the row is counted under ``BOUNDARY_MERGED``). Tokenizing the
completion on its own instead gives sentencepiece tokenizers a spurious word-start
token (``▁Use`` for ``Use``) on every completion that follows a newline.

Two deliberate differences from ``apply_chat_template``, both stated in the contract:
a BOS is added where the template writes none and the model expects one
(``data.add_bos``), and whitespace the template writes after the end-of-turn token
(ChatML's ``<|im_end|>\\n``) is not part of the completion: generation stops at the
end-of-turn token (``stop_ids``), so the model never produces it.

Special-token strings inside message contents (``<|im_end|>`` typed by a user) are
tokenized as text by default: the rows are tokenized once as usual, and any control
id that lies inside a content span is re-tokenized as text (``split_special_tokens``)
over the smallest span on which both tokenizations agree on their token boundaries.
Such rows are counted under ``SPECIAL_TOKEN_TEXT``.
"""

from __future__ import annotations

import re

from simpo_ray.sources import RowError

TOKENIZATION = "tokenization"  # the same category as rows.TOKENIZATION (rows imports it from here)
# Counted, never fatal: the row trains, and data inspect says how many did what.
BOUNDARY_MERGED = "boundary merged"
SPECIAL_TOKEN_TEXT = "special_token_text"
ADD_BOS = ("auto", "always", "never")
_PROBE = [{"role": "user", "content": "Hi"}]


class Streams:
    """A tokenizer with the policy applied: built once per tokenizer (``streams_for``)."""

    def __init__(self, tokenizer, add_bos: str = "auto", allow_special_tokens_in_text: bool = False):
        if add_bos not in ADD_BOS:
            raise ValueError(f"add_bos must be one of {ADD_BOS}, got {add_bos!r}")
        tok = self.tok = tokenizer
        self.policy, self.allow_special = add_bos, allow_special_tokens_in_text
        self.bos_id = getattr(tok, "bos_token_id", None)
        self.eos_id = getattr(tok, "eos_token_id", None)
        if add_bos == "always" and self.bos_id is None:
            raise ValueError("data.add_bos is 'always' but the tokenizer has no BOS token")
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        self.control_ids = {int(i) for i in getattr(tok, "all_special_ids", [])} | {
            int(i) for i, t in added.items() if getattr(t, "special", False)}
        control_text = {t.content for i, t in added.items() if int(i) in self.control_ids} | set(
            getattr(tok, "all_special_tokens", []))
        self.control_re = re.compile("|".join(map(re.escape, sorted(control_text)))) if control_text else None
        # The tokenizer's own word on BOS: does plain encoding put one in front?
        try:
            plain = tok("a")["input_ids"]
        except Exception:
            plain = []
        self.expects_bos = self.bos_id is not None and bool(plain) and plain[0] == self.bos_id
        self.add_bos = self.bos_id is not None and (add_bos == "always" or (add_bos == "auto" and self.expects_bos))
        self.max_token_chars = max((len(t) for t in _vocab(tok)), default=16) or 16
        self.template_bos, self.eot_id = False, self.eos_id
        try:  # what the template itself writes, from a one-turn probe
            ids = self.encode(_PROBE, ["Hi"])
            self.template_bos = self.bos_id is not None and ids["prompt_raw"][:1] == [self.bos_id]
            last = ids["completions"][0][-1]
            self.eot_id = last if last in self.control_ids else self.eos_id
        except RowError:  # a template that refuses the probe: its rows say why
            pass

    # ------------------------------------------------------------ rendering
    def render(self, turns: list[dict], completion: str | None = None) -> tuple[str, str]:
        """(prompt text with the generation prompt, full text with ``completion``;
        the full text is '' when ``completion`` is None)."""
        tok = self.tok
        if getattr(tok, "chat_template", None) is None:
            prompt = "\n\n".join(m["content"] for m in turns) + "\n\n"
            return prompt, "" if completion is None else prompt + completion + (tok.eos_token or "")
        try:  # templates refuse some conversations (e.g. a system turn): that row, not the run
            prompt = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            full = "" if completion is None else tok.apply_chat_template(
                turns + [{"role": "assistant", "content": completion}], tokenize=False)
        except Exception as e:
            raise RowError(f"chat template refused the conversation ({type(e).__name__}: {e})", TOKENIZATION) from None
        if completion is not None and not full.startswith(prompt):
            raise RowError("the chat template's prompt rendering (add_generation_prompt=True) is not a prefix of "
                           "its rendering of the full conversation: the completion cannot be located", TOKENIZATION)
        return prompt, full

    # ------------------------------------------------------------ tokenization
    def _ids(self, text: str, spans: list[tuple[int, int]], special: bool) -> tuple[list[int], list]:
        """One-pass ids of ``text`` (and offsets, None for slow tokenizers); when the
        contents hold ``special``-token text, control ids inside the content ``spans``
        are re-tokenized as text."""
        tok = self.tok
        fast = getattr(tok, "is_fast", False)
        try:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=fast)
        except Exception as e:  # a tokenizer error is this row's, never the pipeline's
            raise RowError(f"tokenizer refused the text ({type(e).__name__}: {e})", TOKENIZATION) from None
        ids, offs = list(enc["input_ids"]), (list(enc["offset_mapping"]) if fast else None)
        if not special or self.allow_special:
            return ids, offs
        if not fast:
            raise RowError("special-token text in a message, and this tokenizer has no offsets to keep it as "
                           "text (set data.allow_special_tokens_in_text=true to train it as control tokens)",
                           TOKENIZATION)
        split = tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        return _merge_as_text(ids, offs, list(split["input_ids"]), list(split["offset_mapping"]), spans,
                              self.control_ids), None

    def encode(self, turns: list[dict], completions: list[str]) -> dict:
        """Prompt ids shared by every completion, and each completion's ids (ending with
        the end-of-turn token). ``notes``: the non-fatal reasons that applied."""
        notes: set = set()
        special = self.control_re is not None and any(
            self.control_re.search(c) for c in [m["content"] for m in turns] + completions)
        if special:
            notes.add(SPECIAL_TOKEN_TEXT)
        fulls = [self.render(turns, c) for c in completions]
        prompt = fulls[0][0] if fulls else self.render(turns)[0]
        spans = _content_spans(prompt, [m["content"] for m in turns])
        p_ids, _ = self._ids(prompt, spans, special)
        cut, streams = len(p_ids), []
        for (_, full), c in zip(fulls, completions):
            f_spans = spans + _content_spans(full, [c], start=len(prompt))
            ids, offs = self._ids(full, f_spans, special)
            b = len(p_ids) if ids[:len(p_ids)] == p_ids else _boundary(offs, len(prompt))
            if b is None or b >= len(ids):
                raise RowError("the completion cannot be located in the tokenized conversation", TOKENIZATION)
            if b != len(p_ids):
                notes.add(BOUNDARY_MERGED)
            cut = min(cut, b)
            streams.append(ids)
        if any(s[:cut] != streams[0][:cut] for s in streams):
            raise RowError("the prompt tokenizes differently for chosen and rejected", TOKENIZATION)
        head = streams[0][:cut] if streams else p_ids
        return {"prompt_raw": head, "prompt_ids": self._with_bos(head),
                "completions": [self._close(s[cut:]) for s in streams], "notes": notes}

    def prompt_ids(self, turns: list[dict]) -> list[int]:
        """The prompt as training sees it (BOS policy applied), for generation."""
        return self.encode(turns, [])["prompt_ids"]

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_id
        if bos is not None and ids[:2] == [bos, bos]:
            raise RowError("double BOS after chat template", TOKENIZATION)
        return [bos] + ids if self.add_bos and ids[:1] != [bos] else ids

    def _close(self, ids: list[int]) -> list[int]:
        """Whitespace after the last control token is not the model's to produce; a
        template that writes no end-of-turn token gets the tokenizer's EOS."""
        last = max((i for i, t in enumerate(ids) if t in self.control_ids), default=None)
        if last is not None and not self.tok.decode(ids[last + 1:]).strip():
            return ids[:last + 1]
        return ids + [self.eos_id] if self.eos_id is not None and ids[-1:] != [self.eos_id] else ids

    def stop_ids(self) -> list[int]:
        """The tokens generation stops at: the end-of-turn token completions end with,
        and the tokenizer's EOS."""
        return sorted({t for t in (self.eot_id, self.eos_id) if t is not None})

    # ------------------------------------------------------------ truncation
    def char_cap(self, max_tokens: int) -> int:
        """Characters that always hold more than ``max_tokens`` tokens (no token covers
        more characters than its vocabulary string): text beyond it is cut before
        tokenizing, so an enormous row costs what a long one does."""
        return (max_tokens + 16) * self.max_token_chars

    def cap_turns(self, turns: list[dict], max_prompt_length: int) -> list[dict]:
        """Prompt turns with each content cut to its last ``char_cap`` characters
        (the end of a prompt is what truncation keeps)."""
        cap = self.char_cap(max_prompt_length)
        return [dict(m, content=m["content"][-cap:]) if len(m["content"]) > cap else m for m in turns]

    def truncate_prompt(self, ids: list[int], max_prompt_length: int) -> list[int]:
        """The end of a long prompt (the question is there), after its BOS if it has one."""
        if len(ids) <= max_prompt_length:
            return ids
        if self.bos_id is not None and ids[:1] == [self.bos_id] and max_prompt_length > 1:
            return ids[:1] + ids[len(ids) - max_prompt_length + 1:]
        return ids[-max_prompt_length:]

    def describe(self) -> dict:
        """The policy as applied, for ``data inspect``."""
        conv = lambda i: None if i is None else self.tok.convert_ids_to_tokens(int(i))  # noqa: E731
        return {"add_bos": self.policy, "bos": conv(self.bos_id), "template_writes_bos": self.template_bos,
                "tokenizer_expects_bos": self.expects_bos, "bos_added": bool(self.add_bos and not self.template_bos),
                "end_of_turn": conv(self.eot_id), "stop_tokens": [conv(i) for i in self.stop_ids()],
                "special_tokens_in_text": "control ids" if self.allow_special else "text"}


def streams_for(tokenizer, add_bos: str = "auto", allow_special_tokens_in_text: bool = False) -> Streams:
    """The ``Streams`` of a tokenizer and policy, built once and kept on the tokenizer."""
    cache = tokenizer.__dict__.setdefault("_simpo_streams", {})
    key = (add_bos, allow_special_tokens_in_text)
    if key not in cache:
        cache[key] = Streams(tokenizer, add_bos, allow_special_tokens_in_text)
    return cache[key]


def _vocab(tok) -> list[str]:
    try:
        return list(tok.get_vocab())
    except Exception:
        return []


def _content_spans(text: str, contents: list[str], start: int = 0) -> list[tuple[int, int]]:
    """Character spans of the message contents in the rendered ``text``, found in order
    (templates that trim contents are matched on the trimmed text)."""
    spans, pos = [], start
    for c in contents:
        for needle in (c, c.strip()):
            i = text.find(needle, pos) if needle else -1
            if i >= 0:
                spans.append((i, i + len(needle)))
                pos = i + len(needle)
                break
    return spans


def _boundary(offs, n_chars: int) -> int | None:
    """The first token reaching past the prompt's ``n_chars`` characters (it belongs
    to the completion); None without offsets."""
    if offs is None:
        return None
    return next((k for k, (_, e) in enumerate(offs) if e > n_chars), None)


def _merge_as_text(ids, offs, s_ids, s_offs, spans, control) -> list[int]:
    """``ids`` with every control id inside a content span replaced by the text
    tokenization ``s_ids`` of the smallest character region on which both token
    streams have boundaries (a fixpoint over the tokens overlapping it)."""
    def overlapping(o, lo, hi):
        return [k for k, (a, b) in enumerate(o) if (a < hi and b > lo) or (a == b and lo <= a < hi)]

    regions = []
    for k, t in enumerate(ids):
        a, b = offs[k]
        if t in control and any(sa <= a and b <= sb for sa, sb in spans):
            lo, hi = a, b
            while True:
                ks = [offs[j] for j in overlapping(offs, lo, hi)] + [s_offs[j] for j in overlapping(s_offs, lo, hi)]
                nlo, nhi = min([lo] + [x for x, _ in ks]), max([hi] + [y for _, y in ks])
                if (nlo, nhi) == (lo, hi):
                    break
                lo, hi = nlo, nhi
            if regions and lo <= regions[-1][1]:
                regions[-1] = (regions[-1][0], max(hi, regions[-1][1]))
            else:
                regions.append((lo, hi))
    out, k = [], 0
    for lo, hi in regions:
        inside = set(overlapping(offs, lo, hi))
        while k < len(ids) and k not in inside and offs[k][0] < lo:
            out.append(ids[k])
            k += 1
        text_ids = [s_ids[j] for j in overlapping(s_offs, lo, hi)]
        own = [j for j in inside if ids[j] in control and not any(sa <= offs[j][0] and offs[j][1] <= sb
                                                                  for sa, sb in spans)]
        if own or any(t in control for t in text_ids):
            raise RowError("special-token text in a message could not be separated from the template's own "
                           "control tokens", TOKENIZATION)
        out.extend(text_ids)
        while k < len(ids) and (k in inside or offs[k][0] < hi):
            k += 1
    out.extend(ids[k:])
    return out
