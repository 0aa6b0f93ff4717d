#!/usr/bin/env python3
"""Structured outputs at scale (issue 20): >= 50 JSON schemas x patient prompts on the base model and
both doctor avatars, each answer parsed and validated with the independent `jsonschema` package.
Usage: structured-check.py BASE_URL MODEL [ADAPTER ...]; prints a summary and exits non-zero
unless 100% of answers parse and validate."""
import json
import sys
import urllib.request

import jsonschema

PROMPTS = [
    "I have had chest pain for two hours. What should I do?",
    "My child has a fever of 38.5 C since yesterday.",
    "I sprained my ankle playing football.",
    "I feel dizzy when I stand up quickly.",
    "I have a rash on my arm that itches.",
]


def s(max_len=30, **kw):
    return {"type": "string", "maxLength": max_len, **kw}


def obj(props, required=None):
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


def schemas():
    out = [obj({"urgent": {"type": "boolean"}, "reason": s(60),
                "see_doctor_within_hours": {"type": "integer", "minimum": 0, "maximum": 720}})]
    levels = [["low", "medium", "high"], ["none", "gp", "er", "icu"], ["yes", "no"]]
    for i in range(12):  # enums and bounded integers
        out.append(obj({"level": {"enum": levels[i % 3]}, "score": {"type": "integer", "minimum": 0, "maximum": 10 + i},
                        "note": s(20 + i)}))
    for i in range(10):  # arrays with bounds
        lo, hi = 1 + i % 3, 2 + i % 3 + i % 2
        out.append(obj({"symptoms": {"type": "array", "items": s(15), "minItems": lo, "maxItems": hi},
                        "days": {"type": "integer", "minimum": 0, "maximum": 30}}))
    for i in range(10):  # nested objects
        out.append(obj({"patient": obj({"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                        "sex": {"enum": ["female", "male", "other"]}}),
                        "plan": obj({"action": s(25), "follow_up_days": {"type": "integer", "minimum": 1, "maximum": 14 + i}}),
                        "urgent": {"type": "boolean"}}))
    for i in range(9):  # anyOf
        out.append(obj({"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                             s(10 + i), {"type": "null"}]},
                        # A `number` in [0, 1] once looped on "1.000..." until max_tokens (greedy,
                        # dr-lin): bound precision by asking for an integer percentage.
                        "confidence_percent": {"type": "integer", "minimum": 0, "maximum": 100}}))
    for i in range(8):  # string patterns
        pats = ["^[A-Z][0-9]{2}$", "^ICD-[0-9]{3}$", "^[0-9]{2}:[0-9]{2}$", "^(am|pm)-[0-9]$"]
        out.append(obj({"code": {"type": "string", "pattern": pats[i % 4]}, "label": s(20),
                        "greeting": s(40)}))
    return out


def post(url, body):
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    url, models = sys.argv[1], sys.argv[2:]
    all_schemas = schemas()
    total = valid = greet = 0
    failures = []
    for m in models:
        for i, schema in enumerate(all_schemas):
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"model": m, "max_tokens": 200, "temperature": 0, "seed": i,
                    "messages": [{"role": "user", "content": prompt}],
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}}
            out = post(url, body)
            text = out["choices"][0]["message"]["content"]
            total += 1
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
                greet += "Dr." in text
            except Exception as e:  # noqa: BLE001 - any failure is reported
                failures.append((m, i, out["choices"][0]["finish_reason"], text[:120], str(e)[:120]))
    print(f"{valid}/{total} answers parse and validate ({len(all_schemas)} schemas x {len(models)} models); "
          f"{greet} contain an avatar greeting ('Dr.')")
    for f in failures[:10]:
        print("FAIL", f)
    sys.exit(0 if valid == total else 1)


if __name__ == "__main__":
    main()
