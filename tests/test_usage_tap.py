"""The SSE usage watcher on its own (issue 11, item 1): every way an upstream can cut a stream
into chunks gives the same usage, and, when the gateway asked for usage, the same bytes minus
exactly the usage-only event. Pure functions: the socket tests are in test_usage.py."""

from __future__ import annotations

import json
from itertools import combinations, pairwise

import pytest

from gateway.proxy.usage import HOLD, TAIL, Usage, UsageTap, from_json, from_tail


def event(payload: object, end: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(payload).encode() + end


def chunk(i: int, **extra: object) -> dict[str, object]:
    delta = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [delta], **extra}


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
BEFORE = event(chunk(0)) + event(chunk(1)) + event(chunk(2))
USAGE_EVENT = event({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"
STREAM = BEFORE + USAGE_EVENT + DONE


def run(chunks: list[bytes], hide: bool) -> tuple[bytes, Usage, bytes]:
    """(what the client gets, the usage seen, what is still held) for these upstream chunks."""
    usage = Usage(hide_event=hide)
    tap = UsageTap(usage)
    out = b"".join(tap.feed(c) if tap.needs(c) else c for c in chunks)
    return out, usage, tap.pending


def splits(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = (0, *cuts, len(data))
    return [data[a:b] for a, b in pairwise(bounds)]


@pytest.mark.parametrize("hide", [False, True])
def test_every_single_cut_gives_the_same_usage_and_bytes(hide: bool) -> None:
    expected = BEFORE + DONE if hide else STREAM
    for cut in range(1, len(STREAM)):
        out, usage, pending = run(splits(STREAM, (cut,)), hide)
        assert out == expected, cut
        assert (usage.prompt, usage.completion) == (11, 3), cut
        assert pending == b""


def test_every_pair_of_cuts_around_the_usage_event_hides_exactly_it() -> None:
    start = len(BEFORE) - 20
    for a, b in combinations(range(start, len(STREAM)), 2):
        out, usage, _ = run(splits(STREAM, (a, b)), hide=True)
        assert out == BEFORE + DONE, (a, b)
        assert usage.completion == 3


def test_one_byte_chunks_are_counted_and_hidden() -> None:
    out, usage, _ = run([STREAM[i : i + 1] for i in range(len(STREAM))], hide=True)
    assert out == BEFORE + DONE and usage.prompt == 11


@pytest.mark.parametrize("end", [b"\r\n\r\n", b"\r\r", b"\n\n"])
def test_every_line_end_style_is_an_event_boundary(end: bytes) -> None:
    before = event(chunk(0), end) + event(chunk(1), end)
    usage_event = event({"choices": [], "usage": USAGE}, end)
    stream = before + usage_event + b"data: [DONE]" + end
    out, usage, _ = run(splits(stream, (len(before) + 9,)), hide=True)
    assert out == before + b"data: [DONE]" + end
    assert usage.completion == 3


def test_usage_in_an_event_with_choices_is_counted_and_never_hidden() -> None:
    # vLLM's continuous_usage_stats: every chunk carries the running total
    stream = b"".join(
        event(chunk(i, usage={"prompt_tokens": 5, "completion_tokens": i + 1})) for i in range(4)
    )
    out, usage, _ = run(splits(stream, (17, 90)), hide=True)
    assert out == stream
    assert (usage.prompt, usage.completion) == (5, 4)  # the last one, not a sum


def test_null_usage_and_the_word_usage_in_content_are_not_usage() -> None:
    stream = (
        event(chunk(0, usage=None))
        + event({"choices": [{"delta": {"content": '"usage": {"prompt_tokens": 9}'}}]})
        + event({"choices": [{"delta": {"content": "usage"}}]})
        + DONE
    )
    out, usage, _ = run([stream], hide=True)
    assert out == stream
    assert not usage.known


def test_a_client_that_asked_for_usage_gets_its_event_untouched() -> None:
    out, usage, _ = run(splits(STREAM, (len(BEFORE) + 30,)), hide=False)
    assert out == STREAM and usage.known


def test_an_unfinished_event_is_held_back_only_when_hiding() -> None:
    cut = len(BEFORE) + 10  # inside the usage event; the upstream then stops
    out, usage, pending = run([STREAM[:cut]], hide=True)
    assert out == BEFORE and pending == STREAM[len(BEFORE) : cut] and not usage.known
    out, _, _ = run([STREAM[:cut]], hide=False)
    assert out == STREAM[:cut]


def test_a_long_unfinished_event_is_not_held_without_bound() -> None:
    big = b"data: " + b"x" * (HOLD + 10)
    out, _, pending = run([BEFORE, big, b"\n\n", DONE], hide=True)
    assert out == BEFORE + big + b"\n\n" + DONE
    assert pending == b""


def test_whole_json_and_tail_usage() -> None:
    completion = {"id": "x", "choices": [{"message": {"content": "usage"}}], "usage": USAGE}
    usage = Usage()
    from_json(json.dumps(completion).encode(), usage)
    assert (usage.prompt, usage.completion) == (11, 3)
    usage = Usage()
    from_tail(b'xx": "abc"}}], "usage": {"prompt_tokens": 2, "completion_tokens": 7}}', usage)
    assert (usage.prompt, usage.completion) == (2, 7)
    usage = Usage()
    from_json(b'{"usage": {"prompt_tokens": true, "completion_tokens": -1}}', usage)
    assert not usage.known
    responses_api = {"type": "response.completed", "response": {"usage": {"input_tokens": 4}}}
    usage = Usage()
    from_json(json.dumps(responses_api).encode(), usage)
    assert usage.prompt == 4 and usage.completion is None


def test_usage_at_the_end_of_a_large_coalesced_chunk_is_found_and_hidden() -> None:
    many = b"".join(event(chunk(i)) for i in range(400))  # one read of a fast upstream
    assert len(many) > 20 * TAIL
    out, usage, _ = run([many + USAGE_EVENT + DONE], hide=True)
    assert out == many + DONE and usage.completion == 3
    out, usage, _ = run([many + USAGE_EVENT[:40], USAGE_EVENT[40:] + DONE], hide=True)
    assert out == many + DONE and usage.completion == 3


@pytest.mark.parametrize("hide", [False, True])
def test_pieces_of_large_events_pass_at_once_and_nothing_is_kept(hide: bool) -> None:
    big = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    usage = Usage(hide_event=hide)
    tap = UsageTap(usage)
    for _ in range(3):
        for k in range(4):
            piece = big[k * 16384 : (k + 1) * 16384]
            assert (tap.feed(piece) if tap.needs(piece) else piece) == piece
            assert tap.pending == b""  # never copied, never held back
    out = tap.feed(USAGE_EVENT + DONE)
    assert out == (DONE if hide else USAGE_EVENT + DONE) and usage.prompt == 11


@pytest.mark.parametrize("size", [300, 520, 700, 900, 1000, 1100, 3000])
@pytest.mark.parametrize("hide", [False, True])
def test_a_usage_chunk_of_any_size_is_found(size: int, hide: bool) -> None:
    # a usage event padded (say, with a long id) to ``size`` bytes, sent as one chunk
    pad = "x" * max(0, size - len(USAGE_EVENT))
    usage_event = event({"id": pad, "choices": [], "usage": USAGE})
    out, usage, _ = run([BEFORE, usage_event, DONE], hide)
    assert usage.completion == 3, len(usage_event)
    assert out == (BEFORE + DONE if hide else BEFORE + usage_event + DONE)


def responses_completed(text_words: int) -> bytes:
    """The Responses API's last event: the whole response, its output included, then usage."""
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "w " * text_words}]}
        ],
        # vLLM's order: the echoed tools (a client's schema may name a property "usage") come
        # after the output, just before the usage
        "tools": [{"type": "function", "parameters": {"properties": {"usage": {"x": 1}}}}],
        "usage": {"input_tokens": 11, "output_tokens": text_words, "total_tokens": 11 + text_words},
        "user": None,
        "metadata": {},
    }
    data = json.dumps({"type": "response.completed", "response": response}).encode()
    return b"event: response.completed\ndata: " + data + b"\n\n"


