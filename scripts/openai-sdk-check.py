"""Calls a running Caduceus server with the official `openai` Python package: chat and legacy
completions, streaming and not. Exits non-zero on the first mismatch.

Usage: python openai-sdk-check.py BASE_URL MODEL
"""
import sys

from openai import OpenAI


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
    print("openai SDK check: 6 calls passed (models, chat, chat stream, completions, completions stream, 404)")


if __name__ == "__main__":
    main()
