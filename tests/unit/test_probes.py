"""Generation probes, torch-free parts: what counts as a loop, an unfinished or empty
reply, the gen/ metrics, when a probe is due, and when alarm/generation fires."""

import pytest

from simpo_ray import probes
from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.metrics import format_progress
from simpo_ray.runplan import TrainState

STOP, PAD = 2, 0


def _reply(tokens):
    return probes.reply(tokens, [STOP], PAD, lambda t: "".join(chr(96 + x) if x > 2 else " " for x in t))


def test_a_reply_ends_at_the_first_stop_id_and_padding_is_not_length():
    r = _reply([5, 6, 7, STOP, 9, 9])
    assert (r["tokens"], r["finished"], r["empty"], r["text"]) == (3, True, False, "efg")
    r = _reply([5, 6, PAD, PAD])  # finished on another rank's clock: padding after the cap
    assert (r["tokens"], r["finished"]) == (2, False)
    assert _reply([STOP])["empty"] and _reply([1, 1, STOP])["empty"]  # whitespace only


def test_a_loop_is_a_4_gram_seen_3_times():
    assert not probes.has_loop([3, 4, 5, 6, 3, 4, 5, 6])  # twice
    assert probes.has_loop([3, 4, 5, 6] * 3)
    assert probes.has_loop([7] * 6)  # one token over and over: the same 4-gram 3 times
    assert not probes.has_loop([7] * 5 + [8])
    assert not probes.has_loop([1, 2, 3])


def test_summary_rates_and_medians():
    records = [_reply([5, 6, STOP]), _reply([5] * 10), _reply([STOP]), _reply([3, 4, 5, 6, 7, STOP])]
    m = probes.summarize(records)
    assert m["gen/length_median"] == 3.5 and m["gen/length_chars_median"] == 3.5
    assert m["gen/unfinished_rate"] == 0.25 and m["gen/repeat_rate"] == 0.25 and m["gen/empty_rate"] == 0.25
    assert set(m) == set(probes.GEN_KEYS)


def test_probes_are_due_at_step_0_the_end_and_their_cadence():
    cfg = RunConfig.from_dict({"eval": {"generate_every": 4}})
    assert [s for s in range(11) if probes.due(cfg, s, s == 10, False)] == [0, 4, 8, 10]
    with_eval = RunConfig.from_dict({})
    assert probes.due(with_eval, 3, False, True) and not probes.due(with_eval, 3, False, False)
    assert not probes.due(RunConfig.from_dict({"eval": {"generate_every": 0}}), 0, True, True)
    for bad in ({"generate_every": -1}, {"generate_prompts": 0}, {"alarm_rate_rise": 0}, {"alarm_length_factor": 1}):
        with pytest.raises(ConfigError, match="eval."):
            RunConfig.from_dict({"eval": bad})


def _gen(length, unfinished=0.0, repeat=0.0, empty=0.0):
    return {"gen/length_median": length, "gen/length_chars_median": 4.0 * length, "gen/unfinished_rate": unfinished,
            "gen/repeat_rate": repeat, "gen/empty_rate": empty}


@pytest.mark.parametrize("later,fires", [
    (_gen(20, unfinished=0.2), False), (_gen(20, unfinished=0.4), True), (_gen(20, repeat=0.3), True),
    (_gen(20, empty=0.26), True), (_gen(39), False), (_gen(41), True), (_gen(9), True), (_gen(11), False)])
def test_generation_alarm_compares_with_step_0(later, fires, capsys):
    e = RunConfig.from_dict({}).eval  # rise 0.25, factor 2
    first = dict(_gen(20, unfinished=0.1), step=0)
    state = probes.generation_alarm(first, TrainState(), e)
    assert first[probes.GENERATION_ALARM] is False and state.gen_start["gen/length_median"] == 20
    report = dict(later, step=5)
    state = probes.generation_alarm(report, state, e)
    assert report[probes.GENERATION_ALARM] is fires and state.gen_alarm_printed is fires
    assert ("generations changed since step 0" in capsys.readouterr().out) is fires
    again = dict(later, step=6)
    probes.generation_alarm(again, state, e)
    assert "generations changed" not in capsys.readouterr().out  # printed once
    assert probes.generation_alarm({"step": 7}, state, e) == state  # no probe in this report


def test_progress_line_shows_the_probe():
    line = format_progress(dict(_gen(12, unfinished=0.5), step=0, **{"eval/rewards/accuracies": 0.5,
                                                                       "alarm/generation": False}), 10)
    assert "gen len 12 unfinished 0.50 repeat 0.00 empty 0.00" in line and "ALARM" not in line
