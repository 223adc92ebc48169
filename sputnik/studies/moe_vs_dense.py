"""Study `moe_vs_dense`: where DeepSeekMoE pays against a dense model of equal active parameters, per
FLOP and per second, on this hardware.

Data, made once under <project>/studies/data (each step ledgered; the mtp study shares it): a diverse procedural corpus
(`sputnik data generate`, @diverse: the built-in tasks with worked traces and 75 reasoning-gym
datasets, training-split problems only), a tokenizer fitted on a sample of it, and its token shards
(`sputnik data tokenize`, 1% of documents held out by hash). Arms, for every size in `sizes`
(width x depth) and every token budget in `tokens`, pretrained from scratch on the same shards:

    moe      DeepSeekMoE: MLA, `experts` fine-grained routed experts (top-2) + 1 shared, the first
             layer dense, aux-loss-free balancing; trained on the budget's tokens
    dense    its dense twin of the MoE's active parameters (compare.dense_twin), trained for the MoE's
             FLOPs (asserted from the ledger); `twin` picks which: mla (the default: the MoE's own
             model with every FFN dense, so the two differ in the FFN only, as in DeepSeekMoE's own
             ablations; its runs are named dense_mla) or llama (same width, depth, heads and
             vocabulary, multi-head attention and so a narrower FFN: attention differs too)

and, at `granularity_size` and the largest budget, MoE variants at the default MoE's FLOPs: half and
twice the routed experts (same expert width and top-k: same active parameters), no shared expert.
At the largest budget every size's two arms also train at each learning rate of `lr_sweep` (seed 0;
the dense twin at its MoE's FLOPs), and the crossover compares each arm at its own best learning rate
(the lowest seed-0 held-out loss): one shared rate can favour one architecture.

Measured: held-out loss (the shards' held-out split, the same batches for every arm), downstream
accuracy (held-out test-split problems of `eval_tasks`, few-shot: two solved training problems, then
the problem; the model writes until a blank line and its "Answer:" line is verified), FLOPs and
wall-clock from the ledger. The crossover: at each size, the FLOPs (and seconds) the MoE needed to
reach its dense twin's final held-out loss at the largest budget, read off the MoE's own eval curve,
over the twin's; the log of that ratio fitted against the log of active parameters and solved for
0.7 (the issue's bar). Three seeds for the largest size at the largest budget, one elsewhere.

    sputnik study moe_vs_dense
    sputnik study moe_vs_dense --scale 0.05 --seeds 0 --project runs/smoke   # a smoke run
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sputnik.common import atomic_write_json, print0
from sputnik.config import add_config_args, build, config_from_args, knob, save_config
from sputnik.studies import runner as R

ARCHS = ("moe", "dense")
TWINS = {"llama": "Llama of the MoE's width, depth and heads (multi-head attention; a narrower FFN)",
         "mla": "the MoE's own DeepSeek-V3 model with every FFN dense (same MLA and norms: only the FFN differs)"}


@dataclass
class Config(R.StudyConfig):
    sizes: list[str] = knob(default_factory=lambda: ["48x2", "96x3", "144x4"], help="model sizes: hidden width x layers")
    tokens: list[float] = knob(default_factory=lambda: [5e5, 2e6], help="training-token budgets of the MoE arms")
    experts: int = knob(16, "routed experts of the MoE arms (top-2, one shared expert)", min=2)
    twin: str = knob("mla", "the dense arm: llama (multi-head attention, a narrower FFN) or mla (the MoE's model, "
                              "every FFN dense: only the FFN differs)", choices=["llama", "mla"])
    granularity_size: str = knob("96x3", "the size of the expert-count and shared-expert arms ('' = none)")
    corpus_mb: int = knob(48, "MB of generated corpus text", min=1)
    vocab_size: int = knob(2048, "tokenizer vocabulary (fitted on a sample of the corpus)", min=300)
    seq_len: int = knob(256, "tokens per packed window", min=16)
    batch_size: int = knob(16, "windows per step", min=1)
    lr: float = knob(3e-3, "peak learning rate (warmup 20 steps, cosine)", min=0.0)
    lr_sweep: list[float] = knob(default_factory=lambda: [1e-3, 1e-2],
                                 help="more peak learning rates for both arms at every size at the largest budget (seed 0); "
                                      "the crossover takes each arm at its best")
    evals: int = knob(8, "held-out loss evaluations per run (its eval curve)", min=1)
    eval_tasks: list[str] = knob(default_factory=lambda: ["addition:max_digits=6", "subtraction:max_digits=6",
                                                          "rg:chain_sum", "rg:gcd"],
                                 help="downstream tasks (few-shot held-out problems; all are in the corpus's mix)")
    eval_per_task: int = knob(50, "held-out problems per downstream task", min=1)


def parse_size(size: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m:
        raise ValueError(f"size {size!r}: expected WIDTHxLAYERS, e.g. 96x3")
    return int(m.group(1)), int(m.group(2))


def moe_model(size: str, vocab: int, seq_len: int, experts: int = 16, shared: int = 1) -> dict:
    """DeepSeekMoE of width d and depth L: 4 heads of d/4, MLA ranks d/2 and d/4, experts of width d/2."""
    d, layers = parse_size(size)
    return dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, first_k_dense_replace=1,
                intermediate_size=3 * d, moe_intermediate_size=d // 2, n_routed_experts=experts, num_experts_per_tok=2,
                n_shared_experts=shared, n_group=1, topk_group=1, num_attention_heads=4, q_lora_rank=d // 2,
                kv_lora_rank=d // 4, qk_nope_head_dim=d // 8, qk_rope_head_dim=2 * max(1, d // 32), v_head_dim=d // 8,
                num_nextn_predict_layers=0, max_position_embeddings=max(seq_len, 512))


def run(cfg: Config) -> dict:
    from sputnik.accounting.compare import dense_twin

    r = cfg.runner("moe_vs_dense")
    save_config(cfg, r.out / "study_config.json")
    shards, tokenizer, data_ids = build_data(cfg, r)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    budgets = sorted(cfg.tokens)
    largest = max(budgets)

    def pretrain(model: dict, steps: int, seed: int, lr: float = cfg.lr) -> dict:
        return dict(tokenizer=tokenizer, data=shards, tasks=[], model=model, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                    steps=steps, eval_every=max(1, steps // cfg.evals), eval_batches=8, checkpoint_every=steps,
                    log_every=50, seed=seed, progress=False, optim=dict(lr=lr, warmup_steps=20))

    def per_step(model: dict) -> float:
        from sputnik.model.accounting import flops_per_token
        from sputnik.model.config import ModelConfig

        return flops_per_token(build(ModelConfig, model), cfg.seq_len)["total"] * tokens_per_step

    twin_dir = "dense" if cfg.twin == "llama" else "dense_mla"
    for size in cfg.sizes:
        moe = moe_model(size, cfg.vocab_size, cfg.seq_len, cfg.experts)
        dense = dense_twin(moe, attention=cfg.twin)
        for budget in budgets:
            steps = max(1, round(budget * cfg.scale / tokens_per_step))
            for seed in (cfg.seeds if size == cfg.sizes[-1] and budget == largest else cfg.seeds[:1]):
                name = f"{size}/{budget:.0e}/seed{seed}"
                m = r.stage(f"{name}/moe", "pretrain", pretrain(moe, steps, seed), data_ids)
                d, ratio = r.stage_at_flops(f"{name}/{twin_dir}", "pretrain", pretrain(dense, steps, seed), m.flops,
                                            per_step(dense), data_ids)
                for arch, run_, model in (("moe", m, moe), ("dense", d, dense)):
                    add_row(r, cfg, run_, arch=arch, size=size, budget=budget, seed=seed, model=model, lr=cfg.lr,
                            tokenizer=tokenizer, compute_ratio=ratio if arch == "dense" else 1.0)
            for lr in (cfg.lr_sweep if budget == largest else []):
                seed, name = cfg.seeds[0], f"{size}/{budget:.0e}/seed{cfg.seeds[0]}/lr{lr:g}"
                m = r.stage(f"{name}/moe", "pretrain", pretrain(moe, steps, seed, lr), data_ids)
                d, ratio = r.stage_at_flops(f"{name}/{twin_dir}", "pretrain", pretrain(dense, steps, seed, lr), m.flops,
                                            per_step(dense), data_ids)
                for arch, run_, model in (("moe", m, moe), ("dense", d, dense)):
                    add_row(r, cfg, run_, arch=arch, size=size, budget=budget, seed=seed, model=model, lr=lr,
                            tokenizer=tokenizer, compute_ratio=ratio if arch == "dense" else 1.0)
            if size == cfg.granularity_size and budget == largest:
                seed = cfg.seeds[0]
                ref = next(x for x in r.rows if x["size"] == size and x["budget"] == budget and x["arch"] == "moe"
                           and x["seed"] == seed)
                for arch, model in ((f"moe {cfg.experts // 2} experts", moe_model(size, cfg.vocab_size, cfg.seq_len, cfg.experts // 2)),
                                    (f"moe {cfg.experts * 2} experts", moe_model(size, cfg.vocab_size, cfg.seq_len, cfg.experts * 2)),
                                    ("moe no shared expert", moe_model(size, cfg.vocab_size, cfg.seq_len, cfg.experts, shared=0))):
                    slug = arch.replace(" ", "_")
                    v, ratio = r.stage_at_flops(f"{size}/{budget:.0e}/seed{seed}/{slug}", "pretrain",
                                                pretrain(model, steps, seed), ref["flops"], per_step(model), data_ids)
                    add_row(r, cfg, v, arch=arch, size=size, budget=budget, seed=seed, model=model, tokenizer=tokenizer,
                            compute_ratio=ratio, lr=cfg.lr)
    return summarize(cfg, r)


def build_data(cfg, r: R.Runner) -> tuple[str, str, list[str]]:
    """The corpus, its tokenizer and its shards under <project>/studies/data/diverse-<MB>mb-v<vocab>
    (each skipped once made; shared by the studies that ask for the same) -> (shard dir, tokenizer
    dir, ledger ids of the runs that made them)."""
    from sputnik.corpus import generate, tokenize
    from sputnik.stages import tokenizer as tok_stage

    mb = max(1, round(cfg.corpus_mb * min(1.0, cfg.scale * 4)))
    data = r.project / "studies" / "data" / f"diverse-{mb}mb-v{cfg.vocab_size}"
    project = dict(project_dir=str(r.project))
    ids = generate.run(build(generate.Config, dict(out_dir=str(data / "corpus"), mb=mb, file_mb=16, seed=0,
                                                   workers=cfg.num_threads or 0, **project)))["run_ids"]
    tok_dir = data / "tokenizer"
    done = tok_dir / "DONE.json"
    if not done.is_file():
        res = tok_stage.run(build(tok_stage.Config, dict(out_dir=str(tok_dir), vocab_size=cfg.vocab_size, tasks=[],
                                                         corpus=[str(data / "corpus")], corpus_sample_mb=16, **project)),
                            parents=ids)
        atomic_write_json(done, res)
    ids = ids + json.loads(done.read_text())["run_ids"]
    ids += tokenize.run(build(tokenize.Config, dict(sources=[str(data / "corpus")], tokenizer=str(tok_dir),
                                                    out_dir=str(data / "shards"), workers=cfg.num_threads or 0,
                                                    unit_mb=16, **project)), parents=ids)["run_ids"]
    return str(data / "shards"), str(tok_dir), ids


def add_row(r: R.Runner, cfg: Config, run_: R.StageRun, *, model: dict, tokenizer: str, **row) -> None:
    from sputnik.model.accounting import param_counts
    from sputnik.model.config import ModelConfig

    counts = param_counts(build(ModelConfig, model))
    curve = [(m["flops"], m["eval_loss"]) for m in _metrics(run_) if "eval_loss" in m]
    acc = downstream_accuracy(r, run_, cfg, tokenizer)
    r.add(**row, flops=run_.flops, wall_s=run_.wall_s, heldout_loss=run_.result["final_eval_loss"],
          downstream=acc["mean"], per_task=acc["per_task"], params=counts["total"], active=counts["active"],
          steps=run_.result.get("steps"), curve=curve)


def _metrics(run_: R.StageRun) -> list[dict]:
    path = Path(run_.out_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def downstream_accuracy(r: R.Runner, run_: R.StageRun, cfg, tokenizer: str) -> dict:
    """Few-shot greedy accuracy on held-out problems of each eval task (cached in the run's directory,
    ledgered as study:moe_vs_dense:eval)."""
    out = Path(run_.out_dir) / "study_eval" / "downstream.json"
    if out.is_file() and not r._forced(run_.name):
        return json.loads(out.read_text())
    from sputnik.accounting.ledger import record_run
    from sputnik.common import set_threads
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.tasks import example_text
    from sputnik.train.loading import load_model, load_tokenizer

    set_threads(cfg.num_threads)
    tok = load_tokenizer(tokenizer)
    model = load_model(run_.model).eval()
    engine = Engine(model, tok)
    per_task = {}
    with record_run(r.project, r.command("eval"), dict(model=run_.model, tasks=cfg.eval_tasks), parents=run_.run_ids) as led:
        for spec in cfg.eval_tasks:
            task, problems, prompts = fewshot_prompts(spec, cfg.eval_per_task, tok)
            budget = max(len(tok.encode(example_text(e))) for e in problems) + 16
            params = SamplingParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=[tok.eot_id],
                                    stop_strings=("\n\n",))
            outs = engine.generate(prompts, params)
            hits = 0
            for e, (c,) in zip(problems, outs):
                m = re.search(r"Answer:\s*(.+)", c.text)
                hits += bool(m) and task.check_answer(e, m.group(1).strip())[0]
            per_task[spec] = hits / len(problems)
        res = dict(mean=sum(per_task.values()) / len(per_task), per_task=per_task, problems=cfg.eval_per_task)
        led.metrics.update(downstream_accuracy=res["mean"])
    atomic_write_json(out, res)
    return res


def fewshot_prompts(spec: str, n: int, tok):
    """(task, its first n held-out problems, their prompts): two solved training problems of the task
    in the corpus's text format, then the problem and a newline, tokenized."""
    from sputnik.tasks import example_text, parse_task

    task = parse_task(spec)
    problems = task.generate(n, split="test", seed=1)
    shots = "\n\n".join(example_text(e) for e in task.generate(2, split="train", seed=2)) + "\n\n"
    return task, problems, [tok.encode(shots + e.prompt + "\n") for e in problems]


