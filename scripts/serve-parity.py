#!/usr/bin/env python3
"""`caduceus serve` on the GPU engine against `caduceus serve` on the CPU, over HTTP.

  serve-parity.py --bin CADUCEUS --tiny DIR [--device cuda:0] [--dtype f16] [--emulated]
                  [--out summary.json]

Starts the binary twice on the shared tiny Llama (DIR: its `model/`, `adapters/` and
`expected.json`) with both PEFT doctors in `adapters.dir`: on the CPU (f32 weights and adapter
slots, the reference) and on DEVICE (DTYPE weights and slots, two device slots, decode graphs up
to batch 4, the KV pool from the memory plan). Nine greedy completions (the base model and both
doctors, three prompts each, 16 tokens, logprobs) go in at once, so the device's batches mix
adapters. Required (exit status 1 otherwise):
  * each completion's text and tokens equal the CPU server's, its logprobs within 0.05 (f16/bf16
    against f32), except after a near-tie: where the CPU server's two best tokens are within
    0.05 of each other and the device picked the other one (f16 rounding, which depends on how
    the requests happened to be batched, decides such a tie: the tiny Llama's base model has one
    of 0.0003 on its third prompt), the continuations part and are compared up to there; the
    row says where (`tie_at`, `cpu_margin`);
  * the GPU server's start log shows the memory plan, the decode graphs and the adapter slots;
    `/metrics` carries the logged `num_gpu_blocks` in `caduceus_cache_config_info` and 48
    generated tokens for each doctor;
  * `echo` with `logprobs` (prompt logprobs, an evaluation's scoring call) for each model and
    prompt, sent at once: the prompt tokens' logprobs equal the CPU server's within 0.05;
  * both servers drain and exit 0 on SIGTERM.
`--emulated` sets CAD_TEST_EMULATED_GPU=1: a test build (feature gpu-emu) then runs DEVICE in the
kernels' host emulation (runtime/tests/serve_gpu_emulated.rs, in CI); without it DEVICE is the
real GPU (`scripts/gpu-check serve`). Standard library only.
"""
import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

