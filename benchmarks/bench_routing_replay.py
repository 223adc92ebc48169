"""Routing replay (R3) on a forced sampler/trainer routing mismatch: how far the update's log-probs are
from the sampler's with the trainer's own routing and with the sampler's replayed.

    .venv/bin/python benchmarks/bench_routing_replay.py [--shift 0.05] [--layers 3] [--experts 8]

A DeepSeekMoE (width 32, the first layer dense, top-2) samples 8 rollouts of up to 12 tokens (T = 1)
with its routers' expert-selection bias shifted by N(0, shift²), recording each token's experts; the
bias is then restored. The weights are identical on both sides, only the routing differs, as when a
bf16 sampler and an fp32 trainer disagree near score ties. Rows: the share of (token, layer) pairs
whose own experts differ from the sampler's, and the mean |log p_trainer − log p_sampler| per
completion token, without and with replay, in the plain and the shared-prompt forward.

    .venv/bin/python benchmarks/bench_routing_replay.py --rollout-speed [--threads 2]

instead times what recording costs the rollouts: the tiny preset, 8 prompts x 8 samples x 64 tokens,
Engine.generate without recording, recording through our C decode step, and recording through the
torch step (the C step turned away), interleaved, medians of 3.
"""
from __future__ import annotations

import argparse

import torch

from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.model.routing_replay import replaying, routed_layers
from sputnik.rl.rollout import build_rollout_batch, logprobs, replay_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shift", type=float, default=0.05)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rollout-speed", action="store_true", help="time what recording costs the rollouts instead")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.rollout_speed:
        return rollout_speed(args.threads)
    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=64, hidden_size=32, num_hidden_layers=args.layers, first_k_dense_replace=1,
                             num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
                             n_routed_experts=args.experts, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_nextn_predict_layers=0,
                             max_position_embeddings=128, initializer_range=0.1)).eval()
    gates = routed_layers(model)
    torch.manual_seed(3)
    saved = [g.e_score_correction_bias.clone() for g in gates]
    for g in gates:
        g.e_score_correction_bias.copy_(args.shift * torch.randn(args.experts))
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    out = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5), num_samples=4,
                                 record_routing=True)
    for g, b in zip(gates, saved):
        g.e_score_correction_bias.copy_(b)
    rows = [(p, c) for p, row in zip(prompts, out) for c in row]
    batch = build_rollout_batch([p for p, _ in rows], [c.token_ids for _, c in rows], [c.logprobs for _, c in rows],
                                pad_id=0, routing=[c.routing for _, c in rows])
    mask = batch.completion_mask_BT
    gap = lambda lp: float(((lp - batch.sampler_logp_BT).abs() * mask).sum() / mask.sum())  # noqa: E731
    print("forward        own experts differ   |Δ log p| own routing   |Δ log p| replayed")
    for shared in (False, True):
        with torch.no_grad():
            with replaying(model, replay_layout(batch, shared), apply=False) as measured:
                free, _, _ = logprobs(model, batch, shared=shared)
            with replaying(model, replay_layout(batch, shared)):
                replayed, _, _ = logprobs(model, batch, shared=shared)
        print(f"{'shared-prompt' if shared else 'plain':14} {measured.mismatch:18.1%}   {gap(free):20.2e}   {gap(replayed):18.2e}")


def rollout_speed(threads: int) -> None:
    import statistics
    import time

    from sputnik.inference import deepseek_decode
    from sputnik.model.config import PRESETS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(PRESETS["tiny"]()).eval()
    prompts = torch.randint(0, model.config.vocab_size, (8, 10)).tolist()
    params, engine, supported = SamplingParams(max_new_tokens=64, temperature=1.0, seed=0), Engine(model), deepseek_decode.supported
    arms = {"no recording (C step)": (False, True), "recording through the C step": (True, True),
            "recording through the torch step": (True, False)}

    def run(record: bool, c_step: bool) -> float:
        deepseek_decode.supported = supported if c_step else (lambda m: False)
        try:
            t0 = time.perf_counter()
            engine.generate(prompts, params, num_samples=8, record_routing=record)
            return time.perf_counter() - t0
        finally:
            deepseek_decode.supported = supported

    times = {name: [] for name in arms}
    for r in range(4):  # the first round warms up
        for name, arm in arms.items():
            t = run(*arm)
            if r:
                times[name].append(t)
    for name, t in times.items():
        print(f"{name:34s} {statistics.median(t):.3f} s (64 rows x 64 tokens)")


if __name__ == "__main__":
    main()