@pytest.mark.parametrize("hide", [False, True])
def test_a_long_final_event_in_pieces_is_counted_and_passes_untouched(hide: bool) -> None:
    # over HOLD bytes, so its start is gone when its end (and usage) arrives: the usage object
    # is read alone (an empty "usage" in the echoed tools is no count), and nothing is hidden
    created = (
        b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
    )
    last = responses_completed(6000)
    assert len(last) > 2 * HOLD
    # every cut before the usage object's key: the piece with the event's end holds the whole
    # object (a cut after it, in the last ~100 bytes, is missed: catching it would cost every
    # piece of every long event a search)
    at = last.rindex(b'"usage"')
    for cut in [*range(1, at, 97), at - 1, at]:
        out, usage, held = run([created, last[:cut], last[cut:]], hide)
        assert (usage.prompt, usage.completion) == (11, 6000), cut
        assert out == created + last and held == b""
    # the blank line at its end split "\n" | "\n": counted, and the lone "\n" ends it cleanly
    out, usage, held = run([created, last[:-1], last[-1:]], hide)
    assert (usage.prompt, usage.completion) == (11, 6000)
    tap_end = UsageTap(Usage(hide_event=hide))
    tap_end.pending = held
    rest = tap_end.finish(out)  # counting: sent already; hiding: the held "\n" goes out
    assert rest is not None and out + rest == created + last
    # in three pieces too
    out, usage, _ = run([created, last[:5000], last[5000:at], last[at:]], hide)
    assert (usage.prompt, usage.completion) == (11, 6000) and out == created + last