# ---------------------------------------------------------------------------------------------
def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The FLOPs at which an eval curve first reaches `target` loss (log-linear interpolation between
    evaluations); None when it never does."""
    prev = None
    for f, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return f
            (f0, l0) = prev
            t = (l0 - target) / (l0 - loss)
            return math.exp(math.log(max(f0, 1.0)) + t * (math.log(f) - math.log(max(f0, 1.0))))
        prev = (f, loss)
    return None


def best_lr(rows: list[dict]) -> float | None:
    """The learning rate whose first-seed run ends with the lowest held-out loss (seed-0 runs only, so
    that the rate with three seeds is not favoured or penalised by its spread)."""
    if not rows:
        return None
    first = min(x.get("seed", 0) for x in rows)
    seeded = [x for x in rows if x.get("seed", 0) == first and x.get("lr") is not None]
    return min(seeded, key=lambda x: x["heldout_loss"])["lr"] if seeded else None


def crossover(cfg: Config, rows: list[dict]) -> dict:
    """Per size at the largest budget, each arm at its best learning rate: FLOPs and wall-clock ratios
    (MoE to reach the dense twin's final loss / dense), then log(ratio) ~ a + b·log(active params),
    solved for ratio 0.7."""
    largest = max(cfg.tokens)
    points = []
    for size in cfg.sizes:
        arms = {}
        for arch in ARCHS:
            runs = [x for x in rows if x["size"] == size and x["budget"] == largest and x["arch"] == arch]
            lr = best_lr(runs)
            arms[arch] = (lr, [x for x in runs if x.get("lr") == lr])
        (moe_lr, moe), (dense_lr, dense) = arms["moe"], arms["dense"]
        if not moe or not dense:
            continue
        target = sum(x["heldout_loss"] for x in dense) / len(dense)
        d_flops = sum(x["flops"] for x in dense) / len(dense)
        d_wall = sum(x["wall_s"] for x in dense) / len(dense)
        reach = [flops_to_reach(x["curve"], target) for x in moe]
        ok = [f for f in reach if f is not None]
        m_flops, m_wall = (sum(x["flops"] for x in moe) / len(moe)), (sum(x["wall_s"] for x in moe) / len(moe))
        ratio = (sum(ok) / len(ok)) / d_flops if len(ok) == len(reach) else None
        points.append(dict(size=size, active=moe[0]["active"], moe_lr=moe_lr, dense_lr=dense_lr, dense_loss=target, moe_loss=sum(x["heldout_loss"] for x in moe) / len(moe),
                           flops_ratio=ratio, flops_ratio_at_least=None if ratio else m_flops / d_flops,
                           wall_ratio=None if ratio is None else ratio * (m_wall / m_flops) / (d_wall / d_flops)))
    fit = {}
    usable = [p for p in points if p["flops_ratio"]]
    if len(usable) >= 2:
        xs = [math.log(p["active"]) for p in usable]
        ys = [math.log(p["flops_ratio"]) for p in usable]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        a = my - b * mx
        fit = dict(a=a, b=b, crossover_active=math.exp((math.log(0.7) - a) / b) if b < 0 else None)
    return dict(points=points, fit=fit)


def _largest_losses(cfg: Config, table: list[dict]) -> str:
    """'; at 144x4 (2e+06 tokens, lr 0.003): MoE 1.044 [1.022, 1.066] vs dense 1.073 [1.062, 1.083]': the
    held-out losses behind the headline's ratios, with their intervals, at the largest size and budget."""
    size, budget = cfg.sizes[-1], max(cfg.tokens)
    by = {e["arch"]: e["heldout_loss"] for e in table
          if (e["size"], e["budget"], e["lr"]) == (size, budget, cfg.lr) and e.get("heldout_loss")}
    if not all(arch in by for arch in ARCHS):
        return ""

    def loss(stat: dict) -> str:
        return f"{stat['mean']:.3f}" + ("" if math.isnan(stat["low"]) else f" [{stat['low']:.3f}, {stat['high']:.3f}]")
    return (f"; at {size} ({budget:.2g} tokens, lr {cfg.lr:g}, {len(by['moe']['per_seed'])} seeds): MoE "
            f"{loss(by['moe'])} vs dense {loss(by['dense'])}")


def summarize(cfg: Config, r: R.Runner) -> dict:
    table = R.aggregate(r.rows, ("size", "budget", "arch", "lr"), ("heldout_loss", "downstream"))
    cross = crossover(cfg, r.rows)
    lines = ["# Study: moe_vs_dense", "",
             f"Corpus: `sputnik data generate` @diverse, {cfg.corpus_mb} MB (scaled by --scale), tokenizer of "
             f"{cfg.vocab_size}; held-out loss on the shards' held-out split (8 batches of {cfg.batch_size}x{cfg.seq_len}); "
             f"downstream: few-shot greedy accuracy on {cfg.eval_per_task} held-out problems of each of {cfg.eval_tasks}. "
             f"Dense twin: {TWINS[cfg.twin]}; it trains for its MoE's FLOPs (ledger, ±5%). Cells: mean [95% t-interval over seeds] (each seed).", "",
             "| size | budget (MoE tokens) | arm | lr | params total / active | held-out loss | downstream acc | FLOPs | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        first = next(x for x in r.rows if (x["size"], x["budget"], x["arch"], x["lr"]) == (e["size"], e["budget"], e["arch"], e["lr"]))
        lines.append(f"| {e['size']} | {e['budget']:.2g} | {e['arch']} | {e['lr']:g} | {first['params'] / 1e6:.2f}M / {first['active'] / 1e6:.2f}M | "
                     f"{R.cell(e.get('heldout_loss'), '.3f')} | {R.cell(e.get('downstream'))} | {e['flops']['mean']:.3g} | "
                     f"{e['wall_s']['mean']:.0f} |")
    lines += ["", f"Crossover (largest budget, {max(cfg.tokens):.2g} tokens; each arm at its best learning rate): FLOPs and "
                  "wall-clock the MoE needed to reach its dense twin's final held-out loss, over the twin's (read off the "
                  "MoE's eval curve; > x: never reached, x = its whole budget over the twin's):", "",
              "| size | active params | lr MoE / dense | dense loss | MoE loss | FLOPs ratio | wall-clock ratio |",
              "|---|---|---|---|---|---|---|"]
    for p in cross["points"]:
        fr = f"{p['flops_ratio']:.2f}" if p["flops_ratio"] else f"> {p['flops_ratio_at_least']:.2f}"
        wr = f"{p['wall_ratio']:.2f}" if p["wall_ratio"] else "—"
        lines.append(f"| {p['size']} | {p['active'] / 1e6:.2f}M | {p['moe_lr']:g} / {p['dense_lr']:g} | {p['dense_loss']:.3f} | "
                     f"{p['moe_loss']:.3f} | {fr} | {wr} |")
    fit = cross["fit"]
    if fit.get("crossover_active"):
        verdict = (f"the fitted trend (log ratio = {fit['a']:.2f} {fit['b']:+.2f}·log active) reaches 0.7 at "
                   f"~{fit['crossover_active'] / 1e6:.2g}M active parameters")
    elif fit:
        verdict = f"the fitted trend (slope {fit['b']:+.2f} in log-log) does not fall towards 0.7 with size"
    else:
        verdict = "too few sizes where the MoE reached the dense loss to fit a trend"
    measured = [p for p in cross["points"] if p["flops_ratio"] and p["flops_ratio"] <= 0.7 and (p["wall_ratio"] or 9) <= 1.0]
    arm = f"its dense twin ({cfg.twin})"
    headline = (f"moe_vs_dense: the MoE reaches {arm}'s loss with ≤ 0.7× the FLOPs and ≤ 1× the wall-clock at "
                f"{', '.join(p['size'] for p in measured)}" if measured else
                f"moe_vs_dense: at no measured size does the MoE reach {arm}'s loss with ≤ 0.7× the FLOPs and "
                "≤ 1× the wall-clock") + f"; {verdict}" + _largest_losses(cfg, table)
    lines[1:1] = ["", f"**{headline}**"]
    lines += ["", "![held-out loss against compute](moe_vs_dense.png)", "", "![crossover](moe_vs_dense_crossover.png)"]
    series = [(f"{arch} {size}", [e for e in table if e["arch"] == arch and e["size"] == size and e["lr"] == cfg.lr])
              for size in cfg.sizes for arch in ARCHS]
    series += [(e["arch"] + f" {e['size']}", [e]) for e in table if e["arch"] not in ARCHS]
    R.plot(r.out / "moe_vs_dense.png", series, "heldout_loss", "held-out loss")
    plot_crossover(r.out / "moe_vs_dense_crossover.png", cross)
    rows = [{k: v for k, v in x.items() if k != "curve"} for x in r.rows]
    summary = dict(study="moe_vs_dense", table=table, crossover=cross, headline=headline, curves={
        f"{x['size']}/{x['budget']:.0e}/{x['arch']}/lr{x['lr']:g}/seed{x['seed']}": x["curve"] for x in r.rows})
    r.rows = rows
    path = R.write(r, summary, "\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"study moe_vs_dense: {path}")
    return summary


def plot_crossover(path: Path, cross: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    pts = [p for p in cross["points"] if p["flops_ratio"]]
    ax.scatter([p["active"] for p in pts], [p["flops_ratio"] for p in pts], label="measured (FLOPs)")
    cens = [p for p in cross["points"] if not p["flops_ratio"]]
    ax.scatter([p["active"] for p in cens], [p["flops_ratio_at_least"] for p in cens], marker="^",
               label="never reached (≥ its budget)")
    fit = cross["fit"]
    if fit:
        xs = [p["active"] for p in cross["points"]]
        lo, hi = min(xs) / 2, max(xs + [fit.get("crossover_active") or 0]) * 2
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.plot(grid, [math.exp(fit["a"] + fit["b"] * math.log(g)) for g in grid], "--", label="fit")
    ax.axhline(0.7, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("active parameters")
    ax.set_ylabel("MoE FLOPs to the dense loss / dense FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from sputnik.accounting.report import save_figure

    save_figure(fig, path)


def register(sub) -> None:
    p = sub.add_parser("moe_vs_dense", help="DeepSeekMoE vs a dense twin of equal active parameters: sizes x budgets, "
                                            "iso-FLOP, crossover fit", description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
