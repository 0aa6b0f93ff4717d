"""Calls a running Caduceus server with the official `openai` Python package: chat and legacy
completions, streaming and not. Exits non-zero on the first mismatch.

Usage: python openai-sdk-check.py BASE_URL MODEL
"""
import json
import sys

import httpx
from openai import OpenAI
from pydantic import BaseModel, Field


class Triage(BaseModel):
    """The triage flags an upstream service routes on (issue 20)."""
    urgent: bool
    reason: str = Field(max_length=12)
    see_doctor_within_hours: int = Field(ge=0, le=720)


BOOK_VISIT = {"type": "function", "function": {
    "name": "book_visit", "description": "Book a visit with the doctor",
    "parameters": {"type": "object", "properties": {
        "within_hours": {"type": "integer", "minimum": 1, "maximum": 72},
        "department": {"type": "string", "enum": ["general", "cardiology"]}},
        "required": ["within_hours", "department"], "additionalProperties": False}}}


def structured_and_tools(client: OpenAI, model: str) -> None:
    """`parse` with a Pydantic model, and a tool-call round trip, streamed and not."""
    messages = [{"role": "user", "content": "I have had chest pain since this morning."}]
    beta = getattr(client, "beta", None)
    parse = beta.chat.completions.parse if beta is not None and hasattr(beta, "chat") else client.chat.completions.parse
    parsed = parse(model=model, messages=messages, response_format=Triage, max_tokens=300,
                   temperature=0.7, seed=3)
    triage = parsed.choices[0].message.parsed
    assert isinstance(triage, Triage), parsed
    assert 0 <= triage.see_doctor_within_hours <= 720, triage

    first = client.chat.completions.create(model=model, messages=messages, tools=[BOOK_VISIT],
                                           tool_choice="required", max_tokens=200, temperature=0,
                                           parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", first
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "book_visit", call
    args = json.loads(call.function.arguments)
    assert 1 <= args["within_hours"] <= 72 and args["department"] in ("general", "cardiology"), args

    streamed_args, streamed_name, finish = "", None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=[BOOK_VISIT],
                                                tool_choice="required", max_tokens=200, temperature=0,
                                                parallel_tool_calls=False, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                streamed_name = tc.function.name or streamed_name
                streamed_args += tc.function.arguments or ""
    assert finish == "tool_calls" and streamed_name == "book_visit", (finish, streamed_name)
    assert streamed_args == call.function.arguments, (streamed_args, call.function.arguments)

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Booked for tomorrow 9:00."}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[BOOK_VISIT],
                                            max_tokens=8, temperature=0, tool_choice="none")
    assert answer.choices[0].message.content is not None, answer


def tokenize_and_logit_bias(client: OpenAI, base_url: str, model: str) -> None:
    """vLLM's `/tokenize` (outside `/v1`) finds a token's id; the SDK's `logit_bias` (a dict of
    id strings) then makes greedy decoding repeat that token."""
    root = base_url.rstrip("/").removesuffix("/v1")
    reply = httpx.post(f"{root}/tokenize", json={"model": model, "prompt": "Z"},
                       headers={"Authorization": "Bearer sk-sdk-check"}, timeout=30)
    assert reply.status_code == 200, reply.text
    forced = reply.json()["tokens"][-1]
    comp = client.completions.create(model=model, prompt="The patient", max_tokens=3, temperature=0,
                                     logprobs=1, logit_bias={str(forced): 100})
    tokens = comp.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1, tokens
    plain = client.completions.create(model=model, prompt="The patient", max_tokens=3,
                                      temperature=0, logprobs=1)
    assert plain.choices[0].logprobs.tokens != tokens, (plain.choices[0].logprobs.tokens, tokens)


