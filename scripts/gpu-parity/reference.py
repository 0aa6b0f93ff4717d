#!/usr/bin/env python3
"""Random ~1B Llama (GQA) + two random PEFT LoRA adapters, and transformers+peft reference outputs.

Runs ON the GPU machine (PyTorch, transformers, peft; no network). Writes under OUT:
  model/               HF safetensors (bf16), config.json
  adapters/doctor-a/   PEFT adapter, r=16 on all seven projections, B nonzero (bf16-rounded, saved f32)
  adapters/doctor-b/
  prompts.json         {"prompts": [{"token_ids": [...]}, ...]}
  torch.json           for dtype in f32, bf16 and key in base/doctor-a/doctor-b: per prompt
                       last-position logits (all vocab) and greedy tokens (no EOS stop)

Weights are rounded to bf16 before anything runs, so the f32 reference multiplies exactly the
numbers the bf16 files hold. Hidden layers use HF's init (std 0.02); the LM head is drawn with
std 0.1 so logits spread over several units (near-uniform logits would make greedy tokens a
coin toss in any precision).
"""
import argparse
import json
import os
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg, t0=[time.time()]):
    print(f"reference.py [{time.time() - t0[0]:6.1f} s] {msg}", flush=True)


def greedy(model, ids, n):
    """Last-position logits of the prompt and n greedy tokens (argmax, ties to the lowest id)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = out.logits[0, -1].float()
        first = logits.clone()
        tokens = []
        past = out.past_key_values
        for _ in range(n):
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            if len(tokens) == n:
                break
            out = model(input_ids=torch.tensor([[tok]], device=ids.device), past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
    return first, tokens


def write_tokenizer(model_dir, vocab):
    """A word-level tokenizer over the whole vocabulary: caduceus loads a model directory with its
    tokenizer, and a random model has none (the parity runs on token ids only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def run_all(model_dir, adapters, prompts, dtype, n, dev):
    try:
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    base = base.to(dev).eval()
    peft = PeftModel.from_pretrained(base, adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        peft.load_adapter(path, adapter_name=name)
    peft.eval()
    result = {}
    for key in ["base"] + [a[0] for a in adapters]:
        rows = []
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            if key == "base":
                with peft.disable_adapter():
                    logits, toks = greedy(peft, ids, n)
            else:
                peft.set_adapter(key)
                logits, toks = greedy(peft, ids, n)
            rows.append({"last_logits": [round(float(x), 5) for x in logits.cpu()], "greedy": toks})
        result[key] = rows
    del peft, base
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-lens", default="7,19,33,64")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dev = torch.device(a.device)
    os.makedirs(a.out, exist_ok=True)
    model_dir = os.path.join(a.out, "model")
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    write_tokenizer(model_dir, a.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e9:.2f} B parameters saved to {model_dir}")
    model.float()
    adapters = []
    for i, name in enumerate(["doctor-a", "doctor-b"]):
        torch.manual_seed(a.seed + 1 + i)
        lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights=False, bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(model, lcfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    # B nonzero and of a size that moves the logits by about a unit.
                    p.normal_(0.0, 0.02)
                if "lora_" in pname:
                    p.copy_(p.to(torch.bfloat16).float())
        path = os.path.join(a.out, "adapters", name)
        pm.save_pretrained(path)
        adapters.append((name, path))
        model = pm.unload()
    del model
    torch.cuda.empty_cache()
    log("adapters saved")
    g = torch.Generator().manual_seed(a.seed + 10)
    prompts = [torch.randint(3, a.vocab, (int(n),), generator=g).tolist() for n in a.prompt_lens.split(",")]
    with open(os.path.join(a.out, "prompts.json"), "w") as f:
        json.dump({"prompts": [{"token_ids": p} for p in prompts]}, f)
    ref = {"prompts": prompts, "torch": {}}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        ref["torch"][name] = run_all(model_dir, adapters, prompts, dtype, a.tokens, dev)
        log(f"torch {name} outputs done")
    import peft as peft_mod
    import transformers
    ref["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft_mod.__version__,
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    ref["shape"] = {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
                    "ffn": a.ffn, "vocab": a.vocab, "rank": a.rank, "parameters": n_params}
    with open(os.path.join(a.out, "torch.json"), "w") as f:
        json.dump(ref, f)
    log("wrote torch.json")


if __name__ == "__main__":
    main()