LOGPROB_TOL = 0.05
MAX_TOKENS = 16
MODELS = ["model", "doctor-a", "doctor-b"]
START_LINES = [
    "weights converted and resident on the GPU",
    "GPU kernels",
    "decode graphs captured",
    "KV cache pool (GPU memory plan)",
    "adapter slots allocated",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, path, body=None, timeout=300):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data, {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, args, work, name, device, dtype, adapter_dtype, emulated):
        self.port = free_port()
        self.log = os.path.join(work, f"{name}.log")
        config = os.path.join(work, f"{name}.toml")
        with open(config, "w") as f:
            f.write(
                f"""
[model]
path = "{os.path.join(args.tiny, 'model')}"
device = "{device}"
dtype = "{dtype}"
max_model_len = 256
# The emulated device reports 1 GiB; on a GPU 5% is still thousands of tiny blocks.
gpu_memory_utilization = 0.05
cuda_graph_max_batch = 4

[adapters]
dir = "{os.path.join(args.tiny, 'adapters')}"
dtype = "{adapter_dtype}"
max_loras = 2

[server]
host = "127.0.0.1"
port = {self.port}
"""
            )
        env = dict(os.environ, NO_COLOR="1")
        if emulated:
            env["CAD_TEST_EMULATED_GPU"] = "1"
        self.proc = subprocess.Popen(
            [args.bin, "--threads", "1", "--log-level", "info", "serve", "--config", config],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
            env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the {name} server exited ({self.proc.returncode}):\n{self.log_text()}")
            try:
                if http(self.port, "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        sys.exit(f"the {name} server did not become healthy:\n{self.log_text()}")

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def complete_all(self, prompts):
        def one(job):
            model, prompt = job
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 2,
            }
            status, text = http(self.port, "/v1/completions", body)
            if status != 200:
                sys.exit(f"{model}: HTTP {status}: {text}")
            return json.loads(text)

        jobs = [(m, p) for m in MODELS for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            return list(ex.map(one, jobs))

    def echo_all(self, prompts):
        """`echo` with `logprobs` (prompt logprobs) for every model and prompt at once: each
        prompt's (tokens, token_logprobs), or the HTTP status and error when refused."""

        def one(job):
            model, prompt = job
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "logprobs": 1,
                    "echo": True, "temperature": 0}
            status, text = http(self.port, "/v1/completions", body)
            reply = json.loads(text)
            if status != 200:
                return status, reply.get("error", {}).get("param")
            lp = reply["choices"][0]["logprobs"]
            n = len(prompt)
            return lp["tokens"][:n], lp["token_logprobs"][:n]

        jobs = [(m, p) for m in MODELS for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            return list(ex.map(one, jobs))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "timeout"


def tie_margin(got_tokens, want_logprobs, at):
    """How far apart the CPU server put its own token and the device's at the first position where
    they differ (`at`), when that is a near-tie (at most LOGPROB_TOL, the device's token among
    the CPU's top logprobs); None when they never differ or it is no tie."""
    if at >= min(len(got_tokens), len(want_logprobs["tokens"])):
        return None
    top = want_logprobs["top_logprobs"][at] or {}
    theirs = top.get(got_tokens[at])
    if theirs is None:
        return None
    margin = want_logprobs["token_logprobs"][at] - theirs
    return margin if 0.0 <= margin <= LOGPROB_TOL else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--emulated", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    with open(os.path.join(args.tiny, "expected.json")) as f:
        prompts = [p["token_ids"] for p in json.load(f)["prompts"][:3]]
    failures = []
    with tempfile.TemporaryDirectory() as work:
        cpu = Server(args, work, "cpu", "cpu", "auto", "f32", False)
        want = cpu.complete_all(prompts)
        cpu_echo = cpu.echo_all(prompts)
        cpu_exit = cpu.stop()
        if cpu_exit != 0:
            failures.append(f"the CPU server exited {cpu_exit} on SIGTERM")

        gpu = Server(args, work, "gpu", args.device, args.dtype, args.dtype, args.emulated)
        t0 = time.time()
        got = gpu.complete_all(prompts)
        seconds = time.time() - t0
        status, metrics = http(gpu.port, "/metrics")
        gpu_echo = gpu.echo_all(prompts)
        gpu_exit = gpu.stop()
        if gpu_exit != 0:
            failures.append(f"the GPU server exited {gpu_exit} on SIGTERM")
        log = gpu.log_text()

    # Prompt logprobs: each position (the first has none) within the logprob tolerance.
    echo_rows = []
    jobs = [(m, i) for m in MODELS for i in range(len(prompts))]
    for (model, i), g, w in zip(jobs, gpu_echo, cpu_echo):
        if not isinstance(g[0], list) or not isinstance(w[0], list):
            failures.append(f"echo {model} prompt {i}: GPU {g}, CPU {w}")
            continue
        if g[0] != w[0] or g[1][0] is not None or len(g[1]) != len(prompts[i]):
            failures.append(f"echo {model} prompt {i}: tokens {g[0]} vs the CPU's {w[0]}")
            continue
        diff = max(abs(a - b) for a, b in zip(g[1][1:], w[1][1:]))
        echo_rows.append({"model": model, "prompt": i, "max_logprob_diff": round(diff, 5)})
        if diff > LOGPROB_TOL:
            failures.append(f"echo {model} prompt {i}: prompt logprobs differ by {diff:.4f}")
    for line in START_LINES:
        if line not in log:
            failures.append(f"no `{line}` in the GPU server's log")
    blocks = None
    for line in log.splitlines():
        if "KV cache pool (GPU memory plan)" in line and "num_gpu_blocks=" in line:
            blocks = line.split("num_gpu_blocks=")[1].split()[0]
    info = [l for l in metrics.splitlines() if l.startswith("caduceus_cache_config_info")]
    if status != 200 or not any(f'num_gpu_blocks="{blocks}"' in l for l in info):
        failures.append(f"/metrics cache_config_info {info} vs the logged num_gpu_blocks={blocks}")
    for doctor in ["doctor-a", "doctor-b"]:
        if not any(
            l.startswith("caduceus_lora_generation_tokens_total")
            and f'"{doctor}"' in l
            and l.endswith(f" {3 * MAX_TOKENS}")
            for l in metrics.splitlines()
        ):
            failures.append(f"{doctor} did not generate {3 * MAX_TOKENS} tokens on the device")

    rows = []
    jobs = [(m, i) for m in MODELS for i in range(len(prompts))]
    for (model, i), g, w in zip(jobs, got, want):
        gc, wc = g["choices"][0], w["choices"][0]
        gl, wl = gc["logprobs"]["token_logprobs"], wc["logprobs"]["token_logprobs"]
        agree = 0
        for a, b in zip(gc["logprobs"]["tokens"], wc["logprobs"]["tokens"]):
            if a != b:
                break
            agree += 1
        margin = tie_margin(gc["logprobs"]["tokens"], wc["logprobs"], agree)
        # Logprobs compared where both picked the same tokens (after a tie the contexts differ).
        diff = max((abs(a - b) for a, b in zip(gl[:agree], wl[:agree])), default=0.0)
        row = {
            "model": model,
            "prompt": i,
            "text_equal": gc["text"] == wc["text"],
            "tokens_agree": agree,
            "tie_at": agree if margin is not None else None,
            "cpu_margin": None if margin is None else round(margin, 5),
            "max_logprob_diff": round(diff, 5),
            "completion_tokens": g["usage"]["completion_tokens"],
        }
        rows.append(row)
        if agree != MAX_TOKENS and margin is None:
            failures.append(f"{model} prompt {i}: {agree}/{MAX_TOKENS} tokens as the CPU server's")
        if agree == MAX_TOKENS and not row["text_equal"]:
            failures.append(f"{model} prompt {i}: the same tokens but not the same text")
        if diff > LOGPROB_TOL or len(gl) != MAX_TOKENS:
            failures.append(f"{model} prompt {i}: logprobs differ by {diff:.4f} (> {LOGPROB_TOL})")
        if g["usage"]["completion_tokens"] != MAX_TOKENS:
            failures.append(f"{model} prompt {i}: {g['usage']['completion_tokens']} tokens")

    summary = {
        "device": args.device,
        "dtype": args.dtype,
        "emulated": args.emulated,
        "num_gpu_blocks": blocks,
        "completions_seconds": round(seconds, 2),
        "echo_with_logprobs": echo_rows,
        "rows": rows,
        "failures": failures,
        "pass": not failures,
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if failures:
        print("serve parity FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        print(log[-4000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
