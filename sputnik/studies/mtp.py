"""Study `mtp`: what multi-token prediction buys at equal compute: held-out loss, downstream accuracy,
and the speed-up its module gives as a draft head at inference (DeepSeek-V3 §2.2, §5.4.3: 85-90%
acceptance of the second token).

On the moe_vs_dense study's data (a diverse generated corpus, its tokenizer and shards, shared under
<project>/studies/data), one DeepSeekMoE size, pretrained from scratch with MTP depth D for each D in
`depths`. An MTP module costs FLOPs every step, so every arm is trained for the FLOPs of the depth-0
arm at `tokens` (asserted from the ledger): deeper arms take fewer steps. Measured per arm: held-out
next-token loss (the main head only, the shards' held-out split), few-shot downstream accuracy (as in
moe_vs_dense), and for D ≥ 1 self-speculative greedy decoding at batch 1 with the depth-1 module as
the draft (inference/speculative.py) on the downstream prompts: acceptance rate, tokens per main
forward, and wall-clock against plain batch-1 greedy decoding of the same prompts (alternated).

    sputnik study mtp
    sputnik study mtp --scale 0.05 --seeds 0 --project runs/smoke   # a smoke run
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sputnik.common import atomic_write_json, print0
from sputnik.config import add_config_args, build, config_from_args, knob, save_config
from sputnik.studies import moe_vs_dense as MVD
from sputnik.studies import runner as R


@dataclass
class Config(R.StudyConfig):
    size: str = knob("96x3", "model size: hidden width x layers (moe_vs_dense's DeepSeekMoE of that size)")
    depths: list[int] = knob(default_factory=lambda: [0, 1, 2], help="MTP depths compared")
    mtp_weight: float = knob(0.3, "λ, the MTP loss weight (V3: 0.3 for the first 10T tokens)", min=0.0)
    tokens: float = knob(2e6, "training tokens of the depth-0 arm (the others get its FLOPs)", min=1.0)
    experts: int = knob(16, "routed experts (top-2, one shared)", min=2)
    corpus_mb: int = knob(48, "MB of generated corpus text (the moe_vs_dense study's data)", min=1)
    vocab_size: int = knob(2048, "tokenizer vocabulary", min=300)
    seq_len: int = knob(256, "tokens per packed window", min=16)
    batch_size: int = knob(16, "windows per step", min=1)
    lr: float = knob(3e-3, "peak learning rate (warmup 20 steps, cosine)", min=0.0)
    evals: int = knob(8, "held-out loss evaluations per run", min=1)
    eval_tasks: list[str] = knob(default_factory=lambda: ["addition:max_digits=6", "subtraction:max_digits=6",
                                                          "rg:chain_sum", "rg:gcd"], help="downstream tasks")
    eval_per_task: int = knob(50, "held-out problems per downstream task", min=1)
    spec_prompts: int = knob(24, "prompts decoded at batch 1, plain and speculative, for the speed-up", min=1)


def run(cfg: Config) -> dict:
    from sputnik.model.accounting import flops_per_token
    from sputnik.model.config import ModelConfig

    r = cfg.runner("mtp")
    save_config(cfg, r.out / "study_config.json")
    shards, tokenizer, data_ids = MVD.build_data(cfg, r)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = max(1, round(cfg.tokens * cfg.scale / tokens_per_step))
    base = MVD.moe_model(cfg.size, cfg.vocab_size, cfg.seq_len, cfg.experts)

    def settings(depth: int, seed: int) -> dict:
        model = dict(base, num_nextn_predict_layers=depth, mtp_loss_weight=cfg.mtp_weight)
        return dict(tokenizer=tokenizer, data=shards, tasks=[], model=model, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                    steps=steps, eval_every=max(1, steps // cfg.evals), eval_batches=8, checkpoint_every=steps,
                    log_every=50, seed=seed, progress=False, optim=dict(lr=cfg.lr, warmup_steps=20))

    for seed in cfg.seeds:
        ref = None
        for depth in sorted(cfg.depths):
            s = settings(depth, seed)
            if ref is None:
                run_, ratio = r.stage(f"seed{seed}/mtp{depth}", "pretrain", s, data_ids), 1.0
                ref = run_
            else:
                per_step = flops_per_token(build(ModelConfig, s["model"]), cfg.seq_len)["total"] * tokens_per_step
                run_, ratio = r.stage_at_flops(f"seed{seed}/mtp{depth}", "pretrain", s, ref.flops, per_step, data_ids)
            acc = MVD.downstream_accuracy(r, run_, cfg, tokenizer)
            spec = speculative_speedup(r, run_, cfg, tokenizer) if depth >= 1 else {}
            r.add(arm=f"MTP depth {depth}", depth=depth, seed=seed, flops=run_.flops, wall_s=run_.wall_s,
                  steps=run_.result.get("steps"), compute_ratio=ratio, heldout_loss=run_.result["final_eval_loss"],
                  downstream=acc["mean"], per_task=acc["per_task"], **spec)
    return summarize(cfg, r)


def speculative_speedup(r: R.Runner, run_: R.StageRun, cfg: Config, tokenizer: str) -> dict:
    """Greedy batch-1 decoding of the first spec_prompts downstream prompts, plain (Engine) and with
    the MTP module drafting, alternated prompt by prompt; the outputs must agree (greedy is exact)."""
    out = Path(run_.out_dir) / "study_eval" / "speculative.json"
    if out.is_file() and not r._forced(run_.name):
        return json.loads(out.read_text())
    from sputnik.common import set_threads
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.inference.speculative import speculative_generate
    from sputnik.train.loading import load_model, load_tokenizer

    set_threads(cfg.num_threads)
    tok = load_tokenizer(tokenizer)
    model = load_model(run_.model).eval()
    engine = Engine(model, tok)
    prompts = [p for spec in cfg.eval_tasks for p in MVD.fewshot_prompts(spec, cfg.eval_per_task, tok)[2]]
    prompts = prompts[:: max(1, len(prompts) // cfg.spec_prompts)][: cfg.spec_prompts]
    params = SamplingParams(max_new_tokens=64, temperature=0.0, stop_token_ids=[tok.eot_id])
    plain_s = spec_s = 0.0
    drafted = accepted = forwards = generated = same = 0
    for i, p in enumerate(prompts):
        for first in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            if first == 0:
                plain = engine.generate([p], params)[0][0]
                plain_s += time.perf_counter() - t
            else:
                c, st = speculative_generate(model, p, params)
                spec_s += time.perf_counter() - t
                drafted, accepted = drafted + st.drafted, accepted + st.accepted
                forwards, generated = forwards + st.target_forwards, generated + st.generated_tokens
        same += c.token_ids == plain.token_ids
    res = dict(acceptance=accepted / max(drafted, 1), tokens_per_forward=generated / max(forwards, 1),
               speedup=plain_s / max(spec_s, 1e-9), spec_prompts=len(prompts), same_output=same / len(prompts))
    atomic_write_json(out, res)
    return res


def summarize(cfg: Config, r: R.Runner) -> dict:
    metrics = ("heldout_loss", "downstream", "acceptance", "tokens_per_forward", "speedup")
    table = R.aggregate(r.rows, ("arm",), metrics)
    lines = ["# Study: mtp", "",
             f"DeepSeekMoE {cfg.size} on the moe_vs_dense data ({cfg.corpus_mb} MB @diverse, vocabulary {cfg.vocab_size}); "
             f"every arm at the FLOPs of MTP depth 0 trained on {cfg.tokens:.2g} tokens (ledger, ±5%); λ = {cfg.mtp_weight}. "
             f"Held-out loss: the main head's next-token CE. Downstream: few-shot greedy accuracy, {cfg.eval_per_task} "
             f"held-out problems of each of {cfg.eval_tasks}. Speculative: greedy batch 1 on {cfg.spec_prompts} of those "
             "prompts, the depth-1 module drafting, against plain batch-1 greedy (alternated). Cells: mean [95% "
             "t-interval over seeds] (each seed).", "",
             "| arm | held-out loss | downstream acc | acceptance | tokens / main forward | speed-up | FLOPs | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['arm']} | {R.cell(e.get('heldout_loss'), '.3f')} | {R.cell(e.get('downstream'))} | "
                     f"{R.cell(e.get('acceptance'))} | {R.cell(e.get('tokens_per_forward'))} | {R.cell(e.get('speedup'))} | "
                     f"{e['flops']['mean']:.3g} | {e['wall_s']['mean']:.0f} |")
    by = {e["arm"]: e for e in table}
    headline = None
    if "MTP depth 0" in by and "MTP depth 1" in by:
        d0, d1 = by["MTP depth 0"], by["MTP depth 1"]
        diffs = R.paired(r.rows, "heldout_loss", dict(depth=1), dict(depth=0))
        interval = "" if diffs["low"] != diffs["low"] else f" [{diffs['low']:+.3f}, {diffs['high']:+.3f}]"  # NaN: one seed
        headline = (f"mtp ({cfg.size}, equal FLOPs, {len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)}): depth 1 − depth 0 held-out loss "
                    f"{diffs['mean']:+.3f}{interval}; downstream "
                    f"{d1['downstream']['mean']:.2f} vs {d0['downstream']['mean']:.2f}; as a draft: "
                    f"{d1['acceptance']['mean']:.0%} accepted, {d1['speedup']['mean']:.2f}x batch-1 wall-clock")
        lines[1:1] = ["", f"**{headline}**"]
    lines += ["", "![held-out loss against compute](mtp.png)"]
    R.plot(r.out / "mtp.png", [(e["arm"], [e]) for e in table], "heldout_loss", "held-out loss")
    summary = dict(study="mtp", table=table, headline=headline)
    path = R.write(r, summary, "\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"study mtp: {path}")
    return summary


def register(sub) -> None:
    p = sub.add_parser("mtp", help="MTP depth 0 vs 1 vs 2 at equal FLOPs: loss, downstream accuracy, speculative speed-up",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