def echo_and_prompt_logprobs(client: OpenAI, model: str) -> None:
    """The legacy scoring call (lm-evaluation-harness's loglikelihood): `echo` with `logprobs` and
    `max_tokens=0` returns the prompt alone with its tokens' logprobs (the very first without
    one); vLLM's `prompt_logprobs` (through `extra_body`) lists the same numbers by token id."""
    comp = client.completions.create(model=model, prompt="The patient has a fever", max_tokens=0,
                                     temperature=0, logprobs=1, echo=True,
                                     extra_body={"prompt_logprobs": 1})
    choice = comp.choices[0]
    lp = choice.logprobs
    n = comp.usage.prompt_tokens
    assert choice.text == "The patient has a fever" and comp.usage.completion_tokens == 0, comp
    assert len(lp.tokens) == n and lp.token_logprobs[0] is None, lp
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp.token_logprobs
    listed = choice.model_extra["prompt_logprobs"]
    assert len(listed) == n and listed[0] is None, listed
    for j in range(1, n):
        assert any(abs(e["logprob"] - lp.token_logprobs[j]) < 1e-6 for e in listed[j].values())


def vllm_options(client: OpenAI, base_url: str, model: str) -> None:
    """vLLM's request options through `extra_body`, and its `stop_reason` through the SDK's
    `model_extra`: an answer of letters only (`allowed_token_ids`, the ids `/tokenize` gives
    them), a stop string kept at the end of its text and named, then a chat answer that
    continues the assistant message the caller wrote."""
    root = base_url.rstrip("/").removesuffix("/v1")
    reply = httpx.post(f"{root}/tokenize", json={"model": model, "prompt": "abcdefgh"},
                       headers={"Authorization": "Bearer sk-sdk-check"}, timeout=30)
    assert reply.status_code == 200, reply.text
    letters = {"ignore_eos": True, "allowed_token_ids": reply.json()["tokens"][-8:]}
    plain = client.completions.create(model=model, prompt="The patient", max_tokens=12,
                                      temperature=0, extra_body=letters)
    text = plain.choices[0].text
    assert len(text) == 12 and set(text) <= set("abcdefgh"), text
    stop = text[4:6]
    at = text.find(stop)
    kept = client.completions.create(model=model, prompt="The patient", max_tokens=12,
                                     temperature=0, stop=[stop],
                                     extra_body={**letters, "include_stop_str_in_output": True})
    choice = kept.choices[0]
    assert choice.text == text[:at + 2] and choice.finish_reason == "stop", (choice, text)
    assert choice.model_extra["stop_reason"] == stop, choice
    messages = [{"role": "user", "content": "What should I do about a mild fever?"},
                {"role": "assistant", "content": "Dr. Lin here. First,"}]
    cont = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                          temperature=0,
                                          extra_body={"continue_final_message": True,
                                                      "add_generation_prompt": False})
    closed = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                            temperature=0)
    assert cont.usage.prompt_tokens < closed.usage.prompt_tokens, (cont.usage, closed.usage)


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key="sk-sdk-check", max_retries=0)

    models = client.models.list()
    assert any(m.id == model for m in models.data), models

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What should I do about a mild fever?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.object == "chat.completion", chat
    assert chat.choices[0].message.role == "assistant", chat
    assert chat.choices[0].finish_reason == "length", chat
    assert chat.usage.completion_tokens == 8, chat.usage

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What should I do about a mild fever?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    assert finish == "length" and usage.completion_tokens == 8, (finish, usage)

    comp = client.completions.create(
        model=model, prompt=["The patient", "A rash"], max_tokens=5, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert comp.object == "text_completion" and len(comp.choices) == 2, comp
    assert len(comp.choices[0].logprobs.tokens) == 5, comp.choices[0].logprobs

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The patient", max_tokens=5, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

    try:
        client.chat.completions.create(model="dr-nobody", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was accepted")
    except Exception as e:  # openai.NotFoundError
        assert getattr(e, "status_code", None) == 404, e
    structured_and_tools(client, model)
    tokenize_and_logit_bias(client, base_url, model)
    echo_and_prompt_logprobs(client, model)
    vllm_options(client, base_url, model)
    print("openai SDK check: 18 calls passed (models, chat, chat stream, completions, completions stream, "
          "404, parse with a Pydantic model, tool call, tool call stream, tool result round trip, "
          "tokenize, logit_bias and its unbiased twin, echo with prompt logprobs, a kept and named "
          "stop string and its plain twin, a continued assistant message and its closed twin)")


if __name__ == "__main__":
    main()
